"""LLaVA-style multimodal LLMs: a backbone_sdk vision tower spliced into any transformers causal LM.

:class:`MultimodalLM` wraps an ``AutoModelForCausalLM``, its tokenizer, a
:class:`~backbone_sdk.adapters.vlm.VisionTower` and a projector. Every ``<image>`` placeholder in a
prompt is replaced, inside ``inputs_embeds``, by that image's projected tokens::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from backbone_sdk.adapters.vlm import VisionTower
    from backbone_sdk.integrations.llm import MultimodalLM

    lm = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B")
    mm = MultimodalLM(lm, AutoTokenizer.from_pretrained("Qwen/Qwen2-0.5B"),
                      VisionTower("clip_vitl14_336", weights="hub"), projector="mlp2x_gelu")
    loss = mm(prompt=["<image>\\nDescribe the image."], images=[[img]], answer=["A cat."]).loss
    ids = mm.generate(prompt="<image>\\nDescribe the image.", images=[img], max_new_tokens=32)

:func:`backbone_sdk.integrations.llava.llava_with_backbone` instead puts a backbone into
transformers' own ``LlavaForConditionalGeneration``. See docs/vlm.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..backbone import Backbone
from ..errors import CheckpointMismatchError
from ..adapters.vlm import VisionTower, build_projector, tower_from_config

__all__ = ["MultimodalLM", "ensure_image_token", "IMAGE_TOKEN", "IGNORE_INDEX"]

IMAGE_TOKEN = "<image>"
#: label of positions that do not count in the loss (transformers' convention)
IGNORE_INDEX = -100
CONFIG_NAME = "mm_config.json"
WEIGHTS_NAME = "mm_adapter.safetensors"


def ensure_image_token(tokenizer, token: str = IMAGE_TOKEN) -> int:
    """Id of ``token``, added to ``tokenizer`` as a special token if it is not one already.

    A special token is never split by the tokenizer, so each placeholder is exactly one id.
    The LM's embedding matrix need not grow: :class:`MultimodalLM` never looks that id up.
    """
    if token not in tokenizer.all_special_tokens and token not in tokenizer.get_added_vocab():
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
    if encoded != [token_id]:
        raise ValueError(f"the tokenizer splits {token!r} into {encoded}; it must map to one id ({token_id})")
    return token_id


def _as_list(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4 or isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]


def _normalize_batch(prompt, images, answer):
    """``(prompts, images per sample, answers or None)`` from single-sample or batched arguments."""
    if isinstance(prompt, str):
        return [prompt], [_as_list(images)], None if answer is None else [answer]
    prompts = list(prompt)
    if not prompts:
        raise ValueError("got an empty batch of prompts")
    if images is None:
        per_sample = [[] for _ in prompts]
    else:
        items = _as_list(images)
        if len(items) != len(prompts):
            raise ValueError(
                f"images must hold one entry per prompt ({len(prompts)}): an image, a list of images or "
                f"None/[] for a text-only sample; got {len(items)} entries"
            )
        per_sample = [_as_list(x) for x in items]
    if answer is not None:
        answer = [answer] if isinstance(answer, str) else list(answer)
        if len(answer) != len(prompts):
            raise ValueError(f"got {len(answer)} answers for {len(prompts)} prompts")
    return prompts, per_sample, answer


class MultimodalLM(nn.Module):
    """A transformers causal LM that reads images at ``<image>`` placeholders (LLaVA architecture).

    :param lm: any ``AutoModelForCausalLM`` (Llama, Qwen2, Mistral, Phi, GPT-2...).
    :param tokenizer: its tokenizer; ``image_token`` is added as a special token if absent.
    :param tower: a :class:`~backbone_sdk.adapters.vlm.VisionTower`, a backbone or a registered name
        (then a frozen tower with the LLaVA-1.5 defaults).
    :param projector: a :func:`~backbone_sdk.adapters.vlm.build_projector` name (``"mlp2x_gelu"``,
        ``"linear"``...) or a module mapping ``[..., tower.hidden_size]`` to the LM's hidden size.
    :param freeze_lm: turn off gradients of the LM (LLaVA's stage-1 pre-training trains the projector only).

    Batches: ``prompt`` is a string or a list; ``images`` holds, per prompt, an image, a list of
    images (one per placeholder, in order) or ``None``/``[]``; images are PIL images, ``uint8``
    arrays or normalized float tensors (see :meth:`VisionTower.prepare_images`). ``answer`` (optional)
    is appended to each prompt followed by the EOS token; only answer tokens carry labels, so the
    loss trains on the answer / caption. Image, prompt and padding positions get ``-100``.
    """

    def __init__(self, lm: nn.Module, tokenizer, tower: VisionTower | Backbone | str,
                 projector: str | nn.Module = "mlp2x_gelu", image_token: str = IMAGE_TOKEN, freeze_lm: bool = False):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.tower = tower if isinstance(tower, VisionTower) else VisionTower(tower)
        embedding = lm.get_input_embeddings()
        self.hidden_size = embedding.embedding_dim
        if isinstance(projector, str):
            self.projector_type = projector
            projector = build_projector(projector, self.tower.hidden_size, self.hidden_size)
            projector.to(embedding.weight.device)
        else:
            self.projector_type = None
        self.projector = projector
        self.image_token = image_token
        self.image_token_id = ensure_image_token(tokenizer, image_token)
        if freeze_lm:
            lm.requires_grad_(False)

    # -- inputs ----------------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str], answers: Sequence[str | None] | None):
        """Token ids per sample and the number of prompt ids (answers follow, with EOS)."""
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        ids, prompt_lengths = [], []
        for i, prompt in enumerate(prompts):
            seq = list(tok(prompt, add_special_tokens=True)["input_ids"])
            prompt_lengths.append(len(seq))
            text = answers[i] if answers is not None else None
            if text is not None:
                answer = list(tok(text, add_special_tokens=False)["input_ids"])
                if self.image_token_id in answer:
                    raise ValueError(f"answer {i} contains {self.image_token!r}; images go in the prompt")
                seq += answer + ([eos] if eos is not None else [])
            ids.append(seq)
        return ids, prompt_lengths

    def _check_counts(self, ids, images):
        for i, (seq, imgs) in enumerate(zip(ids, images)):
            count = seq.count(self.image_token_id)
            if count != len(imgs):
                raise ValueError(
                    f"prompt {i} has {count} {self.image_token!r} placeholder(s) but {len(imgs)} image(s) were given "
                    f"for it; put exactly one {self.image_token!r} in the prompt per image, in order."
                )

    def image_features(self, images) -> torch.Tensor | list[torch.Tensor]:
        """Projected image tokens ``[n_images, tower.num_tokens(), lm hidden size]``; for a tower
        that gives each image its own count (NaFlex on raw images) a list of ``[N_i, hidden size]``."""
        flat, counts = self._image_tokens(images)
        if isinstance(counts, int):
            return flat.reshape(-1, counts, flat.shape[-1])
        return list(flat.split(counts))

    def _image_tokens(self, images) -> tuple[torch.Tensor, int | list[int]]:
        """``(projected tokens of all images [T, hidden], tokens per image)``; the count is an int for
        fixed-size towers (projected in their ``[n, N, D]`` shape, as always), a list otherwise."""
        feats = self.tower(images)
        ref = next(self.projector.parameters(), None)
        if isinstance(feats, torch.Tensor):
            feats = self.projector(feats.to(ref.dtype) if ref is not None else feats)
            return feats.reshape(-1, feats.shape[-1]), feats.shape[1]
        counts = [len(f) for f in feats]
        flat = torch.cat(list(feats))
        return self.projector(flat.to(ref.dtype) if ref is not None else flat), counts

    def embed_inputs(self, prompt, images=None, answer=None, padding_side: str = "right") -> dict[str, Any]:
        """``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``labels`` (``None`` without
        answers) for the LM; ``padding_side="left"`` for generation.

        Position ids count real tokens only, so a sample gets the same positions in any batch.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        prompts, per_sample, answers = _normalize_batch(prompt, images, answer)
        ids, prompt_lengths = self._encode(prompts, answers)
        self._check_counts(ids, per_sample)
        flat = [img for imgs in per_sample for img in imgs]
        feats, counts = self._image_tokens(flat) if flat else (None, 0)
        embeds, mask, labels = self._splice(ids, prompt_lengths, feats, counts, padding_side)
        position_ids = (mask.cumsum(1) - 1).clamp_(min=0)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids,
                "labels": labels if answers is not None else None}

    def _splice(self, ids: list[list[int]], prompt_lengths: list[int], feats, counts, padding_side: str):
        """Expand each placeholder into its image's tokens, all samples at once (no per-token loop).

        ``feats``: every image's tokens ``[T, hidden]``, image after image in placeholder order (``None``
        without images); ``counts``: tokens per image, an int (all alike) or one per image.
        """
        embedding = self.lm.get_input_embeddings()
        device = embedding.weight.device
        width_in = max(len(s) for s in ids)
        tokens = torch.tensor([s + [0] * (width_in - len(s)) for s in ids], dtype=torch.long).to(device)
        lengths = torch.tensor([len(s) for s in ids]).to(device)
        column = torch.arange(width_in, device=device)
        valid = column < lengths[:, None]
        is_image = valid & (tokens == self.image_token_id)
        is_text = valid & ~is_image
        n_images = int(is_image.sum())
        per_image = torch.as_tensor(counts, device=device).expand(n_images) if feats is not None else None
        n_image = torch.zeros_like(tokens)
        if per_image is not None:  # placeholders in row-major order = the images' order in feats
            n_image[is_image] = per_image
        # each placeholder grows to its image's count; start[b, j] = where token j of sample b lands
        grow = torch.where(is_image, n_image, 1) * valid
        total = grow.sum(1)
        width = int(total.max())
        start = grow.cumsum(1) - grow
        first = (width - total) if padding_side == "left" else torch.zeros_like(total)
        start = start + first[:, None]

        text = embedding(tokens.masked_fill(~is_text, 0))
        # padding must be zeros, not garbage: masked positions still pass through the LM
        embeds = text.new_zeros(len(ids), width, text.shape[-1])
        embeds[is_text.nonzero()[:, 0], start[is_text]] = text[is_text]
        if feats is not None:  # two assignments, no concatenated copy: 2.7x faster at LLaVA sizes
            rows = is_image.nonzero()[:, 0].repeat_interleave(per_image)
            first_token = (per_image.cumsum(0) - per_image).repeat_interleave(per_image)
            offset = torch.arange(len(feats), device=device) - first_token  # token index within its image
            cols = start[is_image].repeat_interleave(per_image) + offset
            embeds[rows, cols] = feats.to(device=device, dtype=text.dtype)
        position = torch.arange(width, device=device)
        mask = ((position >= first[:, None]) & (position < (first + total)[:, None])).long()
        is_answer = is_text & (column >= torch.tensor(prompt_lengths, device=device)[:, None])
        labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long, device=device)
        labels[is_answer.nonzero()[:, 0], start[is_answer]] = tokens[is_answer]
        return embeds, mask, labels

    # -- model API -------------------------------------------------------------------------------
    def forward(self, prompt, images=None, answer=None, padding_side: str = "right", **lm_kwargs):
        """The LM's output (``.logits``, and ``.loss`` on the answer tokens when ``answer`` is given)."""
        inputs = self.embed_inputs(prompt, images, answer, padding_side)
        return self.lm(**inputs, **lm_kwargs)

    @torch.inference_mode()
    def generate(self, prompt, images=None, max_new_tokens: int = 32, **generate_kwargs) -> torch.Tensor:
        """New token ids ``[B, <= max_new_tokens]`` (decode with ``tokenizer.batch_decode``).

        The batch is left-padded; ``generate_kwargs`` go to ``lm.generate`` (``do_sample``, ``num_beams``...).
        """
        inputs = self.embed_inputs(prompt, images, padding_side="left")
        inputs.pop("labels")
        inputs.pop("position_ids")  # generate() derives the same ones from the mask and extends them
        tok = self.tokenizer
        generate_kwargs.setdefault("eos_token_id", tok.eos_token_id)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        generate_kwargs.setdefault("pad_token_id", pad)
        return self.lm.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)

    # -- saving ----------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`save_pretrained` writes: ``projector.*`` and the tower's trainable ``tower.*``."""
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state.update({f"tower.{k}": v for k, v in self.tower.trainable_state_dict().items()})
        return state

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the projector and the trainable tower parameters (LoRA, unfrozen blocks) as
        ``mm_adapter.safetensors`` plus ``mm_config.json``. The LM is saved with its own
        ``save_pretrained`` (it is yours: this wrapper never changes its weights or vocabulary)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        config = {"format": "backbone_sdk.multimodal_lm", "version": 1, "projector": self.projector_type,
                  "projector_in": self.tower.hidden_size, "projector_out": self.hidden_size,
                  "image_token": self.image_token, "tower": self.tower.config}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        return directory

    def load_adapter(self, directory: str | os.PathLike, strict: bool = True) -> None:
        """Load what :meth:`save_pretrained` wrote into this model's projector and tower.

        ``strict``: every saved key must exist here and every trainable tower tensor must be saved.
        """
        from safetensors.torch import load_file

        self._check_saved_config(directory)
        state = load_file(Path(directory) / WEIGHTS_NAME)
        projector = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
        tower = {k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")}
        self.projector.load_state_dict(projector, strict=strict)
        own = self.tower.backbone.state_dict()
        unexpected = sorted(k for k in tower if k not in own)
        missing = sorted(k for k in self.tower.trainable_state_dict() if k not in tower)
        if strict and (unexpected or missing):
            raise CheckpointMismatchError(
                f"{directory}: tower tensors do not match this tower ({self.tower.spec.name}, finetune="
                f"{self.tower.finetune}, lora={self.tower.lora}); missing {missing[:5]}, unexpected {unexpected[:5]}",
                missing=missing, unexpected=unexpected)
        self.tower.backbone.load_state_dict({k: v for k, v in tower.items() if k in own}, strict=False)

    def _check_saved_config(self, directory) -> None:
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            return
        config = json.loads(path.read_text())
        saved = (config.get("projector_in"), config.get("projector_out"))
        if saved != (self.tower.hidden_size, self.hidden_size):
            tower = config.get("tower", {})
            raise CheckpointMismatchError(
                f"{directory}: its projector maps {saved[0]} -> {saved[1]} (tower {tower.get('backbone')}, "
                f"select_layer={tower.get('select_layer')}), this model needs {self.tower.hidden_size} -> "
                f"{self.hidden_size} ({self.tower.spec.name}, select_layer={self.tower.select_layer}, LM hidden size "
                f"{self.hidden_size}); build the tower with the saved settings or use MultimodalLM.from_pretrained."
            )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: nn.Module, tokenizer, *,
                        tower: VisionTower | None = None, tower_weights: Any = None,
                        projector: nn.Module | None = None, strict: bool = True,
                        freeze_lm: bool = False) -> "MultimodalLM":
        """Rebuild a model saved with :meth:`save_pretrained` around ``lm`` and ``tokenizer``.

        The tower is rebuilt from the saved config with the backbone weights ``tower_weights``
        (e.g. ``"hub"``; frozen weights are not in the adapter file), unless ``tower`` is given.
        A custom projector module must be passed as ``projector``.
        """
        config = json.loads((Path(directory) / CONFIG_NAME).read_text())
        if tower is None:
            tower = tower_from_config(config["tower"], weights=tower_weights)
        if projector is None:
            if config["projector"] is None:
                raise ValueError(f"{directory} was saved with a custom projector module; pass projector=")
            projector = config["projector"]
        model = cls(lm, tokenizer, tower, projector=projector, image_token=config["image_token"], freeze_lm=freeze_lm)
        model.load_adapter(directory, strict=strict)
        return model


def __getattr__(name):  # deprecated location (one release): the LLaVA path has its own module
    if name in ("LlavaVisionShim", "llava_with_backbone"):
        import warnings

        from . import llava

        warnings.warn(f"backbone_sdk.integrations.llm.{name} moved to backbone_sdk.integrations.llava",
                      DeprecationWarning, stacklevel=2)
        return getattr(llava, name)
    raise AttributeError(name)
