"""Helpers shared by the built-in plugins (not part of the public API)."""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.convert import has_keys, rename, split_qkv, strip_prefixes

__all__ = ["run", "hf_model", "read_hf_pretrained", "hf_checkpointing", "TextCheckpointing", "token_ids", "has_keys", "rename", "split_qkv",
           "strip_prefixes"]

SDPA = "sdpa"


def run(fn, x, checkpointed: bool, *args, owner: nn.Module | None = None):
    """Call ``fn(x, *args)``, recomputing it in backward when gradient checkpointing is on and
    backward will reach it: ``x`` requires grad, or ``owner`` (default ``fn``) has trainable
    parameters (the first unfrozen stage after a frozen stem gets an input without grad)."""
    if checkpointed and torch.is_grad_enabled() and (x.requires_grad or _trainable(owner or fn)):
        return checkpoint(fn, x, *args, use_reentrant=False)
    return fn(x, *args)


def _trainable(module) -> bool:
    return isinstance(module, nn.Module) and any(p.requires_grad for p in module.parameters())


def hf_model(model_cls, config, **kwargs) -> nn.Module:
    """Build a transformers model from a config with SDPA attention, randomly initialized."""
    config._attn_implementation = SDPA
    return model_cls(config, **kwargs)


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' loading reports (key tables, warnings) off stdout and out of the log."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)


def read_hf_pretrained(inner: nn.Module, directory: str, prefix: str = "model.") -> dict[str, torch.Tensor] | None:
    """State dict (keys under ``prefix``) of a transformers ``save_pretrained`` directory read through
    ``type(inner).from_pretrained``, which also renames keys of older transformers versions.

    Keys ``from_pretrained`` had to initialize are dropped, so strict loading reports them as
    missing; keys of modules the backbone does not use (poolers, heads) are ignored.
    """
    from transformers import PreTrainedModel

    if not isinstance(inner, PreTrainedModel):
        return None
    with _quiet_transformers():
        loaded, info = type(inner).from_pretrained(directory, config=inner.config, output_loading_info=True)
    logging.getLogger(__name__).debug("transformers loading info for %s: %s", directory, info)
    absent = set(info.get("missing_keys", ())) | {m[0] if isinstance(m, tuple) else m
                                                 for m in info.get("mismatched_keys", ())}
    ours = inner.state_dict()
    return {f"{prefix}{k}": v for k, v in loaded.state_dict().items() if k in ours and k not in absent}


def hf_checkpointing(module: nn.Module, enable: bool) -> None:
    """Switch transformers' own activation checkpointing of ``module`` (a text tower) on or off."""
    if not hasattr(module, "activation_checkpointing_enable"):  # transformers < 5.x
        if enable:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_disable()
    elif enable:
        module.activation_checkpointing_enable()
    else:
        module.activation_checkpointing_disable()


def token_ids(name: str, texts, context_length: int, tokenize) -> torch.Tensor:
    """``[B, L]`` integer token ids from strings (through ``tokenize(list_of_texts)``) or from ids a
    caller made (``[L]`` or ``[B, L]``, ``L <= context_length``); anything else is a clear error."""
    if isinstance(texts, torch.Tensor):
        tokens = texts.unsqueeze(0) if texts.dim() == 1 else texts
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.shape[1] > context_length:
            raise ValueError(
                f"{name} takes token ids of shape [B, L] (integer, L <= {context_length}), got "
                f"{tuple(texts.shape)} {texts.dtype}; make them with model.tokenize(texts)."
            )
        return tokens
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("embed_text() needs at least one text")
    return tokenize(list(texts))


class TextCheckpointing:
    """Mixin for backbones whose ``self.model.text_model`` is a transformers text tower (or ``None``):
    gradient checkpointing covers the vision blocks (the base class) and the text blocks (transformers)."""

    text_checkpointing = False
    #: native-key prefixes of the text tower and its contrastive head
    text_key_prefixes = ("model.text_model.", "model.text_projection.", "model.logit_scale", "model.logit_bias")

    def unbuilt_key_prefixes(self) -> tuple[str, ...]:
        """A tower built without ``"text"`` ignores the text keys of a full checkpoint."""
        own = () if self.model.text_model is not None else self.text_key_prefixes
        return super().unbuilt_key_prefixes() + own  # type: ignore[misc]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        text = self.model.text_model
        if text is None or self.text_checkpointing == enable:
            return
        self.text_checkpointing = enable
        hf_checkpointing(text, enable)
