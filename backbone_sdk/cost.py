"""What a forward pass costs at a given size, before running it: FLOPs and activation memory.

The backbone is built and run on the meta device (no weights in memory, no arithmetic), under a
dispatch mode that sees every operator the forward calls: matrix products and convolutions are
counted with torch's own FLOP formulas (``torch.utils.flop_counter``), attention kernels of every
backend (including the CPU fused kernel, which ``FlopCounterMode`` does not count) with the
``4 * B * heads * Nq * Nk * d`` of their two matrix products, and the bytes of every tensor the
forward creates are tracked until it is freed, so the peak of live activations is known.
FLOPs follow torch's convention: one multiply-add counts 2.

    cost = estimate("vit_base_patch16_224", size=(1024, 1024))
    print(cost.gflops, cost.split, cost.activation_mb)

``attention`` FLOPs are the token-mixing products (``Q @ K^T`` and ``attn @ V``, whose cost grows
with the square of the tokens in one attention window); ``linear`` are the projections and MLPs;
``conv`` the convolutions (patch embeddings included).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from .backbone import Backbone
from .errors import InvalidOptionError
from .factory import create_backbone
from .registry import get_spec

__all__ = ["Cost", "estimate", "METHODS"]

METHODS = ("features", "embed", "pyramid")
_PATCH_LOCK = threading.Lock()
_aten = torch.ops.aten
_LINEAR = {_aten.mm, _aten.addmm, _aten._scaled_mm}
_BATCHED = {_aten.bmm, _aten.baddbmm}
_CONV = {_aten.convolution, _aten._convolution, _aten.convolution_overrideable, _aten._slow_conv2d_forward,
         _aten.cudnn_convolution}
#: attention kernels: (query, key, value) are their first three arguments
_SDPA = {getattr(_aten, n) for n in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                                       "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                                       "_flash_attention_forward", "_efficient_attention_forward")
         if hasattr(_aten, n)}


@attrs.frozen
class Cost:
    """Cost of one ``method`` call on a ``batch`` of ``size`` images."""

    name: str
    method: str
    size: tuple[int, int]
    batch: int
    params: int
    #: FLOPs by kind: ``attention``, ``linear``, ``conv`` (multiply-add = 2)
    flops: dict[str, int]
    #: tokens (positions) of each feature level: ``{name: h * w}``
    tokens: dict[str, int]
    #: peak bytes of tensors the forward created that were alive at once (inputs and weights excluded)
    activation_bytes: int
    #: bytes of the parameters and buffers
    weight_bytes: int
    dtype: str = "float32"

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    @property
    def gflops(self) -> float:
        return self.total_flops / 1e9

    @property
    def split(self) -> dict[str, float]:
        """Fraction of the FLOPs in each kind."""
        total = max(self.total_flops, 1)
        return {k: v / total for k, v in self.flops.items()}

    @property
    def activation_mb(self) -> float:
        return self.activation_bytes / 2**20

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data.update(total_flops=self.total_flops, gflops=self.gflops)
        return data


class _Meter(TorchDispatchMode):
    """Counts FLOPs by kind and the peak bytes of live tensors created under it."""

    def __init__(self):
        super().__init__()
        self.flops = {"attention": 0, "linear": 0, "conv": 0}
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors referring to it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func in _SDPA or packet in _SDPA:
            q, k, v = args[:3]
            if func.__name__.startswith(("_flash_attention_forward", "_efficient_attention_forward")):
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # these take [B, N, heads, d]
            self.flops["attention"] += sdpa_flop_count(q.shape, k.shape, v.shape)
        elif packet in _LINEAR or packet in _BATCHED or packet in _CONV:
            kind = "linear" if packet in _LINEAR else "attention" if packet in _BATCHED else "conv"
            self.flops[kind] += flop_registry[packet](*args, **kwargs, out_val=out)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


@contextlib.contextmanager
def _fused_attention_on_meta():
    """On the meta device ``F.scaled_dot_product_attention`` decomposes into its math form, which
    materializes the ``N x N`` attention matrix; real CPU and GPU runs use a fused kernel that does
    not. Inside this block meta inputs go to the fused CPU kernel's meta function instead, so the
    memory estimate is that of a real run (FLOPs are the same either way)."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type == "meta" and not enable_gqa and query.shape[-1] == value.shape[-1]:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)

    with _PATCH_LOCK:
        F.scaled_dot_product_attention = fused
        try:
            yield
        finally:
            F.scaled_dot_product_attention = original


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def estimate(backbone: Backbone | str, size: int | Sequence[int] | None = None, batch: int = 1,
             method: str = "features", dtype: torch.dtype = torch.float32, **overrides) -> Cost:
    """FLOPs and activation memory of ``backbone.<method>(images)`` for ``batch`` images of ``size``
    (``(H, W)`` or a side; default the spec's ``image_size``), counted on the meta device under
    ``torch.no_grad()``. ``backbone`` is a name (built on the meta device, with ``overrides``) or a
    model (its structure is copied to the meta device; its weights are not touched)."""
    if method not in METHODS:
        raise InvalidOptionError(f"method must be one of {METHODS}, got {method!r}")
    if batch < 1:
        raise InvalidOptionError(f"batch must be >= 1, got {batch}")
    name = backbone.spec.name if isinstance(backbone, Backbone) else get_spec(backbone).name
    with torch.device("meta"):
        if isinstance(backbone, Backbone):
            import copy

            model = copy.deepcopy(backbone).to("meta")
        else:
            model = create_backbone(backbone, **{"parts": _parts(backbone, method), **overrides})
    model = model.to(dtype).eval()
    spec = model.spec
    h, w = _pair(size) if size is not None else spec.input.image_size
    images = torch.empty(batch, spec.input.channels, h, w, device="meta", dtype=dtype)
    model.check_images(images)  # a size the backbone cannot take fails here, with the fix
    meter = _Meter()
    with torch.no_grad(), _fused_attention_on_meta(), meter:
        result = getattr(model, method)(images)
    del result
    tokens = {f.name: -(-h // f.stride) * -(-w // f.stride) for f in spec.features}
    state = list(model.parameters()) + list(model.buffers())
    return Cost(name=name, method=method, size=(h, w), batch=batch, params=sum(p.numel() for p in model.parameters()),
                flops=dict(meter.flops), tokens=tokens, activation_bytes=meter.peak,
                weight_bytes=sum(t.numel() * t.element_size() for t in state), dtype=str(dtype).replace("torch.", ""))


def _parts(name: str, method: str):
    """Only the optional parts ``method`` needs (no text tower; the neck only for ``pyramid``)."""
    return get_spec(name).needed_parts(pyramid=method == "pyramid")
