"""Train a tiny LLaVA-style captioner end to end on a CPU in seconds, then generate captions.

    python examples/vlm/train_tiny.py                         # Llama-style LM, dinov2_test + clip_test towers
    python examples/vlm/train_tiny.py --lm qwen2 --steps 60 --towers vit_test swin_test
    python examples/vlm/train_tiny.py --save /tmp/vlm         # also write the adapter, LM and tokenizer

Everything is random-initialized and offline: the LM comes from a transformers config, its
tokenizer is trained here with the ``tokenizers`` library, and the "dataset" is synthetic images of
one coloured shape on a grey background with captions such as "a red square". For each tower the
script builds a :class:`MultimodalLM`, trains the projector and the LM (the tower stays frozen) for
a few steps and greedily captions a few images it has not seen. With real weights, swap in
``AutoModelForCausalLM.from_pretrained(...)`` and ``VisionTower(name, weights="hub")``.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

import backbone_sdk as bs
from backbone_sdk.adapters.vlm import VisionTower
from backbone_sdk.integrations.llm import MultimodalLM

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "stripe")
PROMPT = "<image> describe the image ."


def draw(colour: str, shape: str, size: int = 64, rng=None) -> np.ndarray:
    """A ``uint8`` image: one shape in ``colour`` on a noisy grey background."""
    rng = rng or np.random.default_rng()
    img = rng.integers(100, 140, size=(size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2 + rng.integers(-size // 8, size // 8 + 1, size=2)
    if shape == "square":
        mask = (abs(yy - c[0]) < size // 4) & (abs(xx - c[1]) < size // 4)
    elif shape == "circle":
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size // 4) ** 2
    else:
        mask = (xx // (size // 8)) % 2 == 0
    img[mask] = COLOURS[colour]
    return img


def captions() -> list[str]:
    return [f"a {colour} {shape}" for colour, shape in itertools.product(COLOURS, SHAPES)]


def train_tokenizer():
    """Byte-level BPE trained on the prompt and every caption, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROMPT.replace("<image>", ""), *captions()] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_lm(kind: str, vocab: int, hidden: int = 64):
    """A random 2-layer Llama- or Qwen2-style causal LM."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    Config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


def run(tower_name: str, args, tokenizer) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lm = tiny_lm(args.lm, len(tokenizer))
    mm = MultimodalLM(lm, tokenizer, VisionTower(tower_name), projector="mlp2x_gelu").to(args.device)
    trainable = [p for p in mm.parameters() if p.requires_grad]
    print(f"\n== {tower_name}: {mm.tower.num_tokens()} tokens/image of width {mm.tower.hidden_size}; "
          f"{sum(p.numel() for p in trainable):,} trainable parameters (tower frozen)")
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    pairs = [c.split()[1:] for c in captions()]
    mm.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = [pairs[i] for i in rng.integers(0, len(pairs), size=args.batch)]
        images = [[draw(colour, shape, rng=rng)] for colour, shape in batch]
        loss = mm(prompt=[PROMPT] * len(batch), images=images, answer=[f"a {c} {s}" for c, s in batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f}s")

    mm.eval()
    tests = [("red", "circle"), ("blue", "square"), ("yellow", "stripe")]
    images = [[draw(c, s, rng=rng)] for c, s in tests]
    ids = mm.generate(prompt=[PROMPT] * len(tests), images=images, max_new_tokens=6)
    for (colour, shape), text in zip(tests, tokenizer.batch_decode(ids, skip_special_tokens=True)):
        print(f"  a {colour} {shape:6s} -> {text.strip()!r}")
    if args.save:
        save_and_reload(mm, f"{args.save}/{tower_name}", images, ids)


def save_and_reload(mm: MultimodalLM, directory: str, images, expected) -> None:
    """Write the adapter, the (trained) LM with its tokenizer and, because this tower is random and
    not in any hub, its frozen weights; rebuild from disk and check that generation is unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = mm.save_pretrained(directory)
    mm.lm.save_pretrained(path / "lm")
    mm.tokenizer.save_pretrained(path / "lm")
    bs.save_weights(mm.tower.backbone, path / "tower.safetensors")
    loaded = MultimodalLM.from_pretrained(path, AutoModelForCausalLM.from_pretrained(path / "lm"),
                                          AutoTokenizer.from_pretrained(path / "lm"),
                                          tower_weights=path / "tower.safetensors").eval()
    again = loaded.generate(prompt=[PROMPT] * len(images), images=images, max_new_tokens=6)
    print(f"saved to {path}; reloaded model generates the same tokens: {torch.equal(again, expected)}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--towers", nargs="+", default=["dinov2_test", "clip_test"],
                        help="registered backbone names (missing ones fall back to vit_test)")
    parser.add_argument("--lm", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", default=None, help="directory for the trained adapters")
    args = parser.parse_args(argv)

    tokenizer = train_tokenizer()
    known = set(bs.list_backbones(include_test=True))
    towers = list(dict.fromkeys(name if name in known else "vit_test" for name in args.towers))
    for name in towers:
        run(name, args, tokenizer)


if __name__ == "__main__":
    main()
