"""Pictures of features: backbone_sdk.visualize and `backbone-sdk visualize`."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import backbone_sdk as bs
from _frameworks import single_thread
from backbone_sdk import visualize as viz
from backbone_sdk.cli import main, sample_dir

SAMPLES = sorted(sample_dir().glob("*.png"))
#: tiny variants and the input size used for them (resnet_test's own 224 is larger than needed)
MODELS = {"vit_test": 32, "dinov2_test": 56, "resnet_test": 64, "swin_test": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return bs.create_backbone(name, **overrides)


def _tiles(path, panels, size):
    """The picture at ``path`` cut into its tiles ``[input, panel0, ...]`` (uint8 arrays), after
    checking that its size is the one ``panels`` tiles of ``size`` pixels give."""
    image = np.asarray(Image.open(path).convert("RGB"))
    rows, cols = viz.grid_shape(panels)
    h, w = size
    assert image.shape[:2] == (rows * h + (rows - 1) * viz.GAP, cols * w + (cols - 1) * viz.GAP), path
    tiles = []
    for i in range(panels + 1):
        r, c = divmod(i, cols)
        tiles.append(image[r * (h + viz.GAP):r * (h + viz.GAP) + h, c * (w + viz.GAP):c * (w + viz.GAP) + w])
    return tiles


def test_cli_kind_choices_are_the_kinds():
    command = main.commands["visualize"]
    kind = next(p for p in command.params if p.name == "kinds")
    assert tuple(kind.type.choices) == viz.KINDS


@pytest.mark.parametrize("name", list(MODELS))
def test_each_kind_writes_a_picture_of_the_expected_size(name, tmp_path):
    size = MODELS[name]
    model = _model(name)
    kinds = ["pca", "pca_fg", "norms"] + (["attention"] if viz.supports_attention(model) is None else [])
    assert ("attention" in kinds) == (name in ("vit_test", "dinov2_test"))
    paths = viz.visualize(model, SAMPLES, kinds, tmp_path, size=size, labels=False)
    assert paths == [tmp_path / f"{p.stem}_{k}.png" for p in SAMPLES for k in kinds]
    levels = len(model.pyramid_info)
    panels = {"pca": 1, "pca_fg": 1, "norms": levels, "attention": 2}  # the tiny ViTs have 2 heads
    for path in paths:
        kind = path.stem.split("_", 1)[1]
        tiles = _tiles(path, panels[kind], (size, size))
        assert np.stack(tiles[1:]).std() > 0, path  # the visualization is not constant
    # the input tile is the preprocessed image itself
    expected = bs.preprocess([bs.load_image(SAMPLES[0])], model.spec, size=size)[0]
    mean, std = torch.tensor(model.spec.input.mean).view(3, 1, 1), torch.tensor(model.spec.input.std).view(3, 1, 1)
    expected = ((expected * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    first = _tiles(paths[0], 1, (size, size))[0].astype(float)
    assert np.abs(first - expected).max() <= 1.0


def test_pca_follows_the_tokens():
    """Tokens that are equal get the same colour; the three channels are the three components."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 16, generator=gen)
    patches = base[torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])]  # a 3x3 grid repeating 4 distinct tokens
    rgb = viz.pca_rgb(patches, (3, 3))
    assert rgb.shape == (3, 3, 3) and rgb.min() >= 0 and rgb.max() <= 1
    flat = rgb.reshape(9, 3)
    torch.testing.assert_close(flat[0], flat[4])
    torch.testing.assert_close(flat[1], flat[5])
    assert (flat[0] - flat[1]).abs().max() > 0.1
    for c in range(3):  # every component spans [0, 1]
        assert flat[:, c].min() == 0 and flat[:, c].max() == pytest.approx(1)


