"""Shared fixtures: a small text file and tiny, fast run configurations."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:          # so that a bare `pytest` (not only `python -m pytest`) works
    sys.path.insert(0, str(REPO))

import train as train_mod  # noqa: E402
from config import load_config  # noqa: E402

# No per-example deadline: the machine may be shared, and a slow example is not a failure.
settings.register_profile("repo", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("repo")

# A few KB of repetitive English: learnable in tens of steps by a tiny model.
TEXT = ("the quick brown fox jumps over the lazy dog. "
        "a stitch in time saves nine. "
        "to be or not to be, that is the question.\n") * 40

# Tiny model and training settings: a 2-layer, d_model 32 model trains a step in milliseconds.
TINY = [
    "--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4", "--model.block_size=16",
    "--training.batch_size=8", "--training.max_iters=40", "--training.eval_interval=20",
    "--training.eval_iters=2", "--training.log_interval=5", "--training.warmup_iters=5",
    "--training.learning_rate=3e-3", "--training.progress=false", "--training.device=cpu",
    "--training.plot=false",          # matplotlib costs ~1 s a run; the tests of plots turn it on
]


def make_run_config(tmp_path, *overrides, data=None, out_dir=None):
    """A resolved {'model', 'data', 'training'} config: tiny defaults, then `overrides`."""
    argv = list(TINY)
    if data is not None:
        argv.append(f"--data.path={data}")
    argv.append(f"--training.out_dir={out_dir or tmp_path / 'out'}")
    return load_config(None, argv + list(overrides), sections=train_mod.SECTIONS)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def run_config(tmp_path, text_file):
    """run_config(*overrides) -> a tiny resolved config training on text_file into tmp_path/out."""
    def make(*overrides, out_dir=None):
        return make_run_config(tmp_path, *overrides, data=text_file, out_dir=out_dir)
    return make


@contextlib.contextmanager
def single_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield



@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One tiny model trained once for the session (80 steps, about a second): read-only for tests."""
    root = tmp_path_factory.mktemp("trained")
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    cfg = make_run_config(root, "--training.max_iters=80", "--training.plot=true", data=text)
    with single_thread():
        summary = train_mod.train(cfg)
    return SimpleNamespace(cfg=cfg, summary=summary, out_dir=root / "out", text_file=text)


@pytest.fixture
def fake_tiktoken(monkeypatch):
    """Registers two small named tiktoken encodings, so the named-encoding path runs without a
    download: 'mini_test' (byte-level, a few merges, <|endoftext|> right after them) and
    'mini_wide' (the same with <|endoftext|> at id 70000: a vocabulary too large for uint16).
    Returns the mergeable ranks they share."""
    import tiktoken.registry as registry
    from data import EOT, GPT2_PATTERN, count_pretokens, learn_merges

    tokens = [bytes([b]) for b in range(256)]
    for a, b in learn_merges(count_pretokens(TEXT), 40):
        tokens.append(tokens[a] + tokens[b])
    ranks = {t: i for i, t in enumerate(tokens)}

    def constructor(name, eot):
        return lambda: {"name": name, "pat_str": GPT2_PATTERN, "mergeable_ranks": ranks,
                        "special_tokens": {EOT: eot}}
    registry.list_encoding_names()                       # loads the real constructors first
    monkeypatch.setitem(registry.ENCODING_CONSTRUCTORS, "mini_test", constructor("mini_test", len(ranks)))
    monkeypatch.setitem(registry.ENCODING_CONSTRUCTORS, "mini_wide", constructor("mini_wide", 70000))
    monkeypatch.setattr(registry, "ENCODINGS", dict(registry.ENCODINGS))   # forget them afterwards
    return ranks


def hf_in_float64(monkeypatch, norm_cls, rope_cls, *, rotary_dim: int, length: int):
    """Hugging Face's Llama-family models round to float32 inside RMSNorm and RoPE even in a
    float64 model; patch both to true float64, so a comparison checks all of our math."""
    from model import rope_tables

    def rmsnorm64(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rope64(self, x, position_ids):
        cos, sin = rope_tables(rotary_dim, length, 10000.0)
        return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

    monkeypatch.setattr(norm_cls, "forward", rmsnorm64)
    monkeypatch.setattr(rope_cls, "forward", rope64)
