"""Self-tests and a tour of the API, no pytest needed: `python example.py`.

Each check below is a small, readable use of the public API that also verifies a
property (shapes, causality, the KV cache, tokenizers, training, checkpoints,
a classifier, a forecaster, generation). The last line reads `N passed, N failed`; the exit code is non-zero
if anything failed. The full suite lives in tests/ (pytest).
"""
from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from config import SECTIONS, load_config
from data import ByteTokenizer, CharTokenizer, DataConfig, TokenDataset, load_dataset
from generate import SampleConfig, generate_text, generate_tokens, sample_next
from model import Transformer, TransformerConfig
from train import TransformerTrainer, train
from utils import load_checkpoint, model_from_checkpoint

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(**{**dict(vocab_size=50, block_size=32, d_model=32, n_heads=4, n_layers=2), **kw})


@check
def forward_shapes():
    """Token ids (B, T) -> logits (B, T, vocab): both construction styles."""
    m1 = Transformer(vocab_size=1000, d_model=64, n_heads=4, n_layers=3, d_ff=256, dropout=0.1)
    m2 = Transformer(TransformerConfig.from_preset("tiny", vocab_size=1000))
    x = torch.randint(0, 1000, (2, 10))
    assert m1(x).shape == m2(x).shape == (2, 10, 1000)


@check
def causality():
    """Changing a future token never changes the logits of earlier positions."""
    m = tiny_model().eval()
    a = torch.randint(0, 50, (1, 20))
    b = a.clone()
    b[0, 15] = (b[0, 15] + 1) % 50
    with torch.no_grad():
        assert torch.allclose(m(a)[:, :15], m(b)[:, :15])


@check
def kv_cache_matches_full_forward():
    """Prefill + one token per step with the cache gives the logits of a full forward."""
    for n_kv in (1, 2, 4):                       # MQA, GQA, MHA
        m = tiny_model(n_kv_heads=n_kv).eval()
        x = torch.randint(0, 50, (2, 12))
        with torch.no_grad():
            m.setup_cache(batch_size=2)
            steps = [m(x[:, :8], start_pos=0)] + [m(x[:, t:t + 1], start_pos=t) for t in range(8, 12)]
            assert torch.allclose(torch.cat(steps, 1), m(x), atol=1e-5)


@check
def config_errors_are_clear():
    for kwargs, words in [(dict(d_model=100, n_heads=3), "not divisible by n_heads=3"),
                          (dict(n_heads=8, n_kv_heads=3), "not divisible by n_kv_heads=3"),
                          (dict(activation="swishglu"), "did you mean 'swiglu'")]:
        try:
            TransformerConfig(**kwargs)
        except ValueError as e:
            assert words in str(e), str(e)
        else:
            raise AssertionError(f"{kwargs} was accepted")


@check
def tokenizers_round_trip():
    text = "To be, or not to be: that is the question. ✨ 日本"
    char = CharTokenizer.train(text)
    assert char.decode(char.encode(text)) == text
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    try:
        char.encode("xyz!")
    except ValueError as e:
        assert "not in the char vocabulary" in str(e)
    else:
        raise AssertionError("unknown characters were accepted")


@check
def overrides_are_typed():
    cfg = load_config(None, ["--model.n_layers=3", "--training.learning_rate", "3e-4"], sections=SECTIONS)
    assert cfg["model"].n_layers == 3 and cfg["training"].learning_rate == 3e-4
    try:
        load_config(None, ["--model.n_layer=3"], sections=SECTIONS)
    except ValueError as e:
        assert "did you mean 'model.n_layers'" in str(e), str(e)
    else:
        raise AssertionError("unknown key accepted")


@check
def training_lowers_loss_and_checkpoints_round_trip():
    """A 150-step run on a small file: the loss drops, best.pt reloads to the same logits."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "text.txt"
        path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
        cfg = load_config(None, [f"--data.path={path}", f"--training.out_dir={tmp}/out",
                                 "--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4",
                                 "--model.block_size=32", "--training.max_iters=150",
                                 "--training.eval_interval=50", "--training.eval_iters=5",
                                 "--training.batch_size=8", "--training.progress=false",
                                 "--training.learning_rate=3e-3", "--training.warmup_iters=10"], sections=SECTIONS)
        summary = train(cfg)
        assert summary["final_val_loss"] < 0.5, summary      # from ln(28) = 3.3 at the start
        ckpt = load_checkpoint(Path(tmp) / "out" / "best.pt")
        model, tok = model_from_checkpoint(ckpt)
        x = torch.tensor([tok.encode("the quick brown")])
        with torch.no_grad():
            again, _ = model_from_checkpoint(load_checkpoint(Path(tmp) / "out" / "best.pt"))
            assert torch.equal(model(x), again(x))
        greedy = generate_text(model, tok, "the quick ", SampleConfig(max_new_tokens=20, temperature=0))
        assert greedy.startswith("the quick ") and len(greedy) == 30


@check
def a_classifier_learns_through_the_trainer():
    """A head on the backbone, trained by TransformerTrainer on (tokens, label) pairs: the
    label is whether token 7 occurs; padded batches carry an attention mask."""
    g = torch.Generator().manual_seed(0)
    items = [torch.randint(1, 20, (int(n),), generator=g) for n in torch.randint(4, 16, (256,), generator=g)]
    items = [(x, int((x == 7).any())) for x in items]
    model = tiny_model(vocab_size=20, causal=False, head="classification", num_classes=2, pooling="mean")
    trainer = TransformerTrainer(model, learning_rate=1e-2, batch_size=32, warmup_iters=10)
    trainer.train(items[:192], epochs=8)
    metrics = trainer.evaluate(items[192:])              # {'loss', 'accuracy', 'macro_f1'}
    assert metrics["accuracy"] > 0.9, metrics
    assert trainer.predict(items[192:]).shape == (64, 2)  # class probabilities


@check
def a_forecaster_beats_repeating_the_last_season():
    """Feature vectors in place of tokens: a noisy seasonal series, cut into (lookback,
    horizon) windows; a patch transformer with RevIN learns to forecast it."""
    from series import ForecastWindows
    t = torch.arange(1200.0)
    series = (torch.sin(2 * torch.pi * t / 24) + 0.1 * torch.randn(1200, generator=torch.Generator().manual_seed(0)))[:, None]
    train, test = (ForecastWindows(part.numpy(), lookback=48, horizon=12) for part in (series[:1000], series[952:]))
    torch.manual_seed(0)
    model = Transformer(input_dim=1, output_dim=1, head="forecast", horizon=12, patch_len=8, block_size=6, revin=True,
                        d_model=32, n_heads=4, n_layers=2)
    trainer = TransformerTrainer(model, learning_rate=3e-3, batch_size=32, warmup_iters=10)
    trainer.train(train, epochs=3)
    x, y = (torch.stack([test[i][j] for i in range(len(test))]) for j in (0, 1))
    last_season = x[:, -24:-12]                         # the same 12 steps, one season earlier
    assert trainer.evaluate(test)["mse"] < 0.8 * F.mse_loss(last_season, y).item()
    assert trainer.predict(test).shape == (len(test), 12, 1)


@check
def same_seed_same_text():
    m = tiny_model().eval()
    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat(list(generate_tokens(m, torch.tensor([[1, 2, 3]]), 15, temperature=1.0,
                                              top_k=10, generator=g)), 1)
    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))


@check
def greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    assert sample_next(logits, temperature=0).item() == 1
    assert sample_next(logits, temperature=1.0, top_k=1).item() == 1


def main() -> int:
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn()
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {fn.__name__}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
