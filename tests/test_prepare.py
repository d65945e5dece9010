"""data.py's pipeline: documents and their pieces, prepared token files (reused and rebuilt),
memmap batches against in-memory ones, `python data.py prepare`, and a BPE run end to end."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import generate
import train as train_mod
from conftest import TEXT, make_run_config
from data import (EOT, GPT2_PATTERN, CharTokenizer, DataConfig, MemmapDataset, load_dataset, prepare,
                  prepared_dataset, read_documents, read_pieces)
from utils import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

# the pre-tokenizers of cl100k_base and o200k_base (tiktoken_ext/openai_public.py): the piece cuts must suit them too
CL100K = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
O200K = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])

DOC_A = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
DOC_B = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? ✨\n"


def make_corpus(root: Path) -> Path:
    """Two documents among an empty file, a binary file, a Latin-1 file and a hidden file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(DOC_A * 3, encoding="utf-8")
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "b.md").write_text(DOC_B * 3, encoding="utf-8")
    (root / "empty.txt").write_text("")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (root / ".hidden.txt").write_text("hidden")
    return root


class Log(list):
    """A log= callback that keeps the messages."""

    def __call__(self, message):
        self.append(message)


def tokens_on_disk(directory: Path) -> np.ndarray:
    meta = json.loads((directory / "meta.json").read_text())
    return np.concatenate([np.fromfile(directory / f"{s}.bin", dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
                           for s in ("train", "val")])


# --- documents and pieces ----------------------------------------------------------------------

PIECES = st.lists(st.sampled_from(["a", "B", "xy", " ", " ", "  ", "\n", "\r\n", "\t", "'s", "1", "23", ".",
                                   "!", "é", "日本", "🙂", "\u0301"]), max_size=60).map("".join)


@settings(max_examples=80)
@given(PIECES, st.integers(1, 12))
def test_pieces_reassemble_the_file_and_keep_every_pre_token(text, piece_bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_bytes(text.encode("utf-8"))
        pieces = list(read_pieces(path, piece_bytes=piece_bytes))
    assert "".join(p for p, _ in pieces) == text
    assert sum(n for _, n in pieces) == len(text.encode("utf-8"))
    assert all(p for p, _ in pieces)
    for pattern in (GPT2_PATTERN, CL100K, O200K):        # pieces tokenize exactly as the whole
        assert [t for p, _ in pieces for t in regex.findall(pattern, p)] == regex.findall(pattern, text)


def test_pieces_are_cut_and_bounded():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text("the quick brown fox " * 100)
        pieces = [p for p, _ in read_pieces(path, piece_bytes=64)]
    assert len(pieces) > 20 and max(map(len, pieces)) < 64 + 20
    assert all(p.startswith(" ") for p in pieces[1:])              # cut before " word"


def test_invalid_utf8_names_the_byte_even_across_pieces(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("héllo wörld ".encode() * 3 + b"\xff rest")  # 14 bytes per repeat, é/ö 2 bytes
    for piece_bytes in (1, 3, 5, 1000):
        with pytest.raises(ValueError, match=r"not UTF-8 text \(invalid start byte at byte 42\)"):
            list(read_pieces(path, piece_bytes=piece_bytes))


def test_a_folder_is_documents_with_bad_files_skipped_and_reported(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    log = Log()
    docs, skipped = read_documents(str(root), log=log)
    assert [Path(d.name).name for d in docs] == ["a.txt", "b.md"]
    assert skipped == [("empty.txt", "empty"), ("image.png", "binary (a NUL byte in its first 8000 bytes)"),
                       ("latin1.txt", "not UTF-8 text (invalid continuation byte at byte 3)")]
    assert log == ["skipped 3 of 5 files under '" + str(root) + "' (empty.txt: empty; image.png: binary (a NUL "
                   "byte in its first 8000 bytes); latin1.txt: not UTF-8 text (invalid continuation byte at byte 3))"]


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"\x00\x01binary"), r"t\.bin' is binary \(a NUL byte"),
    (lambda p: p.write_bytes("naïve".encode("latin-1")), r"t\.bin' is not UTF-8 text \(invalid continuation byte at "
                                                         r"byte 2\)"),
    (lambda p: p.write_text(""), r"data.path '.*t\.bin' holds no text \(empty file or folder\)"),
])
def test_a_single_bad_file_is_an_error(tmp_path, make, match):
    make(tmp_path / "t.bin")
    with pytest.raises(ValueError, match=match):
        prepare(DataConfig(path=str(tmp_path / "t.bin")), tmp_path / "prep", progress=False, log=Log())


