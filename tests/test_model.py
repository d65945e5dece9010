"""Model correctness: parity with Hugging Face Llama, causality, KV cache, options, config errors."""
import pytest
import torch
import torch.nn.functional as F

from conftest import hf_in_float64
from model import PRESETS, Transformer, TransformerConfig, apply_rope, rope_tables


def tiny(**kw):
    base = dict(vocab_size=61, block_size=32, d_model=32, n_layers=2, n_heads=4)
    return Transformer(TransformerConfig(**{**base, **kw}))


# --- parity with a reference implementation ----------------------------------

def _llama_pair(n_kv_heads, dtype):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=n_kv_heads, max_position_embeddings=48,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    hf_cfg._attn_implementation = "sdpa"   # eager softmax rounds to float32
    hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    ours = Transformer(vocab_size=97, d_model=64, d_ff=176, n_layers=2, n_heads=8,
                       n_kv_heads=n_kv_heads, block_size=48, tie_weights=False,
                       norm="rmsnorm", activation="swiglu", pos_encoding="rope").to(dtype).eval()
    sd = hf.state_dict()
    new = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        p = f"model.layers.{i}."
        new[f"blocks.{i}.norm1.weight"] = sd[p + "input_layernorm.weight"]
        new[f"blocks.{i}.norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        new[f"blocks.{i}.attn.wqkv.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], dim=0)
        new[f"blocks.{i}.attn.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        new[f"blocks.{i}.mlp.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        new[f"blocks.{i}.mlp.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        new[f"blocks.{i}.mlp.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    ours.load_state_dict(new, strict=True)
    return hf, ours


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])
def test_matches_hf_llama_float32(n_kv_heads):
    hf, ours = _llama_pair(n_kv_heads, torch.float32)
    idx = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_matches_hf_llama_float64_tightly(monkeypatch):
    from transformers.models.llama import modeling_llama as hf_llama
    hf_in_float64(monkeypatch, hf_llama.LlamaRMSNorm, hf_llama.LlamaRotaryEmbedding, rotary_dim=8, length=48)
    hf, ours = _llama_pair(2, torch.float64)
    idx = torch.randint(0, 97, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-12, rtol=0)


# --- invariants ---------------------------------------------------------------

@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
def test_causal_future_tokens_do_not_change_past_logits(pos):
    torch.manual_seed(0)
    m = tiny(pos_encoding=pos).eval()
    a = torch.randint(0, 61, (2, 20))
    b = a.clone()
    b[:, 12:] = torch.randint(0, 61, (2, 8))
    with torch.no_grad():
        la, lb = m(a), m(b)
    torch.testing.assert_close(la[:, :12], lb[:, :12])
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_greedy_equals_no_cache_greedy(n_kv_heads):
    torch.manual_seed(0)
    m = tiny(n_kv_heads=n_kv_heads).eval()
    prompt = torch.randint(0, 61, (2, 5))
    with torch.no_grad():
        seq = prompt
        for _ in range(20):                     # reference: full recompute each step
            nxt = m(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        m.setup_cache(2)
        logits = m(prompt, start_pos=0)
        cached = prompt
        for _ in range(20):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = m(nxt, start_pos=cached.shape[1])
            cached = torch.cat([cached, nxt], 1)
    assert torch.equal(seq, cached)


def test_cached_chunks_match_full_forward_logits():
    torch.manual_seed(0)
    m = tiny(n_kv_heads=2, pos_encoding="rope").eval()
    x = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        full = m(x)
        m.setup_cache(2)
        parts = [m(x[:, :9], start_pos=0), m(x[:, 9:10], start_pos=9), m(x[:, 10:30], start_pos=10)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_use_cache_reuses_prefix_and_matches_full_forward():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        first = m(x[:, :8], use_cache=True)
        assert first.shape == (1, 8, 61)
        step = m(x, use_cache=True)             # only 4 new positions computed
        assert step.shape == (1, 4, 61)
        torch.testing.assert_close(step, m(x)[:, 8:], atol=1e-5, rtol=1e-5)
        other = m(torch.randint(0, 61, (1, 5)), use_cache=True)   # a new prompt resets
        assert other.shape == (1, 5, 61)


def test_seed_language_model_example_runs_as_written():
    # ../shared/seeds/000: incremental generation with use_cache=True on a growing sequence
    model = Transformer(vocab_size=50257, d_model=384, n_heads=6, n_layers=6, activation="swiglu")
    token_ids = torch.randint(0, 50_000, (2, 128))
    assert model(token_ids).shape == (2, 128, 50257)
    model.eval()
    with torch.no_grad():
        input_ids = torch.tensor([[464, 3290, 318]])
        ref = input_ids
        for _ in range(5):
            outputs = model(input_ids, use_cache=True)
            next_token = torch.argmax(outputs[:, -1, :], dim=-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=-1)
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], -1)
    assert torch.equal(input_ids, ref)


