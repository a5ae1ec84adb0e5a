"""Fine-tuning policies shared by every integration (Detectron2, mmseg, VLM): one meaning everywhere.

Policies (strings or :class:`FinetunePolicy`):

- ``"frozen"``: no parameter of the trunk gets gradients, the trunk stays in eval mode (dropout
  off, BatchNorm statistics fixed) and runs under ``torch.no_grad()``: no graph and no stored
  activations, even when the input requires grad (for gradients with respect to the input through a
  fixed network, use ``"none"`` and ``requires_grad_(False)`` instead). The neck
  (``Backbone.neck_modules()``, e.g. a plain ViT's simple feature pyramid) is not trunk: it stays trainable.
- ``"stages:N"`` (hierarchical nets) / ``"blocks:N"`` (plain ViTs, ``spec.plain``): freeze the stem
  and the first ``N`` groups of ``Backbone.stage_modules()``; ``stages:0`` freezes only the stem.
  Same numbering as mmseg's ``frozen_stages``; detectron2's ``FREEZE_AT = N + 1``. The unit must
  match the backbone (:func:`policy_for` writes the right one from a count).
- ``"none"``: train everything.

``norm_eval=True`` keeps every BatchNorm in eval mode while training (frozen statistics; the
affine weight and bias still train: mmseg's ``norm_eval``). ``frozen_norm=True`` also freezes
those affine parameters, which makes every BatchNorm a fixed per-channel scale and shift:
detectron2's ``FrozenBN``, the usual setting for detection with small per-GPU batches.
Both leave LayerNorms (ViT, Swin) alone.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs
from torch import nn

from ..backbone import Backbone
from ..errors import InvalidOptionError

__all__ = ["FinetunePolicy", "apply_finetune", "param_groups", "layer_id", "add_lora", "policy_for", "unit_of"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def unit_of(spec) -> str:
    """``"blocks"`` for plain ViTs (``spec.plain``), else ``"stages"``: the word policies use."""
    return "blocks" if spec.plain else "stages"


def policy_for(spec, frozen: int) -> "FinetunePolicy":
    """Freeze the stem and the first ``frozen`` groups (``-1``: nothing) in the unit of ``spec``."""
    if frozen < 0:
        return FinetunePolicy("none")
    return FinetunePolicy(unit_of(spec), frozen)


def __getattr__(name):  # deprecated module attributes (one release)
    if name == "NO_DECAY_PATTERN":
        import warnings

        warnings.warn("NO_DECAY_PATTERN is deprecated: each backbone names its own parameters in "
                      "Backbone.no_weight_decay()", DeprecationWarning, stacklevel=2)
        return re.compile(r"position_embedding|pos_embed|cls_token|class_embedding|register|mask_token|"
                          r"distillation_token|relative_position_bias_table|logit_scale")
    raise AttributeError(name)


@attrs.frozen
class FinetunePolicy:
    """Which parts of a backbone train. Parse strings with :meth:`parse`."""

    mode: str = attrs.field(validator=attrs.validators.in_(("none", "frozen", "stages", "blocks")))
    n: int = 0
    norm_eval: bool = False
    frozen_norm: bool = False

    @classmethod
    def parse(cls, policy: "str | FinetunePolicy | None", norm_eval: bool = False,
              frozen_norm: bool = False) -> "FinetunePolicy":
        if isinstance(policy, FinetunePolicy):
            return attrs.evolve(policy, norm_eval=policy.norm_eval or norm_eval,
                                frozen_norm=policy.frozen_norm or frozen_norm)
        if policy is not None and not isinstance(policy, str):
            raise InvalidOptionError(f"fine-tune policy must be a string ('frozen', 'stages:N', 'blocks:N', 'none') or "
                                     f"a FinetunePolicy, got {policy!r} ({type(policy).__name__})")
        text = (policy or "none").strip().lower()
        mode, _, count = text.partition(":")
        if mode in ("stages", "blocks"):
            if not count.isdigit():
                raise InvalidOptionError(f"fine-tune policy {policy!r}: write '{mode}:N' with N >= 0, e.g. '{mode}:1'")
            return cls(mode, int(count), norm_eval, frozen_norm)
        if mode in ("none", "frozen") and not count:
            return cls(mode, 0, norm_eval, frozen_norm)
        raise InvalidOptionError(f"unknown fine-tune policy {policy!r}; use 'frozen', 'stages:N', 'blocks:N' or 'none'")


def frozen_modules(backbone: Backbone, policy: FinetunePolicy) -> list[nn.Module]:
    """The modules ``policy`` freezes, in depth order."""
    if policy.mode == "frozen":
        return backbone.trunk_modules()
    if policy.mode in ("stages", "blocks"):
        unit = unit_of(backbone.spec)
        if policy.mode != unit:
            kind = "a plain ViT with blocks" if backbone.spec.plain else "a hierarchical network with stages"
            raise InvalidOptionError(f"fine-tune policy '{policy.mode}:{policy.n}': {backbone.spec.name} is {kind}; "
                                     f"use '{unit}:{policy.n}'.")
        groups = backbone.stage_modules()
        if policy.n > len(groups) - 1:
            raise InvalidOptionError(
                f"fine-tune policy '{policy.mode}:{policy.n}': {backbone.spec.name} has a stem and "
                f"{len(groups) - 1} {policy.mode} ({unit}:0 .. {unit}:{len(groups) - 1}); cannot freeze {policy.n}. "
                f"Use 'frozen' to freeze everything."
            )
        return groups[: policy.n + 1]
    return []


def apply_finetune(backbone: Backbone, policy="none", norm_eval: bool = False, frozen_norm: bool = False) -> Backbone:
    """Apply a fine-tune policy in place (idempotent; re-applying resets earlier choices)."""
    policy = FinetunePolicy.parse(policy, norm_eval, frozen_norm)
    for p in backbone.parameters():
        p.requires_grad_(True)
    bns = [m for m in backbone.modules() if isinstance(m, _BN)]
    frozen = frozen_modules(backbone, policy) + (bns if policy.frozen_norm else [])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    keep_eval = list(frozen)
    if policy.norm_eval:
        keep_eval += bns
    backbone.keep_eval = keep_eval
    backbone.trunk_no_grad = policy.mode == "frozen"
    backbone.finetune_policy = policy
    backbone.train(backbone.training)
    return backbone


def layer_id(backbone: Backbone, groups: list[nn.Module] | None = None) -> dict[str, int]:
    """Parameter name → depth index (0 = stem); parameters outside every group get ``len(groups)``."""
    groups = backbone.stage_modules() if groups is None else groups
    owner = {id(p): i for i, g in enumerate(groups) for p in g.parameters()}
    return {name: owner.get(id(p), len(groups)) for name, p in backbone.named_parameters()}


def param_groups(backbone: Backbone, lr: float, layer_decay: float = 1.0, weight_decay: float = 0.0,
                 extra_no_decay: Iterable[str] = ()) -> list[dict]:
    """Optimizer parameter groups with layer-wise LR decay: ``lr * layer_decay ** (depth - layer)``.

    Norm weights, biases, position embeddings and special tokens get no weight decay. Frozen
    parameters are left out.
    """
    ids = layer_id(backbone)
    depth = max(ids.values()) if ids else 0
    named = backbone.no_weight_decay()
    extra = re.compile("|".join(extra_no_decay)) if extra_no_decay else None
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in named and not (extra and extra.search(name))
        key = (ids[name], decay)
        if key not in groups:
            scale = layer_decay ** (depth - ids[name])
            groups[key] = {"params": [], "names": [], "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": weight_decay if decay else 0.0, "layer_id": ids[name]}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


_LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|query|key|value|qkv)$"


def add_lora(backbone: Backbone, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: str | list[str] | None = None) -> Backbone:
    """Inject LoRA adapters (via ``peft``) into the attention projections; only LoRA weights train.

    The backbone keeps its class and interface; its neck (if any) stays trainable.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ImportError("LoRA needs peft: pip install 'backbone-sdk[vlm]' (or pip install peft)") from exc
    targets = target_modules or _LORA_TARGETS
    if isinstance(targets, str) and not any(
        isinstance(m, nn.Linear) and re.fullmatch(targets, n) for n, m in backbone.named_modules()
    ):
        raise ValueError(f"{backbone.spec.name} has no attention projections matching {targets!r} for LoRA")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(config, backbone)
    backbone.trunk_no_grad = False  # LoRA weights inside a frozen trunk need its graph
    neck = {id(p) for m in backbone.neck_modules() for p in m.parameters()}
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name or id(p) in neck)
    return backbone


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def grads_enabled(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


