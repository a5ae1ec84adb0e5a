"""VLM vision towers, projectors and the LLaVA-style MultimodalLM on a tiny random LM and every tiny backbone."""

import math

import pytest
import torch
from torch import nn

import backbone_sdk as bs
from backbone_sdk.adapters.vlm import VisionTower, build_projector
from backbone_sdk.errors import CheckpointMismatchError
from backbone_sdk.integrations.llava import LlavaVisionShim, llava_with_backbone
from backbone_sdk.integrations.llm import IGNORE_INDEX, MultimodalLM
from _frameworks import load_example
from _vlm_kit import TINY, has_cls, image, make_mm, tiny_lm

pytestmark = pytest.mark.usefixtures("_one_thread")


# -- tower -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_token_count_matches_tower(tokenizer, name, select_feature):
    if select_feature == "cls_patch" and not has_cls(name):
        with pytest.raises(ValueError, match="needs a CLS token.*select_feature='patch'"):
            VisionTower(name, select_feature=select_feature)
        return
    tower = VisionTower(name, select_feature=select_feature)
    pixels = tower.prepare_images([image(), image(30, 30, 1)])
    tokens = tower.backbone.tokens(pixels, layer=-2)
    out = tower(pixels)
    expected = tokens.patches.shape[1] + (select_feature == "cls_patch")
    assert out.shape == (2, expected, tower.hidden_size) == (2, tower.num_tokens(), tokens.patches.shape[-1])
    torch.testing.assert_close(out[:, -tokens.patches.shape[1]:], tokens.patches, rtol=0, atol=0)
    if select_feature == "cls_patch":
        torch.testing.assert_close(out[:, 0], tokens.cls, rtol=0, atol=0)

    # every placeholder becomes exactly that many positions, holding the projected tokens
    # (the pixels above: a NaFlex tower would give raw images their own counts, tested below)
    mm = make_mm(tokenizer, tower)
    prompt = "<image> compare <image> the two pictures"
    inputs = mm.embed_inputs(prompt, images=list(pixels))
    n_text = len(tokenizer(prompt)["input_ids"]) - 2
    assert inputs["inputs_embeds"].shape[1] == n_text + 2 * tower.num_tokens()
    feats = mm.projector(out)
    start = 1  # after BOS
    torch.testing.assert_close(inputs["inputs_embeds"][0, start:start + expected], feats[0], rtol=0, atol=0)
    second = start + expected + len(tokenizer("compare", add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(inputs["inputs_embeds"][0, second:second + expected], feats[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_num_tokens_without_running(name):
    """num_tokens() for sizes other than the default, and with register tokens kept."""
    spec = bs.get_spec(name)
    div = spec.input.size_divisibility
    size = (div * math.ceil(70 / div), div * math.ceil(90 / div))
    for drop in (True, False):
        tower = VisionTower(name, drop_registers=drop, image_size=size)
        out = tower(tower.prepare_images([image(50, 80)]))
        if tower.naflex:  # float pixels keep their size; num_tokens(size) is a raw image's budgeted count
            assert out.shape[1] == (size[0] // div) * (size[1] // div)
            out = tower([image(*size)])[0][None]
        assert out.shape[1] == tower.num_tokens() == tower.num_tokens(size)
    kept = VisionTower(name, drop_registers=False)
    extra = spec.prefix_tokens.extra
    assert {"dinov2_reg_test": 4, "deit_distilled_test": 1, "vit_test": 0}.get(name, extra) == extra
    assert kept.num_tokens() - VisionTower(name).num_tokens() == extra


def test_tower_arguments_are_checked():
    with pytest.raises(IndexError, match="select_layer must be in"):
        VisionTower("vit_test", select_layer=5)
    with pytest.raises(ValueError, match="select_feature"):
        VisionTower("vit_test", select_feature="cls")
    with pytest.raises(ValueError, match="image_aspect"):
        VisionTower("vit_test", image_aspect="crop")


def test_pad_and_resize_preprocessing():
    wide = image(16, 64)
    pad = VisionTower("vit_test", image_aspect="pad").prepare_images([wide])
    resize = VisionTower("vit_test", image_aspect="resize").prepare_images([wide])
    assert pad.shape == resize.shape == (1, 3, 32, 32)
    # padding uses the mean colour, which normalizes to exactly 0; the image sits in the middle rows
    assert pad[..., :8, :].abs().max() == 0 and pad[..., -8:, :].abs().max() == 0
    assert pad[..., 8:24, :].abs().amax() > 0.5 and resize[..., :8, :].abs().amax() > 0.5
    torch.testing.assert_close(resize, bs.preprocess([wide], bs.get_spec("vit_test"), mode="resize"))


def test_projectors():
    linear = build_projector("linear", 8, 16)
    assert isinstance(linear, nn.Linear) and linear.weight.shape == (16, 8)
    mlp = build_projector("mlp2x_gelu", 8, 16)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp[0].weight.shape == (16, 8) and mlp[2].weight.shape == (16, 16)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(mlp(x), mlp[2](nn.functional.gelu(mlp[0](x))))
    assert len(build_projector("mlp3x_gelu", 8, 16)) == 5
    assert isinstance(build_projector("identity", 8, 8), nn.Identity)
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        build_projector("identity", 8, 16)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        build_projector("mlp_relu", 8, 16)


# -- training / generation -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY)
def test_training_step(tokenizer, name):
    mm = make_mm(tokenizer, VisionTower(name)).train()
    assert not mm.tower.trainable
    assert not any(m.training for m in mm.tower.backbone.children())  # frozen trunk stays in eval mode
    feats = mm.tower([image()])
    feats = feats[0] if isinstance(feats, list) else feats  # NaFlex: one tensor per image
    assert feats.grad_fn is None and not feats.requires_grad  # no autograd graph through the frozen tower

    out = mm(prompt=["<image> describe the image", "a cat"], images=[[image()], None],
             answer=["a red square", "sits on the mat"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mm.projector.parameters())
    assert all(p.grad is None for p in mm.tower.parameters())
    opt = torch.optim.SGD(mm.projector.parameters(), lr=0.5)
    before = mm.projector[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, mm.projector[0].weight)


def test_labels_cover_only_the_answer(tokenizer):
    mm = make_mm(tokenizer, VisionTower("vit_test"))
    inputs = mm.embed_inputs(["<image> describe", "what is in the picture"], images=[[image()], []],
                             answer=["a red square", "a cat"])
    answer = tokenizer("a red square", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels, mask = inputs["labels"], inputs["attention_mask"]
    real = labels[0][labels[0] != IGNORE_INDEX].tolist()
    assert real == answer
    n = int(mask[0].sum())  # right padding: the answer is at the end of the real positions
    assert labels[0, n - len(answer):n].tolist() == answer and (labels[0, :n - len(answer)] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all()


@pytest.mark.parametrize("name", TINY)
def test_unfrozen_tower_trains(tokenizer, name):
    blocks = "blocks:0" if bs.get_spec(name).plain else "stages:2"
    mm = make_mm(tokenizer, VisionTower(name, finetune=blocks))
    mm(prompt="<image> describe", images=[image()], answer="a cat").loss.backward()
    groups = mm.tower.backbone.stage_modules()
    assert all(p.grad is None for p in groups[0].parameters())  # stem frozen
    used = groups[len(groups) + mm.tower.select_layer]  # the block / stage that produces the tokens
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in used.parameters())


@pytest.mark.parametrize("name", TINY)
def test_generate(tokenizer, name):
    mm = make_mm(tokenizer, VisionTower(name))
    prompts = ["<image> describe the image", "what is", "<image> and <image> compare"]
    images = [[image()], None, [image(30, 60, 1), image(60, 30, 2)]]
    ids = mm.generate(prompt=prompts, images=images, max_new_tokens=5)
    assert ids.dtype == torch.long and ids.shape[0] == 3 and 1 <= ids.shape[1] <= 5
    assert int(ids.max()) < mm.lm.config.vocab_size
    for i in range(3):  # greedy decoding of a left-padded batch equals decoding each sample alone
        alone = mm.generate(prompt=prompts[i], images=images[i], max_new_tokens=5)[0]
        assert ids[i, : len(alone)].tolist() == alone.tolist()


@pytest.mark.parametrize("name,padding_side,lm_style",
                         [(n, side, "llama") for n in TINY for side in ("right", "left")]
                         + [("dinov2_reg_test", "right", "qwen2"), ("clip_test", "left", "qwen2")])
def test_batch_equals_per_sample(tokenizer, name, padding_side, lm_style):
    mm = make_mm(tokenizer, VisionTower(name), lm_style=lm_style)
    prompts = ["two images are shown here <image> <image> compare the two pictures", "describe",
               "<image> what is in the picture"]
    images = [[image(), image(50, 30, 1)], [], [image(64, 64, 2)]]
    answers = ["stripes and circles", "a cat sits on the mat", "the sun"]
    batch = mm.embed_inputs(prompts, images, answers, padding_side=padding_side)
    out = mm.lm(**batch)
    per_token = []
    for i in range(3):
        single = mm(prompt=prompts[i], images=images[i], answer=answers[i])
        real = batch["attention_mask"][i].bool()
        assert int(real.sum()) == single.logits.shape[1]
        torch.testing.assert_close(out.logits[i, real], single.logits[0], rtol=0, atol=1e-5)
        n = int((mm.embed_inputs(prompts[i], images[i], answers[i])["labels"] != IGNORE_INDEX).sum())
        per_token.append((single.loss * n, n))
    # the batch loss is the mean over every answer token of the batch
    total = sum(s for s, _ in per_token) / sum(n for _, n in per_token)
    torch.testing.assert_close(out.loss, total, rtol=0, atol=1e-5)


def test_placeholder_count_mismatch(tokenizer):
    mm = make_mm(tokenizer, VisionTower("vit_test"))
    with pytest.raises(ValueError, match=r"prompt 0 has 1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        mm(prompt="<image> describe", images=[image(), image()])
    with pytest.raises(ValueError, match=r"prompt 1 has 2 '<image>' placeholder\(s\) but 1 image\(s\)"):
        mm(prompt=["a cat", "<image><image> compare"], images=[None, [image()]])
    with pytest.raises(ValueError, match=r"prompt 0 has 0 '<image>' placeholder\(s\) but 1 image"):
        mm.generate(prompt="describe", images=[image()])
    with pytest.raises(ValueError, match="one entry per prompt"):
        mm(prompt=["a", "b"], images=[image()])
    with pytest.raises(ValueError, match="images go in the prompt"):
        mm(prompt="<image> describe", images=image(), answer="<image>")


def test_image_token_added_once(tokenizer):
    mm = make_mm(tokenizer, VisionTower("vit_test"))
    again = make_mm(tokenizer, VisionTower("vit_test"))
    assert mm.image_token_id == again.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer("a <image> b", add_special_tokens=False)["input_ids"].count(mm.image_token_id) == 1
    assert mm.lm.config.vocab_size == len(tokenizer) - 1  # the LM's vocabulary is left alone


# -- saving --------------------------------------------------------------------------------------------
ROUND_TRIPS = [("vit_test", {}), ("vit_test", {"lora": 4}), ("dinov2_reg_test", {"finetune": "blocks:1"}),
               ("resnet_test", {"finetune": "stages:2", "select_layer": -1}), ("clip_test", {"projector": "linear"})]


@pytest.mark.parametrize("name,options", ROUND_TRIPS, ids=[f"{n}-{'-'.join(o) or 'frozen'}" for n, o in ROUND_TRIPS])
def test_save_load_round_trip(tokenizer, tmp_path, name, options):
    options = dict(options)
    projector = options.pop("projector", "mlp2x_gelu")
    base = bs.create_backbone(name, parts=())
    bs.save_weights(base, tmp_path / "backbone.safetensors")
    mm = make_mm(tokenizer, VisionTower(base, **options), projector=projector)
    with torch.no_grad():  # stand-in for training: move everything that the adapter file must carry
        for p in [*mm.projector.parameters(), *(p for p in mm.tower.parameters() if p.requires_grad)]:
            p.add_(torch.randn_like(p) * 0.1)
        for key, value in mm.tower.trainable_state_dict().items():
            if "running_var" in key:
                value.mul_(1.5)
    mm.save_pretrained(tmp_path / "adapter")
    saved = set(mm.adapter_state_dict())
    assert any(k.startswith("projector.") for k in saved)
    assert any(k.startswith("tower.") for k in saved) == bool(options.get("lora") or options.get("finetune"))
    if "lora" in options:
        assert all("lora_" in k for k in saved if k.startswith("tower."))

    loaded = MultimodalLM.from_pretrained(tmp_path / "adapter", mm.lm, tokenizer,
                                          tower_weights=tmp_path / "backbone.safetensors")
    assert loaded.tower.config == mm.tower.config and loaded.projector_type == projector
    for key, value in mm.adapter_state_dict().items():
        torch.testing.assert_close(loaded.adapter_state_dict()[key], value, rtol=0, atol=0)
    args = dict(prompt="<image> describe the image", images=[image()])
    torch.testing.assert_close(loaded.eval()(**args).logits, mm.eval()(**args).logits, rtol=0, atol=0)

    fresh = make_mm(tokenizer, VisionTower(name, select_layer=options.get("select_layer", -2)), projector=projector)
    if "lora" in options:  # a tower without LoRA has nowhere to put LoRA weights
        with pytest.raises(CheckpointMismatchError, match="tower tensors do not match.*unexpected"):
            fresh.load_adapter(tmp_path / "adapter")
        return
    if "select_layer" in options:  # a projector for another layer's width is refused with the reason
        with pytest.raises(CheckpointMismatchError, match="projector maps 128 -> 32.*this model needs 64 -> 32"):
            make_mm(tokenizer, VisionTower(name), projector=projector).load_adapter(tmp_path / "adapter")
    fresh.load_adapter(tmp_path / "adapter")  # unfrozen blocks' weights also fit a frozen tower
    torch.testing.assert_close(fresh.projector.state_dict(), mm.projector.state_dict(), rtol=0, atol=0)
    own = fresh.tower.backbone.state_dict()
    for key, value in mm.tower.trainable_state_dict().items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


# -- transformers' LLaVA -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,select_feature,layer",
                         [(n, "patch", -2) for n in TINY] + [(n, "cls_patch", -2) for n in TINY if has_cls(n)]
                         + [("vit_test", "patch", 0), ("dinov2_reg_test", "cls_patch", 1), ("resnet_test", "patch", 1)])
def test_llava_with_sdk_tower_equals_multimodal_lm(tokenizer, name, select_feature, layer):
    """transformers' LlavaForConditionalGeneration runs an SDK backbone through LlavaVisionShim and
    gives the same logits and greedy tokens as MultimodalLM with the same LM and projector."""
    tower = VisionTower(name, select_feature=select_feature, select_layer=layer)
    mm = make_mm(tokenizer, tower)
    mm.lm.resize_token_embeddings(len(tokenizer))  # LLaVA looks the placeholder id up before replacing it
    llava = llava_with_backbone(tower, mm.lm, mm.image_token_id, projector=mm.projector).eval()
    assert not any(p.is_meta for p in llava.parameters())

    pixels = tower.prepare_images([image()])
    ids = tokenizer("<image> describe the image")["input_ids"]
    k = ids.index(mm.image_token_id)
    expanded = torch.tensor([ids[:k] + [mm.image_token_id] * tower.num_tokens() + ids[k + 1:]])
    ours = mm(prompt="<image> describe the image", images=pixels).logits
    theirs = llava(input_ids=expanded, pixel_values=pixels).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    generated = llava.generate(input_ids=expanded, pixel_values=pixels, max_new_tokens=4, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    ours_ids = mm.generate(prompt="<image> describe the image", images=pixels, max_new_tokens=4, eos_token_id=None)
    assert generated[0, expanded.shape[1]:].tolist() == ours_ids[0].tolist()


def test_llava_shim_computes_only_requested_states():
    backbone = bs.create_backbone("dinov2_reg_test")
    shim = LlavaVisionShim(backbone)
    pixels = torch.randn(1, 3, 56, 56)
    out = shim(pixels, output_hidden_states=-2)
    assert len(out.hidden_states) == len(backbone.blocks) + 1
    assert [s is not None for s in out.hidden_states] == [False, True, False]
    tokens = backbone.tokens(pixels, layer=-2)
    torch.testing.assert_close(out.hidden_states[-2], torch.cat([tokens.cls[:, None], tokens.patches], 1))
    every = shim(pixels, output_hidden_states=True).hidden_states
    assert all(s.shape == (1, 17, 32) for s in every)
    with pytest.raises(ValueError, match="no CLS token"):
        llava_with_backbone(VisionTower("swin_test", finetune=None), tiny_lm(8), 7, select_feature="cls_patch")


@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_example_trains_generates_and_reloads(tmp_path, capsys, lm):
    """The example's default DINOv2 and CLIP towers, on both LM styles, plus the fallback for unknown names."""
    example = load_example("vlm", "train_tiny.py")
    example.main(["--towers", "dinov2_test", "clip_test", "not_registered", "--lm", lm, "--steps", "3",
                  "--batch", "2", "--save", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("== dinov2_test") == 1 and out.count("== clip_test") == 1
    assert out.count("== vit_test") == 1  # the unknown name fell back to vit_test
    assert out.count("step   3  loss") == 3 and out.count("generates the same tokens: True") == 3