def test_a_folder_of_only_bad_files_is_an_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"holds no text \(empty file or folder, or only files that were skipped\)"):
        prepare(DataConfig(path=str(tmp_path / "c")), tmp_path / "prep", progress=False, log=Log())


# --- prepare: token files and metadata ----------------------------------------------------------------

@pytest.mark.parametrize("tokenizer, separator", [("bpe", EOT), ("char", "\n\n"), ("byte", "\n\n")])
def test_prepare_writes_documents_separated_by_end_of_text(tmp_path, tokenizer, separator):
    root = make_corpus(tmp_path / "corpus")
    log = Log()
    vocab = dict(vocab_size=300) if tokenizer == "bpe" else {}
    meta = prepare(DataConfig(path=str(root), tokenizer=tokenizer, **vocab), tmp_path / "prep",
                   progress=False, log=log)
    assert {p.name for p in (tmp_path / "prep").iterdir()} == {"train.bin", "val.bin", "meta.json"}
    assert json.loads((tmp_path / "prep" / "meta.json").read_text()) == meta
    tok = data.tokenizer_from_state(meta["tokenizer"])
    ids = tokens_on_disk(tmp_path / "prep")
    assert tok.decode(ids.tolist()) == DOC_A * 3 + separator + DOC_B * 3
    assert meta["dtype"] == "uint16" and meta["documents"] == 2 and meta["num_files"] == 5
    assert meta["tokens"] == {"train": len(ids) - int(len(ids) * 0.1), "val": int(len(ids) * 0.1)}
    assert meta["skipped"] == [["empty.txt", "empty"], ["image.png", "binary (a NUL byte in its first 8000 bytes)"],
                               ["latin1.txt", "not UTF-8 text (invalid continuation byte at byte 3)"]]
    assert log[0] == f"preparing the data in {tmp_path / 'prep'}: no prepared data there yet"
    assert log[1].startswith("skipped 3 of 5 files") and log[-1].startswith(f"wrote {meta['tokens']['train']:,} train")
    if tokenizer == "bpe":
        assert list(ids).count(tok.eot_id) == 1 and meta["tokenizer"]["kind"] == "bpe"


def test_prepared_files_are_reused_and_rebuilt_as_promised(tmp_path, text_file):
    where = tmp_path / "prep"

    def run(cfg=DataConfig(path=str(text_file)), **kw) -> str:
        log = Log()
        prepare(cfg, where, progress=False, log=log, **kw)
        return log[0]

    assert run().endswith("no prepared data there yet")
    before = (where / "train.bin").stat().st_mtime_ns
    assert run() == (f"reusing the prepared data in {where} ({int(len(TEXT)) - int(len(TEXT) * 0.1):,} train + "
                     f"{int(len(TEXT) * 0.1):,} val tokens, char tokenizer): same inputs and settings")
    assert (where / "train.bin").stat().st_mtime_ns == before                        # untouched
    assert run(DataConfig(path=str(text_file), tokenizer="byte")).endswith(
        "the settings changed: data.tokenizer 'char' -> 'byte'")
    assert run(DataConfig(path=str(text_file), tokenizer="bpe", vocab_size=300)).endswith(
        "the settings changed: data.tokenizer 'byte' -> 'bpe', data.bpe None -> 'train', data.vocab_size None -> 300")
    assert run(DataConfig(path=str(text_file), tokenizer="bpe", vocab_size=300)).startswith("reusing")
    assert run().endswith("data.tokenizer 'bpe' -> 'char', data.bpe 'train' -> None, data.vocab_size 300 -> None")
    assert run(DataConfig(path=str(text_file), val_fraction=0.2)).endswith("data.val_fraction 0.1 -> 0.2")
    with open(text_file, "a") as f:
        f.write("one more line\n")
    assert run(DataConfig(path=str(text_file), val_fraction=0.2)).endswith("the input files changed (added, "
                                                                           "removed, resized or modified)")
    os.utime(text_file, ns=(before, before - 10 ** 9))                             # same size, older
    assert "the input files changed" in run(DataConfig(path=str(text_file), val_fraction=0.2))
    meta = json.loads((where / "meta.json").read_text())
    same = data.tokenizer_from_state(meta["tokenizer"])
    assert run(DataConfig(path=str(text_file), val_fraction=0.2), tokenizer=same).startswith("reusing")
    wider = CharTokenizer.train(TEXT + "one more line\nXYZ")
    assert run(DataConfig(path=str(text_file), val_fraction=0.2), tokenizer=wider).endswith(
        "they were tokenized with another tokenizer than the checkpoint's")
    assert json.loads((where / "meta.json").read_text())["tokenizer"] == wider.state()
    with open(where / "val.bin", "r+b") as f:
        f.truncate(10)
    assert run(DataConfig(path=str(text_file), val_fraction=0.2), tokenizer=wider).endswith(
        "val.bin is missing or incomplete")
    (where / "meta.json").write_text('{"format": "mini-transformer-tokens", "version": 0}')
    assert run(DataConfig(path=str(text_file), val_fraction=0.2)).endswith(
        "its meta.json is unreadable or of another format version")


