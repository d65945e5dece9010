"""fastpath.py's pieces, eagerly: the static KV cache and its mask, interleaved int8 layers, the
decompositions of the CPU backend, and the compiled step's checks. (Compiled decoding against
eager decoding, as a user runs it, is in test_generate.py.)"""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastpath
import generate
from fastpath import InterleavedInt8Linear, StaticKVCache, deinterleave4, interleave4
from model import Int8Linear, KVCache, QuantConfig, Transformer, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")
INT8_OP = "_weight_int8pack_mm"


def _tiny(**kw):
    torch.manual_seed(0)
    return Transformer(vocab_size=23, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, block_size=16,
                       init_std=0.3, **kw).eval()

# --- the static KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_static_cache_steps_equal_the_no_cache_forward(pos_encoding):
    """start_pos as a 0-d tensor: each layer reads a span of the cache, unwritten slots masked (what
    a compiled step computes); with and without left padding it equals the plain forward."""
    model = _tiny(pos_encoding=pos_encoding).double()
    idx, pad = generate.left_pad([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]])
    with torch.no_grad():
        for p in (None, pad):
            full = model(idx, pad=p)
            fastpath.setup_cache(model, 2, 12)            # longer than the sequence: slots stay unwritten
            steps = [model(idx[:, :3], start_pos=0, pad=p)]
            for t, span in zip(range(3, 8), (4, 12, 9, 64, 8)):
                for block in model.blocks:
                    block.attn.kv_cache.narrow(span)
                start, span = torch.tensor(t), model.blocks[0].attn.kv_cache.k_span.shape[2]
                pos, mask = fastpath.static_positions_and_mask(start, 1, p, span)
                steps.append(model.output(model.encode(idx[:, t:t + 1], pos, mask, start_pos=start)))
            got = torch.cat(steps, 1)
            assert isinstance(model.blocks[0].attn.kv_cache, StaticKVCache)
            keep = slice(None) if p is None else slice(5, None)          # row 1's real tokens
            assert torch.allclose(got[0], full[0], atol=1e-12, rtol=0)
            assert torch.allclose(got[1, keep], full[1, keep], atol=1e-12, rtol=0)
    model.clear_cache()


def test_static_cache_reorders_rows_in_place_and_takes_over_a_plain_cache():
    cache = StaticKVCache(3, 8, 2, 4)
    cache.k.normal_()
    cache.v.normal_()
    k, v, span = cache.k.clone(), cache.v.clone(), cache.k_span
    rows = torch.tensor([2, 0, 0])
    cache.select(rows)
    assert cache.k_span is span and torch.equal(cache.k, k[rows]) and torch.equal(cache.v, v[rows])
    cache.select(torch.tensor([1, 2]))                          # fewer rows: new tensors
    assert cache.k.shape[0] == 2 and torch.equal(cache.k, k[rows][[1, 2]])
    plain = KVCache(2, 8, 2, 4)
    plain.k.normal_()
    plain.v.normal_()
    static = StaticKVCache.like(plain)
    assert static.max_len == 8 and torch.equal(static.k[:, :, :8], plain.k) and torch.equal(static.v[:, :, :8], plain.v)


def test_a_decode_step_outside_the_cache_is_an_error_not_an_abort():
    """A kernel's own index check would abort the whole process: the step checks first."""
    model = _tiny()
    step = fastpath.decode_step(model)
    with pytest.raises(ValueError, match=r"needs a KV cache \(model.setup_cache\) with a slot for position 3$"):
        step(torch.tensor([[1]]), 3)
    fastpath.setup_cache(model, 1, 8)
    with pytest.raises(ValueError, match=r"slot for position 8; it holds 8"):
        step(torch.tensor([[1]]), 8)
    with pytest.raises(ValueError, match=r"slot for positions 6..9; it holds 8"):
        step(torch.tensor([[1, 2, 3, 4]]), 6)
    with pytest.raises(ValueError, match="one token per row, got 4"):
        fastpath.decode_step(model, greedy=True)(torch.tensor([[1, 2, 3, 4]]), 0)
    model.clear_cache()

# --- interleaved int8 ------------------------------------------------------------------------------