def test_principal_components_against_numpy_with_a_fixed_sign():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=gen) * torch.tensor([5.0, 3, 2, 1, 0.5, 0.4, 0.3, 0.2])
    proj = viz._principal(x, 3).numpy()
    centred = x.double().numpy() - x.double().numpy().mean(0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    reference = centred @ vectors[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(proj), np.abs(reference), rtol=1e-6, atol=1e-9)
    peaks = proj[np.abs(proj).argmax(axis=0), range(3)]
    assert (peaks > 0).all()  # the sign rule: each component's largest projection is positive
    # fewer tokens than components: the missing components are zero, not an error
    assert torch.equal(viz._principal(x[:2], 3)[:, 1:], torch.zeros(2, 2, dtype=torch.float64))


def test_foreground_pca_masks_the_border_as_background():
    """A bright centre block on a background: the foreground is the centre, the background black."""
    gen = torch.Generator().manual_seed(0)
    fg_dir, bg_dir = torch.randn(2, 24, generator=gen)
    grid = torch.zeros(6, 6, dtype=torch.bool)
    grid[2:5, 2:5] = True  # 9 of 36 tokens: above the 0.75 quantile
    flat = grid.flatten()
    patches = torch.where(flat[:, None], fg_dir * 5, bg_dir) + 0.05 * torch.randn(36, 24, generator=gen)
    rgb, mask = viz.foreground_pca_rgb(patches, (6, 6), quantile=0.75)
    assert torch.equal(mask, grid)
    assert rgb[~grid].abs().max() == 0 and rgb[grid].max() > 0
    # the foreground is the side away from the border, even when the first component's sign rule
    # (its largest projection positive: here one far-off border token) would pick the border side
    direction = torch.randn(24, generator=gen)
    inner = torch.zeros(6, 6, dtype=torch.bool)
    inner[1:5, 1:5] = True
    level = torch.where(inner.flatten(), 1.0, -1.0)
    level[0] = -10.0
    patches = level[:, None] * direction + 0.01 * torch.randn(36, 24, generator=gen)
    assert torch.equal(viz.foreground_pca_rgb(patches, (6, 6), quantile=0.55)[1], inner)
    with pytest.raises(bs.InvalidOptionError, match="quantile"):
        viz.foreground_pca_rgb(patches, (6, 6), quantile=1.0)


def test_pca_fg_on_a_model_keeps_about_the_quantile(tmp_path):
    model = _model("vit_test")
    path, = viz.visualize(model, SAMPLES[:1], ["pca_fg"], tmp_path, size=64, labels=False)
    panel = _tiles(path, 1, (64, 64))[1]
    black = (panel.reshape(-1, 3) == 0).all(axis=1).mean()
    assert 0.4 <= black <= 0.6  # median threshold: half the 8x8 tokens are background


def test_pca_is_deterministic_for_a_seed(tmp_path):
    def draw(seed, folder):
        path, = viz.visualize(_model("dinov2_test", seed), SAMPLES[1:2], "pca", tmp_path / folder, labels=False)
        return np.asarray(Image.open(path))

    first, again, other = draw(0, "a"), draw(0, "b"), draw(1, "c")
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_attention_matches_a_recomputation_from_the_block_weights():
    model = _model("vit_test").eval()
    x = bs.preprocess([bs.load_image(SAMPLES[2])], model.spec)
    with torch.no_grad():
        maps = viz.attention_maps(model, x)
        depth = len(model.feature_info)
        seq = model.run_layers(x, [depth - 2])[depth - 2]  # the last block's input
        block = model.blocks[-1]
        h = block.layernorm_before(seq)
        heads = maps.shape[1]
        q = block.attention.q_proj(h).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = block.attention.k_proj(h).unflatten(-1, (heads, -1)).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    assert maps.shape == (1, model.spec.config.heads, 4, 4)
    torch.testing.assert_close(maps, probs[:, :, 0, 1:].reshape(maps.shape))
    # the configured attention implementation is restored (the model keeps running SDPA)
    assert model.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["dinov2_reg_test", "deit_distilled_test"])
def test_attention_skips_every_prefix_token(name):
    model = _model(name).eval()
    x = bs.preprocess([bs.load_image(SAMPLES[0])], model.spec)
    with torch.no_grad():
        maps = viz.attention_maps(model, x)
    grid = model.grid(x)
    assert maps.shape == (1, 2, *grid)
    share = maps.sum(dim=(-1, -2))  # what CLS gives to the patches: less than 1 (prefix tokens take the rest)
    assert (share < 1).all() and (share > 0).all()


def test_attention_one_panel_per_head(tmp_path):
    model = _model("vit_test", depth=2, heads=4)
    assert model.spec.config.heads == 4
    path, = viz.visualize(model, SAMPLES[3:4], ["attention"], tmp_path, size=32, tile=64, labels=False)
    tiles = _tiles(path, 4, (64, 64))
    assert all(tile.std() > 0 for tile in tiles[1:])
    assert not np.array_equal(tiles[1], tiles[2])  # heads differ


def test_many_panels_wrap_into_rows(tmp_path):
    """Without a pyramid, norms shows every feature level; past MAX_COLUMNS tiles a row, they wrap."""
    model = _model("vit_test", depth=9, parts=())
    assert model.spec.pyramid is None
    path, = viz.visualize(model, SAMPLES[:1], ["norms"], tmp_path, size=32, labels=False)
    assert viz.grid_shape(9) == (2, viz.MAX_COLUMNS)
    tiles = _tiles(path, 9, (32, 32))
    assert all(tile.std() > 0 for tile in tiles[1:])


def test_norms_panel_brightness_follows_the_norm(tmp_path):
    """The brightest token of a norms panel is the level's largest norm."""
    model = _model("resnet_test").eval()
    path, = viz.visualize(model, SAMPLES[1:2], ["norms"], tmp_path, size=64, labels=False)
    tiles = _tiles(path, 4, (64, 64))
    x = bs.preprocess([bs.load_image(SAMPLES[1])], model.spec, size=64)
    with torch.no_grad():
        norms = viz.level_norms(model, x)
    assert list(norms) == ["p2", "p3", "p4", "p5"]
    for tile, (level, (norm, stride)) in zip(tiles[1:], norms.items()):
        brightness = tile[::stride, ::stride].astype(float).sum(-1)  # one pixel per token
        assert np.unravel_index(brightness.argmax(), brightness.shape) == \
            np.unravel_index(norm[0].argmax().item(), norm[0].shape), level


