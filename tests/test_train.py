"""train.py: the schedule, the optimizer groups, training runs, resuming, checkpoints, the CLI."""
import errno
import math
import os
import re
import signal
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

import tasks
import train as train_mod
import utils
from generate import SampleConfig, generate_text
from model import Transformer
from train import TrainConfig, dropout_at, lr_at, make_optimizer, split_loss
from config import load_config
from utils import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, load_checkpoint,
                   model_from_checkpoint, read_jsonl, save_checkpoint)
from data import DataConfig, load_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
# the scripts run as a user runs them; one thread, as in-process (tiny models are fastest so)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def run_script(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, input=input, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=SUBPROCESS_ENV)


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the learning-rate schedule ------------------------------------------------------

def test_warmup_is_linear():
    for schedule in ("cosine", "linear", "constant"):
        cfg = TrainConfig(learning_rate=2.0, warmup_iters=10, lr_schedule=schedule)
        for step in range(10):
            assert lr_at(step, 0.0, cfg) == pytest.approx(2.0 * (step + 1) / 10)
        assert lr_at(9, 0.0, cfg) == lr_at(50, 0.0, cfg) == pytest.approx(2.0)
    assert lr_at(0, 0.0, TrainConfig(learning_rate=2.0, warmup_iters=0)) == 2.0


@pytest.mark.parametrize("schedule, decay", [
    ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
    ("linear", lambda p: 1 - p),
    ("constant", lambda p: 1.0),
])
def test_schedules_after_warmup(schedule, decay):
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=5, min_lr_ratio=0.1, lr_schedule=schedule)
    for p in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert lr_at(100, p, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * decay(p)))
    end = 1e-3 * (0.1 if schedule != "constant" else 1.0)
    assert lr_at(100, 1.0, cfg) == pytest.approx(end)
    assert lr_at(100, 7.0, cfg) == pytest.approx(end)          # progress is clamped to [0, 1]
    assert lr_at(100, -1.0, cfg) == pytest.approx(1e-3)
    if schedule == "cosine":
        assert lr_at(100, 0.5, cfg) == pytest.approx(1e-3 * 0.55)


@given(st.sampled_from(["cosine", "linear", "constant"]), st.floats(0, 1), st.floats(0, 1),
       st.floats(0, 1), st.integers(0, 1000))
def test_lr_is_non_increasing_after_warmup(schedule, p1, p2, min_ratio, extra_steps):
    cfg = TrainConfig(learning_rate=3e-3, warmup_iters=20, min_lr_ratio=min_ratio, lr_schedule=schedule)
    lo, hi = sorted((p1, p2))
    step = 19 + extra_steps
    assert lr_at(step, lo, cfg) >= lr_at(step, hi, cfg)
    assert 3e-3 * min_ratio - 1e-12 <= lr_at(step, hi, cfg) <= 3e-3 + 1e-12


# --- the optimizer's parameter groups -----------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_weight_decay_only_on_non_embedding_matrices(tie):
    model = Transformer(vocab_size=40, d_model=32, n_heads=4, n_layers=2, block_size=16, bias=True,
                        norm="layernorm", pos_encoding="learned", tie_weights=tie)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    in_decay = {id(p) for p in decay["params"]}
    in_no_decay = {id(p) for p in no_decay["params"]}
    grouped = decay["params"] + no_decay["params"]
    params = list(model.parameters())                # tied weights appear once here
    assert len(grouped) == len({id(p) for p in grouped}) == len(params)   # each exactly once
    assert {id(p) for p in grouped} == {id(p) for p in params}
    for name, p in model.named_parameters():
        expect_decay = p.dim() == 2 and not name.startswith(("tok_emb.", "pos_emb."))
        assert (id(p) in in_decay) == expect_decay, name
        assert (id(p) in in_no_decay) == (not expect_decay), name
    assert id(model.tok_emb.weight) in in_no_decay and id(model.pos_emb.weight) in in_no_decay
    assert (id(model.lm_head.weight) in in_no_decay) == tie          # the tied head is the embedding
    assert id(model.blocks[0].attn.wqkv.weight) in in_decay
    assert id(model.blocks[0].attn.wqkv.bias) in in_no_decay
    assert id(model.blocks[1].norm2.weight) in in_no_decay and id(model.norm_f.bias) in in_no_decay


def test_frozen_parameters_are_left_out():
    model = Transformer(vocab_size=40, d_model=32, n_heads=4, n_layers=2, block_size=16)
    model.blocks[0].mlp.w1.weight.requires_grad_(False)
    opt = make_optimizer(model, TrainConfig(), "cpu")
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.blocks[0].mlp.w1.weight) not in ids
    assert len(ids) == len(list(model.parameters())) - 1


# --- a short training run ------------------------------------------------------------------

