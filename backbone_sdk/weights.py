"""Finding, reading, converting and loading checkpoints; saving them as safetensors.

Loading never executes pickled code: ``.pt``/``.pth``/``.bin`` files are read with
``torch.load(weights_only=True)``; safetensors is preferred whenever a source offers both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import attrs
import torch

from .errors import CheckpointError, CheckpointMismatchError, InvalidOptionError, UnsupportedOperationError

__all__ = ["LoadReport", "resolve_checkpoint", "resolve_source", "looks_local", "read_state_dict", "load_weights",
           "save_weights"]

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$")
#: file endings of checkpoints: a missing path ending in one is "not found", never tried as a hub id
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".pkl", ".ckpt")
_WRAPPERS = ("state_dict", "model", "module", "model_state_dict", "net")
_LIST_LIMIT = 8


@attrs.frozen
class LoadReport:
    """What a load did: the detected format and every key that did not line up."""

    source: str
    format: str
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    initialized: tuple[str, ...] = ()
    #: keys whose checkpoint dtype cannot be cast losslessly into the parameter (int/bool into float)
    dtype_mismatched: tuple[str, ...] = ()
    #: keys holding NaN or Inf values
    nonfinite: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.dtype_mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {self.source} (format: {self.format})"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
            ("dtype mismatch", self.dtype_mismatched),
            ("non-finite values (NaN/Inf)", self.nonfinite),
            ("not in checkpoint, randomly initialized (expected)", self.initialized),
        ):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {_short(keys)}")
        return "\n".join(lines)


def _short(keys) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_in(directory: Path) -> list[Path]:
    for pattern in ("*.safetensors", "*.pth", "*.pt", "*.bin"):
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found
    raise CheckpointError(
        f"{directory} holds no checkpoint (*.safetensors, *.pth, *.pt or *.bin); "
        "pass the checkpoint file itself or a directory in the Hugging Face hub layout."
    )


#: fetched with the weights: configs, and tokenizer files (SentencePiece ``*.model``, BPE vocab/merges)
_SIDECARS = ("*.json", "*.model", "*.txt")


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError("loading hub ids needs huggingface_hub: pip install huggingface_hub") from exc
    repo, _, revision = hub_id.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        path = snapshot_download(repo, revision=revision or None, allow_patterns=["*.safetensors", *_SIDECARS],
                                 local_files_only=offline)
        if not list(Path(path).glob("*.safetensors")):
            path = snapshot_download(repo, revision=revision or None, allow_patterns=["*.bin", "*.pth", *_SIDECARS],
                                     local_files_only=offline)
    except Exception as exc:
        mode = "offline mode (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else "download failed"
        raise CheckpointError(
            f"could not fetch {hub_id!r} from the Hugging Face hub: {mode} ({type(exc).__name__}: {exc}). "
            "Download it elsewhere and pass the local directory or file instead."
        ) from exc
    return Path(path)


def looks_local(source) -> bool:
    """Whether ``source`` names a local path (never to be tried as a hub id): it starts with ``.``,
    ``/`` or ``~``, or ends in a checkpoint suffix."""
    text = os.fspath(source)
    return text.startswith((".", "/", "~")) or text.lower().endswith(CHECKPOINT_SUFFIXES)


def resolve_source(spec, weights):
    """Check a ``weights=`` argument and resolve ``"hub"`` to the spec's published hub id."""
    if isinstance(weights, str) and weights == "hub":
        if not spec.hub_id:
            raise CheckpointError(f"{spec.name} has no published hub id, so weights='hub' cannot be resolved; pass a "
                                  "checkpoint file, a hub-layout directory or a hub id instead.")
        return spec.hub_id
    if not isinstance(weights, (str, os.PathLike, Mapping)) or isinstance(weights, str) and not weights.strip():
        raise InvalidOptionError(f"weights must be 'hub', a hub id, a checkpoint path or directory, or a state dict; "
                                 f"got {weights!r} ({type(weights).__name__}).")
    return weights


