"""The ``backbone-sdk`` command line: list, info, cost, plugins, visualize and extract."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import attrs
import click

from .errors import BackboneSDKError
from .registry import DISABLE_ENV, get_spec, list_backbones, plugin_report

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
DEFAULT_BACKBONE = "resnet18"


def sample_dir() -> Path:
    """The sample images shipped inside the package."""
    return Path(str(resources.files("backbone_sdk") / "assets" / "samples"))


class _Group(click.Group):
    """Reports the SDK's own errors (unknown name, bad checkpoint...) as one clean line, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BackboneSDKError as exc:
            raise click.ClickException(str(exc)) from exc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("backbone-sdk")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _set_verbose(ctx, param, value):
    if value:
        logging.getLogger().setLevel(logging.INFO)


#: ``-v`` after the subcommand too (``backbone-sdk info NAME -v``), not only before it
_verbose = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_set_verbose,
                        help="Show log messages.")


@click.group(cls=_Group)
@click.version_option(_version(), "--version", prog_name="backbone-sdk")
@click.option("-v", "--verbose", is_flag=True, help="Show log messages.")
def main(verbose: bool) -> None:
    """One interface for vision backbones: list them, inspect them, extract embeddings."""
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")


@main.command("list")
@_verbose
@click.argument("pattern", default="*")
@click.option("--tests/--no-tests", "include_test", default=False, help="Include tiny test variants.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object per backbone).")
def list_cmd(pattern: str, include_test: bool, as_json: bool) -> None:
    """List registered backbones matching PATTERN (a glob, e.g. 'vit_*')."""
    names = list_backbones(pattern, include_test=include_test)
    if as_json:
        rows = []
        for name in names:
            spec = get_spec(name)
            rows.append({"name": name, "family": spec.family, "plugin": spec.plugin, "embed_dim": spec.embed_dim,
                         "image_size": list(spec.input.image_size), "hub_id": spec.hub_id,
                         "levels": [[f.name, f.stride, f.channels] for f in spec.features],
                         "description": spec.description})
        click.echo(json.dumps(rows, indent=2))
    elif names:
        click.echo(f"{'name':38s} {'family':15s} {'input':>9s} {'embed':>6s}  description")
    for name in names if not as_json else ():
        spec = get_spec(name)
        h, w = spec.input.image_size
        click.echo(f"{name:38s} {spec.family:15s} {f'{h}x{w}':>9s} {spec.embed_dim:>6d}  {spec.description}")
    failed = [r.name for r in plugin_report() if r.error]
    if failed:
        click.echo(f"note: {len(failed)} plugin(s) failed to load ({', '.join(failed)}); "
                   "see `backbone-sdk plugins`", err=True)
    if not names:
        raise click.ClickException(f"no backbone matches {pattern!r}"
                                   + ("" if include_test else " (add --tests for test variants)"))


def _param_counts(name: str) -> dict[str, int]:
    """Parameters of the trunk alone (``"backbone"``: no optional part) and of each optional part the
    default build includes, from builds on the meta device (shapes only: no memory, no init cost)."""
    import torch

    from .factory import create_backbone

    def count(**overrides):
        with torch.device("meta"):
            return sum(p.numel() for p in create_backbone(name, **overrides).parameters())

    spec = get_spec(name)
    counts = {"backbone": count(parts=())}
    for part in sorted(spec.parts):
        counts[part] = count(parts=(part,)) - counts["backbone"]
    return counts


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _cost_or_fail(name: str, size, batch: int, method: str = "features"):
    from .cost import estimate
    from .errors import BackboneSDKError

    try:
        return estimate(name, size=size, batch=batch, method=method)
    except BackboneSDKError as exc:
        raise click.ClickException(str(exc)) from None


def _cost_lines(cost) -> list[str]:
    f = cost.flops
    return [
        f"  cost of {cost.method}() on {cost.batch} x {cost.size[0]}x{cost.size[1]} ({cost.dtype}, counted on the meta device):",
        f"    GFLOPs: {cost.gflops:.3f} = attention {f['attention'] / 1e9:.3f} + linear {f['linear'] / 1e9:.3f} "
        f"+ conv {f['conv'] / 1e9:.3f}",
        "    tokens per level: " + ", ".join(f"{k} {v}" for k, v in cost.tokens.items()),
        f"    activation memory (peak of live tensors, inference): {cost.activation_mb:.1f} MiB; "
        f"weights {cost.weight_bytes / 2**20:.1f} MiB",
    ]


@main.command()
@click.argument("name")
@_verbose
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--size", nargs=2, type=click.IntRange(min=1), default=None, metavar="H W",
              help="Also estimate FLOPs and activation memory at this input size.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size for --size.")
