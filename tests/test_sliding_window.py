"""Sliding-window attention (Mistral style: each token sees the last W positions): parity with
Hugging Face's MistralForCausalLM in float64, a ring KV cache of W slots whose decoding equals
the uncached model past the window and past block_size, and every decoding mode on top of it."""
import pytest
import torch

from conftest import hf_in_float64
from generate import beam_search, generate_tokens, make_decoder, speculative_generate
from interop import from_hf_tensors
from model import RingKVCache, Transformer, TransformerConfig

W, V, BLOCK = 8, 97, 32


def windowed(block_size=BLOCK, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(**{**dict(vocab_size=V, d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, block_size=block_size,
                                 attention_window=W), **kw}).eval()


def long_reference(model, length=256):
    """The same weights with a longer block: its uncached forward is the truth past block_size
    (a windowed model's outputs do not depend on block_size)."""
    ref = Transformer(TransformerConfig.from_dict({**model.config.to_dict(), "block_size": length})).eval()
    ref.load_state_dict(model.state_dict())
    return ref


@pytest.fixture
def mistral_pair(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mistral import modeling_mistral as hf_mistral

    hf_in_float64(monkeypatch, hf_mistral.MistralRMSNorm, hf_mistral.MistralRotaryEmbedding, rotary_dim=16, length=128)
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=V, max_position_embeddings=128,
                                     sliding_window=W, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    hf = transformers.MistralForCausalLM(cfg).double().eval()
    ours = Transformer(vocab_size=V, d_model=64, d_ff=128, n_layers=2, n_heads=4, n_kv_heads=2, block_size=BLOCK,
                       tie_weights=False, attention_window=W).double().eval()
    ours.load_state_dict(from_hf_tensors(hf.state_dict(), ours.config, "llama", "test"))
    return hf, ours


def test_matches_hf_mistral_in_float64_uncached_and_decoding_past_block_size(mistral_pair):
    hf, ours = mistral_pair
    idx = torch.randint(0, V, (2, 100))
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx[:, :BLOCK]), ref[:, :BLOCK], atol=1e-10, rtol=0)
        ours.setup_cache(2)                                # W slots, however long the text
        got = [ours(idx[:, :5], start_pos=0)]
        got += [ours(idx[:, p:p + 1], start_pos=p) for p in range(5, 100)]
    assert ours.blocks[0].attn.kv_cache.k.shape[2] == W
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunks", [[40], [3, 1, 1, 9, 2, 24], [1] * 40, [12, 28]])
@pytest.mark.parametrize("slots", [W, W + 3])
def test_cached_equals_uncached_for_any_chunking(chunks, slots):
    model = windowed(block_size=64)
    idx = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        ref = model(idx)
        model.setup_cache(2, slots)
        got, pos = [], 0
        for n in chunks:
            got.append(model(idx[:, pos:pos + n], start_pos=pos))
            pos += n
    torch.testing.assert_close(torch.cat(got, 1), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_training_mask_is_the_band(n_layers):
    """Each layer reaches W - 1 positions further back: a token n_layers * (W - 1) back changes
    the output, one further back nothing."""
    model = windowed(n_layers=n_layers)
    a = torch.randint(0, V, (1, BLOCK))
    reach = n_layers * (W - 1)
    for back, changes in ((reach + 1, False), (reach, True)):
        b = a.clone()
        b[0, 20 - back] = (a[0, 20 - back] + 1) % V
        with torch.no_grad():
            diff = (model(a)[0, 20] - model(b)[0, 20]).abs().max().item()
        assert (diff > 1e-6) == changes, (back, diff)
    weights = model.get_attention_weights(a)[0][0, 0]          # (T, S): a band of W ones' worth
    assert (weights[20, :20 - W + 1] == 0).all() and (weights[20, 20 - W + 1:21] > 0).all()


def test_generation_runs_past_block_size_without_re_encoding():
    model = windowed()
    prompt = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        got = torch.cat(list(generate_tokens(model, prompt, 100, temperature=0.0)), dim=1)
        seq, ref = long_reference(model), prompt
        for _ in range(100):                                   # greedy, uncached, on the whole sequence
            ref = torch.cat([ref, seq(ref)[:, -1:].argmax(-1)], dim=1)
    assert got.shape == (2, 100) and torch.equal(got, ref[:, 5:])


def test_a_padded_batch_decodes_as_its_rows_alone():
    model = windowed()
    prompts = [torch.randint(0, V, (1, n)) for n in (3, 11)]
    from generate import left_pad
    ids, pad = left_pad([p[0].tolist() for p in prompts])
    with torch.no_grad(), make_decoder(model) as decoder:
        batch = [decoder.prefill(ids, pad)]
        for _ in range(50):
            batch.append(decoder.step(batch[-1].argmax(-1, keepdim=True))[:, -1])
    for row, prompt in enumerate(prompts):
        alone = list(generate_tokens(model, prompt, 50, temperature=0.0))
        assert torch.equal(torch.stack([b[row].argmax() for b in batch[:50]]), torch.cat(alone, 1)[0])


def test_speculative_and_beam_search_past_block_size():
    """Rejected speculations are rewound out of the ring; one beam is greedy decoding."""
    target, draft = windowed(seed=0), windowed(seed=1)
    prompt = torch.randint(0, V, (1, 4)).tolist()[0]
    with torch.no_grad():
        greedy = torch.cat(list(generate_tokens(target, torch.tensor([prompt]), 60, temperature=0.0)), 1)[0].tolist()
        fast, _ = speculative_generate(target, draft, prompt, 60, k=4, temperature=0.0)
        (beam, _), = beam_search(target, prompt, 60, beam_size=1)
    assert fast == greedy
    assert beam == greedy


def test_ring_cache_keeps_only_the_window():
    cache = RingKVCache(1, W, 1, 2, window=W)
    for p in range(20):
        cache.update(p, torch.full((1, 1, 1, 2), float(p)), torch.zeros(1, 1, 1, 2))
    assert sorted(cache.k[0, 0, :, 0].tolist()) == list(map(float, range(12, 20)))
    assert sorted(cache.key_positions(19, 1).tolist()) == list(range(12, 20))


@pytest.mark.parametrize("kw, message", [
    (dict(attention_window=0), "attention_window=0 must be a whole number of positions in 1..block_size=32"),
    (dict(attention_window=-4), "attention_window=-4 must be"),
    (dict(attention_window=64), "attention_window=64 must be a whole number of positions in 1..block_size=32"),
    (dict(attention_window=8, causal=False), "attention_window is a causal (Mistral-style) window; it needs causal=True"),
])
def test_bad_windows_are_refused(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TransformerConfig(block_size=32, **kw)
