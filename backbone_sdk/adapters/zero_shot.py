"""Zero-shot classification and image-text similarity on any backbone with a text tower.

Works with every backbone whose spec has the ``"text"`` capability (``spec.has("text")``): the
capability's contract is ``embed(images)``, ``embed_text(texts)`` and ``logit_scale``, and for
sigmoid-trained models (SigLIP) a ``logit_bias``. Logits are
``exp(logit_scale) * cos(image, text) (+ logit_bias)``; probabilities are a softmax over the classes
for CLIP-style models and an independent sigmoid per class for models with a ``logit_bias``.
"""

from __future__ import annotations

from typing import Protocol, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone

__all__ = ["DEFAULT_TEMPLATES", "ZeroShotClassifier", "is_sigmoid", "similarity", "text_classifier"]

#: A small prompt ensemble in the style of the CLIP paper's ImageNet prompts.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a drawing of a {}.",
)


class _TextTower(Protocol):
    """What the ``"text"`` capability adds to a :class:`Backbone` (``logit_bias`` is optional)."""

    logit_scale: torch.Tensor

    def embed_text(self, texts: Sequence[str] | torch.Tensor) -> torch.Tensor: ...


def _require_text(backbone: Backbone) -> None:
    if not backbone.spec.has("text"):
        raise TypeError(
            f"{backbone.spec.name} has no text tower; zero-shot classification needs a backbone with a text tower "
            f"(e.g. {', '.join(n for n in _text_backbones()[:3])})."
        )


def _logits(backbone: Backbone, cosine: torch.Tensor) -> torch.Tensor:
    logits = cast(_TextTower, backbone).logit_scale.exp().float() * cosine
    bias = getattr(backbone, "logit_bias", None)
    return logits if bias is None else logits + bias.float()


def is_sigmoid(backbone: Backbone) -> bool:
    """Whether the backbone scores image-text pairs with a sigmoid (it has a ``logit_bias``), as SigLIP."""
    return getattr(backbone, "logit_bias", None) is not None


def _text_backbones() -> list[str]:
    from ..registry import get_spec, list_backbones

    return [n for n in list_backbones(include_test=False) if get_spec(n).has("text")]


@torch.no_grad()
def text_classifier(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                    batch_size: int = 256) -> torch.Tensor:
    """``[C, D]`` unit-norm class weights: the normalized mean of each class's normalized prompt embeddings."""
    _require_text(backbone)
    if not class_names:
        raise ValueError("class_names is empty")
    if any("{}" not in t for t in templates):
        raise ValueError("every template needs a '{}' placeholder for the class name")
    prompts = [t.format(c) for c in class_names for t in templates]
    tower = cast(_TextTower, backbone)
    chunks = [tower.embed_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    emb = F.normalize(torch.cat(chunks).float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


class ZeroShotClassifier(nn.Module):
    """``logits = exp(logit_scale) * normalize(embed(images)) @ class_weights.T (+ logit_bias)``.

    Text embeddings are computed once at construction (prompt ensembling) and cached as a buffer;
    call :meth:`set_classes` to change classes.
    """

    def __init__(self, backbone: Backbone, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("class_weights", torch.empty(0), persistent=False)
        self.set_classes(class_names, templates)

    def set_classes(self, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> None:
        self.class_names = list(class_names)
        self.class_weights = text_classifier(self.backbone, self.class_names, templates)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.backbone.embed(images).float(), dim=-1)
        return _logits(self.backbone, image @ self.class_weights.T.to(image.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, list[list[str]]]:
        """Top-``k`` probabilities ``[B, k]`` and class names per image (softmax over the classes; for
        sigmoid models such as SigLIP each class's own sigmoid probability)."""
        logits = self(images)
        probs = logits.sigmoid() if is_sigmoid(self.backbone) else logits.softmax(dim=-1)
        values, index = probs.topk(min(top_k, len(self.class_names)), dim=-1)
        return values, [[self.class_names[i] for i in row] for row in index.tolist()]


@torch.no_grad()
def similarity(backbone: Backbone, images: torch.Tensor, texts: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """Image-text logits ``[num_images, num_texts]`` (CLIP's / SigLIP's ``logits_per_image``); ``texts`` are
    strings or the backbone's token ids."""
    _require_text(backbone)
    image = F.normalize(backbone.embed(images).float(), dim=-1)
    tower = cast(_TextTower, backbone)
    text = F.normalize(tower.embed_text(texts if isinstance(texts, torch.Tensor) else list(texts)).float(), dim=-1)
    return _logits(backbone, image @ text.T)