def resolve_checkpoint(source: str | os.PathLike) -> list[Path]:
    """Checkpoint files for a local file, a hub-layout directory or a hub id (``org/name[@rev]``)."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return _files_in(path)
    text = os.fspath(source)
    if _HUB_ID.match(text) and not looks_local(text):
        return _files_in(_download(text))
    raise CheckpointError(f"checkpoint {text!r} not found (working directory {os.getcwd()}): it is neither an "
                          "existing file or directory nor a hub id ('org/name').")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again.")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, size)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: {_torch_load_problem(path, size, exc)}") from exc
    return _unwrap(obj, path)


def _read_safetensors(path: Path, size: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        with open(path, "rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = fh.read(min(max(header_len, 0), 1 << 20))
        if header_len < 0 or not header.lstrip().startswith(b"{"):
            problem = ("is not a safetensors file (no JSON header): it may be a torch .pt/.pth file with the wrong "
                       "suffix or another format; rename it or convert it with safetensors.torch.save_file")
        else:
            problem = (f"is truncated ({size} bytes; the header describes more data): the download or copy did not "
                       "finish; fetch it again")
        raise CheckpointError(f"{path} {problem} ({type(exc).__name__}: {exc}).") from exc


def _torch_load_problem(path: Path, size: int, exc: Exception) -> str:
    import zipfile

    with open(path, "rb") as fh:
        magic = fh.read(4)
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    is_zip, is_pickle = magic.startswith(b"PK\x03\x04"), magic[:1] == b"\x80" and magic[1:2] in b"\x02\x03\x04\x05"
    if not (is_zip or is_pickle):
        return (f"is not a torch checkpoint (it starts with bytes {magic!r}, neither a zip archive nor a pickle). "
                "Check the file is the checkpoint you meant.")
    if is_zip and not zipfile.is_zipfile(path):
        return f"is a damaged or truncated torch zip checkpoint ({size} bytes; {text}); fetch it again."
    if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
        return (f"cannot be read with torch.load(weights_only=True): it holds pickled objects other than tensors "
                f"({text}). Load it in trusted code and re-save only its state dict "
                "(torch.save(ckpt['state_dict'], 'weights.pt')) or convert it to safetensors.")
    return f"is a damaged or truncated torch checkpoint ({size} bytes; {text}); fetch it again."


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; top-level keys: {_short(obj)}")
    return tensors


def read_state_dict(source, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint (all shards) into one CPU state dict."""
    files = resolve_checkpoint(source)
    if sha256 is not None:
        if len(files) != 1:
            raise CheckpointError(f"sha256 verification needs a single file, {source} has {len(files)}")
        actual = _sha256(files[0])
        if actual.lower() != sha256.lower():
            raise CheckpointError(f"sha256 mismatch for {files[0]}: expected {sha256}, got {actual}. "
                                  "The file is corrupt or not the one you meant.")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_file(f))
    return _strip_prefix(state, "module.")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _convert(backbone, state: dict[str, torch.Tensor], weights_format: str | None):
    native = backbone.state_dict()
    unbuilt = backbone.unbuilt_key_prefixes() if hasattr(backbone, "unbuilt_key_prefixes") else ()
    if unbuilt:  # a full checkpoint (e.g. save_weights of a CLIP with its text tower) into a partial build
        state = {k: v for k, v in state.items() if not k.startswith(unbuilt)}
    if weights_format in ("native", "backbone_sdk"):
        return state, "native"
    if weights_format is None:
        overlap = sum(k in native for k in state) / max(len(state), 1)
        if overlap >= 0.9:
            return state, "native"
    from .registry import active_registry

    result = active_registry().convert_checkpoint(backbone.spec, state, weights_format)
    if result is not None:
        return result
    if weights_format is not None:
        raise CheckpointError(
            f"no plugin converts {weights_format!r} checkpoints for {backbone.spec.name} "
            f"(family {backbone.spec.family!r}); leave weights_format unset to auto-detect."
        )
    return state, "unknown"


def _lossy_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Integer/bool values into floating parameters are no weights (float into integer buffers such
    as ``num_batches_tracked`` is what ``.half()`` checkpoints hold, and is allowed)."""
    return not (src.is_floating_point or src.is_complex) and (dst.is_floating_point or dst.is_complex)


def compare_keys(backbone, state: Mapping[str, torch.Tensor]):
    """``(missing, unexpected, mismatched, initialized)`` of ``state`` against the backbone."""
    native = backbone.state_dict()
    optional = tuple(backbone.optional_key_prefixes)
    absent = [k for k in native if k not in state]
    missing = tuple(k for k in absent if not k.startswith(optional))
    initialized = tuple(k for k in absent if k.startswith(optional))
    unexpected = tuple(k for k in state if k not in native)
    mismatched = tuple(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(native[k].shape)}"
        for k, v in state.items() if k in native and v.shape != native[k].shape
    )
    return missing, unexpected, mismatched, initialized


def _check_values(backbone, state) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(dtype mismatches, non-finite keys)`` of tensors that match a model key by name and shape."""
    native = backbone.state_dict()
    dtypes, nonfinite = [], []
    for key, value in state.items():
        ref = native.get(key)
        if ref is None or ref.shape != value.shape:
            continue
        if _lossy_cast(value.dtype, ref.dtype):
            dtypes.append(f"{key}: checkpoint {value.dtype} vs model {ref.dtype}")
        elif value.is_floating_point() and value.device.type != "meta" and not bool(torch.isfinite(value).all()):
            nonfinite.append(key)
    return tuple(dtypes), tuple(nonfinite)