def info(name: str, as_json: bool, size, batch: int) -> None:
    """Show the spec of backbone NAME: input, feature levels (stride, channels), parameter count
    (and, with --size, the cost of a forward at that size)."""
    spec = get_spec(name)
    inp = spec.input
    cost = _cost_or_fail(name, size, batch) if size else None
    if as_json:
        p = spec.prefix_tokens
        click.echo(json.dumps({
            "name": spec.name, "family": spec.family, "plugin": spec.plugin, "description": spec.description,
            "hub_id": spec.hub_id, "embed_dim": spec.embed_dim, "parameters": _param_counts(name),
            "input": {"image_size": list(inp.image_size), "mean": list(inp.mean), "std": list(inp.std),
                      "patch_size": inp.patch_size, "size_divisibility": inp.size_divisibility},
            "levels": [{"name": f.name, "stride": f.stride, "channels": f.channels} for f in spec.features],
            "prefix_tokens": {"cls": p.cls, "distillation": p.distillation, "registers": p.registers},
            "parts": sorted(spec.parts), "capabilities": sorted(spec.capabilities),
            **({"cost": cost.to_dict()} if cost is not None else {}),
        }, indent=2))
        return
    click.echo(f"{spec.name} ({spec.family}, plugin {spec.plugin}) {spec.description}")
    click.echo(f"  hub id: {spec.hub_id or '-'}")
    click.echo(f"  input: {inp.image_size[0]}x{inp.image_size[1]}, mean {inp.mean}, std {inp.std}, "
               f"patch {inp.patch_size or '-'}, H/W divisible by {inp.size_divisibility}")
    click.echo(f"  embed dim: {spec.embed_dim}")
    counts = _param_counts(name)
    parts = "".join(f" + {part} {_human(n)}" for part, n in counts.items() if part != "backbone")
    total = f" = {_human(sum(counts.values()))} total" if parts else ""
    click.echo(f"  parameters: {_human(counts['backbone'])} backbone{parts}{total}")
    click.echo("  feature levels (name, stride, channels):")
    for f in spec.features:
        click.echo(f"    {f.name:10s} {f.stride:4d} {f.channels:6d}")
    for line in _cost_lines(cost) if cost is not None else ():
        click.echo(line)


def _sizes(ctx, param, value: str):
    sizes = []
    for item in value.split(","):
        h, _, w = item.strip().lower().partition("x")
        try:
            sizes.append((int(h), int(w or h)))
        except ValueError:
            raise click.BadParameter(f"{item!r} is not a size; use e.g. 224,448 or 224x320,448x640") from None
    return sizes


@main.command()
@click.argument("names", nargs=-1, required=True)
@_verbose
@click.option("--sizes", callback=_sizes, default="224,448,896,1344", show_default=True,
              help="Comma-separated sides or HxW sizes.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--method", type=click.Choice(["features", "embed", "pyramid"]), default="features", show_default=True,
              help="The call to cost.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object per name and size).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw GFLOPs and activation memory against resolution into this PNG.")
