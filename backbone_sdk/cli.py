"""The ``backbone-sdk`` command line: list, info, plugins and extract."""

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


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Show log messages.")
def main(verbose: bool) -> None:
    """One interface for vision backbones: list them, inspect them, extract embeddings."""
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")


@main.command("list")
@click.argument("pattern", default="*")
@click.option("--tests/--no-tests", "include_test", default=False, help="Include tiny test variants.")
def list_cmd(pattern: str, include_test: bool) -> None:
    """List registered backbones matching PATTERN (a glob, e.g. 'vit_*')."""
    names = list_backbones(pattern, include_test=include_test)
    for name in names:
        spec = get_spec(name)
        click.echo(f"{name:38s} {spec.family:8s} {spec.description}")
    failed = [r.name for r in plugin_report() if r.error]
    if failed:
        click.echo(f"note: {len(failed)} plugin(s) failed to load ({', '.join(failed)}); "
                   "see `backbone-sdk plugins`", err=True)
    if not names:
        raise click.ClickException(f"no backbone matches {pattern!r}"
                                   + ("" if include_test else " (add --tests for test variants)"))


def _param_count(name: str) -> int:
    import torch

    from .factory import create_backbone

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_backbone(name)
    return sum(p.numel() for p in model.parameters())


@main.command()
@click.argument("name")
def info(name: str) -> None:
    """Show the spec of backbone NAME: input, feature levels (stride, channels), parameter count."""
    spec = get_spec(name)
    inp = spec.input
    click.echo(f"{spec.name} ({spec.family}, plugin {spec.plugin}) {spec.description}")
    click.echo(f"  hub id: {spec.hub_id or '-'}")
    click.echo(f"  input: {inp.image_size[0]}x{inp.image_size[1]}, mean {inp.mean}, std {inp.std}, "
               f"patch {inp.patch_size or '-'}, H/W divisible by {inp.size_divisibility}")
    click.echo(f"  embed dim: {spec.embed_dim}")
    click.echo(f"  parameters: {_param_count(name) / 1e6:.2f} M")
    click.echo("  feature levels (name, stride, channels):")
    for f in spec.features:
        click.echo(f"    {f.name:10s} {f.stride:4d} {f.channels:6d}")


@main.command()
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
        click.echo(f"{r.name:12s} {r.distribution or '-'} {r.version or ''}  {r.module}  {status}")


def _image_paths(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise click.UsageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}")
    return paths


@main.command()
@click.argument("images", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-b", "--backbone", "name", default=DEFAULT_BACKBONE, show_default=True, help="Backbone name.")
@click.option("-w", "--weights", default=None, help="Hub id, directory or checkpoint file ('hub' = the spec's hub id).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("embeddings.safetensors"),
              show_default=True)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--size", type=click.IntRange(min=1), default=None, help="Square input size (default: the spec's).")
@click.option("--maps", type=click.Choice(["none", "pyramid", "features"]), default="none", show_default=True,
              help="Also store pyramid (p2..p5) or feature maps per image.")
@click.option("--device", default="cpu", show_default=True)
def extract(images, name, weights, output, batch_size, size, maps, device) -> None:
    """Embed every image under IMAGES (default: the bundled samples) into a safetensors file."""
    from .extract import run_extraction

    if images is None:
        images = sample_dir()
        click.echo(f"no image folder given: using the {len(_image_paths(images))} bundled sample images in {images}")
    if weights is None:
        click.echo(f"NOTE: no --weights given, {name} has RANDOM weights: the embeddings are not meaningful. "
                   "Pass --weights hub (or a checkpoint) for pretrained features.")
    result = run_extraction(_image_paths(images), name, weights, output, batch_size=batch_size, size=size,
                            maps=maps, device=device, progress=True)
    click.echo(f"wrote {result['count']} embeddings of dim {result['dim']} ({name}) to {output}")


if __name__ == "__main__":  # pragma: no cover
    main()
