"""Native-resolution VLM towers (SigLIP 2 NaFlex): a token count per image through MultimodalLM."""

import math

import numpy as np
import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.adapters.vlm import VisionTower, pixel_shuffle
from backbone_sdk.integrations.llm import IGNORE_INDEX, MultimodalLM
from _vlm_kit import image, make_mm, saved_multimodal_lm

pytestmark = pytest.mark.usefixtures("_one_thread")


# -- native resolution (SigLIP 2 NaFlex): a token count per image ---------------------------------------
NAFLEX = "siglip2_naflex_test"  # patch 8, budget 16 patches
SHAPES = [(40, 56), (30, 30), (16, 64), (64, 24)]  # budgeted grids 3x5, 4x4, 2x8, 6x2 (a PIL image for one)


def naflex_images():
    from PIL import Image

    images = [image(h, w, seed) for seed, (h, w) in enumerate(SHAPES)]
    images[1] = Image.fromarray(images[1])
    return images


def budget_grid(h, w, budget=16, patch=8):
    from backbone_sdk.plugins.siglip2 import naflex_size

    return tuple(s // patch for s in naflex_size(h, w, patch, budget))


def test_naflex_tower_gives_each_image_its_count():
    tower = VisionTower(NAFLEX)
    assert tower.naflex and tower.max_num_patches == 16 and tower.config["max_num_patches"] == 16
    images = naflex_images()
    out = tower(images)
    grids = [budget_grid(*s) for s in SHAPES]
    assert grids == [(3, 5), (4, 4), (2, 8), (6, 2)]
    assert isinstance(out, list) and [o.shape for o in out] == [(math.prod(g), 32) for g in grids]
    assert [tower.num_tokens(s) for s in SHAPES] == [math.prod(g) for g in grids] and tower.num_tokens() == 16
    ref = tower.backbone.naflex_tokens(tower.backbone.naflex_inputs(images, 16), layer=-2)
    assert ref.grids == grids
    for i, o in enumerate(out):  # only the real tokens, from the tower's own image processing
        torch.testing.assert_close(o, ref.patches[i, ref.mask[i]], rtol=0, atol=0)
    # another budget; float pixels keep today's fixed-size tensor
    small = VisionTower(tower.backbone, finetune=None, max_num_patches=6)
    assert [o.shape[0] for o in small(images)] == [small.num_tokens(s) for s in SHAPES] == [
        math.prod(budget_grid(*s, budget=6)) for s in SHAPES]
    pixels = torch.randn(2, 3, 24, 40)
    fixed = tower(pixels)
    assert isinstance(fixed, torch.Tensor) and fixed.shape == (2, 15, 32)
    torch.testing.assert_close(fixed, tower.backbone.tokens(pixels, layer=-2).patches, rtol=0, atol=0)
    with pytest.raises(ValueError, match="raw images .* mixed with float"):
        tower([image(), torch.randn(3, 32, 32)])
    with pytest.raises(ValueError, match="max_num_patches is for native-resolution"):
        VisionTower("vit_test", max_num_patches=16)
    with pytest.raises(ValueError, match="max_num_patches must be a positive integer"):
        VisionTower(NAFLEX, max_num_patches=0)
    with pytest.raises(ValueError, match="needs a CLS token"):
        VisionTower(NAFLEX, select_feature="cls_patch")


def test_naflex_tower_token_paths():
    """token_merge merges each image's own grid; a select_layer list concatenates / sums per image, in one pass."""
    backbone = bs.create_backbone(NAFLEX, parts=()).eval()
    images = naflex_images()
    plain = VisionTower(backbone, finetune=None)(images)
    merged_tower = VisionTower(backbone, finetune=None, token_merge=2)
    merged = merged_tower(images)
    for p, m, shape in zip(plain, merged, SHAPES):
        grid = budget_grid(*shape)
        torch.testing.assert_close(m, pixel_shuffle(p[None], grid, 2)[0], rtol=0, atol=0)
        n = math.ceil(grid[0] / 2) * math.ceil(grid[1] / 2)
        assert m.shape == (merged_tower.num_tokens(shape), 128) == (n, 128)
    singles = [VisionTower(backbone, select_layer=i, finetune=None)(images) for i in (0, 1)]
    both = VisionTower(backbone, select_layer=[1, 0], finetune=None, token_merge=2)
    summed = VisionTower(backbone, select_layer=[0, 1], layer_merge="sum", finetune=None)
    for i, shape in enumerate(SHAPES):
        cat = torch.cat([singles[1][i], singles[0][i]], dim=-1)
        torch.testing.assert_close(both(images)[i], pixel_shuffle(cat[None], budget_grid(*shape), 2)[0],
                                   rtol=0, atol=0)
        torch.testing.assert_close(summed(images)[i], singles[0][i] + singles[1][i], rtol=0, atol=0)
    assert both.hidden_size == 4 * 64


def placeholder_tokens(tokenizer, mm, inputs, prompts, per_sample):
    """The inputs_embeds rows of each placeholder, read back from the token ids (a plain Python walk)."""
    found = []
    for b, prompt in enumerate(prompts):
        real = inputs["inputs_embeds"][b, inputs["attention_mask"][b].bool()]
        pos, k = 0, 0
        for token in tokenizer(prompt)["input_ids"]:
            if token == mm.image_token_id:
                n = mm.tower.num_tokens(np.asarray(per_sample[b][k]).shape[:2])
                found.append(real[pos:pos + n])
                pos, k = pos + n, k + 1
            else:
                pos += 1
        assert k == len(per_sample[b])
    return found


PROMPTS = ["two images are shown here <image> <image> compare the two pictures", "describe",
           "<image> what is in the picture"]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("token_merge", [1, 2])
def test_naflex_embed_inputs_places_each_images_tokens(tokenizer, padding_side, token_merge):
    mm = make_mm(tokenizer, VisionTower(NAFLEX, token_merge=token_merge))
    images = naflex_images()
    per_sample = [[images[0], images[2]], [], [images[3]]]
    inputs = mm.embed_inputs(PROMPTS, per_sample, padding_side=padding_side)
    counts = [mm.tower.num_tokens(s) for s in SHAPES]
    n_text = [len(tokenizer(p)["input_ids"]) - p.count("<image>") for p in PROMPTS]
    lengths = [n_text[0] + counts[0] + counts[2], n_text[1], n_text[2] + counts[3]]
    assert inputs["attention_mask"].sum(1).tolist() == lengths and inputs["inputs_embeds"].shape[1] == max(lengths)
    pads = inputs["attention_mask"] == 0
    assert inputs["inputs_embeds"][pads].abs().max() == 0
    for b, n in enumerate(lengths):  # positions count real tokens only; padding on the asked side
        real = inputs["attention_mask"][b].bool()
        assert inputs["position_ids"][b, real].tolist() == list(range(n))
        edge = (0, 0) if padding_side == "right" else (-1, max(lengths) - 1)
        assert real.nonzero()[edge[0]].item() == edge[1]
    expected = [mm.projector(mm.tower([img])[0]) for img in (images[0], images[2], images[3])]
    found = placeholder_tokens(tokenizer, mm, inputs, PROMPTS, per_sample)
    assert [f.shape[0] for f in found] == [counts[0], counts[2], counts[3]]
    for got, want in zip(found, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [f.shape for f in mm.image_features(images)] == [(c, 32) for c in counts]


def test_naflex_training_step_and_generate(tokenizer):
    mm = make_mm(tokenizer, VisionTower(NAFLEX, token_merge=2)).train()
    images = naflex_images()
    per_sample = [[images[0], images[1]], None, [images[2]]]
    out = mm(prompt=PROMPTS, images=per_sample, answer=["stripes and circles", "a cat", "the sun"])
    labels = mm.embed_inputs(PROMPTS, per_sample, ["stripes and circles", "a cat", "the sun"])["labels"]
    answer = tokenizer("a cat", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[1][labels[1] != IGNORE_INDEX].tolist() == answer
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mm.projector.parameters())
    assert all(p.grad is None for p in mm.tower.parameters())
    before = mm.projector[0].weight.detach().clone()
    torch.optim.SGD(mm.projector.parameters(), lr=0.5).step()
    assert not torch.equal(before, mm.projector[0].weight)

    mm.eval()
    ids = mm.generate(prompt=PROMPTS, images=per_sample, max_new_tokens=4)
    assert ids.shape[0] == 3 and 1 <= ids.shape[1] <= 4
    for i in range(3):
        alone = mm.generate(prompt=PROMPTS[i], images=per_sample[i], max_new_tokens=4)[0]
        assert ids[i, : len(alone)].tolist() == alone.tolist()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_naflex_batch_equals_per_sample(tokenizer, padding_side):
    mm = make_mm(tokenizer, VisionTower(NAFLEX))
    images = naflex_images()
    per_sample = [[images[0], images[2]], [], [images[3]]]
    answers = ["stripes and circles", "a cat sits on the mat", "the sun"]
    batch = mm.embed_inputs(PROMPTS, per_sample, answers, padding_side=padding_side)
    out = mm.lm(**batch)
    for i in range(3):
        single = mm(prompt=PROMPTS[i], images=per_sample[i], answer=answers[i])
        real = batch["attention_mask"][i].bool()
        assert int(real.sum()) == single.logits.shape[1]
        torch.testing.assert_close(out.logits[i, real], single.logits[0], rtol=0, atol=1e-5)


def test_naflex_save_load_round_trip(tokenizer, tmp_path):
    import json

    options = {"max_num_patches": 9, "token_merge": 2, "select_layer": [0, -1], "finetune": "blocks:1"}
    mm = saved_multimodal_lm(tokenizer, tmp_path, NAFLEX, **options)
    saved = json.loads((tmp_path / "adapter" / "mm_config.json").read_text())["tower"]
    assert {k: saved[k] for k in options} == options
    loaded = MultimodalLM.from_pretrained(tmp_path / "adapter", mm.lm, tokenizer,
                                          tower_weights=tmp_path / "backbone.safetensors")
    assert loaded.tower.config == mm.tower.config and loaded.tower.max_num_patches == 9
    args = {"prompt": "<image> describe <image>", "images": naflex_images()[:2]}
    torch.testing.assert_close(loaded.eval()(**args).logits, mm.eval()(**args).logits, rtol=0, atol=0)
    assert [t.shape[0] for t in loaded.tower(args["images"])] == [mm.tower.num_tokens(s) for s in SHAPES[:2]]


def test_docs_native_resolution_example_runs():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "vlm.md").read_text()
    section = doc.split("\n## Native resolution", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/vlm.md", "exec"), {})