def test_unsupported_attention_and_bad_kinds(tmp_path):
    for name in ("resnet_test", "siglip_test"):  # hierarchical; plain without a CLS token
        with pytest.raises(bs.UnsupportedOperationError, match=rf"{name}.*(CLS|plain ViT)"):
            viz.visualize(_model(name), SAMPLES[:1], ["pca", "attention"], tmp_path / name, size=64)
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())  # nothing written
    with pytest.raises(bs.InvalidOptionError, match="unknown visualization kind.*'pcaa'"):
        viz.visualize("resnet_test", SAMPLES[:1], ["pcaa"], tmp_path)
    # default kinds: every supported one
    paths = viz.visualize(_model("resnet_test"), SAMPLES[:1], out_dir=tmp_path / "all", size=64)
    assert [p.stem for p in paths] == [f"{SAMPLES[0].stem}_{k}" for k in ("pca", "pca_fg", "norms")]


def test_in_memory_images_and_repeated_names(tmp_path):
    image = Image.open(SAMPLES[0])
    paths = viz.visualize(_model("vit_test"), [image, np.asarray(image), SAMPLES[0], SAMPLES[0]], "pca", tmp_path)
    assert [p.name for p in paths] == ["image0_pca.png", "image1_pca.png", f"{SAMPLES[0].stem}-1_pca.png",
                                       f"{SAMPLES[0].stem}-2_pca.png"]
    arrays = [np.asarray(Image.open(p)) for p in paths]
    assert all(np.array_equal(arrays[0], a) for a in arrays[1:])


def test_cli_visualize_on_the_bundled_samples(tmp_path):
    result = CliRunner().invoke(main, ["visualize", "vit_test", "-o", str(tmp_path), "--tile", "48"])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.stderr and "bundled sample images" in result.stderr
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted(f"{p.stem}_{k}.png" for p in SAMPLES for k in viz.KINDS)
    assert result.stdout.split() == [str(tmp_path / f"{p.stem}_{k}.png") for p in SAMPLES for k in viz.KINDS]
    assert Image.open(tmp_path / f"{SAMPLES[0].stem}_attention.png").size == (3 * 48 + 2 * viz.GAP, 48)


def test_cli_visualize_with_weights_matches_python(tmp_path):
    model = _model("swin_test", seed=3)
    weights = bs.save_weights(model, tmp_path / "w.safetensors")
    args = ["visualize", "swin_test", str(SAMPLES[4]), "-o", str(tmp_path / "cli"), "-w", str(weights),
            "--kind", "pca", "--kind", "norms"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "RANDOM" not in result.stderr
    expected = viz.visualize(model, [SAMPLES[4]], ["pca", "norms"], tmp_path / "py")
    for path in expected:
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "cli" / path.name)))


def test_cli_visualize_skips_or_refuses_attention(tmp_path):
    runner = CliRunner()
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.open(SAMPLES[0]).save(folder / "a.png")
    skipped = runner.invoke(main, ["visualize", "resnet_test", str(folder), "-o", str(tmp_path / "o"), "--size", "64"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipping the attention pictures" in skipped.stderr and "hierarchical" in skipped.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_norms.png", "a_pca.png", "a_pca_fg.png"]

    refused = runner.invoke(main, ["visualize", "resnet_test", str(folder), "-o", str(tmp_path / "r"),
                                   "--kind", "attention"])
    assert refused.exit_code == 1 and "--kind attention" in refused.stderr and "CLS" in refused.stderr
    assert "Traceback" not in refused.output
    bad = runner.invoke(main, ["visualize", "resnet_test", "-o", str(tmp_path / "b"), "--kind", "heat"])
    assert bad.exit_code == 2 and "'heat' is not one of" in bad.stderr
    missing = runner.invoke(main, ["visualize", "resnet_test", str(tmp_path / "nope.png"), "-o", str(tmp_path)])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    no_output = runner.invoke(main, ["visualize", "resnet_test"])
    assert no_output.exit_code == 2 and "--output" in no_output.stderr


def test_docs_python_snippet_runs_and_its_images_exist(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    page = (docs / "visualize.md").read_text()
    snippet, = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/visualize.md", "exec"), {})  # noqa: S102 (our own docs)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("['checker_pca.png', 'checker_pca_fg.png'")
    assert printed[1] == "torch.Size([1, 2, 8, 8])"
    assert len(list((tmp_path / "viz").glob("*.png"))) == 2 * len(viz.KINDS)
    images = re.findall(r"\]\((images/[^)]+\.png)\)", page)
    assert len(images) >= 3
    for name in images:
        assert (docs / name).is_file() and (docs / name).stat().st_size < 100_000, name