def load_state_dict(backbone, state, *, source="<state dict>", weights_format=None, strict=True,
                    allow_nonfinite: bool = False) -> LoadReport:
    """Convert (if foreign) and load an in-memory state dict, strictly by default.

    Tensors holding NaN/Inf raise :class:`CheckpointError` unless ``allow_nonfinite``; integer or
    bool tensors for floating parameters are dtype mismatches (strict loading fails).
    """
    state, fmt = _convert(backbone, dict(state), weights_format)
    state = backbone.upgrade_state_dict(state)
    missing, unexpected, mismatched, initialized = compare_keys(backbone, state)
    dtypes, nonfinite = _check_values(backbone, state)
    report = LoadReport(os.fspath(source) if not isinstance(source, str) else source, fmt,
                        missing, unexpected, mismatched, initialized, dtypes, nonfinite)
    if nonfinite and not allow_nonfinite:
        raise CheckpointError(f"{backbone.spec.name}: {report.source} holds NaN/Inf values in {len(nonfinite)} "
                              f"tensor(s): {_short(nonfinite)}. The checkpoint is corrupt or diverged; pass "
                              "allow_nonfinite=True to load it anyway.")
    if strict and not report.exact:
        raise CheckpointMismatchError(
            f"{backbone.spec.name}: checkpoint does not match the model.\n{report}\n"
            "Fix: pass the right backbone name or weights_format (timm, torchvision, openai, dinov2, "
            "transformers), or strict=False to load the matching keys and keep the rest as initialized.",
            missing, unexpected, mismatched + dtypes,
        )
    bad = {m.split(":")[0] for m in mismatched + dtypes}
    backbone.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    if not report.exact:
        log.warning("%s", report)
    return report


def _transformers_dir(files: list[Path]) -> Path | None:
    """The directory of a transformers ``save_pretrained`` checkpoint (config.json with a model_type)."""
    config = files[0].parent / "config.json"
    if not config.is_file():
        return None
    try:
        return config.parent if "model_type" in json.loads(config.read_text()) else None
    except (OSError, ValueError):
        return None


def _read_via_transformers(backbone, directory: Path) -> dict[str, torch.Tensor] | None:
    try:
        return backbone.read_pretrained(str(directory))
    except Exception as exc:
        raise CheckpointError(
            f"{directory} is a transformers checkpoint that does not fit {backbone.spec.name}: "
            f"{type(exc).__name__}: {exc}. Check the backbone name matches the checkpoint's architecture."
        ) from exc


def load_weights(backbone, source, *, weights_format=None, strict=True, sha256=None,
                 allow_nonfinite: bool = False) -> LoadReport:
    """Load weights from a file, hub-layout directory, hub id or state dict into ``backbone``.

    transformers ``save_pretrained`` directories (and hub ids of them) go through the model's own
    ``from_pretrained``, which also maps keys of older transformers versions.
    """
    source = resolve_source(backbone.spec, source)
    if isinstance(source, Mapping):
        return load_state_dict(backbone, source, weights_format=weights_format, strict=strict,
                               allow_nonfinite=allow_nonfinite)
    files = resolve_checkpoint(source)
    directory = _transformers_dir(files) if weights_format in (None, "transformers") and sha256 is None else None
    state = _read_via_transformers(backbone, directory) if directory is not None else None
    if state is not None:  # read by transformers' from_pretrained: native keys, from a transformers checkpoint
        report = load_state_dict(backbone, state, source=os.fspath(source), weights_format="native", strict=strict,
                                 allow_nonfinite=allow_nonfinite)
        return attrs.evolve(report, format="transformers")
    state = read_state_dict(source, sha256=sha256)
    return load_state_dict(backbone, state, source=os.fspath(source), weights_format=weights_format, strict=strict,
                           allow_nonfinite=allow_nonfinite)


def save_weights(backbone, path: str | os.PathLike) -> Path:
    """Write the backbone's state dict to ``path`` as safetensors, with its spec as metadata."""
    from safetensors.torch import save_file

    report = getattr(backbone, "optimization", None)
    if report is not None and report.folded_norms:
        raise UnsupportedOperationError(
            f"{backbone.spec.name} is optimized for inference ({'; '.join(report.changes)}): its state dict is "
            "not the checkpoint layout. Call backbone.optimization.undo() before save_weights().")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple[int, int], str] = {}
    tensors = {}
    for key, value in backbone.state_dict().items():
        value = value.detach().cpu().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone() if ident in seen else value
        seen[ident] = key
    meta = {"format": "pt", "backbone_sdk.name": backbone.spec.name,
            "backbone_sdk.spec": json.dumps(backbone.spec.to_dict(), default=str)}
    save_file(tensors, str(path), metadata=meta)
    return path