def test_overlong_input_is_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match="longer than block_size=32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(RuntimeError, match="setup_cache"):
        m(torch.zeros(1, 3, dtype=torch.long), start_pos=0)


def test_rope_rotates_only_the_rotary_fraction_and_preserves_norm():
    cos, sin = (t.float() for t in rope_tables(8, 16, 10000.0))
    x = torch.randn(1, 2, 16, 12)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])   # position 0 is the identity
    # relative: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(8), torch.randn(8)
    def dot(m, n):
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()
    torch.testing.assert_close(dot(5, 2), dot(9, 6))


# --- every option builds, trains and lowers the loss ---------------------------

OPTIONS = [
    dict(norm="layernorm"), dict(pre_norm=False), dict(pos_encoding="learned"),
    dict(pos_encoding="none"), dict(rotary_pct=0.5), dict(rope_theta=500.0),
    dict(activation="geglu"), dict(activation="gelu"), dict(activation="relu"),
    dict(activation="silu"), dict(n_kv_heads=1), dict(n_kv_heads=2), dict(bias=True),
    dict(dropout=0.1), dict(tie_weights=False),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_option_trains_and_lowers_loss(opts):
    torch.manual_seed(0)
    m = tiny(**opts)
    data = torch.arange(0, 33).repeat(4, 1) % 61          # a fixed, learnable batch
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_options_change_the_architecture():
    assert tiny(bias=True).blocks[0].attn.wqkv.bias is not None
    assert tiny().blocks[0].attn.wqkv.bias is None
    assert isinstance(tiny(norm="layernorm").norm_f, torch.nn.LayerNorm)
    m = tiny(tie_weights=False)
    assert m.lm_head.weight is not m.tok_emb.weight
    m = tiny(tie_weights=True)
    assert m.lm_head.weight is m.tok_emb.weight
    assert tiny(n_kv_heads=1).blocks[0].attn.wqkv.weight.shape[0] == (4 + 2) * 8
    assert tiny(pos_encoding="learned").pos_emb is not None
    assert tiny(activation="gelu").blocks[0].mlp.w3 is None
    assert tiny(activation="swiglu").blocks[0].mlp.w3 is not None


def test_depth_scaled_init():
    m = Transformer(vocab_size=50, d_model=128, n_heads=4, n_layers=8, block_size=16)
    std_wo = m.blocks[0].attn.wo.weight.std().item()
    std_q = m.blocks[0].attn.wqkv.weight.std().item()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_wo - 0.02 / 4) < 0.001


