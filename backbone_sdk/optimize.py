"""Inference optimization of a backbone: what :meth:`Backbone.optimize` changes, and its undo.

Each step is opt-in or only applied where it is exact up to float rounding, and every change is
recorded in an :class:`OptimizationReport` whose :meth:`~OptimizationReport.undo` puts the module
back as it was (the original parameters, not a lossy re-cast):

- **BatchNorm folding**: each ``Conv2d -> BatchNorm2d`` pair the family names
  (:meth:`Backbone.norm_folding_pairs`) becomes one convolution with the norm's scale and shift in
  its weights, when that norm is in eval mode. The backbone then refuses ``train()`` until undone:
  training keeps real BatchNorm.
- **channels_last** for families that declare ``prefers_channels_last`` (convolutional nets): the
  4-D weights switch memory format, so oneDNN runs its NHWC kernels whatever the input layout.
- **dtype**: a one-time cast of the weights (e.g. ``torch.bfloat16``); inputs must then come in
  that dtype (the backbone says so otherwise), as after ``module.to(dtype)``.
- **compile** (opt-in): ``embed``, ``features`` and ``pyramid`` become ``torch.compile`` d
  functions, with inductor's weight freezing for inference; the compile time is measured when an
  ``example`` batch is given.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable

import attrs
import torch
from torch import nn

from .errors import InvalidOptionError

if TYPE_CHECKING:
    from .backbone import Backbone

__all__ = ["OptimizationReport", "fold_batchnorm", "COMPILED_METHODS"]

#: the entry points ``optimize(compile=True)`` compiles
COMPILED_METHODS = ("embed", "features", "pyramid")


def fold_batchnorm(pairs: Iterable[tuple[nn.Module, str, str]]) -> list[tuple[nn.Module, str, str, nn.Module, nn.Module]]:
    """Fold every eval-mode ``BatchNorm2d`` into the convolution before it.

    ``pairs``: ``(owner, conv_attr, norm_attr)`` with ``owner.<conv_attr>`` a ``Conv2d`` whose output
    goes straight into ``owner.<norm_attr>``. The convolution is replaced by the folded one (bias
    added) and the norm by ``nn.Identity``. Norms in training mode or of other types (e.g.
    detectron2's ``FrozenBatchNorm2d``) are left alone. Returns ``(owner, conv_attr, norm_attr,
    original conv, original norm)`` per folded pair, for undoing.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded: list[tuple[nn.Module, str, str, nn.Module, nn.Module]] = []
    for owner, conv_attr, norm_attr in pairs:
        conv, norm = getattr(owner, conv_attr), getattr(owner, norm_attr)
        if type(conv) is not nn.Conv2d or type(norm) is not nn.BatchNorm2d or norm.training or conv.training:
            continue
        if norm.running_mean is None or norm.running_var is None:
            continue  # batch statistics only: nothing to fold
        fused = fuse_conv_bn_eval(conv, norm)
        fused.weight.requires_grad_(conv.weight.requires_grad)
        if fused.bias is not None:
            fused.bias.requires_grad_(conv.weight.requires_grad)
        setattr(owner, conv_attr, fused)
        setattr(owner, norm_attr, nn.Identity())
        folded.append((owner, conv_attr, norm_attr, conv, norm))
    return folded


@attrs.define(eq=False)
class OptimizationReport:
    """What :meth:`Backbone.optimize` changed; :meth:`undo` restores the backbone.

    :ivar folded_norms: BatchNorm layers folded into their convolutions
    :ivar channels_last: whether the weights were switched to ``torch.channels_last``
    :ivar dtype: the weights' dtype after optimizing (``None``: unchanged)
    :ivar compiled: the methods replaced by compiled ones
    :ivar compile_seconds: time of the first compiled ``embed`` call on the ``example`` (else ``None``)
    """

    backbone: Backbone = attrs.field(repr=False)
    folded_norms: int = 0
    channels_last: bool = False
    dtype: torch.dtype | None = None
    compiled: tuple[str, ...] = ()
    compile_seconds: float | None = None
    _folded: list = attrs.field(factory=list, repr=False)
    _original_state: dict[str, torch.Tensor] | None = attrs.field(default=None, repr=False)
    undone: bool = False

    @property
    def changes(self) -> list[str]:
        """One line per change, for logs."""
        out = []
        if self.folded_norms:
            out.append(f"folded {self.folded_norms} BatchNorm layers into their convolutions")
        if self.channels_last:
            out.append("weights in channels_last memory format")
        if self.dtype is not None:
            out.append(f"weights cast to {self.dtype}")
        if self.compiled:
            seconds = f" (first call {self.compile_seconds:.1f} s)" if self.compile_seconds is not None else ""
            out.append(f"compiled {', '.join(self.compiled)} with torch.compile, inductor freezing{seconds}")
        return out

    def undo(self) -> None:
        """Put the backbone back as it was before :meth:`Backbone.optimize` (idempotent)."""
        if self.undone:
            return
        model = self.backbone
        for name in self.compiled:
            model.__dict__.pop(name, None)
        for owner, conv_attr, norm_attr, conv, norm in reversed(self._folded):
            setattr(owner, conv_attr, conv)
            setattr(owner, norm_attr, norm)
        if self._original_state is not None:
            with torch.no_grad():
                current = dict(model.named_parameters()) | dict(model.named_buffers())
                for key, value in self._original_state.items():
                    tensor = current[key]
                    tensor.data = value.to(tensor.device)
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)
        self.undone = True
        if model._optimization is self:
            model._optimization = None


def optimize(model: Backbone, *, dtype: torch.dtype | str | None = None, compile: bool = False,
             fold_norms: bool = True, channels_last: bool | None = None,
             example: torch.Tensor | None = None, compile_options: dict[str, Any] | None = None) -> OptimizationReport:
    """The implementation of :meth:`Backbone.optimize` (see there)."""
    if model._optimization is not None:
        model._optimization.undo()
    dtype = _dtype(dtype)
    report = OptimizationReport(model)
    if dtype is not None and dtype != _param_dtype(model):
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        report._original_state = {k: v.detach().clone() for k, v in tensors.items() if v.is_floating_point()}
    if fold_norms:
        report._folded = fold_batchnorm(model.norm_folding_pairs())
        report.folded_norms = len(report._folded)
    if channels_last if channels_last is not None else model.prefers_channels_last:
        model.to(memory_format=torch.channels_last)
        report.channels_last = True
    if report._original_state is not None:
        model.to(dtype)
        report.dtype = dtype
    model._optimization = report
    if compile:
        options = {"freezing": True, **(compile_options or {})}
        for name in COMPILED_METHODS:
            method = getattr(type(model), name).__get__(model)
            model.__dict__[name] = torch.compile(method, options=options)
        report.compiled = COMPILED_METHODS
        if example is not None:
            start = time.perf_counter()
            with torch.inference_mode():
                model.embed(example)
            report.compile_seconds = time.perf_counter() - start
    return report


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise InvalidOptionError(f"optimize(dtype={dtype!r}): use a torch dtype or one of {sorted(names)}")
    return names[dtype]


def _param_dtype(model: nn.Module) -> torch.dtype | None:
    ref = next(model.parameters(), None)
    return ref.dtype if ref is not None else None