def cost(names, sizes, batch: int, method: str, as_json: bool, plot: Path | None) -> None:
    """How FLOPs and activation memory of backbone(s) NAMES grow with input size (counted on the meta
    device: nothing is computed, no weights are loaded). Sizes a backbone cannot take are rounded up
    to its size divisibility."""
    rows = []
    for name in names:
        div = get_spec(name).input.size_divisibility
        for h, w in sizes:
            size = (-(-h // div) * div, -(-w // div) * div)
            rows.append(_cost_or_fail(name, size, batch, method))
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        click.echo(f"{'name':28s} {'size':>11s} {'GFLOPs':>10s} {'attention':>9s} {'linear':>7s} {'conv':>6s} "
                   f"{'act. MiB':>10s}")
        for r in rows:
            split = r.split
            click.echo(f"{r.name:28s} {r.size[0]:>5d}x{r.size[1]:<5d} {r.gflops:10.2f} {split['attention']:9.0%} "
                       f"{split['linear']:7.0%} {split['conv']:6.0%} {r.activation_mb:10.1f}")
    if plot is not None:
        _plot_costs(rows, plot)
        click.echo(f"plot written to {plot}", err=True)


def _plot_costs(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r.name for r in rows):
        mine = [r for r in rows if r.name == name]
        pixels = [r.size[0] * r.size[1] for r in mine]
        ax_f.plot(pixels, [r.gflops for r in mine], marker="o", label=name)
        ax_m.plot(pixels, [r.activation_mb for r in mine], marker="o", label=name)
    for ax, label in ((ax_f, "GFLOPs"), (ax_m, "activation MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input pixels (H x W)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_f.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


@main.command()
@_verbose
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List discovered plugins with distribution, version, backbones and errors."""
    records = plugin_report()
    if as_json:
        click.echo(json.dumps([attrs.asdict(r) for r in records], indent=2, default=str))
        return
    for r in records:
        if r.disabled:
            status = f"disabled ({DISABLE_ENV})"
        elif r.error:
            status = "ERROR: " + r.error
        else:
            status = f"{len(r.backbones)} backbones: " + ", ".join(sorted(r.backbones))
            if r.on_demand:
                status = "resolves names on demand, " + status.replace("backbones", "resolved or registered", 1)
        click.echo(f"{r.name:12s} {r.distribution or '-'} {r.version or ''}  {r.module}  {status}")


@main.command(context_settings={"show_default": True})
@_verbose
@click.argument("name")
@click.argument("images", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory the PNGs are written to.")
@click.option("-k", "--kind", "kinds", multiple=True, type=click.Choice(["pca", "pca_fg", "attention", "norms"]),
              help="Picture kind (repeat for several; default: every kind the backbone supports).")
@click.option("-w", "--weights", default=None, help="Hub id, directory or checkpoint file ('hub' = the spec's hub id).")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Square input size (default: the spec's).")
@click.option("--tile", type=click.IntRange(min=1), default=None, help="Tile side in pixels (default: the input size).")
@click.option("--seed", type=int, default=0, help="Seed of random weights (no --weights).")
def visualize(name, images, out_dir, kinds, weights, size, tile, seed) -> None:
    """Write PNG pictures of what backbone NAME's features see in IMAGES (files or folders; default: the
    bundled samples): PCA of the last tokens (pca), foreground PCA (pca_fg), CLS attention per head
    (attention) and the norm of each pyramid level (norms)."""
    import torch

    from .factory import create_backbone
    from .visualize import KINDS, supports_attention
    from .visualize import visualize as draw

    if not images:
        images = (sample_dir(),)
        _note(f"no images given: using the bundled sample images in {images[0]}")
    paths = [p for item in images for p in (_image_paths(item) if item.is_dir() else [item])]
    if weights is None:
        _note(f"NOTE: no --weights given, {name} has RANDOM weights (seed {seed}): the pictures show the structure "
              "of the input, not learned features. Pass --weights hub (or a checkpoint) for pretrained features.")
    torch.manual_seed(seed)
    model = create_backbone(name, weights=weights)
    reason = supports_attention(model)
    if reason and "attention" in kinds:
        raise click.ClickException(f"cannot draw --kind attention: {reason}")
    if not kinds:
        kinds = tuple(k for k in KINDS if k != "attention" or not reason)
        if reason:
            _note(f"skipping the attention pictures: {reason}")
    written = draw(model, paths, kinds, out_dir, size=size, tile=tile)
    for path in written:
        click.echo(str(path))
    _note(f"wrote {len(written)} pictures ({', '.join(kinds)}) of {len(paths)} images to {out_dir}")


def _image_paths(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise click.UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return paths


def _note(message: str) -> None:
    click.echo(message, err=True)


def _verify(directory: str) -> None:
    from .extraction import verify

    problems = verify(directory)
    if problems:
        raise click.ClickException(f"{directory}: " + "; ".join(problems))
    click.echo(f"{directory}: complete and consistent")


@main.command(context_settings={"show_default": True})
@_verbose
@click.argument("inputs", nargs=-1)
@click.option("-b", "--backbone", "name", default=DEFAULT_BACKBONE, help="Backbone name.")
@click.option("-w", "--weights", default=None, help="Hub id, directory or checkpoint file ('hub' = the spec's hub id).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output directory (default 'extraction'); a *.safetensors path selects --format safetensors.")
@click.option("--format", "fmt", type=click.Choice(["shards", "safetensors"]), default=None,
              help="shards: a sharded directory (npy + parquet); safetensors: one file, for small runs.")
@click.option("--store", type=click.Choice(["fp16", "fp32"]), default="fp16", help="Embedding dtype on disk.")
@click.option("--normalize", is_flag=True, help="L2-normalize the embeddings.")
@click.option("--maps", type=click.Choice(["none", "pyramid", "features"]), default="none",
              help="Also store pyramid (p2..p5) or feature maps per shard (safetensors).")
@click.option("--batch-size", default=32, type=click.IntRange(min=1))
@click.option("--shard-size", default=10_000, type=click.IntRange(min=1), help="Images per shard.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decode worker processes (default: cores - 1, at most 8).")
@click.option("--size", type=click.IntRange(min=1), default=None, help="Square input size (default: the spec's).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Inference dtype.")
@click.option("--channels-last", is_flag=True, help="channels_last memory format for the model and inputs.")
@click.option("--optimize/--no-optimize", "optimize", default=True, show_default=True,
              help="Backbone.optimize(): fold BatchNorm into convolutions, the family's memory format; "
                   "on CPU also tune_cpu_allocator() (freed memory stays in the worker process).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone (compiles once per input size).")
@click.option("--device", default=None, help="Device (default: the local rank's GPU if any, else cpu).")
@click.option("--max-failure-rate", type=click.FloatRange(0, 1), default=0.5,
              help="Stop when more than this fraction of images fail (after 50).")
@click.option("--decode-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0,
              help="Seconds one image may take to decode.")
@click.option("--seed", type=int, default=0, help="Seed of random weights (no --weights).")
@click.option("--overwrite", is_flag=True, help="Replace an existing, different extraction in --output.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              help="local: this process (one per torchrun/SLURM rank); ray: Ray tasks.")
@click.option("--ray-address", default=None, help="Ray cluster address (default: a local Ray).")
@click.option("--ray-tasks", type=click.IntRange(min=1), default=2, help="Ray worker tasks.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per process.")
def extract(inputs, name, weights, output, fmt, store, normalize, maps, batch_size, shard_size, workers, size, dtype,
            channels_last, optimize, compile_, device, max_failure_rate, decode_timeout, seed, overwrite, engine, ray_address, ray_tasks,
            threads) -> None:
    """Embed images of INPUTS (folders, file lists .txt/.csv/.parquet, tar shards such as
    'data/{00000..00009}.tar'; default: the bundled samples). `extract verify DIR` checks an output."""
    if inputs and inputs[0] == "verify":
        if len(inputs) != 2:
            raise click.UsageError("usage: backbone-sdk extract verify DIR")
        return _verify(inputs[1])
    if not inputs:
        inputs = (str(sample_dir()),)
        _note(f"no inputs given: using the bundled sample images in {inputs[0]}")
    if weights is None:
        _note(f"NOTE: no --weights given, {name} has RANDOM weights (seed {seed}): the embeddings are not "
              "meaningful. Pass --weights hub (or a checkpoint) for pretrained features.")
    fmt = fmt or ("safetensors" if output is not None and output.suffix == ".safetensors" else "shards")
    if fmt == "safetensors":
        return _extract_file(inputs, name, weights, output or Path("embeddings.safetensors"), batch_size, size, maps,
                             device or "cpu")
    from .extraction import ExtractionSettings, run

    output = output or Path("extraction")
    settings = ExtractionSettings(backbone=name, weights=weights, size=size, store=store, normalize=normalize,
                                  maps=maps, dtype=dtype, channels_last=channels_last, optimize=optimize,
                                  compile=compile_, batch_size=batch_size,
                                  shard_size=shard_size, workers=workers, device=device,
                                  max_failure_rate=max_failure_rate, decode_timeout=decode_timeout, seed=seed,
                                  threads=threads)
    if engine == "ray":
        from .extraction.ray_engine import run_on_ray

        summary = run_on_ray(list(inputs), output, settings, tasks=ray_tasks, address=ray_address,
                             overwrite=overwrite)
    else:
        summary = run(list(inputs), output, settings, overwrite=overwrite, progress=True)
    split = summary.get("this_process_seconds") or {}
    click.echo(f"{summary['ok']} of {summary['images']} images embedded ({name}, {summary['shards_done']}/"
               f"{summary['shards']} shards), failed: {summary['failed'] or 0}, "
               f"{summary['images_per_second']} img/s; time read/decode {split.get('read_decode', 0):.1f} s, "
               f"inference {split.get('inference', 0):.1f} s, write {split.get('write', 0):.1f} s")
    click.echo(f"output: {output.resolve()}  (check: backbone-sdk extract verify {output}; read: "
               f"backbone_sdk.read_extraction({str(output)!r}) -> .shards (memory-mapped npy), .meta (pyarrow))")


def _extract_file(inputs, name, weights, output, batch_size, size, maps, device) -> None:
    from .extract import run_extraction

    paths = [p for item in inputs for p in (_image_paths(Path(item)) if Path(item).is_dir() else [Path(item)])]
    result = run_extraction(paths, name, weights, output, batch_size=batch_size, size=size, maps=maps, device=device,
                            progress=True)
    click.echo(f"wrote {result['count']} embeddings of dim {result['dim']} ({name}) to {output}")


if __name__ == "__main__":  # pragma: no cover
    main()
