"""Parity with Hugging Face GPT-2: the gpt2-124M preset's layer choices (LayerNorm, learned
positions, exact GELU, biases, tied head, pre-norm) on a tiny random GPT2LMHeadModel, no download."""
import pytest
import torch

from model import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")
B, V, T_MAX = 2, 97, 32


def copy_gpt2_weights(hf, ours):
    """Copy every HF GPT-2 tensor into ours; Conv1D weights are (in, out), so they are transposed."""
    sd = hf.state_dict()
    conv = {"attn.wqkv": "attn.c_attn", "attn.wo": "attn.c_proj", "mlp.w1": "mlp.c_fc", "mlp.w2": "mlp.c_proj"}
    src = {"tok_emb.weight": sd["transformer.wte.weight"], "pos_emb.weight": sd["transformer.wpe.weight"],
           "norm_f.weight": sd["transformer.ln_f.weight"], "norm_f.bias": sd["transformer.ln_f.bias"]}
    for i in range(len(ours.blocks)):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ln, hf_ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            for t in ("weight", "bias"):
                src[p + f"{ln}.{t}"] = sd[h + f"{hf_ln}.{t}"]
        for ln, hf_ln in conv.items():   # c_attn's columns are q, k, v: the rows of our wqkv
            src[p + f"{ln}.weight"] = sd[h + f"{hf_ln}.weight"].t()
            src[p + f"{ln}.bias"] = sd[h + f"{hf_ln}.bias"]
    params = dict(ours.named_parameters())          # the tied lm_head.weight is tok_emb.weight
    assert src.keys() == params.keys() and len(src) == len(list(hf.parameters()))
    with torch.no_grad():
        for name, t in src.items():
            assert params[name].shape == t.shape, name
            params[name].copy_(t)
    assert ours.lm_head.weight is ours.tok_emb.weight


def gpt2_pair(dtype):
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=T_MAX, vocab_size=V, activation_function="gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():   # HF starts biases at 0 and LayerNorms at 1: perturb so every tensor matters
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = TransformerConfig.from_preset(
        "gpt2-124M", vocab_size=V, block_size=T_MAX, d_model=64, n_heads=4, n_layers=2, d_ff=256,
        norm="layernorm", pos_encoding="learned", activation="gelu", bias=True, tie_weights=True,
        dropout=0.0)
    assert cfg.pre_norm and cfg.norm_eps == hf_cfg.layer_norm_epsilon
    ours = Transformer(cfg).eval()
    copy_gpt2_weights(hf, ours)
    return hf.to(dtype), ours.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T", [16, T_MAX])
def test_logits_match_hf_gpt2(dtype, tol, T):
    hf, ours = gpt2_pair(dtype)
    idx = torch.randint(0, V, (B, T))
    with torch.no_grad():
        ref, got = hf(idx).logits, ours(idx)
    assert got.shape == ref.shape == (B, T, V)
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)


def test_kv_cache_decode_matches_hf_full_forward():
    """Prefill 10 tokens, then one token a step up to n_positions: each step's logits are
    HF's last-position logits on the whole prefix (float64, so 1e-10 checks the cache's math)."""
    hf, ours = gpt2_pair(torch.float64)
    idx = torch.randint(0, V, (B, T_MAX))
    with torch.no_grad():
        ours.setup_cache(batch_size=B)
        got = ours(idx[:, :10], start_pos=0)
        torch.testing.assert_close(got, hf(idx[:, :10]).logits, atol=1e-10, rtol=0)
        for pos in range(10, T_MAX):
            got = ours(idx[:, pos:pos + 1], start_pos=pos)[:, -1]
            ref = hf(idx[:, :pos + 1]).logits[:, -1]
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=0, msg=f"position {pos}")