def test_training_lowers_the_loss(trained_run):
    vocab = len(set(trained_run.text_file.read_text()))
    s = trained_run.summary
    assert s["step"] == 80
    assert s["final_val_loss"] < 0.7 * math.log(vocab), s
    assert s["best_val_loss"] < 0.7 * math.log(vocab)
    evals = [r for r in read_jsonl(trained_run.out_dir / "log.jsonl") if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(vocab) + 0.2


def test_run_outputs(trained_run):
    out = trained_run.out_dir
    assert {p.name for p in out.iterdir()} == {"last.pt", "best.pt", "config.yaml", "log.jsonl", "plot.png", "data"}
    assert {p.name for p in (out / "data").iterdir()} == {"train.bin", "val.bin", "meta.json"}
    rows = read_jsonl(out / "log.jsonl")
    events = [r["event"] for r in rows]
    assert events[0] == "start" and events[-1] == "final" and events.count("final") == 1
    train_rows = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(5, 81, 5))          # log_interval=5
    for r in train_rows:
        assert {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= r.keys()
        assert math.isfinite(r["train_loss"]) and r["lr"] > 0 and r["grad_norm"] > 0
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
    assert train_rows[-1]["train_loss"] < train_rows[0]["train_loss"]
    eval_rows = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in eval_rows] == [20, 40, 60, 80]
    for r in eval_rows:
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
    final = rows[-1]
    assert final["step"] == 80
    assert final["final_val_loss"] == pytest.approx(trained_run.summary["final_val_loss"])
    assert final["perplexity"] == pytest.approx(math.exp(final["final_val_loss"]))
    # best.pt holds the best evaluation, last.pt the end of the run
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert last["step"] == 80
    assert best["val_loss"] == min(r["val_loss"] for r in eval_rows) == trained_run.summary["best_val_loss"]
    assert best["step"] == min(eval_rows, key=lambda r: r["val_loss"])["step"]


def test_saved_config_loads_back(trained_run):
    cfg = trained_run.cfg
    saved = load_config(str(trained_run.out_dir / "config.yaml"), sections=train_mod.SECTIONS)
    vocab = len(set(trained_run.text_file.read_text()))
    assert saved["model"].vocab_size == vocab
    assert saved["data"] == cfg["data"] and saved["training"] == cfg["training"]
    assert saved["model"].to_dict() == {**cfg["model"].to_dict(), "vocab_size": vocab}
    ckpt = load_checkpoint(trained_run.out_dir / "last.pt")
    assert yaml.safe_load((trained_run.out_dir / "config.yaml").read_text()) == ckpt["config"]


def test_final_val_loss_is_the_loss_of_last_pt_on_every_val_token(trained_run):
    model, tok = model_from_checkpoint(load_checkpoint(trained_run.out_dir / "last.pt"))
    data = load_dataset(DataConfig(path=str(trained_run.text_file)), block_size=16, tokenizer=tok)
    got = split_loss(model, data, "val", block_size=16, batch_size=3, device="cpu")
    assert got == pytest.approx(trained_run.summary["final_val_loss"], rel=1e-5)
    # and it is the mean over every val target (hand-rolled, one long window at a time)
    val = data.splits["val"]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(val) - 1, 16):
            x, y = val[None, start:start + 16], val[None, start + 1:start + 17]
            x = x[:, :y.shape[1]]
            total += torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="sum").item()
    assert total / (len(val) - 1) == pytest.approx(got, rel=1e-5)


def test_max_time_is_the_budget(run_config):
    cfg = run_config("--training.max_time=2", "--training.max_iters=1000000",
                     "--training.eval_interval=1000000", "--training.log_interval=2",
                     "--training.min_lr_ratio=0.1")
    t0 = time.perf_counter()
    summary = train_mod.train(cfg)
    wall = time.perf_counter() - t0
    assert 2.0 <= summary["elapsed"] <= 6.0 and wall >= 2.0, summary
    assert 0 < summary["step"] < 1000000
    rows = read_jsonl(Path(cfg["training"].out_dir) / "log.jsonl")
    start = next(r for r in rows if r["event"] == "start")
    train_rows = [r for r in rows if r["event"] == "train"]
    assert len(train_rows) >= 3
    after_warmup = [r["lr"] for r in train_rows if r["step"] > 5]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))     # decays with time
    # by step count (step / max_iters ~ 0) the lr would still be ~3e-3; by time it nears the minimum
    assert train_rows[-1]["lr"] < 0.5 * 3e-3
    tcfg = cfg["training"]
    for r in train_rows:     # elapsed at the step <= wall time since start: lr is at least lr_at(that)
        p_max = (r["time"] - start["time"] + 0.002) / tcfg.max_time
        assert r["lr"] >= lr_at(r["step"] - 1, p_max, tcfg) - 1e-9
    final = rows[-1]
    assert final["event"] == "final" and 2.0 <= final["elapsed"] <= 6.0


# --- resuming -------------------------------------------------------------------------------

RESUME_ARGS = ("--training.max_iters=20", "--training.eval_interval=5", "--training.log_interval=5",
               "--model.dropout=0.1")          # dropout: the global torch RNG must be restored too


