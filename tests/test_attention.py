"""Attention weights on request: they are the weights the model really used (weights @ V is the
layer's attention output), rows are distributions, and masks (causal, padding, the KV cache)
give exact zeros."""
from pathlib import Path

import pytest
import torch

from model import Transformer


def _model(**kw):
    torch.manual_seed(0)
    opts = dict(vocab_size=31, d_model=32, n_heads=4, n_kv_heads=2, n_layers=3, block_size=24, init_std=0.3)
    return Transformer(**{**opts, **kw}).double().eval()


def _attention_outputs(model, idx, **options):
    """Each layer's values (B, n_kv_heads, S, hd) and attention output before the output
    projection (B, T, H * hd), caught at the layer's linear maps."""
    caught, hooks = [], []
    cfg = model.config
    for block in model.blocks:
        record = {}
        caught.append(record)
        hooks.append(block.attn.wqkv.register_forward_hook(
            lambda m, i, out, r=record: r.update(v=out[..., (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim:])))
        hooks.append(block.attn.wo.register_forward_pre_hook(lambda m, i, r=record: r.update(y=i[0])))
    try:
        model.hidden_states(idx, **options)
    finally:
        for h in hooks:
            h.remove()
    return caught


def _weighted_values(w, v, cfg):
    B, T = w.shape[0], w.shape[2]
    v = v.view(B, -1, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)             # (B, Hkv, S, hd)
    v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)               # (B, H, S, hd)
    return (w @ v).transpose(1, 2).reshape(B, T, -1)                           # (B, T, H * hd)


@pytest.mark.parametrize("kw", [{}, {"causal": False}, {"n_kv_heads": 1}, {"pos_encoding": "learned"},
                                {"causal": False, "head": "classification", "num_classes": 3, "pooling": "cls"}],
                         ids=["causal-gqa", "bidirectional", "mqa", "learned", "cls"])
def test_weights_times_values_is_the_attention_output(kw):
    model, idx = _model(**kw), torch.randint(0, 31, (2, 9))
    weights = model.get_attention_weights(idx)
    cls = model.config.pooling == "cls"
    assert len(weights) == model.config.n_layers
    for w, layer in zip(weights, _attention_outputs(model, idx)):
        assert w.shape == (2, model.config.n_heads, 9 + cls, 9 + cls)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=w.dtype))
        torch.testing.assert_close(_weighted_values(w, layer["v"], model.config), layer["y"], atol=1e-6, rtol=0)
    if model.config.causal:
        assert all((w.triu(diagonal=1) == 0).all() for w in weights)
    else:
        assert all((w > 0).all() for w in weights)


def test_a_quantized_or_compiled_model_gives_its_weights_too():
    """Weights can be had from both: a quantized model's come from its quantized projections
    (weights @ V is still its attention output), and torch.compile's wrapper runs the module."""
    from model import QuantConfig, quantize_model
    model, idx = _model(), torch.randint(0, 31, (2, 9))
    eager = model.get_attention_weights(idx)
    assert all(torch.equal(a, b) for a, b in zip(torch.compile(model).get_attention_weights(idx), eager))
    quantize_model(model, QuantConfig("int8"))
    for w, layer in zip(model.get_attention_weights(idx), _attention_outputs(model, idx)):
        torch.testing.assert_close(_weighted_values(w, layer["v"], model.config), layer["y"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_gets_zero_weight_and_a_padded_row_attends_as_alone(causal):
    model = _model(causal=causal)
    row, other = torch.randint(0, 31, (5,)), torch.randint(0, 31, (8,))
    batch = torch.stack([torch.cat([row, torch.zeros(3, dtype=torch.long)]), other])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    padded = model.get_attention_weights(batch, attention_mask=mask)
    alone = model.get_attention_weights(row[None])
    for w, w_alone in zip(padded, alone):
        assert (w[0, :, :5, 5:] == 0).all()                     # real tokens never look at padding
        torch.testing.assert_close(w[0, :, :5, :5], w_alone[0], atol=1e-12, rtol=0)
    for w, layer in zip(padded, _attention_outputs(model, batch, attention_mask=mask)):
        torch.testing.assert_close(_weighted_values(w, layer["v"], model.config), layer["y"], atol=1e-6, rtol=0)


def test_with_the_kv_cache_a_step_attends_as_in_the_full_sequence():
    model, idx = _model(), torch.randint(0, 31, (2, 12))
    full = model.get_attention_weights(idx)
    model.setup_cache(batch_size=2)
    model.get_attention_weights(idx[:, :7], start_pos=0)                          # prefill
    chunk = model.get_attention_weights(idx[:, 7:11], start_pos=7)                # 4 tokens after 7 cached
    step = model.get_attention_weights(idx[:, 11:], start_pos=11)                 # 1 token after 11
    for w_full, w_chunk, w_step in zip(full, chunk, step):
        assert w_chunk.shape == (2, 4, 4, 11) and w_step.shape == (2, 4, 1, 12)
        torch.testing.assert_close(w_chunk, w_full[:, :, 7:11, :11], atol=1e-12, rtol=0)
        torch.testing.assert_close(w_step, w_full[:, :, 11:], atol=1e-12, rtol=0)


def test_asking_for_weights_changes_nothing_else():
    model, idx = _model(), torch.randint(0, 31, (2, 9))
    before = model(idx)
    model.get_attention_weights(idx)
    torch.testing.assert_close(model(idx), before, atol=0, rtol=0)      # still SDPA, the same outputs


def test_left_padded_generation_rows_attend_as_alone():
    model = _model()
    row = torch.randint(0, 31, (6,))
    batch = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), row]), torch.randint(0, 31, (8,))])
    model.setup_cache(batch_size=2)
    padded = model.get_attention_weights(batch, start_pos=0, pad=torch.tensor([2, 0]))
    alone = model.get_attention_weights(row[None].expand(2, -1), start_pos=0)      # a fresh prefill of the row
    for w, w_alone in zip(padded, alone):
        assert (w[0, :, 2:, :2] == 0).all()
        torch.testing.assert_close(w[0, :, 2:, 2:], w_alone[0], atol=1e-12, rtol=0)


