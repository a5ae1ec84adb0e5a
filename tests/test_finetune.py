"""Fine-tune policies: one meaning for every family."""

import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.adapters.finetune import FinetunePolicy, add_lora, apply_finetune, param_groups
from conftest import tiny_names


def _frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("name", tiny_names())
def test_frozen_trunk_gets_no_grads_and_stays_in_eval(name):
    model = apply_finetune(bs.create_backbone(name), "frozen").train()
    trunk = [n for n, _ in model.named_parameters() if not n.startswith("neck.")]
    assert _frozen_names(model) == set(trunk)
    assert all(not m.training for c in model.children() if c is not model.neck
               for m in c.modules())
    size = 56 if model.spec.input.patch_size == 14 else 64
    x = torch.randn(1, 3, size, size, requires_grad=True)  # even an input that wants grad builds no graph
    assert not model.embed(x).requires_grad
    assert all(not v.requires_grad for v in model.features(x).values())  # no autograd graph, no activations kept
    if model.spec.plain:  # the simple pyramid after the frozen trunk still trains
        sum(m.sum() for m in model.pyramid(x).values()).backward()
        assert x.grad is None
        assert all(p.grad is not None for p in model.neck.parameters())


@pytest.mark.parametrize("name", tiny_names())
def test_stages_n_freezes_stem_and_first_n(name):
    model = bs.create_backbone(name)
    groups = model.stage_modules()
    mode = "blocks" if model.spec.plain else "stages"
    apply_finetune(model, f"{mode}:1")
    expected = {n for n, p in model.named_parameters()
                if any(p is q for g in groups[:2] for q in g.parameters())}
    assert _frozen_names(model) == expected and expected
    apply_finetune(model, "none")
    assert _frozen_names(model) == set()
    with pytest.raises(ValueError, match="cannot freeze"):
        apply_finetune(model, f"{mode}:{len(groups)}")
    other = "stages" if model.spec.plain else "blocks"
    with pytest.raises(ValueError, match=f"use '{mode}:1'"):  # the unit must match the family
        apply_finetune(model, f"{other}:1")


def test_frozen_norm_is_frozen_batchnorm():
    """frozen_norm: every BatchNorm is a fixed scale and shift (statistics and affine), convolutions train."""
    model = apply_finetune(bs.create_backbone("resnet_test"), "none", frozen_norm=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not b.training and not any(p.requires_grad for p in b.parameters()) for b in bns)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.embed(torch.randn(2, 3, 64, 64)).pow(2).sum().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".convolution." in k for k in changed)
    frozen_bn = FinetunePolicy(mode="none", frozen_norm=True)
    assert FinetunePolicy.parse("none", frozen_norm=True) == frozen_bn
    vit = apply_finetune(bs.create_backbone("vit_test"), frozen_bn)  # LayerNorms are not BatchNorms
    assert all(p.requires_grad for p in vit.parameters())


def test_norm_eval_keeps_batchnorm_in_eval():
    model = apply_finetune(bs.create_backbone("resnet_test"), "none", norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    stats = [b.running_mean.clone() for b in bns]
    model.features(torch.randn(2, 3, 64, 64))
    assert all(not b.training for b in bns)
    assert all(torch.equal(b.running_mean, s) for b, s in zip(bns, stats))


@pytest.mark.parametrize("text", ["stages", "stages:x", "freeze", "frozen:2"])
def test_bad_policy_strings(text):
    with pytest.raises(ValueError, match="policy"):
        FinetunePolicy.parse(text)


def test_layer_decay_groups():
    model = bs.create_backbone("vit_test")
    groups = param_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    by_name = {n: g for g in groups for n in g["names"]}
    depth = len(model.stage_modules())
    assert by_name["model.embeddings.cls_token"]["lr"] == pytest.approx(0.5 ** depth)
    assert by_name["model.embeddings.cls_token"]["weight_decay"] == 0.0
    assert by_name["model.layers.0.attention.q_proj.weight"]["lr"] == pytest.approx(0.5 ** (depth - 1))
    assert by_name["model.layers.0.attention.q_proj.weight"]["weight_decay"] == 0.1
    assert by_name["model.layers.0.attention.q_proj.bias"]["weight_decay"] == 0.0
    assert by_name["model.layernorm.weight"]["lr"] == pytest.approx(1.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("policy", [None, "frozen"])
def test_lora_trains_only_adapters(policy):
    model = bs.create_backbone("vit_test")
    if policy:  # LoRA inside a frozen trunk: the trunk must build its graph again
        apply_finetune(model, policy)
    model = add_lora(model, r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("neck.") for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable)
    model.embed(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n and not n.startswith("simple"))
    with pytest.raises(ValueError, match="no attention projections"):
        add_lora(bs.create_backbone("resnet_test"))