def test_a_new_file_in_the_folder_rebuilds(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    cfg = DataConfig(path=str(root))
    prepare(cfg, tmp_path / "prep", progress=False, log=Log())
    (root / "sub" / "c.txt").write_text("more text\n")
    log = Log()
    meta = prepare(cfg, tmp_path / "prep", progress=False, log=log)
    assert "the input files changed" in log[0] and meta["documents"] == 3


def test_a_checkpoint_tokenizer_that_misses_characters_is_a_clear_error(tmp_path, text_file):
    with pytest.raises(ValueError, match=r"does not fit the checkpoint's tokenizer: 1 character\(s\) not in the "
                                         r"char vocabulary: 'q'"):
        prepare(DataConfig(path=str(text_file)), tmp_path / "prep", tokenizer=CharTokenizer.train(TEXT.replace("q", "")),
                progress=False, log=Log())


# --- memmap batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe"])
def test_memmap_batches_equal_the_in_memory_batches(tmp_path, tokenizer):
    cfg = DataConfig(path=str(make_corpus(tmp_path / "corpus")), tokenizer=tokenizer,
                     **(dict(vocab_size=300) if tokenizer == "bpe" else {}))
    memory = load_dataset(cfg, block_size=8, log=Log())
    disk = prepared_dataset(cfg, out_dir=tmp_path / "out", block_size=8, progress=False, log=Log())
    assert (tmp_path / "out" / "data" / "train.bin").exists()            # the default place
    assert disk.tokenizer.state() == memory.tokenizer.state() and disk.num_tokens == memory.num_tokens
    assert np.array_equal(tokens_on_disk(tmp_path / "out" / "data"),
                          torch.cat([memory.splits["train"], memory.splits["val"]]).numpy())
    for split in ("train", "val"):
        g_memory, g_disk = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(5):
            x, y = memory.get_batch(split, 4, 8, generator=g_memory)
            x2, y2 = disk.get_batch(split, 4, 8, generator=g_disk)
            assert torch.equal(x, x2) and torch.equal(y, y2) and x2.dtype == torch.int64
        for (x, y), (x2, y2) in zip(memory.iter_split(split, 3, 8), disk.iter_split(split, 3, 8), strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_memmap_is_reopened_for_every_batch(tmp_path, text_file, monkeypatch):
    ds = prepared_dataset(DataConfig(path=str(text_file)), out_dir=tmp_path, block_size=8, progress=False, log=Log())
    opened = []
    real = np.memmap
    monkeypatch.setattr(np, "memmap", lambda *a, **kw: opened.append(a) or real(*a, **kw))
    for _ in range(3):
        ds.get_batch("train", 2, 8)
    assert len(opened) == 3 and all(str(a[0]).endswith("train.bin") for a in opened)


def test_vocabularies_past_uint16_are_stored_as_uint32(tmp_path, fake_tiktoken):
    cfg = DataConfig(path=str(make_corpus(tmp_path / "corpus")), tokenizer="bpe", bpe="mini_wide")
    meta = prepare(cfg, tmp_path / "prep", progress=False, log=Log())
    assert meta["dtype"] == "uint32" and meta["tokenizer"] == {"kind": "bpe", "version": 1, "encoding": "mini_wide"}
    ids = tokens_on_disk(tmp_path / "prep")
    assert (tmp_path / "prep" / "train.bin").stat().st_size == 4 * meta["tokens"]["train"]
    assert 70000 in ids.tolist()                                        # <|endoftext|> between the documents
    ds = MemmapDataset(tmp_path / "prep", block_size=8)
    assert ds.tokenizer.vocab_size == 70001 and ds.tokenizer.decode(ids.tolist()) == DOC_A * 3 + EOT + DOC_B * 3
    meta["dtype"] = "uint16"                                             # a hand-edited, inconsistent file
    (tmp_path / "prep" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"holds uint16 tokens, too small for the 70,001-token vocabulary"):
        MemmapDataset(tmp_path / "prep", block_size=8)


def test_too_little_data_for_the_context_is_a_clear_error(tmp_path):
    (tmp_path / "t.txt").write_text("a short text, fifty characters long, more or less.")
    with pytest.raises(ValueError, match=r"the val split has 5 tokens but block_size=16 needs at least 17"):
        prepared_dataset(DataConfig(path=str(tmp_path / "t.txt")), out_dir=tmp_path, block_size=16,
                         progress=False, log=Log())
    with pytest.raises(FileNotFoundError, match="no prepared data in"):
        MemmapDataset(tmp_path / "nothing", block_size=8)


# --- the command line ----------------------------------------------------------------------------------

def test_prepare_command_line(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    argv = ["prepare", "--config", "config.yaml", "--data", str(root), "--data.tokenizer=bpe", "--data.vocab_size=300",
            f"--data.cache_dir={tmp_path / 'cache'}", "--training.progress=false"]
    proc = subprocess.run([sys.executable, "data.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"preparing the data in {tmp_path / 'cache'}: no prepared data there yet"
    assert lines[1].startswith("skipped 3 of 5 files") and lines[2].startswith("learned a 300-token BPE in ")
    assert lines[3].startswith("wrote ") and "(uint16, vocabulary 300) from 2 document(s)" in lines[3]
    assert {p.name for p in (tmp_path / "cache").iterdir()} == {"train.bin", "val.bin", "meta.json"}
    assert proc.stderr == ""                                           # no progress bar when turned off


def test_prepare_command_line_reuses_and_reports_errors(tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["prepare", "--data", str(text_file), f"--training.out_dir={tmp_path / 'out'}", "--training.progress=false"]
    data.main(argv)
    data.main(argv)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"preparing the data in {tmp_path / 'out' / 'data'}") and out[-1].startswith("reusing")
    with pytest.raises(SystemExit, match=r"error: unknown option '--data.tokenzer'; did you mean 'data.tokenizer'"):
        data.main(["prepare", "--data.tokenzer=bpe"])
    with pytest.raises(SystemExit, match=r"error: data.path '.*nope' does not exist"):
        data.main(["prepare", f"--data={tmp_path / 'nope'}"])
    with pytest.raises(SystemExit, match=r"error: prepare tokenizes a language model's corpus; it does not use "
                                         r"--training.task, --model.pooling$"):
        data.main(["prepare", "--task", "classification", "--model.pooling=mean"])
    with pytest.raises(SystemExit, match=r"error: genres takes only --out; not --data.path=x"):
        data.main(["genres", "--data.path=x"])
    with pytest.raises(SystemExit, match=r"error: \[Errno 21\] Is a directory"):
        data.main(["genres", "--out", str(tmp_path)])


# --- training and generation with a learned BPE ----------------------------------------------------------

def test_train_and_generate_with_a_learned_bpe(tmp_path, text_file, capsys):
    cfg = make_run_config(tmp_path, "--data.tokenizer=bpe", "--data.vocab_size=300", "--training.max_iters=30",
                          data=text_file)
    summary = train_mod.train(cfg)
    out = capsys.readouterr().out
    assert "learned a 300-token BPE" in out and "vocab 300 (bpe)" in out
    ckpt = load_checkpoint(tmp_path / "out" / "best.pt")
    state = ckpt["tokenizer"]
    assert state["kind"] == "bpe" and state["version"] == 1 and len(state["merges"]) == 300 - 257
    assert ckpt["model_config"]["vocab_size"] == 300 and summary["final_val_loss"] < np.log(300)
    generate.main(["--checkpoint", str(tmp_path / "out" / "best.pt"), "--prompt", "the quick",
                   "--max_new_tokens", "20", "--temperature", "0"])
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text) > len("the quick") + 10
    # resuming reads the same prepared files, tokenized with the checkpoint's tokenizer
    resumed, last, _ = train_mod.resolve(["--resume", f"--training.out_dir={tmp_path / 'out'}",
                                       "--training.max_iters=40"])
    train_mod.train(resumed, resume_from=last)
    assert "reusing the prepared data" in capsys.readouterr().out