def test_resume_after_an_interruption_is_bit_identical(run_config, tmp_path, monkeypatch):
    straight = train_mod.train(run_config(*RESUME_ARGS, out_dir=tmp_path / "a"))

    real_save = train_mod.save_checkpoint

    def interrupt_at_10(path, payload):
        real_save(path, payload)
        if Path(path).name == "last.pt" and payload["step"] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", interrupt_at_10)
    cfg_b = run_config(*RESUME_ARGS, out_dir=tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg_b)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    ckpt = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ckpt["step"] == 10
    resumed = train_mod.train(cfg_b, resume_from=ckpt)

    assert resumed["step"] == straight["step"] == 20
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert resumed["best_val_loss"] == straight["best_val_loss"]
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert state_dicts_equal(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert state_dicts_equal(sa, sb)
    rows_a = [r for r in read_jsonl(tmp_path / "a" / "log.jsonl") if r["event"] == "train"]
    rows_b = [r for r in read_jsonl(tmp_path / "b" / "log.jsonl") if r["event"] == "train"]
    assert [(r["step"], r["train_loss"], r["lr"]) for r in rows_a] == \
           [(r["step"], r["train_loss"], r["lr"]) for r in rows_b]
    starts = [r for r in read_jsonl(tmp_path / "b" / "log.jsonl") if r["event"] == "start"]
    assert [(r["step"], r["resumed"]) for r in starts] == [(0, False), (10, True)]


def test_resume_with_a_larger_max_iters_via_resolve(run_config, tmp_path, monkeypatch):
    # a constant schedule makes "10 steps, then 10 more" the same run as "20 steps"
    args = ("--training.lr_schedule=constant", "--training.eval_interval=5", "--model.dropout=0.1")
    straight = train_mod.train(run_config(*args, "--training.max_iters=20", out_dir=tmp_path / "a"))
    out_b = tmp_path / "b"
    train_mod.train(run_config(*args, "--training.max_iters=10", out_dir=out_b))
    monkeypatch.chdir(tmp_path)
    cfg, ckpt, _ = train_mod.resolve(["--resume", f"--training.out_dir={out_b}", "--training.max_iters=20"])
    assert ckpt["step"] == 10 and cfg["training"].max_iters == 20
    assert cfg["model"].to_dict() == ckpt["model_config"]     # the checkpoint's own configuration
    assert cfg["data"].path == run_config()["data"].path
    resumed = train_mod.train(cfg, resume_from=ckpt)
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert state_dicts_equal(load_checkpoint(tmp_path / "a" / "last.pt")["model"],
                             load_checkpoint(out_b / "last.pt")["model"])


def test_resume_cannot_change_the_model(trained_run, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = trained_run.out_dir
    with pytest.raises(ValueError, match=r"cannot change model\.n_layers when resuming \(2 in .*last\.pt, "
                                         r"3 requested\)"):
        train_mod.resolve(["--resume", f"--training.out_dir={out}", "--model.n_layers=3"])
    cfg, ckpt, _ = train_mod.resolve(["--resume", f"--training.out_dir={out}", "--model.n_layers=2",
                                   "--training.learning_rate=1e-4"])
    assert cfg["training"].learning_rate == 1e-4 and ckpt["step"] == 80
    with pytest.raises(CheckpointError, match=r"last\.pt' does not exist"):
        train_mod.resolve(["--resume", f"--training.out_dir={tmp_path / 'none'}"])


# --- checkpoints ----------------------------------------------------------------------------------

def _payload(value=1.0):
    return {"model": {"w": torch.full((2, 2), value)}, "model_config": {"vocab_size": 3},
            "tokenizer": {"kind": "byte", "version": 1}}


def test_save_checkpoint_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, _payload(1.0))
    save_checkpoint(path, _payload(2.0))                  # overwrite
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["version"] == CHECKPOINT_VERSION
    assert torch.equal(ckpt["model"]["w"], torch.full((2, 2), 2.0))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _payload(1.0))
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(CheckpointError, match=r"could not write .*ckpt\.pt: No space left on device; "
                                              r"the previous ckpt\.pt is intact"):
        save_checkpoint(path, _payload(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]           # the temp file is gone
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((2, 2), 1.0))


