"""The model catalogue: every registered backbone's sizes, outputs and weight source, from the registry.

``python -m backbone_sdk.catalog > docs/models.md`` regenerates the docs page; a test keeps the
page equal to what the registry says. Parameter counts come from builds on the meta device (shapes
only), of the backbone alone (no optional part: the counts published for image towers).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .registry import Registry, get_spec, list_backbones, use_registry

__all__ = ["rows", "markdown", "family_summaries"]


def _levels(spec) -> str:
    strides = sorted({f.stride for f in spec.features})
    names = [f.name for f in spec.features]
    if spec.plain:
        return f"{names[0]}..{names[-1]} (stride {strides[0]})"
    return ", ".join(f"{f.name}/{f.stride}" for f in spec.features)


def _prefix(spec) -> str:
    p = spec.prefix_tokens
    parts = (["CLS"] if p.cls else []) + (["dist"] if p.distillation else []) + \
        ([f"{p.registers} reg"] if p.registers else [])
    return " + ".join(parts) or "-"


def _cost(name: str):
    """Parameters and GFLOPs of one ``embed`` forward at the default input size (multiply-add = 2
    FLOPs), from one build on the meta device by :func:`backbone_sdk.cost.estimate` (the backbone
    alone: ``embed`` needs no optional part)."""
    from .cost import estimate

    return estimate(name, method="embed")


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} K"


def _flops(g: float) -> str:
    return f"{g:.0f}" if g >= 100 else f"{g:.1f}" if g >= 1 else f"{g:.2f}"


def rows(include_test: bool = False) -> list[dict[str, Any]]:
    """One dict per registered backbone (sorted by family, then name)."""
    out = []
    for name in list_backbones(include_test=include_test):
        spec = get_spec(name)
        h, w = spec.input.image_size
        cost = _cost(name)
        out.append({
            "name": name, "family": spec.family, "params": cost.params, "gflops": cost.gflops, "input": f"{h}x{w}",
            "levels": _levels(spec), "embed_dim": spec.embed_dim, "prefix": _prefix(spec),
            "parts": ", ".join(sorted(spec.config.optional_parts(spec.features))) if spec.config else "",
            "pyramid": "native" if spec.pyramid is not None and spec.pyramid.native else "simple",
            "text": spec.has("text") or "text" in spec.capabilities, "hub_id": spec.hub_id or "",
            "plugin": spec.plugin or "",
        })
    return sorted(out, key=lambda r: (r["family"], r["name"]))


def family_summaries(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per family: variant count, parameter range and the plugin module's one-line description."""
    families: dict[str, list[dict]] = {}
    for row in table:
        families.setdefault(row["family"], []).append(row)
    out = []
    for family, items in families.items():
        builder = get_spec(items[0]["name"]).builder
        path = builder if isinstance(builder, str) else f"{builder.__module__}:"  # "module:function" or a callable
        module = importlib.import_module(path.split(":")[0]) if ":" in path else None
        doc = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").replace("``", "`") if module else ""
        counts = [r["params"] for r in items]
        out.append({"family": family, "variants": len(items), "module": module.__name__ if module else "",
                    "params": f"{_human(min(counts))} - {_human(max(counts))}" if len(items) > 1 else _human(counts[0]),
                    "about": doc})
    return out


def markdown() -> str:
    with use_registry(Registry()):  # what the plugins register, not what this process resolved on demand
        return _markdown()


def _markdown() -> str:
    table = rows()
    lines = [
        "# Model catalogue",
        "",
        "Generated from the registry by `python -m backbone_sdk.catalog > docs/models.md` (a test checks that",
        "this page is current). Parameters: the backbone alone (no pyramid neck, no text tower), counted on",
        "the meta device. GFLOPs: one image through `embed` at the default input, counted on the meta device",
        "(multiply-add = 2; `backbone-sdk cost NAME --sizes ...` for other sizes, see [cost.md](cost.md)).",
        "`hub id` is what `weights=\"hub\"` downloads; every family also loads local",
        "files and directories and the foreign layouts its plugin lists (see each module's docstring).",
        "Names that plugins resolve on demand, such as `timm/<model>` of the timm bridge",
        "([timm_bridge.md](timm_bridge.md)), are not registered and not listed.",
        "",
        "## Families",
        "",
        "| family | variants | parameters | plugin module | about |",
        "|---|---|---|---|---|",
    ]
    for f in family_summaries(table):
        lines.append(f"| {f['family']} | {f['variants']} | {f['params']} | `{f['module']}` | {f['about']} |")
    lines += [
        "",
        "## Backbones",
        "",
        "| name | family | parameters | GFLOPs | default input | feature levels | embed dim | prefix tokens "
        "| pyramid | text | optional parts | hub id |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| `{r['name']}` | {r['family']} | {_human(r['params'])} | {_flops(r['gflops'])} | {r['input']} "
                     f"| {r['levels']} "
                     f"| {r['embed_dim']} | {r['prefix']} | {r['pyramid']} | {'yes' if r['text'] else '-'} "
                     f"| {r['parts'] or '-'} | {r['hub_id'] or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    sys.stdout.write(markdown())
