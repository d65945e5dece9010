"""LoRA adapters and int8/int4 weight-only quantization: model.py section 9 (surgery), utils.py
(load_model, check_base, `quantize`, `merge-lora`), train.py --init_from with --lora / --quantize
(QLoRA) and generate.py --lora / --quantize, the last ones run end to end as a user runs them."""
import contextlib
import copy
import hashlib
import io
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import generate
import train as train_mod
import utils
from conftest import TEXT, single_thread
from data import DataConfig, load_dataset
from generate import SampleConfig, generate_text
from model import (LORA_TARGETS, Int4Linear, Int8Linear, LoRAConfig, LoRALinear, QuantConfig, Transformer,
                   apply_lora, dequantize_model, load_lora_state_dict, lora_state_dict,
                   merge_lora, pack_int4, quantize_int4, quantize_int8, quantize_model, unpack_int4)
from tasks import lm_loss
from train import TrainConfig, make_optimizer, split_loss
from utils import (CheckpointError, base_reference, check_base, file_sha256, load_checkpoint, load_model,
                   model_from_checkpoint, read_jsonl, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = ["--config", str(REPO / "config.yaml")]

INT8_OP, INT4_OP = "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"
needs_int8_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, INT8_OP),
                                       reason=f"this torch has no aten.{INT8_OP}")
needs_int4_kernel = pytest.mark.skipif(not hasattr(torch.ops.aten, INT4_OP),
                                       reason=f"this torch has no aten.{INT4_OP}")


def gqa_model(seed=0, **overrides) -> Transformer:
    """A tiny random model with grouped-query attention (4 query heads, 2 kv heads of 8 dims)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=37, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, block_size=16,
              bias=True, init_std=0.2)
    return Transformer(**{**kw, **overrides}).eval()


def qkv_slices(cfg) -> dict:
    """The rows of the fused wqkv that are q, k and v (computed here, not by the code under test)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