def test_plot_attention_draws_one_head_or_every_head_and_saves_a_png(tmp_path):
    from utils import plot_attention
    model, idx = _model(n_heads=4), torch.randint(0, 31, (1, 6))
    weights = model.get_attention_weights(idx)
    tokens = list("to be!")
    one = plot_attention(weights, layer=2, head=1, tokens=tokens, path=tmp_path / "one.png")
    grid = plot_attention(weights, layer=0, head=None, tokens=tokens, path=tmp_path / "grid.png")
    images = [ax for ax in one.axes if ax.images], [ax for ax in grid.axes if ax.images]
    assert [len(a) for a in images] == [1, 4]
    assert images[0][0].get_title() == "layer 2, head 1"
    assert [t.get_text() for t in images[0][0].get_xticklabels()] == ["t", "o", "\u2423", "b", "e", "!"]
    drawn = images[0][0].images[0].get_array()
    torch.testing.assert_close(torch.as_tensor(drawn.data), weights[2][0, 1].float())
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in ("one.png", "grid.png"))


@pytest.mark.parametrize("kw, match", [({"layer": 3}, r"layer=3 is out of range: the weights have 3 layers \(0..2\)"),
                                       ({"head": 4}, r"head=4 is out of range: the weights have 4 heads \(0..3\)"),
                                       ({"tokens": ["a"]}, "1 token labels for 6 key positions")])
def test_plot_attention_errors_name_the_valid_range(kw, match):
    from utils import plot_attention
    model = _model()
    with pytest.raises(ValueError, match=match):
        plot_attention(model.get_attention_weights(torch.randint(0, 31, (1, 6))), **kw)


# --- training.log_attention: diagnostics -----------------------------------------------------------

def test_uniform_attention_has_the_entropy_of_a_uniform_row():
    from train import attention_diagnostics
    model = _model(n_layers=2)
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.wqkv.weight)        # every score 0: each row is uniform
    T = 7
    stats = attention_diagnostics(model, torch.randint(0, 31, (3, T)))
    expected = torch.log(torch.arange(1, T + 1, dtype=torch.float64)).mean().item()   # causal row t: t + 1 keys
    heads = [v for k, v in stats.items() if k.startswith("attn_entropy/")]
    assert len(heads) == 2 * 4 and all(v == pytest.approx(expected, abs=1e-4) for v in heads)
    assert {"act/L0/mean", "act/L0/std", "act/L0/max_abs", "act/L1/max_abs"} <= set(stats)


@pytest.mark.parametrize("kw", [{"causal": True}, {"causal": False, "head": "classification", "num_classes": 2,
                                                   "pooling": "cls"}], ids=["causal", "cls"])
def test_diagnostics_of_a_padded_batch_are_those_of_its_rows(kw):
    from train import attention_diagnostics
    model = _model(**kw)
    row = torch.randint(0, 31, (5,))
    padded_row = torch.cat([row, torch.zeros(3, dtype=torch.long)])
    padded = attention_diagnostics(model, torch.stack([padded_row, padded_row]),
                                   attention_mask=torch.tensor([[1] * 5 + [0] * 3] * 2))
    alone = attention_diagnostics(model, row[None])
    assert padded.keys() == alone.keys()
    for k in alone:
        assert padded[k] == pytest.approx(alone[k], abs=1e-4), k


