"""VLM token paths: multi-layer taps and the pixel-shuffle token merge, on every tiny backbone."""

import math

import pytest
import torch
from torch import nn

import backbone_sdk as bs
from backbone_sdk.adapters.vlm import VisionTower, pixel_shuffle
from backbone_sdk.errors import CheckpointMismatchError
from backbone_sdk.integrations.llava import llava_with_backbone
from backbone_sdk.integrations.llm import MultimodalLM
from _vlm_kit import TINY, has_cls, image, make_mm, saved_multimodal_lm, tiny_lm

pytestmark = pytest.mark.usefixtures("_one_thread")


# -- token paths: multi-layer taps, pixel-shuffle token merge ------------------------------------------
def split_out(out, grid):
    """A tower output ``[B, P + h*w, D]`` as (prefix, patches)."""
    p = out.shape[1] - grid[0] * grid[1]
    return out[:, :p], out[:, p:]


def reference_taps(backbone, pixels, layers, **options):
    """Each layer through today's single-layer tower, patches mean-pooled by hand to the coarsest grid."""
    singles = [VisionTower(backbone, select_layer=i, finetune=None, **options) for i in layers]
    coarse = max(singles, key=lambda t: t.level.stride).grid()
    parts = []
    for tower in singles:
        (gh, gw), out = tower.grid(), tower(pixels)
        prefix, patches = split_out(out, (gh, gw))
        k = gh // coarse[0]
        assert (gh, gw) == (k * coarse[0], k * coarse[1])  # the test sizes give exact multiples
        if k > 1:
            maps = patches.transpose(1, 2).reshape(out.shape[0], out.shape[-1], gh, gw)
            patches = nn.functional.avg_pool2d(maps, k).flatten(2).transpose(1, 2)
        parts.append(torch.cat([prefix, patches], dim=1))
    return parts


def prefix_options(name):
    """Keep every prefix token the family has, so that their per-layer handling is tested too."""
    return {"select_feature": "cls_patch" if has_cls(name) else "patch", "drop_registers": False}