@settings(max_examples=40)
@given(st.lists(st.integers(1, 3), max_size=2), st.integers(1, 12))
def test_interleave4_orders_columns_by_quarters_and_is_undone(lead, quarter):
    k = 4 * quarter
    t = torch.arange(math.prod(lead) * k).view(*lead, k)
    got = interleave4(t)
    j, b = torch.arange(k) // 4, torch.arange(k) % 4
    assert torch.equal(got, t[..., b * quarter + j])                  # position 4j + b <- column b*K/4 + j
    assert torch.equal(deinterleave4(got), t)


def test_int8_interleaved_layer_computes_and_saves_as_the_plain_one():
    """Interleaving changes the in-memory order only: the same outputs on every eager path, the
    plain order in the state dict, and a plain state dict loads into an interleaved layer."""
    torch.manual_seed(0)
    plain = Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=True))
    inter = InterleavedInt8Linear.from_int8(copy.deepcopy(plain))
    assert not torch.equal(inter.weight, plain.weight) and torch.equal(inter.codes(), plain.weight)
    assert torch.equal(inter.dequantize(), plain.dequantize())
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        for use_kernel in ([True, False] if hasattr(torch.ops.aten, INT8_OP) else [False]):
            plain.use_kernel = inter.use_kernel = use_kernel
            torch.testing.assert_close(inter(x), plain(x), rtol=1e-5, atol=1e-6)
    sd = inter.state_dict()
    assert torch.equal(sd["weight"], plain.weight)
    fresh = InterleavedInt8Linear.from_int8(Int8Linear(64, 48, bias=True))
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh.weight, inter.weight)
    fresh.load_state_dict({"scales": plain.scales * 2}, strict=False)   # partial: the weight stays
    assert torch.equal(fresh.codes(), plain.weight)
    assert InterleavedInt8Linear.from_int8(Int8Linear.from_linear(torch.nn.Linear(30, 8))) is None  # no 32-bit words


def test_interleaving_a_model_keeps_its_outputs_and_its_state_dict():
    model = quantize_model(_tiny(), QuantConfig("int8"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before, state = model(ids), model.state_dict()
        assert fastpath.interleave_int8(model) == 11                     # 5 per block and the head
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert isinstance(model.lm_head, InterleavedInt8Linear)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_int8_one_row_product_unpacks_the_words_exactly():
    """The compiled decoding path (shifts unpack four signed codes per 32-bit word), run
    eagerly in float64 against x @ codes.T."""
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 48, bias=False))
    layer.weight[0, :4] = torch.tensor([-128, -1, 0, 127], dtype=torch.int8)   # the extremes, signs
    layer = InterleavedInt8Linear.from_int8(layer)
    x = torch.randn(1, 1, 64, dtype=torch.float64)
    got = layer._one_row(x)
    assert got.shape == (1, 1, 48)
    torch.testing.assert_close(got, x @ layer.codes().double().T, rtol=1e-12, atol=1e-12)

# --- the CPU backend's decompositions ----------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_one_query_attention_equals_the_flash_kernel(n_kv_heads, mask):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 8, generator=g)
    k, v = (torch.randn(2, n_kv_heads, 9, 8, generator=g) for _ in range(2))
    attn_mask = None
    if mask is not None:
        keep = torch.rand(2, 1, 1, 9, generator=g) > 0.4
        keep[..., 3] = True                                                 # never a row with nothing
        attn_mask = keep if mask == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    float_mask = None if attn_mask is None or mask == "additive" else \
        torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
    want = flash(q, k, v, attn_mask=float_mask if mask == "bool" else attn_mask, scale=0.3)
    got = fastpath._one_query_attention(q, k, v, attn_mask=attn_mask, scale=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fastpath._one_query_attention(torch.randn(2, 4, 2, 8), k, v) is NotImplemented   # two queries
    assert fastpath._one_query_attention(q, k, v, is_causal=True) is NotImplemented


def test_one_row_mm_is_the_matrix_product():
    a, b = torch.randn(1, 6, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(fastpath._one_row_mm(a, b), a @ b, rtol=1e-12, atol=1e-12)
    assert fastpath._one_row_mm(torch.randn(2, 6), b) is NotImplemented