def test_a_run_with_log_attention_logs_diagnostics_at_each_evaluation_and_plots_them(run_config):
    import train
    from utils import read_jsonl
    cfg = run_config("--training.max_iters=20", "--training.eval_interval=10", "--training.log_attention=true",
                     "--training.plot=true")
    train.train(cfg)
    out = cfg["training"].out_dir
    rows = read_jsonl(f"{out}/log.jsonl")
    diagnostics = [r for r in rows if r["event"] == "diagnostics"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in diagnostics] == [r["step"] for r in evals] == [10, 20]
    n_layers, n_heads = cfg["model"].n_layers, cfg["model"].n_heads
    entropies = [k for k in diagnostics[0] if k.startswith("attn_entropy/")]
    assert len(entropies) == n_layers * n_heads
    T = cfg["model"].block_size
    assert all(0 <= diagnostics[0][k] <= torch.log(torch.tensor(float(T))).item() for k in entropies)
    assert (Path(out) / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_log_attention_logs_none(run_config):
    import train
    from utils import read_jsonl
    cfg = run_config("--training.max_iters=10", "--training.eval_interval=10")
    train.train(cfg)
    assert not [r for r in read_jsonl(f"{cfg['training'].out_dir}/log.jsonl") if r["event"] == "diagnostics"]


def test_log_attention_with_fsdp_is_a_clear_error():
    from config import TrainConfig
    with pytest.raises(ValueError, match="training.log_attention reads one unsharded forward"):
        TrainConfig(log_attention=True, distributed="fsdp")


# --- pluggable attention, positions and activations ------------------------------

from model import SelfAttention, register_activation, register_attention, register_position  # noqa: E402


@register_attention("local")
class LocalMultiHeadAttention(SelfAttention):
    """Seed 000's extension example: multi-head attention with a sliding window constraint."""

    window_size = 4

    def attend(self, q, k, v, mask=None):
        T, S = q.shape[2], k.shape[2]
        i = torch.arange(S - T, S, device=q.device)[:, None]         # query slots
        j = torch.arange(S, device=q.device)                         # key slots
        local = (j <= i) & (i - j < self.window_size)
        return super().attend(q, k, v, local if mask is None else mask & local)


def test_a_registered_attention_is_the_built_in_sliding_window_and_shows_its_weights():
    torch.manual_seed(0)
    local = Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=2, block_size=32, attention="local").eval()
    band = Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=2, block_size=32, attention_window=4).eval()
    band.load_state_dict(local.state_dict())
    idx = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(local(idx), band(idx), atol=1e-6, rtol=0)
        local.setup_cache(2)                                   # the plugin sees cached keys too
        steps = [local(idx[:, :9], start_pos=0)] + [local(idx[:, p:p + 1], start_pos=p) for p in range(9, 32)]
        torch.testing.assert_close(torch.cat(steps, 1), band(idx), atol=1e-6, rtol=0)
        local.clear_cache()
    weights = local.get_attention_weights(idx)[0][0, 0]
    assert (weights[10, :7] == 0).all() and (weights[10, 7:11] > 0).all() and (weights[10, 11:] == 0).all()


def test_a_registered_activation_and_position_encoding_are_used():
    @register_activation("squared_relu")
    def squared_relu(x):
        return torch.relu(x) ** 2

    seen = []

    @register_position("sinusoidal")
    class Sinusoidal(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            freq = 1.0 / 10000 ** (torch.arange(0, cfg.d_model, 2) / cfg.d_model)
            self.register_buffer("freq", freq, persistent=False)

        def forward(self, x, pos):
            seen.append(pos)
            angles = pos[..., None].float() * self.freq                 # (T, C/2) or (B, T, C/2)
            return x + torch.cat([angles.sin(), angles.cos()], dim=-1)

    model = Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=1, activation="squared_relu",
                        pos_encoding="sinusoidal").eval()
    x = torch.randn(2, 5, 32)
    mlp = model.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.w2(torch.relu(mlp.w1(x)) ** 2))
    assert mlp.w3 is None                                       # not gated
    idx = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        out = model(idx)
        model.setup_cache(1)
        steps = torch.cat([model(idx[:, :2], start_pos=0), model(idx[:, 2:], start_pos=2)], 1)
    torch.testing.assert_close(steps, out, atol=1e-5, rtol=0)
    assert seen[0].tolist() == list(range(6)) and seen[-1].tolist() == [2, 3, 4, 5]


def test_registry_mistakes_are_clear():
    with pytest.raises(ValueError, match=r"attention='locall' is not registered; did you mean 'local'\? "
                                         r"valid: standard, local"):
        Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=1, attention="locall")
    with pytest.raises(ValueError, match=r"activation 'swiglu' is built in; register yours under another name"):
        register_activation("swiglu", torch.relu)

    @register_attention("silent")
    class Silent(SelfAttention):       # replaces attention outright, recording nothing
        def attend(self, q, k, v, mask=None):
            return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)[:, :, -q.shape[2]:]

    model = Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=1, attention="silent")
    with pytest.raises(ValueError, match="attention 'silent' does not record its weights"):
        model.get_attention_weights(torch.randint(0, 50, (1, 4)))
