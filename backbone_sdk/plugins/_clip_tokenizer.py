"""The CLIP text tokenizer (byte-level BPE, 49408 tokens), token-for-token equal to open_clip's.

Built from the BPE merges file ``bpe_simple_vocab_16e6.txt.gz`` that the ``open_clip_torch`` wheel
ships (the vocabulary of the OpenAI release). The file is located on disk without importing
open_clip (that import costs seconds) and turned into a vocabulary in memory: nothing is
downloaded, nothing is written. Text goes through the same steps as in open_clip and OpenAI CLIP:
``ftfy.fix_text``, HTML unescaping (twice), whitespace collapsing, lower-casing, then the split into
words with the same pattern and the same ``regex`` engine (whose Unicode tables decide what is a
letter); the byte-level BPE of the words runs in the Rust ``tokenizers`` library that transformers
already depends on.

Needs ``open_clip_torch`` (for the vocabulary file) and ``ftfy``, both in the ``vlm`` extra.
Nothing is built at import time: :func:`default_tokenizer` builds the tokenizer on first use.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path
from typing import Sequence

import torch

from ..errors import MissingDependencyError, require

__all__ = ["ClipTokenizer", "default_tokenizer", "tokenize", "SOT_ID", "EOT_ID", "CONTEXT_LENGTH", "VOCAB_SIZE"]

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # the release uses the first 48894 merges of the file
SOT, EOT = "<start_of_text>", "<end_of_text>"
SOT_ID, EOT_ID = 49406, 49407
VOCAB_SIZE = 49408
# open_clip's pre-tokenization: special tokens, English contractions, runs of letters, single
# digits, runs of other non-space characters; compiled case-insensitively like open_clip's, which
# matters for U+017F (long s, case-folds to "s") and U+0345 (folds to a letter, so no class takes it)
_PRETOKEN = f"{SOT}|{EOT}|" + r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def find_vocab_file() -> Path:
    """The BPE merges file shipped inside the installed ``open_clip`` package."""
    spec = importlib.util.find_spec("open_clip")  # finds the package without executing it
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for location in locations:
        path = Path(location) / VOCAB_FILE
        if path.is_file():
            return path
    raise MissingDependencyError(
        f"the CLIP tokenizer needs the BPE vocabulary {VOCAB_FILE} that ships with open_clip_torch, "
        "which is not installed. Install it with `pip install 'backbone-sdk[vlm]'` (or "
        "`pip install open_clip_torch`), or pass tokens instead of strings."
    )


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE, in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space...) are
    mapped to code points from 256 upward so that no token contains whitespace.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in set(kept)]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


def read_merges(path: Path) -> list[tuple[str, str]]:
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id: bytes, bytes ending a word, one token per merge, then SOT and EOT."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(tokens)}


def clean(text: str) -> str:
    """OpenAI CLIP's text cleaning: fix mojibake and unicode, unescape HTML, collapse spaces, lower-case."""
    ftfy = require("ftfy", "vlm")
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Strings -> ``LongTensor [B, context_length]``: ``SOT tokens... EOT`` then zeros.

    Longer texts are cut to ``context_length`` tokens and the last one is replaced by EOT, so EOT
    (the highest id, where CLIP pools the text) is always present. The literal strings
    ``<start_of_text>`` and ``<end_of_text>`` in a text become the special tokens, as in open_clip.
    """

    def __init__(self, vocab_file: str | Path | None = None):
        import regex
        from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
        from tokenizers.models import BPE

        merges = read_merges(Path(vocab_file) if vocab_file else find_vocab_file())
        self.vocab = build_vocab(merges)
        backend = Tokenizer(BPE(vocab=self.vocab, merges=merges, end_of_word_suffix="</w>",
                                continuing_subword_prefix="", fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT, EOT)])
        self.backend = backend
        # words are split in Python with the `regex` module, as open_clip does: the Rust regex
        # engine's Unicode tables differ for characters assigned in recent Unicode versions
        self.pattern = regex.compile(_PRETOKEN, regex.IGNORECASE)

    def words(self, text: str) -> list[str]:
        """Cleaned text split into the words that BPE encodes one by one."""
        return self.pattern.findall(clean(text))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without SOT/EOT and without truncation."""
        return self.backend.encode(self.words(text), is_pretokenized=True, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must leave room for SOT and EOT (>= 2), got {context_length}")
        encoded = self.backend.encode_batch([self.words(t) for t in texts], is_pretokenized=True,
                                            add_special_tokens=False)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, enc in zip(out, encoded):
            ids = [SOT_ID, *enc.ids[: context_length - 2], EOT_ID]
            row[: len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        """Text of token ids (special tokens and padding dropped), words separated by spaces."""
        ids = [int(i) for i in ids if 0 < int(i) < SOT_ID]
        return self.backend.decode(ids, skip_special_tokens=True).replace("</w>", " ").strip()


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> ClipTokenizer:
    """The shared tokenizer over open_clip's vocabulary, built on first use."""
    return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """``open_clip.tokenize`` equivalent: ``LongTensor [B, context_length]`` of CLIP token ids."""
    return default_tokenizer()(texts, context_length)