# --- config -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=100, n_heads=3), r"d_model=100 is not divisible by n_heads=3"),
    (dict(n_heads=8, n_kv_heads=3), r"n_heads=8 is not divisible by n_kv_heads=3"),
    (dict(norm="batchnorm"), r"norm='batchnorm'.*valid: rmsnorm, layernorm"),
    (dict(activation="swishglu"), r"did you mean 'swiglu'"),
    (dict(pos_encoding="alibi"), r"pos_encoding='alibi'"),
    (dict(dropout=1.5), r"dropout=1.5"),
    (dict(rotary_pct=0.0), r"rotary_pct=0.0"),
    (dict(vocab_size=0), r"vocab_size must be a positive integer"),
])
def test_config_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def test_unknown_key_names_the_closest():
    with pytest.raises(ValueError, match="unknown key 'n_layer'; did you mean 'n_layers'"):
        Transformer(vocab_size=10, n_layer=2)


def test_presets():
    for name in PRESETS:
        cfg = TransformerConfig.from_preset(name)
        assert cfg.d_model % cfg.n_heads == 0
    assert TransformerConfig.from_preset("tiny", vocab_size=65).vocab_size == 65
    m = Transformer(TransformerConfig.from_preset("gpt2-124M"))
    assert 123e6 < m.num_params() < 125e6 + 1e6   # GPT-2 small: 124M with tied head
    with pytest.raises(ValueError, match="unknown model preset 'smal'; did you mean 'small'"):
        TransformerConfig.from_preset("smal")


def test_default_d_ff():
    assert TransformerConfig(d_model=256, activation="gelu").d_ff == 1024
    assert TransformerConfig(d_model=256, activation="swiglu").d_ff == 704


# --- training knobs: dropout and gradient checkpointing --------------------------------------------

def _counting(forward, calls: list):
    """forward, appending to calls at each run (hooks do not fire when checkpointing recomputes)."""
    def wrapped(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    return wrapped


def test_set_dropout_reaches_every_dropout_and_leaves_the_config():
    model = Transformer(vocab_size=40, d_model=32, n_heads=4, n_layers=2, block_size=16, dropout=0.2)
    model.set_dropout(0.05)
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 1 + 2 and set(drops) == {0.05}                  # embeddings + one per block
    assert [b.attn.dropout for b in model.blocks] == [0.05, 0.05]         # attention weights (SDPA)
    assert model.config.dropout == 0.2
    model.set_dropout(0.0)                 # no dropout left: training mode computes what eval mode does
    x = torch.randint(0, 40, (2, 16))
    assert torch.equal(model.train()(x), model.eval()(x))
    with pytest.raises(ValueError, match=r"dropout=1\.0 must be in \[0, 1\)"):
        model.set_dropout(1.0)


@pytest.mark.parametrize("opts", [dict(dropout=0.0), dict(dropout=0.1, pos_encoding="learned")])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(opts):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)
        model = Transformer(vocab_size=40, d_model=32, n_heads=4, n_layers=3, block_size=16, **opts)
        model.set_gradient_checkpointing(checkpointing)
        calls = []
        for block in model.blocks:
            block.forward = _counting(block.forward, calls)
        x = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)                             # the same dropout masks, recomputed or not
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        return loss, {n: p.grad for n, p in model.named_parameters()}, len(calls)

    loss, grads, calls = loss_and_grads(False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(True)
    assert calls == 3 and calls_ckpt == 6                # each block ran again in backward
    assert torch.equal(loss, loss_ckpt)                  # the same kernels on the same inputs: bit for bit
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name


def test_gradient_checkpointing_is_off_outside_training():
    model = Transformer(vocab_size=40, d_model=32, n_heads=4, n_layers=2, block_size=16)
    model.set_gradient_checkpointing(True)
    x = torch.randint(0, 40, (1, 8))
    calls = []
    model.blocks[0].forward = _counting(model.blocks[0].forward, calls)
    with torch.no_grad():
        expected = model(x)
    model.eval()
    model(x).sum().backward()                           # eval mode: nothing is recomputed
    assert len(calls) == 2
    with torch.no_grad():
        model.setup_cache(batch_size=1)
        assert torch.allclose(model(x, start_pos=0), expected, atol=1e-6)   # the KV cache path works