class _Sneaky:
    """Unpickling this would create a directory: weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("kind, match", [
    ("missing", r"does not exist \(train first"),
    ("random", r"is not a loadable checkpoint"),
    ("foreign", r"is not a Mini Transformer checkpoint \(no 'mini-transformer' format tag\)"),
    ("list", r"is not a Mini Transformer checkpoint"),
    ("version", r"has checkpoint format version 99; this code reads versions 1, 2"),
    ("no_model", r"is missing 'model'"),
    ("object", r"holds Python objects besides tensors and plain data \(os\.makedirs\); refused, since loading "
               r"them could run code"),
])
def test_load_checkpoint_errors(tmp_path, kind, match):
    path = tmp_path / "ckpt.pt"
    marker = tmp_path / "pwned"
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "foreign":
        torch.save({"a": 1}, path)
    elif kind == "list":
        torch.save([1, 2], path)
    elif kind == "version":
        torch.save({**_payload(), "format": CHECKPOINT_FORMAT, "version": 99}, path)
    elif kind == "no_model":
        payload = _payload()
        del payload["model"]
        save_checkpoint(path, payload)
    elif kind == "object":
        torch.save({**_payload(), "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                    "extra": _Sneaky(str(marker))}, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_of_an_empty_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"")                       # e.g. a copy cut short, or `touch out/best.pt`
    with pytest.raises(CheckpointError, match=r"ckpt\.pt' is empty, not a checkpoint"):
        load_checkpoint(path)


# --- non-finite losses -----------------------------------------------------------------------------

def test_nan_loss_stops_the_run_and_keeps_last_pt(run_config, monkeypatch):
    real_loss = tasks.lm_loss
    calls = {"n": 0}

    def nan_at_step_7(model, x, y, **options):
        loss = real_loss(model, x, y, **options)
        if torch.is_grad_enabled():                      # training steps, not evaluation
            calls["n"] += 1
            if calls["n"] == 7:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(tasks, "lm_loss", nan_at_step_7)
    cfg = run_config("--training.eval_interval=5")
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan .* at step 7; .*last\.pt is the last good checkpoint"):
        train_mod.train(cfg)
    ckpt = load_checkpoint(Path(cfg["training"].out_dir) / "last.pt")
    assert ckpt["step"] == 5 and math.isfinite(ckpt["val_loss"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_divergence_never_overwrites_last_pt_with_nan_weights(run_config):
    cfg = run_config("--training.learning_rate=1e6", "--training.eval_interval=1", "--training.warmup_iters=0")
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train_mod.train(cfg)
    ckpt = load_checkpoint(Path(cfg["training"].out_dir) / "last.pt")   # step 1 still evaluates finite
    assert ckpt["step"] >= 1 and math.isfinite(ckpt["val_loss"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# --- the command line, end to end ------------------------------------------------------------------

TINY_CLI = ["--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4", "--model.block_size=16",
            "--training.batch_size=8", "--training.max_iters=30", "--training.eval_interval=15",
            "--training.eval_iters=2", "--training.warmup_iters=5", "--training.progress=false",
            "--training.plot=false", "--device", "cpu"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    out = root / "out"
    argv = ["train.py", "--config", "config.yaml", "--data", text, f"--training.out_dir={out}", *TINY_CLI]
    proc = run_script(*argv)
    assert proc.returncode == 0, proc.stderr
    return root, text, out, argv, proc


def test_cli_train_writes_a_run(cli_run):
    root, text, out, argv, proc = cli_run
    assert "final_val_loss" in proc.stdout and "Traceback" not in proc.stderr
    assert {"last.pt", "best.pt", "config.yaml", "log.jsonl"} <= {p.name for p in out.iterdir()}
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 30 and ckpt["model_config"]["n_layers"] == 2
    assert ckpt["config"]["data"]["path"] == str(text)
    from_yaml = yaml.safe_load((REPO / "config.yaml").read_text())["training"]
    assert ckpt["config"]["training"]["learning_rate"] == float(from_yaml["learning_rate"])
    assert ckpt["config"]["training"]["weight_decay"] == float(from_yaml["weight_decay"])


def test_cli_generate(cli_run):
    root, text, out, argv, proc = cli_run
    gen = ["generate.py", "--checkpoint", out / "best.pt", "--prompt", "the ", "--max_new_tokens", "20"]
    a = run_script(*gen, "--seed", "1")
    b = run_script(*gen, "--seed", "1")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout                                     # same seed, same text
    sample = a.stdout[:-1]
    assert a.stdout.endswith("\n") and sample.startswith("the ") and len(sample) == 4 + 20
    assert set(sample) <= set(text.read_text())

    streamed = run_script(*gen, "--seed", "1", "--stream")
    assert streamed.returncode == 0 and streamed.stdout == a.stdout       # streaming changes nothing

    greedy = run_script(*gen, "--temperature", "0", "--num_samples", "2")
    assert greedy.returncode == 0, greedy.stderr
    samples = greedy.stdout.split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and samples[0] == samples[1]
    model, tok = model_from_checkpoint(load_checkpoint(out / "best.pt"))
    expected = generate_text(model, tok, "the ", SampleConfig(max_new_tokens=20, temperature=0))
    assert samples[0] == expected + "\n"


def test_cli_errors_are_one_line_messages(tmp_path):
    bad = run_script("train.py", "--model.n_layer=3")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith("error: unknown option '--model.n_layer'; did you mean 'model.n_layers'?")
    assert "Traceback" not in bad.stderr
    missing = tmp_path / "missing.txt"
    proc = run_script("train.py", "--data", missing, f"--training.out_dir={tmp_path / 'out'}", *TINY_CLI)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: data.path '{missing}' does not exist"
    assert not (tmp_path / "out").exists()


def test_main_errors_in_process(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # main() may tune the process (e.g. the malloc settings): not the pytest process's
    monkeypatch.setattr(train_mod, "tune_cpu_allocator", lambda: False, raising=False)
    with pytest.raises(SystemExit, match=r"^error: unknown option '--training\.max_iter'; did you mean "
                                         r"'training\.max_iters'"):
        train_mod.main(["--training.max_iter=3"])
    with pytest.raises(SystemExit, match=r"^error: training\.batch_size=0 must be positive"):
        train_mod.main(["--training.batch_size=0"])
    with pytest.raises(SystemExit, match=r"^error: .*last\.pt' does not exist"):
        train_mod.main(["--resume"])


def test_cli_resume_continues_from_last_pt(cli_run, tmp_path):
    root, text, out, argv, proc = cli_run
    out2 = tmp_path / "out"
    shutil.copytree(out, out2)
    argv = [a if not str(a).startswith("--training.out_dir=") else f"--training.out_dir={out2}" for a in argv]
    resumed = run_script(*argv, "--resume", "--training.max_iters=40")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step 30 of {out2 / 'last.pt'}" in resumed.stdout
    assert "after 40 steps" in resumed.stdout
    rows = read_jsonl(out2 / "log.jsonl")
    starts = [r for r in rows if r["event"] == "start"]
    assert [(r["step"], r["resumed"]) for r in starts] == [(0, False), (30, True)]
    assert [r["step"] for r in rows if r["event"] == "final"] == [30, 40]
    assert load_checkpoint(out2 / "last.pt")["step"] == 40
    spent = run_script(*argv, "--resume", "--training.max_iters=20")
    assert spent.returncode == 1 and spent.stderr.strip().splitlines()[-1] == (
        "error: nothing to train: the resumed run is at step 40 and its budget (training.max_iters=20) is spent; "
        "raise it to go on")


def test_a_new_run_starts_a_new_log_and_resume_appends(run_config):
    cfg = run_config("--training.max_iters=4", "--training.eval_interval=2")
    log = Path(cfg["training"].out_dir) / "log.jsonl"
    train_mod.train(cfg)
    train_mod.train(cfg)                                   # same out_dir, not a resume
    assert [e["event"] for e in read_jsonl(log)].count("start") == 1
    more = run_config("--training.max_iters=6", "--training.eval_interval=2")
    train_mod.train(more, resume_from=load_checkpoint(log.parent / "last.pt"))
    starts = [e for e in read_jsonl(log) if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True]


def test_checkpoints_are_ordinary_files_not_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.pt", {"model": {}, "model_config": {}, "tokenizer": {}})
    finally:
        os.umask(umask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


# --- resuming after kill -9 ------------------------------------------------------------------------

# Run by a subprocess: train.py's main, with torch.save patched to die (SIGKILL, which no
# handler can catch) half-way through writing the checkpoint of step KILL_AT.
DIE_WHILE_SAVING = """
import os, signal, sys
import torch
import train