@pytest.mark.parametrize("name", TINY)
def test_multi_layer_taps_equal_single_layers(name):
    """concat / sum of several layers equal today's single-layer towers combined by hand (hierarchical
    stages mean-pooled to the coarsest grid), prefix tokens included; widths, grid and counts follow."""
    spec = bs.get_spec(name)
    backbone = bs.create_backbone(name, parts=()).eval()
    layers, options = [0, -1], prefix_options(name)
    tower = VisionTower(backbone, select_layer=layers, finetune=None, **options)
    pixels = tower.prepare_images([image(), image(30, 30, 1)])
    parts = reference_taps(backbone, pixels, layers, **options)
    out = tower(pixels)
    torch.testing.assert_close(out, torch.cat(parts, dim=-1), rtol=0, atol=1e-6)
    widths = [spec.features[i].channels for i in layers]
    stride = max(spec.features[i].stride for i in layers)
    size = tower.image_size
    assert tower.grid() == (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    assert out.shape == (2, tower.num_tokens(), tower.hidden_size) and tower.hidden_size == sum(widths)
    if len(set(widths)) == 1:
        summed = VisionTower(backbone, select_layer=layers, layer_merge="sum", finetune=None, **options)
        torch.testing.assert_close(summed(pixels), parts[0] + parts[1], rtol=0, atol=1e-6)
        assert summed.hidden_size == widths[0] and summed.num_tokens() == tower.num_tokens()
    else:
        with pytest.raises(ValueError, match="layer_merge='sum' needs layers of one width.*'concat'"):
            VisionTower(backbone, select_layer=layers, layer_merge="sum")


@pytest.mark.parametrize("name", TINY)
def test_multi_layer_taps_run_the_backbone_once(name):
    """One pass for all tapped layers, stopping after the deepest: later blocks / stages never run."""
    tower = VisionTower(name, select_layer=[1, 0])
    groups = tower.backbone.stage_modules()[1:]  # one per level, after the stem
    assert len(groups) == len(tower.spec.features)
    counts = {}  # calls of every module inside each group (a group may be a ModuleList that is never called)
    for k, group in enumerate(groups):
        for module in group.modules():
            module.register_forward_hook(lambda m, *_, k=k: counts.__setitem__((k, id(m)), counts.get((k, id(m)), 0) + 1))
    tower([image()])
    # a second pass would call every module of the group again: its least-called module tells the passes
    calls = [min((n for (g, _), n in counts.items() if g == k), default=0) for k in range(len(groups))]
    assert calls == [1, 1] + [0] * (len(groups) - 2)


def test_multi_layer_concat_follows_list_order():
    backbone = bs.create_backbone("resnet_test", parts=())
    pixels = VisionTower(backbone).prepare_images([image()])
    ab = VisionTower(backbone, select_layer=[2, 3])(pixels)
    ba = VisionTower(backbone, select_layer=[3, 2])(pixels)
    assert ab.shape == ba.shape == (1, 49, 64 + 128)
    torch.testing.assert_close(ba, torch.cat([ab[..., 64:], ab[..., :64]], dim=-1), rtol=0, atol=0)


def test_pixel_shuffle_channel_order():
    """Hand-computed 2x4 grid: token t holds values 10 * t + d. Idefics3 / SmolVLM order, equal to
    transformers' InternVL pixel_shuffle on square grids, different from torch's pixel_unshuffle."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = (10 * torch.arange(8.0)[:, None] + torch.arange(2.0))[None]  # [1, 8 tokens, 2]: rows 0-3, 4-7
    out = pixel_shuffle(x, (2, 4), 2)
    assert out.tolist() == [[[0, 1, 10, 11, 40, 41, 50, 51], [20, 21, 30, 31, 60, 61, 70, 71]]]

    x = torch.randn(2, 36, 5)
    ours = pixel_shuffle(x, (6, 6), 2)
    torch.testing.assert_close(ours, Idefics3Connector.pixel_shuffle(None, x, 2), rtol=0, atol=0)
    internvl = InternVLModel.pixel_shuffle(None, x.reshape(2, 6, 6, 5), 0.5)  # [B, rows, cols, D] in
    torch.testing.assert_close(ours, internvl.reshape(2, 9, 20), rtol=0, atol=0)
    maps = x.transpose(1, 2).reshape(2, 5, 6, 6)
    unshuffled = nn.functional.pixel_unshuffle(maps, 2).flatten(2).transpose(1, 2)  # channel-major order
    assert unshuffled.shape == ours.shape and not torch.equal(unshuffled, ours)
    torch.testing.assert_close(ours.reshape(2, 9, 4, 5).transpose(2, 3).flatten(2), unshuffled, rtol=0, atol=0)


def test_pixel_shuffle_pads_odd_grids():
    x = (torch.arange(9.0) + 1)[None, :, None]  # 3x3 grid, D = 1, values 1..9
    out = pixel_shuffle(x, (3, 3), 2)
    assert out.tolist() == [[[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]]
    torch.testing.assert_close(pixel_shuffle(x, (3, 3), 1), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="9 tokens for a 2x4 grid"):
        pixel_shuffle(x, (2, 4), 2)


@pytest.mark.parametrize("name", TINY)
def test_token_merge_tower(name):
    """token_merge=2 is pixel_shuffle of today's patch tokens; prefix tokens stay, tiled to the width."""
    backbone = bs.create_backbone(name, parts=()).eval()
    options = prefix_options(name)
    plain = VisionTower(backbone, finetune=None, **options)
    merged = VisionTower(backbone, finetune=None, token_merge=2, **options)
    pixels = plain.prepare_images([image(), image(30, 30, 1)])
    prefix, patches = split_out(plain(pixels), plain.grid())
    out = merged(pixels)
    (gh, gw), d = plain.grid(), plain.hidden_size
    assert merged.grid() == (math.ceil(gh / 2), math.ceil(gw / 2)) and merged.hidden_size == 4 * d
    assert out.shape == (2, merged.num_tokens(), 4 * d) and merged.num_tokens() == prefix.shape[1] + math.prod(merged.grid())
    torch.testing.assert_close(out[:, prefix.shape[1]:], pixel_shuffle(patches, (gh, gw), 2), rtol=0, atol=0)
    torch.testing.assert_close(out[:, :prefix.shape[1]], prefix.repeat(1, 1, 4), rtol=0, atol=0)


def test_token_merge_odd_grid():
    """A 5x5 grid (vit_test at 40 px) becomes 3x3 with zero-padded blocks; ResNet's 7x7 stage4 4x4."""
    tower = VisionTower("vit_test", image_size=40, token_merge=2)
    out = tower([image()])
    assert tower.grid() == (3, 3) and out.shape == (1, 9, 128) == (1, tower.num_tokens(), tower.hidden_size)
    d = 32
    right, bottom = out[0, 2].reshape(4, d), out[0, 6].reshape(4, d)  # token (0, 2) and (2, 0)
    assert right[[1, 3]].abs().max() == 0 and right[[0, 2]].abs().min() > 0
    assert bottom[[2, 3]].abs().max() == 0 and bottom[[0, 1]].abs().min() > 0
    resnet = VisionTower("resnet_test", select_layer=-1, token_merge=2)
    assert resnet([image()]).shape == (1, 16, 512) and resnet.num_tokens() == 16


def test_token_path_arguments_are_checked():
    with pytest.raises(IndexError, match="select_layer must be in.*non-empty list"):
        VisionTower("vit_test", select_layer=[0, 5])
    with pytest.raises(IndexError, match="non-empty list"):
        VisionTower("vit_test", select_layer=[])
    with pytest.raises(IndexError, match="names a layer of vit_test twice"):
        VisionTower("vit_test", select_layer=[2, -1])
    with pytest.raises(ValueError, match="layer_merge must be one of"):
        VisionTower("vit_test", select_layer=[0, 1], layer_merge="mean")
    with pytest.raises(ValueError, match="token_merge must be an integer >= 1"):
        VisionTower("vit_test", token_merge=0)
    one = VisionTower("vit_test", select_layer=[-2])  # a one-element list is the list form of -2
    torch.testing.assert_close(one([image()]), VisionTower(one.backbone, finetune=None)([image()]), rtol=0, atol=0)
    assert one.config["select_layer"] == [-2] and VisionTower("vit_test").config["select_layer"] == -2
    for tower in (one, VisionTower("vit_test", token_merge=2)):
        with pytest.raises(ValueError, match="one select_layer and token_merge=1.*MultimodalLM"):
            llava_with_backbone(tower, tiny_lm(8), 7)


TOKEN_PATHS = {"layers": {"select_layer": [0, -1]}, "merge": {"token_merge": 2},
               "layers+merge": {"select_layer": [-1, 0], "token_merge": 2, "select_feature": "cls_patch"}}


@pytest.mark.parametrize("variant", TOKEN_PATHS)
@pytest.mark.parametrize("name", TINY)
def test_token_paths_train_in_multimodal_lm(tokenizer, name, variant):
    """Every tiny family as a multi-layer / merged tower: placeholders expand to num_tokens() positions
    holding the projected tokens, and a training step updates the projector."""
    options = dict(TOKEN_PATHS[variant])
    if not has_cls(name):
        options.pop("select_feature", None)
    tower = VisionTower(name, **options)
    mm = make_mm(tokenizer, tower).train()
    images = [image(), image(30, 30, 1)]
    if tower.naflex:  # the fixed-size path here; native images: test_naflex_tower_token_paths
        images = list(tower.prepare_images(images))
    feats = tower(images)
    assert feats.shape == (2, tower.num_tokens(), tower.hidden_size)
    prompt = "<image> compare <image> the two pictures"
    inputs = mm.embed_inputs(prompt, images=images)
    n_text = len(tokenizer(prompt)["input_ids"]) - 2
    assert inputs["inputs_embeds"].shape[1] == n_text + 2 * tower.num_tokens()
    torch.testing.assert_close(inputs["inputs_embeds"][0, 1:1 + tower.num_tokens()], mm.projector(feats)[0],
                               rtol=0, atol=0)

    out = mm(prompt=[prompt, "a cat"], images=[images, None], answer=["stripes", "sits on the mat"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mm.projector.parameters())
    before = mm.projector[0].weight.detach().clone()
    torch.optim.SGD(mm.projector.parameters(), lr=0.5).step()
    assert not torch.equal(before, mm.projector[0].weight)


TOKEN_TRIPS = [("vit_test", {"select_layer": [0, -1], "layer_merge": "sum", "token_merge": 2,
                             "select_feature": "cls_patch"}),
               ("swin_test", {"select_layer": [1, 3], "token_merge": 2, "finetune": "stages:1"})]


@pytest.mark.parametrize("name,options", TOKEN_TRIPS, ids=[n for n, _ in TOKEN_TRIPS])
def test_token_paths_save_load_round_trip(tokenizer, tmp_path, name, options):
    import json

    mm = saved_multimodal_lm(tokenizer, tmp_path, name, **options)
    saved = json.loads((tmp_path / "adapter" / "mm_config.json").read_text())["tower"]
    assert {k: saved[k] for k in options} == options  # the list form survives JSON
    loaded = MultimodalLM.from_pretrained(tmp_path / "adapter", mm.lm, tokenizer,
                                          tower_weights=tmp_path / "backbone.safetensors")
    assert loaded.tower.config == mm.tower.config and loaded.tower.num_tokens() == mm.tower.num_tokens()
    args = {"prompt": "<image> describe the image", "images": [image()]}
    torch.testing.assert_close(loaded.eval()(**args).logits, mm.eval()(**args).logits, rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="projector maps"):
        make_mm(tokenizer, VisionTower(name)).load_adapter(tmp_path / "adapter")


def test_docs_token_paths_examples_run():
    """The examples of docs/vlm.md's token-paths section are self-contained and their asserts hold."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "vlm.md").read_text()
    section = doc.split("\n## Token paths", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "docs/vlm.md", "exec"), {})