def lora_layers(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def randomize_B(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)
    return model


def expected_trainable(cfg, r, targets) -> int:
    """The adapter parameter count by the formula r * (in + out) per adapted projection."""
    d, (q0, q1), (k0, k1) = cfg.d_model, qkv_slices(cfg)["q"], qkv_slices(cfg)["k"]
    q, kv = q1 - q0, k1 - k0
    per_layer = sum(r * (d + width) for t, width in (("q", q), ("k", kv), ("v", kv)) if t in targets)
    if "o" in targets:
        per_layer += r * (q + d)
    if "mlp" in targets:
        gated = cfg.activation in ("swiglu", "geglu")
        per_layer += r * (d + cfg.d_ff) * (2 if gated else 1) + r * (cfg.d_ff + d)
    return cfg.n_layers * per_layer


def tokens(vocab=37, shape=(2, 12), seed=3):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_main(module, argv) -> str:
    """module.main(argv) in-process, as `python module.py argv` runs it; returns what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        module.main([str(a) for a in argv])
    return buf.getvalue()


@pytest.fixture
def no_malloc_tuning(monkeypatch):
    # train.main() tunes the process's allocator: not the pytest process's
    monkeypatch.setattr(train_mod, "tune_cpu_allocator", lambda: False)

# =============================================================================
# LoRA: the module surgery
# =============================================================================


@pytest.mark.parametrize("targets", [["q"], ["k"], ["v"], ["q", "v"], ["k", "v"], ["q", "k", "v"], ["o"],
                                     ["mlp"], list(LORA_TARGETS)])
def test_fresh_adapters_change_no_output(targets):
    model = gqa_model()
    x = tokens()
    with torch.no_grad():
        before = model(x)
    n = apply_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
    assert n == expected_trainable(model.config, 4, targets) > 0
    layers = lora_layers(model)
    slices = qkv_slices(model.config)
    for i in range(model.config.n_layers):          # exactly the targets are wrapped, q/k/v by their rows
        wqkv = layers.get(f"blocks.{i}.attn.wqkv")
        wanted = [slices[t] for t in "qkv" if t in targets]
        assert (wqkv.segments if wqkv else []) == wanted
        assert (f"blocks.{i}.attn.wo" in layers) == ("o" in targets)
        mlp = {f"blocks.{i}.mlp.{w}" for w in ("w1", "w2", "w3")}
        assert mlp & set(layers) == (mlp if "mlp" in targets else set())
    assert "lm_head" not in layers
    with torch.no_grad():
        assert torch.equal(model(x), before)          # B = 0: bit for bit the base model
        randomize_B(model)
        assert not torch.allclose(model(x), before, atol=1e-3)   # ... and the adapters are live


def test_segments_are_separately_adapted_q_k_v_projections():
    model = gqa_model()
    apply_lora(model, LoRAConfig(r=3, alpha=6, targets=["q", "v"]))
    layer = model.blocks[0].attn.wqkv
    (q0, q1), (k0, k1), (v0, v1) = qkv_slices(model.config).values()
    assert (q1 - q0, k1 - k0, v1 - v0) == (32, 16, 16)      # GQA: k and v are narrower than q
    randomize_B(model)
    W, b = layer.base.weight, layer.base.bias
    A_q, A_v = layer.lora_A[:3], layer.lora_A[3:6]
    B_q, B_v = layer.lora_B[:q1 - q0], layer.lora_B[q1 - q0:]
    x = torch.randn(2, 5, 32)
    expected = x @ W.T + b
    expected[..., q0:q1] += 2.0 * (x @ A_q.T) @ B_q.T          # scale = alpha / r = 2
    expected[..., v0:v1] += 2.0 * (x @ A_v.T) @ B_v.T
    with torch.no_grad():
        got = layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[..., k0:k1], layer.base(x)[..., k0:k1])      # k is not adapted at all
        # the same as two separately adapted q and v projections and a plain k one
        q_ref = LoRALinear(torch.nn.Linear(32, q1 - q0), r=3, alpha=6)
        v_ref = LoRALinear(torch.nn.Linear(32, v1 - v0), r=3, alpha=6)
        for ref, (lo, hi), A, B in ((q_ref, (q0, q1), A_q, B_q), (v_ref, (v0, v1), A_v, B_v)):
            for param, value in ((ref.base.weight, W[lo:hi]), (ref.base.bias, b[lo:hi]),
                                 (ref.lora_A, A), (ref.lora_B, B)):
                param.copy_(value)
            torch.testing.assert_close(got[..., lo:hi], ref(x), rtol=1e-5, atol=1e-6)
        # delta_weight / merged: W + (alpha/r) B A on the q and v rows, nothing on the k rows
        delta = torch.zeros_like(W)
        delta[q0:q1], delta[v0:v1] = 2.0 * B_q @ A_q, 2.0 * B_v @ A_v
        torch.testing.assert_close(layer.delta_weight(), delta)
        merged = layer.merged()
        torch.testing.assert_close(merged.weight, W + delta)
        assert torch.equal(merged.weight[k0:k1], W[k0:k1]) and torch.equal(merged.bias, b)


def test_merged_plain_layer_is_W_plus_scaled_BA():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    layer = LoRALinear(base, r=4, alpha=10)
    with torch.no_grad():
        layer.lora_B.normal_()
        merged = layer.merged()
        assert type(merged) is torch.nn.Linear
        torch.testing.assert_close(merged.weight, base.weight + 2.5 * layer.lora_B @ layer.lora_A)
        assert torch.equal(merged.bias, base.bias)
        x = torch.randn(7, 24)
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-6)


def test_merged_model_equals_the_lora_model_and_merging_twice_is_merging_once():
    model = gqa_model()
    apply_lora(model, LoRAConfig(r=4, alpha=16, dropout=0.3, targets=list(LORA_TARGETS)))
    randomize_B(model)
    x = tokens()
    with torch.no_grad():
        lora_out = model.eval()(x)                    # eval: the adapter's dropout is off
        assert not torch.allclose(model.train()(x), lora_out)    # (it is on in training)
        merge_lora(model.eval())
        assert not lora_layers(model)
        assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("wqkv", "w2")))
        once = copy.deepcopy(model.state_dict())
        torch.testing.assert_close(model(x), lora_out, rtol=1e-4, atol=1e-5)
        assert not any(".lora_" in k or ".base." in k for k in once)
        assert once.keys() == gqa_model().state_dict().keys()     # a plain model's state dict
        merge_lora(model)
        assert state_dicts_equal(model.state_dict(), once)


def test_an_optimizer_step_changes_only_the_adapters():
    model = gqa_model(n_kv_heads=1, activation="gelu")          # MQA; an MLP without w3
    targets = ["q", "k", "o", "mlp"]
    n = apply_lora(model, LoRAConfig(r=2, targets=targets))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in model.named_parameters() if ".lora_" in k} and trainable
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) \
        == expected_trainable(model.config, 2, targets)
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer(model, TrainConfig(learning_rate=1e-2, weight_decay=0.0), "cpu")
    model.train()
    x, y = tokens(shape=(4, 16)), tokens(shape=(4, 16), seed=4)
    for _ in range(2):         # the first step moves B off zero, the second moves A too
        lm_loss(model, x, y).backward()
        assert all(p.grad is None for k, p in model.named_parameters() if ".lora_" not in k)
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {k for k in after if ".lora_" in k}


def test_apply_lora_doc_example_count():
    model = Transformer(vocab_size=16, d_model=32, n_heads=4, n_layers=2)
    assert apply_lora(model, LoRAConfig(r=4, targets=["q", "v"])) == expected_trainable(
        model.config, 4, ["q", "v"]) == 1024


def test_lora_state_dict_round_trip_and_mismatches(tmp_path):
    cfg = LoRAConfig(r=4, targets=["q", "v", "mlp"])
    trained = gqa_model()
    apply_lora(trained, cfg)
    randomize_B(trained)
    state = lora_state_dict(trained)
    assert set(state) == {f"{name}.lora_{m}" for name in lora_layers(trained) for m in "AB"}
    torch.save(state, tmp_path / "adapter.pt")
    state = torch.load(tmp_path / "adapter.pt", weights_only=True)

    fresh = gqa_model()                    # the same base ...
    torch.manual_seed(123)
    apply_lora(fresh, cfg)                 # ... with other random A and a zero B
    x = tokens()
    with torch.no_grad():
        assert not torch.allclose(fresh(x), trained(x))
        load_lora_state_dict(fresh, state)
        assert torch.equal(fresh(x), trained(x))
    assert state_dicts_equal(fresh.state_dict(), trained.state_dict())

    for other, cfg_other in [(gqa_model(), LoRAConfig(r=8, targets=["q", "v", "mlp"])),     # rank
                             (gqa_model(), LoRAConfig(r=4, targets=["q", "v"])),            # targets
                             (gqa_model(d_model=64, n_heads=8), cfg)]:                      # base shape
        apply_lora(other, cfg_other)
        with pytest.raises(ValueError, match="the adapter does not fit this model"):
            load_lora_state_dict(other, state)
    with pytest.raises(ValueError, match="does not fit"):
        load_lora_state_dict(gqa_model(), state)          # a model without adapters


def test_lora_and_quant_config_validation():
    assert LoRAConfig(r=2, targets="q, v").targets == ["q", "v"]
    assert LoRAConfig(r=2, targets=["q,k", "mlp"]).targets == ["q", "k", "mlp"]
    for kw, match in [(dict(r=-1), r"lora\.r=-1 must be an integer >= 0"),
                      (dict(r=1.5), r"lora\.r=1\.5 must be an integer"),
                      (dict(r=4, targets=["mpl"]), r"unknown target 'mpl'; did you mean 'mlp'\?"),
                      (dict(r=4, targets=["q", "vv"]), r"unknown target 'vv'; did you mean 'v'\?"),
                      (dict(r=4, targets=[]), r"lora\.targets is empty"),
                      (dict(r=4, alpha=0), r"lora\.alpha=0 must be positive"),
                      (dict(r=4, dropout=1.0), r"lora\.dropout=1\.0 must be in \[0, 1\)")]:
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**kw)
    with pytest.raises(ValueError, match="lora.r > 0"):
        apply_lora(gqa_model(), LoRAConfig(r=0))
    with pytest.raises(ValueError, match=r"quantize mode 'int3'; .*valid: int8, int4"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match=r"group_size=48; valid: 32, 64, 128, 256"):
        QuantConfig("int4", 48)
    model = gqa_model()
    assert quantize_model(model, QuantConfig()) is model and not any(
        isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())

# =============================================================================
# Quantization: the numbers
# =============================================================================


@settings(max_examples=60)
@given(st.integers(1, 6), st.integers(1, 80), st.integers(-4, 3), st.integers(0, 2**31 - 1))
def test_int8_error_is_at_most_half_a_step_per_row(n, k, exponent, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 10.0 ** exponent
    w[0, 0] *= 30                                            # an outlier
    if n > 1:
        w[-1] = 0                                            # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (n,)
    assert int(q.int().abs().max()) <= 127
    err = (w - q.float() * scale[:, None]).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-6 * w.abs())
    rows = w.abs().amax(1) > 0
    assert torch.all(q[rows].int().abs().amax(1) == 127)     # each row uses the whole range
    assert torch.all(q[~rows] == 0)
    layer_w = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        layer_w.weight.copy_(w)
    layer = Int8Linear.from_linear(layer_w)
    assert torch.equal(layer.weight, q) and torch.equal(layer.scales, scale)
    assert torch.equal(layer.dequantize(), q.float() * scale[:, None])


@settings(max_examples=60)
@given(st.integers(1, 6), st.sampled_from([32, 64]), st.integers(1, 3), st.integers(-4, 3),
       st.integers(0, 2**31 - 1))
def test_int4_error_is_at_most_half_a_step_per_group(n, group, groups, exponent, seed):
    g = torch.Generator().manual_seed(seed)
    k = group * groups
    w = (torch.randn(n, k, generator=g) + 2 * torch.rand(n, 1, generator=g)) * 10.0 ** exponent  # off-centre
    codes, sz = quantize_int4(w, group)
    assert codes.dtype == torch.uint8 and codes.shape == (n, k) and int(codes.max()) <= 15
    assert sz.shape == (groups, n, 2)
    scale = sz[..., 0].T.repeat_interleave(group, dim=1)             # (n, k)
    zero = sz[..., 1].T.repeat_interleave(group, dim=1)
    deq = (codes.float() - 8) * scale + zero                          # the documented layout
    err = (w - deq).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-4) + 1e-6 * w.abs().amax())
    by_group = codes.view(n, groups, group)
    assert torch.all(by_group.amin(-1) == 0) and torch.all(by_group.amax(-1) == 15)   # min and max hit
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Int4Linear.from_linear(linear, group_size=group)
    assert torch.equal(layer.weight, pack_int4(codes)) and torch.equal(layer.codes(), codes)
    torch.testing.assert_close(layer.dequantize(), deq, rtol=1e-6, atol=0)


@given(st.integers(1, 8), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_pack_unpack_int4_round_trip(n, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, 2 * half_k), generator=g, dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (n, half_k)
    assert torch.equal(packed.int(), codes[:, 0::2].int() + 16 * codes[:, 1::2].int())   # even column low
    assert torch.equal(unpack_int4(packed), codes)
    raw = torch.randint(0, 256, (n, half_k), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(raw)), raw)


def test_int4_needs_in_features_divisible_by_the_group():
    with pytest.raises(ValueError, match=r"int4 needs in_features \(48\) divisible by group_size \(32\)"):
        Int4Linear(48, 16, group_size=32)
    with pytest.raises(ValueError, match=r"in_features \(32\) divisible by group_size \(64\)"):
        quantize_model(gqa_model(), QuantConfig("int4", 64))        # d_model 32


def test_quantized_logits_are_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(vocab_size=50, d_model=128, d_ff=256, n_heads=4, n_kv_heads=2, n_layers=2,
                        block_size=32).eval()
    x = tokens(50, (2, 24))
    with torch.no_grad():
        ref = model(x)
        rel = {}
        for mode, group in [("int8", 64), ("int4", 32), ("int4", 64), ("int4", 128)]:
            q = quantize_model(copy.deepcopy(model), QuantConfig(mode, group))
            assert not any(type(m) is torch.nn.Linear for m in q.modules())
            rel[mode if mode == "int8" else f"int4/{group}"] = float((q(x) - ref).norm() / ref.norm())
    print("relative logit error vs fp32:", {k: round(v, 4) for k, v in rel.items()})
    assert 0 < rel["int8"] < 0.02
    assert all(0 < rel[f"int4/{g}"] < 0.2 for g in (32, 64, 128))
    assert rel["int8"] < rel["int4/32"] < rel["int4/128"]          # more bits, smaller groups: closer


def test_quantize_model_swaps_every_linear_and_dequantize_restores_the_tie():
    model = gqa_model(d_model=64, n_heads=4, d_ff=64, bias=False)
    float_weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
                     if type(m) is torch.nn.Linear}
    assert len(float_weights) == 2 * 5 + 1                              # wqkv, wo, w1, w2, w3; head
    quantize_model(model, QuantConfig("int8"))
    q_layers = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert set(q_layers) == set(float_weights)
    assert model.tok_emb.weight.dtype == torch.float32                  # the embedding stays float
    for name, layer in q_layers.items():
        scale = float_weights[name].abs().amax(1, keepdim=True) / 127
        assert torch.all((layer.dequantize() - float_weights[name]).abs() <= scale / 2 + 1e-7)
    dequantize_model(model)
    assert model.lm_head.weight is model.tok_emb.weight                 # tied again: the head is exact
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


@needs_int8_kernel
def test_int8_fused_kernel_and_fallback_agree():
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=True))
    x = torch.randn(3, 5, 64)
    real, calls = getattr(torch.ops.aten, INT8_OP), []

    def spy(*args):
        calls.append(1)
        return real(*args)

    layer.use_kernel = True           # by default the kernel is used only where it measured faster
    with mock.patch.object(torch.ops.aten, INT8_OP, spy), torch.no_grad():
        fused = layer(x)
        assert calls, "no gradient needed on CPU: the fused kernel must be used"
        layer.use_kernel = False
        n = len(calls)
        fallback = layer(x)
        assert len(calls) == n
    torch.testing.assert_close(fused, fallback, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fallback, F.linear(x, layer.dequantize()) + layer.bias, rtol=1e-5, atol=1e-6)


@needs_int4_kernel
def test_int4_kernel_layout_and_portable_layout_agree():
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(torch.nn.Linear(96, 48, bias=True), group_size=32)
    x = torch.randn(3, 5, 96)
    codes, deq = layer.codes(), layer.dequantize()
    with torch.no_grad():
        portable = layer(x)
        assert layer.to_kernel_layout() and layer.layout == "cpu"
        assert not torch.equal(layer.weight, pack_int4(codes))           # really another layout
        real, calls = getattr(torch.ops.aten, INT4_OP), []

        def spy(*args):
            calls.append(1)
            return real(*args)

        with mock.patch.object(torch.ops.aten, INT4_OP, spy):
            kernel = layer(x)
        assert len(calls) == 1
    torch.testing.assert_close(kernel, portable, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.codes(), codes) and torch.equal(layer.dequantize(), deq)
    assert torch.equal(layer.state_dict()["weight"], pack_int4(codes))   # the state dict stays portable
    # a shape the CPU kernel does not take (out_features 40) stays portable and still works
    odd = Int4Linear.from_linear(torch.nn.Linear(64, 40), group_size=32)
    with torch.no_grad():
        before = odd(x[..., :64])
        assert odd.to_kernel_layout() is False and odd.layout == "portable"
        assert torch.equal(odd(x[..., :64]), before)


def _int4_model(seed, kernels):
    model = gqa_model(seed, d_model=64, n_heads=4, d_ff=128)
    return quantize_model(model, QuantConfig("int4", 32), kernels=kernels)


def test_int4_state_dict_is_portable_and_round_trips_exactly(tmp_path):
    model = gqa_model(0, d_model=64, n_heads=4, d_ff=128)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    quantize_model(model, QuantConfig("int4", 32), kernels=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert set(layers) == set(floats)
    if hasattr(torch.ops.aten, INT4_OP):       # the block layers (out_features % 16 == 0) take the kernel
        assert {n for n, m in layers.items() if m.layout == "cpu"} >= {n for n in layers if "blocks" in n}
    state = model.state_dict()
    for name, w in floats.items():
        codes, sz = quantize_int4(w, 32)
        assert torch.equal(state[f"{name}.weight"], pack_int4(codes))
        assert torch.equal(state[f"{name}.scales_and_zeros"], sz)
    save_checkpoint(tmp_path / "q.pt", {"model": state, "model_config": model.config.to_dict(),
                                        "tokenizer": {"kind": "byte", "version": 1}})
    loaded = load_checkpoint(tmp_path / "q.pt")["model"]
    x = tokens()
    with torch.no_grad():
        ref = model(x)
        outs = {}
        for kernels in (True, False):
            fresh = _int4_model(seed=7, kernels=kernels)          # other random weights first
            fresh.load_state_dict(loaded)
            assert state_dicts_equal(fresh.state_dict(), state)
            outs[kernels] = fresh(x)
        assert torch.equal(outs[True], ref)                         # the same layout: bit for bit
        torch.testing.assert_close(outs[False], ref, rtol=1e-4, atol=1e-5)


def test_loading_an_adapter_keeps_kernel_layout_int4_weights():
    # regression: Int4Linear._load_from_state_dict zeroed a kernel-layout weight whenever any
    # state dict was loaded, so load_lora_state_dict (strict=False, adapter keys only) wiped the base
    model = _int4_model(seed=0, kernels=True)
    x = tokens()
    codes = {n: m.codes() for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    with torch.no_grad():
        base_out = model(x)
    apply_lora(model, LoRAConfig(r=2))
    load_lora_state_dict(model, lora_state_dict(model))
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    for n, m in model.named_modules():
        if isinstance(m, Int4Linear):
            assert torch.equal(m.codes(), codes[n.replace(".base", "")]), n


@pytest.mark.parametrize("mode, group", [("int8", 64), ("int4", 32)])
@pytest.mark.parametrize("kernels", [True, False])
def test_qlora_gradients_reach_every_adapter(mode, group, kernels):
    """The quantized layers fall back to dequantize-then-matmul when a gradient is needed, so
    the adapters get the gradients a float model with the dequantized weights gives."""
    model = quantize_model(gqa_model(d_model=64, n_heads=4, d_ff=128, tie_weights=False),
                           QuantConfig(mode, group), kernels=kernels)
    reference = dequantize_model(copy.deepcopy(model))              # float, the same (dequantized) weights
    for m in (model, reference):
        torch.manual_seed(5)
        apply_lora(m, LoRAConfig(r=2))
        randomize_B(m)
    assert state_dicts_equal(lora_state_dict(model), lora_state_dict(reference))
    x, y = tokens(shape=(2, 16)), tokens(shape=(2, 16), seed=9)
    for m in (model.train(), reference.train()):
        lm_loss(m, x, y).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    ref_grads = {k: p.grad for k, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() == set(lora_state_dict(model))
    assert len(grads) == 2 * 2 * 5                                    # A and B, 5 projections, 2 layers
    for k, g in grads.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, k
        assert (g - ref_grads[k]).abs().max() <= 1e-3 * ref_grads[k].abs().max(), k    # float rounding only

# =============================================================================
# End to end: train a base, fine-tune it with LoRA and QLoRA, quantize, merge, generate
# =============================================================================


ARCH = ["--model.n_layers=2", "--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--model.block_size=32"]
RUN = ["--training.batch_size=8", "--training.eval_interval=20", "--training.eval_iters=2",
       "--training.log_interval=5", "--training.warmup_iters=5", "--training.learning_rate=3e-3",
       "--training.progress=false", "--device", "cpu"]
# other text in the base's characters: what the adapters learn
FT_TEXT = "to be, to see, to quote a dog in the box is not the fox. " * 60


def lora_argv(runs, out, *extra, data=None):
    return [*CONFIG, "--data", data or runs.ft_text, f"--training.out_dir={out}", *RUN,
            "--init_from", runs.base, "--lora.r=4", "--lora.targets=q,v,o,mlp", "--training.max_iters=40",
            *extra]


def loss_on(model, tokenizer, path) -> float:
    data = load_dataset(DataConfig(path=str(path)), block_size=model.config.block_size, tokenizer=tokenizer)
    return split_loss(model, data, "val", block_size=model.config.block_size, batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base trained on TEXT and a LoRA adapter fine-tuned on FT_TEXT, both by train.main."""
    root = tmp_path_factory.mktemp("lora_quant")
    (root / "base.txt").write_text(TEXT, encoding="utf-8")
    (root / "ft.txt").write_text(FT_TEXT, encoding="utf-8")
    ns = SimpleNamespace(root=root, base_text=root / "base.txt", ft_text=root / "ft.txt",
                         base=root / "base" / "best.pt", adapter=root / "lora" / "best.pt")
    with pytest.MonkeyPatch.context() as mp, single_thread():
        mp.setattr(train_mod, "tune_cpu_allocator", lambda: False)
        run_main(train_mod, [*CONFIG, "--data", ns.base_text, f"--training.out_dir={root / 'base'}", *ARCH,
                             *RUN, "--training.max_iters=60"])
        ns.base_sha = file_sha256(ns.base)
        # no --model.* flags: a fine-tune takes the base's architecture, not config.yaml's
        ns.lora_stdout = run_main(train_mod, lora_argv(ns, root / "lora"))
    ns.base_model, ns.tok = model_from_checkpoint(load_checkpoint(ns.base))
    ns.base_ft_loss = loss_on(ns.base_model, ns.tok, ns.ft_text)
    return ns


def greedy(*argv, capsys, n=30) -> str:
    """generate.py's output for argv (greedy unless argv says otherwise)."""
    capsys.readouterr()
    generate.main([*CONFIG, "--prompt", "to ", "--max_new_tokens", str(n), "--temperature", "0",
                   "--seed", "1", "--device", "cpu", *map(str, argv)])
    return capsys.readouterr().out


def test_lora_run_writes_a_small_adapter_that_refers_to_its_base(runs):
    ckpt = load_checkpoint(runs.adapter)
    expected_keys = {f"blocks.{i}.{p}.lora_{m}" for i in range(2) for m in "AB"
                     for p in ("attn.wqkv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")}
    assert set(ckpt["model"]) == expected_keys                     # only the adapters' weights
    assert ckpt["lora"]["config"] == {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q", "v", "o", "mlp"]}
    assert ckpt["lora"]["base"] == {"path": str(runs.base.resolve()),
                                    "sha256": hashlib.sha256(runs.base.read_bytes()).hexdigest()}
    assert file_sha256(runs.base) == runs.base_sha                  # the run left its base alone
    assert "quantize" not in ckpt
    base = load_checkpoint(runs.base)
    assert ckpt["model_config"] == base["model_config"] and ckpt["model_config"]["d_model"] == 64
    assert ckpt["tokenizer"] == base["tokenizer"]
    assert len(ckpt["optimizer"]["state"]) == len(expected_keys)     # optimizer state of the adapters only
    assert runs.adapter.stat().st_size * 5 < runs.base.stat().st_size
    n = expected_trainable(Transformer(**base["model_config"]).config, 4, ["q", "v", "o", "mlp"])
    assert f"LoRA r=4 on q,v,o,mlp: {n:,} trainable parameters" in runs.lora_stdout
    rows = read_jsonl(runs.root / "lora" / "log.jsonl")
    assert rows[0]["event"] == "start" and rows[0]["params"] == n
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows[-1]["step"] == 40 and train_rows[-1]["train_loss"] < 0.8 * train_rows[0]["train_loss"]
    final = rows[-1]["final_val_loss"]
    print(f"val loss on the fine-tune text: base {runs.base_ft_loss:.4f}, with the adapter {final:.4f}")
    assert final < 0.9 * runs.base_ft_loss
    model, tok = load_model(runs.root / "lora" / "last.pt")         # the end of the run
    assert loss_on(model, tok, runs.ft_text) == pytest.approx(final, rel=1e-5)


def test_generate_with_an_adapter(runs, capsys):
    with_lora = greedy("--checkpoint", runs.base, "--lora", runs.adapter, capsys=capsys)
    alone = greedy("--checkpoint", runs.adapter, capsys=capsys)          # finds its base
    assert with_lora == alone and with_lora.startswith("to ") and len(with_lora) == 3 + 30 + 1
    model, tok = load_model(runs.base, lora=runs.adapter)
    assert with_lora == generate_text(model, tok, "to ", SampleConfig(max_new_tokens=30, temperature=0)) + "\n"
    ids = torch.tensor([tok.encode("to be, to see")])
    with torch.no_grad():
        assert not torch.allclose(model(ids), runs.base_model(ids), atol=1e-2)   # the adapter does something
    sampled = [greedy("--checkpoint", runs.adapter, "--temperature", "1.0", capsys=capsys) for _ in range(2)]
    assert sampled[0] == sampled[1]                                          # --seed 1 both times


def test_merge_lora_cli_writes_a_plain_checkpoint(runs, tmp_path, capsys):
    merged_path = tmp_path / "merged.pt"
    out = run_main(utils, ["merge-lora", "--lora", runs.adapter, "--out", merged_path])
    assert f"-> {merged_path}" in out
    merged = load_checkpoint(merged_path)
    base, adapter = load_checkpoint(runs.base), load_checkpoint(runs.adapter)
    assert "lora" not in merged and "quantize" not in merged
    assert merged["model"].keys() == base["model"].keys()
    # W + (alpha / r) B A by hand: q and v rows of wqkv each with their own adapter, k rows untouched
    (q0, q1), (k0, k1), (v0, v1) = qkv_slices(Transformer(**base["model_config"]).config).values()
    scale, r = 16.0 / 4, 4
    for i in range(2):
        W, A, B = (base["model"][f"blocks.{i}.attn.wqkv.weight"], adapter["model"][f"blocks.{i}.attn.wqkv.lora_A"],
                   adapter["model"][f"blocks.{i}.attn.wqkv.lora_B"])
        got = merged["model"][f"blocks.{i}.attn.wqkv.weight"]
        torch.testing.assert_close(got[q0:q1], W[q0:q1] + scale * B[:q1 - q0] @ A[:r])
        torch.testing.assert_close(got[v0:v1], W[v0:v1] + scale * B[q1 - q0:] @ A[r:])
        assert torch.equal(got[k0:k1], W[k0:k1])
        p = f"blocks.{i}.mlp.w2"
        torch.testing.assert_close(merged["model"][f"{p}.weight"], base["model"][f"{p}.weight"] + scale *
                                   adapter["model"][f"{p}.lora_B"] @ adapter["model"][f"{p}.lora_A"])
    assert torch.equal(merged["model"]["tok_emb.weight"], base["model"]["tok_emb.weight"])
    assert greedy("--checkpoint", merged_path, capsys=capsys) == \
        greedy("--checkpoint", runs.base, "--lora", runs.adapter, capsys=capsys)
    # naming the base explicitly gives the same weights; another "base" is refused
    run_main(utils, ["merge-lora", "--lora", runs.adapter, "--checkpoint", runs.base, "--out", tmp_path / "m2.pt"])
    assert state_dicts_equal(load_checkpoint(tmp_path / "m2.pt")["model"], merged["model"])
    with pytest.raises(SystemExit, match=r"^error: .*merged\.pt' is not the base this adapter was trained on "
                                         r"\(sha256"):
        utils.main(["merge-lora", "--lora", str(runs.adapter), "--checkpoint", str(merged_path),
                    "--out", str(tmp_path / "m3.pt")])
    assert not (tmp_path / "m3.pt").exists()


def test_interrupted_lora_run_resumes_bit_identically(runs, tmp_path, monkeypatch, no_malloc_tuning):
    real_save = train_mod.save_checkpoint

    def interrupt_at_20(path, payload):
        real_save(path, payload)
        if Path(path).name == "last.pt" and payload["step"] == 20:
            raise KeyboardInterrupt

    out = tmp_path / "lora"
    monkeypatch.setattr(train_mod, "save_checkpoint", interrupt_at_20)
    with pytest.raises(SystemExit, match="interrupted; resume with --resume"):
        run_main(train_mod, lora_argv(runs, out))
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert load_checkpoint(out / "last.pt")["step"] == 20
    printed = run_main(train_mod, [*CONFIG, "--resume", f"--training.out_dir={out}", "--device", "cpu"])
    assert f"resuming from step 20 of {out / 'last.pt'}" in printed and "after 40 steps" in printed
    resumed, straight = load_checkpoint(out / "last.pt"), load_checkpoint(runs.root / "lora" / "last.pt")
    assert resumed["step"] == 40 and resumed["lora"] == straight["lora"]
    assert state_dicts_equal(resumed["model"], straight["model"])              # only adapters, the same bits
    starts = [r for r in read_jsonl(out / "log.jsonl") if r["event"] == "start"]
    assert [(r["step"], r["resumed"]) for r in starts] == [(0, False), (20, True)]
    # and --resume with more steps goes on training the adapter
    run_main(train_mod, [*CONFIG, "--resume", f"--training.out_dir={out}", "--training.max_iters=50",
                         "--device", "cpu"])
    more = load_checkpoint(out / "last.pt")
    assert more["step"] == 50 and more["model"].keys() == straight["model"].keys()
    assert not any(torch.equal(more["model"][k], straight["model"][k]) for k in more["model"])


def test_a_changed_or_missing_base_is_refused(runs, tmp_path, capsys, no_malloc_tuning):
    base = tmp_path / "base.pt"
    shutil.copy(runs.base, base)
    ref = base_reference(base)
    adapter = load_checkpoint(runs.adapter)
    adapter["lora"]["base"] = ref
    save_checkpoint(tmp_path / "adapter.pt", adapter)
    run = tmp_path / "run"                      # a LoRA run to resume, on this base
    shutil.copytree(runs.root / "lora", run)
    last = load_checkpoint(run / "last.pt")
    last["lora"]["base"] = ref
    save_checkpoint(run / "last.pt", last)
    check_base(adapter, base)
    ok = greedy("--checkpoint", tmp_path / "adapter.pt", capsys=capsys)

    changed = load_checkpoint(base)
    wo = "blocks.0.attn.wo.weight"
    changed["model"] = {**changed["model"], wo: changed["model"][wo] * 1.01}
    save_checkpoint(base, changed)
    with pytest.raises(CheckpointError, match=r"'.*base\.pt' is not the base this adapter was trained on \(sha256 "
                                              + ref["sha256"][:12]):
        check_base(adapter, base)
    for path, lora in ((tmp_path / "adapter.pt", None), (base, tmp_path / "adapter.pt")):
        with pytest.raises(CheckpointError, match="sha256"):
            load_model(path, lora=lora)
    with pytest.raises(SystemExit, match=r"^error: .*not the base this adapter was trained on \(sha256"):
        greedy("--checkpoint", tmp_path / "adapter.pt", capsys=capsys)
    with pytest.raises(SystemExit, match=r"^error: .*not the base this adapter was trained on \(sha256"):
        run_main(train_mod, [*CONFIG, "--resume", f"--training.out_dir={run}", "--training.max_iters=60"])
    assert load_checkpoint(run / "last.pt")["step"] == 40
    base.unlink()
    with pytest.raises(CheckpointError, match=r"the base of adapter '.*adapter\.pt' is not at .*base\.pt"):
        load_model(tmp_path / "adapter.pt")
    assert ok.startswith("to ")


def test_an_adapter_where_a_model_is_expected_and_vice_versa(runs, tmp_path, capsys, no_malloc_tuning):
    adapter, base = str(runs.adapter), str(runs.base)
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a model"):
        model_from_checkpoint(load_checkpoint(adapter))
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter; pass the base model as the checkpoint"):
        load_model(adapter, lora=adapter)
    with pytest.raises(CheckpointError, match=r"best\.pt' is not a LoRA adapter \(it holds a full model\)"):
        load_model(base, lora=base)
    with pytest.raises(SystemExit, match=r"^error: .*is not a LoRA adapter \(it holds a full model\)"):
        greedy("--checkpoint", base, "--lora", base, capsys=capsys)
    with pytest.raises(SystemExit, match=r"^error: .*is a LoRA adapter; pass the base model"):
        greedy("--checkpoint", adapter, "--lora", adapter, capsys=capsys)
    with pytest.raises(SystemExit, match=r"^error: .*best\.pt is a LoRA adapter; merge it first"):
        run_main(train_mod, [*CONFIG, "--data", runs.ft_text, f"--training.out_dir={tmp_path / 'x'}", *RUN,
                             "--init_from", adapter, "--lora.r=4"])
    # regression: merge-lora given a full model as --lora died with KeyError: 'lora'
    with pytest.raises(SystemExit, match=r"^error: .*best\.pt' is not a LoRA adapter \(it holds a full model\)"):
        utils.main(["merge-lora", "--lora", base, "--out", str(tmp_path / "m.pt")])
    with pytest.raises(SystemExit, match=r"^error: this is a LoRA adapter, not a model"):
        utils.main(["quantize", "--checkpoint", adapter, "--mode", "int8", "--out", str(tmp_path / "q.pt")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.pt").exists() and not (tmp_path / "q.pt").exists()


def test_fine_tune_text_outside_the_base_vocabulary_is_a_clear_error(runs, tmp_path, no_malloc_tuning):
    bad = tmp_path / "bad.txt"
    bad.write_text("TO BE: OR NOT! " * 100, encoding="utf-8")
    with pytest.raises(SystemExit, match=r"^error: the data does not fit the checkpoint's tokenizer: \d+ "
                                         r"character\(s\) not in the char vocabulary: '!', ':', 'B', "):
        run_main(train_mod, lora_argv(runs, tmp_path / "out", data=bad))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, match", [
    (["--lora.r=4"], r"LoRA and quantized training fine-tune a trained model: set training\.init_from"),
    (["--quantize", "int8"], r"LoRA and quantized training fine-tune a trained model: set training\.init_from"),
    (["--init_from", "BASE", "--quantize", "int8"], r"quantized weights cannot be trained; add LoRA adapters"),
    (["--init_from", "BASE", "--lora.r=4", "--training.out_dir=BASEDIR"],
     r"training\.init_from=.*best\.pt is inside training\.out_dir, where this run writes its checkpoints"),
    (["--init_from", "BASE", "--lora.r=4", "--lora.targets=q,vv"],
     r"lora\.targets: unknown target 'vv'; did you mean 'v'\? valid: q, k, v, o, mlp"),
    (["--init_from", "BASE", "--lora.r=4", "--lora.targets=mpl"],
     r"lora\.targets: unknown target 'mpl'; did you mean 'mlp'\?"),
    (["--init_from", "BASE", "--lora.r=-2"], r"lora\.r=-2 must be an integer >= 0"),
    (["--init_from", "BASE", "--lora.r=4", "--quantize", "int5"], r"quantize mode 'int5'; .*valid: int8, int4"),
    (["--init_from", "BASE", "--lora.r=4", "--quantize", "int4", "--group_size", "48"],
     r"quantize group_size=48; valid: 32, 64, 128, 256"),
    (["--init_from", "BASE", "--lora.r=4", "--quantize", "int4", "--group_size", "128"],
     r"int4 needs in_features \(64\) divisible by group_size \(128\)"),
    (["--init_from", "NOWHERE", "--lora.r=4"], r"checkpoint .*nowhere\.pt' does not exist"),
], ids=["lora-without-init_from", "quantize-without-init_from", "quantize-without-lora", "init_from-in-out_dir",
        "target-vv", "target-mpl", "negative-r", "mode-int5", "group-48", "group-128-too-wide", "missing-init_from"])
def test_train_guards_are_clear_errors(runs, tmp_path, extra, match, no_malloc_tuning):
    subs = {"BASE": str(runs.base), "NOWHERE": str(tmp_path / "nowhere.pt"),
            "--training.out_dir=BASEDIR": f"--training.out_dir={runs.base.parent}"}
    extra = [subs.get(a, a) for a in extra]
    with pytest.raises(SystemExit, match=r"^error: " + match):
        run_main(train_mod, [*CONFIG, "--data", runs.ft_text, f"--training.out_dir={tmp_path / 'out'}",
                             *ARCH, *RUN, "--training.max_iters=2", *extra])
    assert not (tmp_path / "out").exists()
    assert file_sha256(runs.base) == runs.base_sha


# --- quantized checkpoints ------------------------------------------------------------------------------

def linear_bytes(quantized: dict, base: dict) -> tuple[int, int, int]:
    """(fp32 bytes of the quantized layers' weights in base, their bytes in quantized, how many)."""
    prefixes = [k[:-len("scales")] for k in quantized if k.endswith(".scales")] + \
               [k[:-len("scales_and_zeros")] for k in quantized if k.endswith(".scales_and_zeros")]
    nbytes = lambda t: t.numel() * t.element_size()
    fp32 = sum(nbytes(base[p + "weight"]) for p in prefixes)
    q = sum(nbytes(quantized[k]) for p in prefixes for k in (p + "weight", p + "scales", p + "scales_and_zeros")
            if k in quantized)
    return fp32, q, len(prefixes)


@pytest.mark.parametrize("mode, group", [("int8", None), ("int4", 64)])
def test_quantize_cli_writes_a_smaller_checkpoint_that_generates(runs, tmp_path, capsys, mode, group):
    out = tmp_path / f"q-{mode}.pt"
    args = ["quantize", "--checkpoint", runs.base, "--mode", mode, "--out", out, "--eval"]
    printed = run_main(utils, args + (["--group_size", group] if group else []))
    q, base = load_checkpoint(out), load_checkpoint(runs.base)
    assert q["quantize"] == {"mode": mode, "group_size": group or 64} and "optimizer" not in q
    assert q["model_config"] == base["model_config"] and q["tokenizer"] == base["tokenizer"]
    fp32, qbytes, n = linear_bytes(q["model"], base["model"])
    assert n == 2 * 5 + 1                                  # every linear layer, the (tied) head too
    ratio = fp32 / qbytes
    if mode == "int8":       # 1 byte a weight and a float scale a row
        shapes = [base["model"][k].shape for k in q["model"] if q["model"][k].dtype == torch.int8]
        assert ratio == pytest.approx(sum(4 * o * i for o, i in shapes) / sum(o * i + 4 * o for o, i in shapes))
        assert 3.5 < ratio <= 4
    else:                    # half a byte a weight and a float (scale, zero) a group of 64
        assert ratio == pytest.approx(4 / (0.5 + 8 / 64)) and ratio > 5
    assert re.search(rf"\({ratio:.1f}x smaller\)", printed)
    # the file too: against the same model saved in float32
    fp32_file = tmp_path / "fp32.pt"
    save_checkpoint(fp32_file, {k: base[k] for k in ("model", "model_config", "tokenizer", "config")})
    assert out.stat().st_size < (0.4 if mode == "int8" else 0.3) * fp32_file.stat().st_size
    # --eval: the perplexity of every validation token, before and after
    m = re.search(rf"validation perplexity: fp32 ([\d.]+), {mode} ([\d.]+) \(([-+][\d.]+)%\)", printed)
    assert m, printed
    fp32_ppl, q_ppl = float(m[1]), float(m[2])
    assert fp32_ppl == pytest.approx(math.exp(loss_on(runs.base_model, runs.tok, runs.base_text)), rel=1e-4)
    model, tok = load_model(out)
    assert q_ppl == pytest.approx(math.exp(loss_on(model, tok, runs.base_text)), rel=1e-4)
    assert abs(q_ppl / fp32_ppl - 1) < (0.02 if mode == "int8" else 0.1), printed
    # generation from the quantized file, and quantizing on the fly, give the same text
    extra = ["--group_size", str(group)] if group else []
    stored = greedy("--checkpoint", out, capsys=capsys)
    assert stored.startswith("to ") and len(stored) == 3 + 30 + 1
    assert greedy("--checkpoint", runs.base, "--quantize", mode, *extra, capsys=capsys) == stored
    # regression: quantizing a quantized checkpoint again wrote int8 weights labelled as int4
    with pytest.raises(SystemExit, match=rf"^error: .*q-{mode}\.pt' is already quantized \({mode}\)"):
        utils.main(["quantize", "--checkpoint", str(out), "--mode", "int4", "--out", str(tmp_path / "qq.pt")])
    assert not (tmp_path / "qq.pt").exists()


def test_quantize_cli_default_output_name(runs, tmp_path):
    src = tmp_path / "best.pt"
    shutil.copy(runs.base, src)
    printed = run_main(utils, ["quantize", "--checkpoint", src, "--mode", "int4", "--group_size", "32"])
    assert printed.startswith(f"{tmp_path / 'best-int4.pt'}: ")
    assert load_checkpoint(tmp_path / "best-int4.pt")["quantize"] == {"mode": "int4", "group_size": 32}
    with pytest.raises(SystemExit, match=r"^error: unknown command .*did you mean 'quantize'"):
        utils.main(["quantise"])


def test_int8_greedy_text_starts_as_fp32(runs):
    model, tok = load_model(runs.base, quantize=QuantConfig("int8"))
    assert isinstance(model.blocks[0].attn.wqkv, Int8Linear)
    cfg = SampleConfig(max_new_tokens=8, temperature=0)
    assert generate_text(model, tok, "to ", cfg) == generate_text(runs.base_model, tok, "to ", cfg)


# --- QLoRA ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qlora(runs):
    out = {}
    with pytest.MonkeyPatch.context() as mp, single_thread():
        mp.setattr(train_mod, "tune_cpu_allocator", lambda: False)
        for mode, extra in (("int8", []), ("int4", ["--group_size", "32"])):
            run_main(train_mod, lora_argv(runs, runs.root / f"qlora-{mode}", "--quantize", mode, *extra))
            out[mode] = runs.root / f"qlora-{mode}" / "best.pt"
    return out


@pytest.mark.parametrize("mode, group", [("int8", 64), ("int4", 32)])
def test_qlora_trains_an_adapter_on_a_quantized_base(runs, qlora, mode, group, tmp_path, capsys):
    ckpt = load_checkpoint(qlora[mode])
    assert ckpt["quantize"] == {"mode": mode, "group_size": group}
    assert ckpt["model"].keys() == load_checkpoint(runs.adapter)["model"].keys()      # adapters only
    assert ckpt["lora"]["base"]["sha256"] == runs.base_sha
    rows = read_jsonl(qlora[mode].parent / "log.jsonl")
    train_rows = [r for r in rows if r["event"] == "train"]
    assert train_rows[-1]["train_loss"] < 0.8 * train_rows[0]["train_loss"]
    final = rows[-1]["final_val_loss"]
    assert final < 0.9 * runs.base_ft_loss, f"{mode} QLoRA: val loss {final:.4f}, base {runs.base_ft_loss:.4f}"
    # the adapter loads on its quantized base: with the fused kernels (generation) as in training
    fast, tok = load_model(qlora[mode])
    slow, _ = load_model(qlora[mode], kernels=False)
    wqkv = fast.blocks[0].attn.wqkv
    assert isinstance(wqkv, LoRALinear) and isinstance(wqkv.base, Int8Linear if mode == "int8" else Int4Linear)
    if mode == "int4" and hasattr(torch.ops.aten, INT4_OP):
        assert wqkv.base.layout == "cpu" and slow.blocks[0].attn.wqkv.base.layout == "portable"
    last, _ = load_model(qlora[mode].parent / "last.pt", kernels=False)
    assert loss_on(last, tok, runs.ft_text) == pytest.approx(final, rel=1e-5)
    ids = torch.tensor([tok.encode("to be, to see, to quote")])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), slow(ids), rtol=1e-4, atol=1e-4)
    text = greedy("--checkpoint", qlora[mode], capsys=capsys)
    assert text == generate_text(slow, tok, "to ", SampleConfig(max_new_tokens=30, temperature=0)) + "\n"
    # merged: a plain float checkpoint, the dequantized base plus the adapter
    run_main(utils, ["merge-lora", "--lora", qlora[mode], "--out", tmp_path / "merged.pt"])
    merged = load_checkpoint(tmp_path / "merged.pt")
    assert "quantize" not in merged and "lora" not in merged
    assert merged["model"].keys() == load_checkpoint(runs.base)["model"].keys()
    assert all(t.dtype == torch.float32 for t in merged["model"].values())
    m, _ = model_from_checkpoint(merged)
    assert m.lm_head.weight is m.tok_emb.weight
    with torch.no_grad():     # the same but the head, which is the float embedding again
        a, b = m(ids), slow(ids)
        assert float((a - b).norm() / b.norm()) < (0.02 if mode == "int8" else 0.2)


@needs_int8_kernel
def test_int8_auto_kernel_choice_follows_batch_size_and_the_device(monkeypatch):
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48))
    calls = []
    real = getattr(torch.ops.aten, INT8_OP)
    monkeypatch.setattr(torch.ops.aten, INT8_OP, lambda *a: calls.append(1) or real(*a))
    import model as model_module
    with torch.no_grad():
        monkeypatch.setattr(model_module, "int8_kernel_suits", lambda device_type: True)
        layer(torch.randn(1, 64))
        assert len(calls) == 1                       # decode-sized on a device it suits: the kernel
        layer(torch.randn(4, 8, 64))
        assert len(calls) == 1                       # 32 rows: dequantize-then-matmul
        monkeypatch.setattr(model_module, "int8_kernel_suits", lambda device_type: False)
        layer(torch.randn(1, 64))
        assert len(calls) == 1                       # a device it does not suit: never
