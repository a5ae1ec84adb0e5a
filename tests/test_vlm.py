"""VLM vision towers, projectors and the LLaVA-style MultimodalLM on a tiny random LM and every tiny backbone."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import backbone_sdk as bs
from backbone_sdk.adapters.vlm import VisionTower, build_projector, pixel_shuffle
from backbone_sdk.errors import CheckpointMismatchError
from backbone_sdk.integrations.llava import LlavaVisionShim, llava_with_backbone
from backbone_sdk.integrations.llm import IGNORE_INDEX, MultimodalLM
from _frameworks import load_example
from conftest import tiny_names

TINY = tiny_names()
SENTENCES = [
    "a red square on a blue field", "a cat sits on the mat", "describe the image please",
    "what is in the picture", "two images are shown here", "compare the two pictures",
    "the sun sets over the sea", "stripes and circles in green and yellow",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU, OpenMP spin-waiting made
    this file 2.5-7x slower (25-70 s instead of 10 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE tokenizer trained here (adds BOS like Llama's); ``<image>`` is not in it yet."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=90, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", specials.index("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_lm(vocab: int, hidden: int = 32, style: str = "llama"):
    """A random 2-layer causal LM: Llama- or Qwen2-style (transformers' own classes, built from configs)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[style]
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model_cls(config).eval()


def make_mm(tokenizer, tower, projector="mlp2x_gelu", lm_style="llama", **kwargs):
    vocab = len(tokenizer) - int("<image>" in tokenizer.get_added_vocab())
    return MultimodalLM(tiny_lm(vocab, style=lm_style), tokenizer, tower, projector=projector, **kwargs)


def image(h=40, w=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def has_cls(name):
    return bs.get_spec(name).prefix_tokens.cls


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

    base = bs.create_backbone(name, parts=())
    bs.save_weights(base, tmp_path / "backbone.safetensors")
    mm = make_mm(tokenizer, VisionTower(base, **options))
    with torch.no_grad():
        for p in [*mm.projector.parameters(), *(p for p in mm.tower.parameters() if p.requires_grad)]:
            p.add_(torch.randn_like(p) * 0.1)
    mm.save_pretrained(tmp_path / "adapter")
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

    base = bs.create_backbone(NAFLEX, parts=())
    bs.save_weights(base, tmp_path / "backbone.safetensors")
    options = {"max_num_patches": 9, "token_merge": 2, "select_layer": [0, -1], "finetune": "blocks:1"}
    mm = make_mm(tokenizer, VisionTower(base, **options))
    with torch.no_grad():
        for p in [*mm.projector.parameters(), *(p for p in mm.tower.parameters() if p.requires_grad)]:
            p.add_(torch.randn_like(p) * 0.1)
    mm.save_pretrained(tmp_path / "adapter")
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
