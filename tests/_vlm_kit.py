"""Shared pieces of the VLM tests (a pytest plugin, see conftest.py): a tokenizer trained on the spot,
tiny random LMs, images. ``_one_thread`` is opted into per module with ``pytestmark``."""

import numpy as np
import pytest
import torch

import backbone_sdk as bs
from backbone_sdk.integrations.llm import MultimodalLM
from conftest import tiny_names

TINY = tiny_names()
SENTENCES = [
    "a red square on a blue field", "a cat sits on the mat", "describe the image please",
    "what is in the picture", "two images are shown here", "compare the two pictures",
    "the sun sets over the sea", "stripes and circles in green and yellow",
]


@pytest.fixture(scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared CPU, OpenMP spin-waiting made
    this file 2.5-7x slower (25-70 s instead of 10 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def train_tokenizer():
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


def saved_multimodal_lm(tokenizer, tmp_path, backbone: str, **options):
    """A MultimodalLM on a fresh tower (``options``) with perturbed projector and trainable tower
    weights, saved to ``tmp_path / "adapter"`` (the backbone's own weights to ``backbone.safetensors``)."""
    from backbone_sdk.adapters.vlm import VisionTower

    base = bs.create_backbone(backbone, parts=())
    bs.save_weights(base, tmp_path / "backbone.safetensors")
    mm = make_mm(tokenizer, VisionTower(base, **options))
    with torch.no_grad():
        for p in [*mm.projector.parameters(), *(p for p in mm.tower.parameters() if p.requires_grad)]:
            p.add_(torch.randn_like(p) * 0.1)
    mm.save_pretrained(tmp_path / "adapter")
    return mm