real_save = torch.save

def save_then_die(obj, f, *args, **kwargs):
    if obj.get("step") == int(os.environ["KILL_AT"]):
        f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
train.main(sys.argv[1:])
"""

KILL_ARGS = ("--training.max_iters=30", "--training.eval_interval=5", "--training.log_interval=1",
             "--model.dropout=0.1")


def _train_rows(out_dir: Path, after: int = 0, upto: float = float("inf")) -> list:
    """(step, loss, lr, grad norm) of each step in (after, upto]; a step the resumed run did
    again (the killed run had logged it after its last checkpoint) counts once, as redone."""
    rows = {r["step"]: r for r in read_jsonl(out_dir / "log.jsonl")
            if r["event"] == "train" and after < r["step"] <= upto}
    return [(r["step"], r["train_loss"], r["lr"], r["grad_norm"]) for r in rows.values()]


def test_kill_9_during_a_checkpoint_write_resumes_the_same_trajectory(run_config, tmp_path):
    straight = train_mod.train(run_config(*KILL_ARGS, out_dir=tmp_path / "a"))
    out = tmp_path / "b"
    driver = tmp_path / "die_while_saving.py"
    driver.write_text(DIE_WHILE_SAVING)
    # the same resolved configuration as the straight run, through train.py's command line
    proc = subprocess.run([sys.executable, str(driver), "--config", str(tmp_path / "a" / "config.yaml"),
                           f"--training.out_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**SUBPROCESS_ENV, "KILL_AT": "15", "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in out.glob(".*.tmp")] and load_checkpoint(out / "last.pt")["step"] == 10

    cfg = run_config(*KILL_ARGS, out_dir=out)
    resumed = train_mod.train(cfg, resume_from=load_checkpoint(out / "last.pt"))
    assert not list(out.glob(".*.tmp"))                         # the half-written file is cleaned up
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert _train_rows(out, after=10) == _train_rows(tmp_path / "a", after=10)    # bit for bit
    assert state_dicts_equal(load_checkpoint(tmp_path / "a" / "last.pt")["model"],
                             load_checkpoint(out / "last.pt")["model"])


def test_kill_9_at_any_moment_resumes_from_the_last_complete_checkpoint(run_config, tmp_path):
    out = tmp_path / "killed"
    proc = _endless_run(run_config, out)
    try:
        _wait_for(out / "log.jsonl", proc, lambda rows: any(r["event"] == "eval" and r["step"] >= 30 for r in rows))
    finally:
        proc.kill()                                                 # SIGKILL, wherever it is
        proc.wait()
    ckpt = load_checkpoint(out / "last.pt")                         # complete, whatever was being written
    resume_at = ckpt["step"]                # 20 if step 30's checkpoint was still being written
    assert resume_at >= 20 and resume_at % 10 == 0
    more = run_config(*ENDLESS_ARGS, f"--training.max_iters={resume_at + 10}", out_dir=out)
    resumed = train_mod.train(more, resume_from=ckpt)
    straight = train_mod.train(run_config(*ENDLESS_ARGS, f"--training.max_iters={resume_at + 10}",
                                          out_dir=tmp_path / "straight"))
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    # (the killed run may have logged steps past resume_at + 10 before the kill arrived)
    assert _train_rows(out, resume_at, resume_at + 10) == _train_rows(tmp_path / "straight", resume_at)


# a constant schedule makes the trajectory independent of max_iters, so a run can go on until it
# is stopped and be compared with a short straight run
ENDLESS_ARGS = ("--training.lr_schedule=constant", "--training.eval_interval=10", "--training.log_interval=1",
                "--model.dropout=0.1")


def _endless_run(run_config, out: Path) -> subprocess.Popen:
    """train.py with ENDLESS_ARGS and no end in sight, writing to out."""
    cfg = run_config(*ENDLESS_ARGS)
    Path(cfg["training"].out_dir).mkdir(parents=True)
    (Path(cfg["training"].out_dir) / "config.yaml").write_text(yaml.safe_dump(train_mod.config_to_dict(cfg)))
    return subprocess.Popen([sys.executable, "train.py", "--config", str(Path(cfg["training"].out_dir) / "config.yaml"),
                             f"--training.out_dir={out}", "--training.max_iters=1000000"], cwd=REPO,
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _read_if_there(path: Path) -> list:
    try:
        return read_jsonl(path)
    except (FileNotFoundError, ValueError):       # not yet written, or a line being appended
        return []


def test_checkpoints_hold_what_exact_resume_needs(trained_run):
    ckpt = load_checkpoint(trained_run.out_dir / "last.pt")
    assert {"optimizer", "scaler", "step", "elapsed", "best_val_loss", "evals_since_best", "rng"} <= ckpt.keys()
    assert {"torch", "batches", "numpy", "python"} <= ckpt["rng"].keys()
    assert ckpt["scaler"] == {}                                   # fp32: no gradient scaler to restore
    assert "cuda" not in ckpt["rng"] and "ranks" not in ckpt["rng"]   # a CPU run in one process
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


# --- early stopping and the dropout schedule -------------------------------------------------------

def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_new_best(run_config, monkeypatch):
    vals = iter([3.0, 2.5, 2.6, 2.55, 2.7, 1.0, 1.0])          # best at the 2nd evaluation, then 3 worse

    splits = iter(["train", "val"] * 10)

    def scripted(task, stats):                               # the task's metrics, train then val
        return {"loss": 2.0 if next(splits) == "train" else next(vals)}

    monkeypatch.setattr(tasks.LanguageModelTask, "summarize", scripted)
    cfg = run_config("--training.eval_interval=5", "--training.max_iters=100", "--training.early_stopping_patience=3")
    summary = train_mod.train(cfg)
    out = Path(cfg["training"].out_dir)
    assert summary["stopped_early"] and summary["step"] == 25 and summary["best_val_loss"] == 2.5
    rows = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in rows if r["event"] == "eval"] == [5, 10, 15, 20, 25]
    stop = next(r for r in rows if r["event"] == "early_stop")
    assert stop["step"] == 25 and stop["patience"] == 3 and rows[-1]["event"] == "final"
    assert load_checkpoint(out / "best.pt")["step"] == 10
    assert load_checkpoint(out / "last.pt")["evals_since_best"] == 3


def test_no_early_stopping_without_patience(run_config, monkeypatch):
    monkeypatch.setattr(tasks.LanguageModelTask, "summarize", lambda *args: {"loss": 2.0})
    summary = train_mod.train(run_config("--training.eval_interval=5", "--training.max_iters=30"))
    assert not summary["stopped_early"] and summary["step"] == 30


def test_dropout_at():
    linear = TrainConfig(dropout_schedule="linear", dropout_final=0.02)
    assert [dropout_at(p, 0.1, linear) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([0.1, 0.06, 0.02, 0.02])
    assert dropout_at(0.7, 0.1, TrainConfig()) == 0.1                   # constant: the model's own


def test_dropout_schedule_anneals_every_dropout_of_the_model(run_config, monkeypatch):
    seen = []
    real = Transformer.set_dropout
    monkeypatch.setattr(Transformer, "set_dropout", lambda self, p: (seen.append(p), real(self, p)))
    cfg = run_config("--model.dropout=0.2", "--training.dropout_schedule=linear", "--training.dropout_final=0.0",
                     "--training.max_iters=40")
    train_mod.train(cfg)
    assert seen == pytest.approx([0.2 * (1 - step / 40) for step in range(40)])     # before each step
    logged = [(r["step"], r["dropout"]) for r in read_jsonl(Path(cfg["training"].out_dir) / "log.jsonl")
              if r["event"] == "train"]
    assert logged == [(s, pytest.approx(0.2 * (1 - (s - 1) / 40))) for s in range(5, 41, 5)]
    assert load_checkpoint(Path(cfg["training"].out_dir) / "last.pt")["model_config"]["dropout"] == 0.2


@pytest.mark.parametrize("args, match", [
    (["--training.early_stopping_patience=0"], r"early_stopping_patience=0 must be positive"),
    (["--training.dropout_schedule=cosine"], r"dropout_schedule='cosine'; valid: constant, linear"),
    (["--training.dropout_final=1"], r"dropout_final=1.0 must be in \[0, 1\)"),
    (["--training.dropout_schedule=linear", "--training.compile"], r"recompiles for every new value"),
    (["--training.distributed=fdsp"], r"distributed='fdsp'; did you mean 'fsdp'"),
])
def test_new_training_keys_are_checked(run_config, args, match):
    with pytest.raises(ValueError, match=match):
        run_config(*args)


# --- the training record: plot, TensorBoard ----------------------------------------------------------

def test_a_run_draws_its_plot_and_utils_plot_redraws_it(trained_run, tmp_path, capsys):
    png = trained_run.out_dir / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    utils.main(["plot", str(trained_run.out_dir), "--output", str(tmp_path / "again.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "again.png")
    assert (tmp_path / "again.png").stat().st_size > 20_000
    with pytest.raises(SystemExit, match=r"^error: unknown command 'plt'; did you mean 'plot'\? valid: plot, quantize, merge-lora"):
        utils.main(["plt", str(trained_run.out_dir)])
    with pytest.raises(SystemExit, match=r"^error: '.*log\.jsonl' does not exist"):
        utils.main(["plot", str(tmp_path)])


def test_plot_keeps_the_latest_row_of_a_step_logged_twice(tmp_path):
    log = utils.JsonlLogger(tmp_path / "log.jsonl")
    for step, loss in [(1, 3.0), (2, 2.9), (2, 2.5), (3, 2.4)]:       # step 2 redone after a resume
        log.log(event="train", step=step, train_loss=loss, lr=1e-3, grad_norm=1.0)
    log.log(event="eval", step=3, train_loss=2.4, val_loss=2.6)
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert [r["train_loss"] for r in utils._by_step(rows, "train")] == [3.0, 2.5, 2.4]
    assert utils.plot_run(tmp_path).stat().st_size > 10_000


def test_utils_plot_runs_as_a_script(trained_run, tmp_path):
    proc = run_script("utils.py", "plot", trained_run.out_dir, "-o", tmp_path / "p.png")
    assert proc.returncode == 0 and proc.stdout.strip() == str(tmp_path / "p.png"), proc.stderr
    assert run_script("utils.py").stderr.strip() == "error: no command given; valid: plot, quantize, merge-lora, export, import"


def test_tensorboard_scalars_mirror_the_log(run_config, monkeypatch):
    scalars = []

    class FakeWriter:                       # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def flush(self):
            pass

        def close(self):
            scalars.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train_mod.train(run_config("--training.tensorboard=true", "--training.max_iters=10",
                               "--training.eval_interval=5"))
    assert ("train/train_loss", 5) in scalars and ("eval/val_loss", 10) in scalars
    assert ("final/final_val_loss", 10) in scalars and ("train/mfu", 10) in scalars
    assert scalars[-1] == "closed"


def test_without_the_tensorboard_package_the_run_warns_and_goes_on(run_config, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # import fails
    summary = train_mod.train(run_config("--training.tensorboard=true", "--training.max_iters=5",
                                         "--training.eval_interval=5"))
    assert summary["step"] == 5
    assert "warning: TensorBoard logging is off" in capsys.readouterr().err


def test_measuring_the_peak_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    utils.measure_matmul_peak(n=32, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)          # a seeded run is the same with or without MFU


# --- faults: signals, two runs in one folder, a full disk ------------------------------------------

def _wait_for(path: Path, proc, ready, timeout=120):
    deadline = time.time() + timeout
    while not ready(_read_if_there(path)):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_last_pt_at_that_step_and_resume_continues_bit_exactly(run_config, tmp_path, sig):
    """The loop finishes its step, writes last.pt there (between evaluations) and exits with
    128 + the signal; resumed, the run is the straight run's, step for step."""
    args, out = ENDLESS_ARGS, tmp_path / "signalled"
    proc = _endless_run(run_config, out)
    _wait_for(out / "log.jsonl", proc, lambda rows: any(r["event"] == "train" and r["step"] >= 13 for r in rows))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in stderr, stderr
    ckpt = load_checkpoint(out / "last.pt")
    stopped = ckpt["step"]
    assert f"{sig.name}: stopped after step {stopped}; {out / 'last.pt'} holds it" in stderr
    assert read_jsonl(out / "log.jsonl")[-1] == {**read_jsonl(out / "log.jsonl")[-1], "event": "interrupted",
                                                  "step": stopped, "signal": sig.name}
    assert not (out / ".lock").exists()
    end = stopped + 12                                       # past the next evaluation
    resumed = train_mod.train(run_config(*args, f"--training.max_iters={end}", out_dir=out), resume_from=ckpt)
    straight = train_mod.train(run_config(*args, f"--training.max_iters={end}", out_dir=tmp_path / "straight"))
    assert resumed["final_val_loss"] == straight["final_val_loss"]
    assert _train_rows(out, stopped, end) == _train_rows(tmp_path / "straight", stopped)
    assert state_dicts_equal(load_checkpoint(out / "last.pt")["model"],
                             load_checkpoint(tmp_path / "straight" / "last.pt")["model"])


