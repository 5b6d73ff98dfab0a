"""Loader of the shipped character-level GPT-2 (``weights/char_gpt2.*``).

A ``GPT2LMHeadModel`` (4 layers, 4 heads, width 128, context 128, about 0.8 M parameters)
trained by ``tools/train_char_gpt2.py`` on the docstrings of a fixed list of Python
standard-library modules, lower-cased, over a 47-character alphabet (letters, digits, space,
``.,;:'()-_`` and newline). Newline (id 0) ends a docstring and is the EOS token. The model is
a small demo/benchmark model, not a good language model: what is exact is the SMC arithmetic
around it (its log Ẑ targets *this* model's probabilities), not its English.

Loading needs transformers and safetensors; nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["WEIGHTS_DIR", "CharTokenizer", "char_lm_info", "load_char_lm"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
WEIGHTS_FILE = "char_gpt2.safetensors"
META_FILE = "char_gpt2.json"


@dataclass(frozen=True)
class CharTokenizer:
    """Characters ↔ token ids of the shipped model (id = index in :attr:`alphabet`).

    Attributes:
        alphabet: the vocabulary, one character per token.
        eos_token_id: the id of ``"\\n"``, which ends a sequence.
    """

    alphabet: str
    eos_token_id: int

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (lower-cased); raises on a character outside the alphabet."""
        out = []
        for c in text.lower():
            i = self.alphabet.find(c)
            if i < 0:
                raise ValueError(f"text: character {c!r} is not in the model's alphabet "
                                 f"{self.alphabet!r}")
            out.append(i)
        return out

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The text of token ids ``ids``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.alphabet[i] for i in ids)

    def mask(self, exclude: str = "", *, eos: bool = True) -> torch.Tensor:
        """A bool ``(V,)`` mask of allowed tokens: every character but those in ``exclude``
        (and but EOS when ``eos=False``), e.g. ``mask("e")`` for a lipogram."""
        m = torch.ones(self.vocab_size, dtype=torch.bool)
        for c in exclude.lower():
            m[self.encode(c)[0]] = False
        if not eos:
            m[self.eos_token_id] = False
        return m


def char_lm_info() -> dict[str, Any]:
    """The metadata written at training: alphabet, config, corpus (modules, size, SHA-256,
    Python version) and training settings with the validation loss."""
    path = WEIGHTS_DIR / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run tools/train_char_gpt2.py to produce it")
    return json.loads(path.read_text())


def load_char_lm(device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[Any, CharTokenizer]:
    """The shipped character-level GPT-2 in eval mode and its tokenizer.

    Returns:
        ``(model, tokenizer)``: a transformers ``GPT2LMHeadModel`` on ``device`` and a
        :class:`CharTokenizer` (``encode`` / ``decode`` / ``mask``, ``eos_token_id``).
    """
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    meta = char_lm_info()
    path = WEIGHTS_DIR / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run tools/train_char_gpt2.py to produce it")
    cfg = GPT2Config(**meta["config"])
    model = GPT2LMHeadModel(cfg)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the config (missing {missing}, "
                           f"unexpected {unexpected})")
    model.tie_weights()
    model = model.to(device=device, dtype=dtype).eval()
    return model, CharTokenizer(meta["alphabet"], int(meta["eos_token_id"]))