def test_a_second_run_in_a_busy_out_dir_is_refused_and_a_killed_runs_lock_is_taken_over(run_config, tmp_path):
    cfg = run_config("--training.max_iters=1000000")
    out = Path(cfg["training"].out_dir)
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(tmp_path / "text.txt"), *TINY_CLI,
                             f"--training.out_dir={out}", "--training.max_iters=1000000"], cwd=REPO,
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "log.jsonl", proc, lambda rows: any(r["event"] == "train" for r in rows))
        with pytest.raises(SystemExit) as e:
            train_mod.main(["--data", str(tmp_path / "text.txt"), *TINY_CLI, f"--training.out_dir={out}"])
        assert str(e.value.code).startswith(f"error: {out} is in use by another run (") and str(proc.pid) in str(e.value.code)
        assert any(r["event"] == "train" for r in read_jsonl(out / "log.jsonl"))      # its log was left alone
    finally:
        proc.kill()
        proc.wait()
    assert (out / ".lock").exists()                                   # kill -9 leaves it behind
    summary = train_mod.train(run_config("--training.max_iters=40", out_dir=out))    # and it is taken over
    assert summary["step"] == 40 and not (out / ".lock").exists()


def test_a_full_disk_during_a_run_keeps_last_and_best_pt_and_says_so(run_config, monkeypatch, capsys):
    cfg = run_config("--training.eval_interval=10", "--training.max_iters=40")
    out = Path(cfg["training"].out_dir)
    real_save, saved = torch.save, {}

    def fill_the_disk_at_step_30(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 30:
            saved.update({name: (out / name).read_bytes() for name in ("last.pt", "best.pt")})
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", fill_the_disk_at_step_30)
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--config", str(REPO / "config.yaml"), "--data", str(Path(cfg["data"].path)),
                        *TINY_CLI, f"--training.out_dir={out}", "--training.eval_interval=10",
                        "--training.max_iters=40"])
    message = str(e.value.code)
    assert re.fullmatch(rf"error: could not write {re.escape(str(out))}/(best|last)\.pt: No space left on device; "
                        r"the previous \1\.pt is intact", message), message
    assert {name: (out / name).read_bytes() for name in ("last.pt", "best.pt")} == saved
    assert load_checkpoint(out / "last.pt")["step"] == 20 and not list(out.glob(".*.tmp"))
    assert not (out / ".lock").exists()


def test_a_really_full_disk_keeps_the_checkpoints_loadable(run_config, tmp_path):
    """The same on a small tmpfs (where this process may mount one): room for best.pt, last.pt
    and a little more, so the second evaluation's write runs out of space."""
    probe = train_mod.train(run_config("--training.max_iters=10", "--training.eval_interval=10",
                                       out_dir=tmp_path / "probe"))
    size = (Path(probe["out_dir"]) / "last.pt").stat().st_size
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.6 * size) + 65536}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cfg = run_config("--training.eval_interval=10", "--training.max_iters=40",
                         f"--data.cache_dir={tmp_path / 'cache'}", out_dir=disk / "out")
        with pytest.raises(utils.CheckpointError, match=r"No space left on device; the previous (best|last)\.pt is intact"):
            train_mod.train(cfg)
        assert load_checkpoint(disk / "out" / "last.pt")["step"] == 10
        assert load_checkpoint(disk / "out" / "best.pt")["step"] == 10 and not list((disk / "out").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
