"""generate.py: filters, sampling, cached decoding with a sliding window, streaming text, the CLI."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import generate
from data import EOT, BPETokenizer, ByteTokenizer, CharTokenizer
from generate import (SampleConfig, TextStream, check_sampling, generate_text, generate_tokens,
                      sample_next, top_k_filter, top_p_filter)
from model import QuantConfig, Transformer, quantize_model
from config import load_config
from utils import load_checkpoint, model_from_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def kept(logits: torch.Tensor) -> set:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


# --- top-k and top-p ------------------------------------------------------------------

@given(st.lists(st.floats(-20, 20), min_size=1, max_size=30, unique=True), st.integers(1, 40))
def test_top_k_keeps_exactly_the_k_largest(values, k):
    logits = torch.tensor([values], dtype=torch.float64)
    out = top_k_filter(logits, k)
    expected = set(torch.topk(logits[0], min(k, len(values))).indices.tolist())
    assert kept(out[0]) == expected
    assert torch.equal(out[0, list(expected)], logits[0, list(expected)])     # kept values unchanged
    assert torch.all(out[0, [i for i in range(len(values)) if i not in expected]] == float("-inf"))


def test_top_k_keeps_ties_and_works_per_row():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    out = top_k_filter(logits, 1)
    assert kept(out[0]) == {1, 2} and kept(out[1]) == {0}
    assert kept(top_k_filter(logits, 3)[1]) == {0, 1, 2}
    assert kept(top_k_filter(logits, 100)[1]) == {0, 1, 2, 3}


@pytest.mark.parametrize("p, expected", [
    (0.3, {1}), (0.5, {1}), (0.51, {1, 3}), (0.8, {1, 3}), (0.81, {1, 3, 0}), (0.95, {1, 3, 0}),
    (0.951, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_exactly_the_nucleus(p, expected):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])        # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log()
    out = top_p_filter(logits, p)
    assert kept(out[0]) == expected
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    # the same distribution in another order, in a batch: each row on its own
    batch = torch.cat([logits, logits[:, [2, 0, 3, 1]]])
    out = top_p_filter(batch, p)
    assert kept(out[0]) == expected
    assert kept(out[1]) == {[2, 0, 3, 1].index(i) for i in expected}


@settings(max_examples=200)
@given(st.lists(st.floats(-8, 8), min_size=1, max_size=20), st.floats(0.01, 1.0))
def test_top_p_is_the_smallest_set_reaching_p(values, p):
    logits = torch.tensor([values], dtype=torch.float64)
    probs = torch.softmax(logits[0], -1)
    sorted_probs = probs.sort(descending=True).values
    cum = sorted_probs.cumsum(0)
    assume(bool(torch.all((cum - p).abs() > 1e-5)))       # the filter works in float32: stay off boundaries
    out = top_p_filter(logits, p)
    keep = kept(out[0])
    assert max(float(probs[i]) for i in keep) == float(probs.max())   # the top token is always kept
    m = len(keep)
    assert float(cum[m - 1]) >= p or m == len(values)       # the kept set reaches p ...
    assert m == 1 or float(cum[m - 2]) < p                 # ... and one fewer would not
    smallest_kept = min(float(probs[i]) for i in keep)
    assert all(float(probs[i]) <= smallest_kept + 1e-12 for i in range(len(values)) if i not in keep)


# --- sample_next ---------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next(logits, temperature=0, top_k=5, top_p=0.1), logits.argmax(-1, keepdim=True))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g), logits.argmax(-1, keepdim=True))
    assert torch.equal(sample_next(logits, temperature=5.0, top_p=1e-6, generator=g), logits.argmax(-1, keepdim=True))


def _frequencies(logits, n, **kw):
    g = torch.Generator().manual_seed(1234)
    draws = sample_next(logits.expand(n, -1), generator=g, **kw).flatten()
    assert draws.shape == (n,)
    return torch.bincount(draws, minlength=logits.shape[-1]).double()


def _chi2(counts, probs):
    expected = probs * counts.sum()
    nz = expected > 0
    assert counts[~nz].sum() == 0                          # nothing drawn outside the support
    return float(((counts[nz] - expected[nz]) ** 2 / expected[nz]).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    counts = _frequencies(logits, 4000, temperature=temperature)
    probs = torch.softmax(logits[0].double() / temperature, -1)
    assert _chi2(counts, probs) < 20.5                     # chi-square, 4 dof: p ~ 0.0004
    wrong = torch.softmax(logits[0].double() / (temperature * 2), -1)
    assert _chi2(counts, wrong) > 50                       # and the test can tell temperatures apart


def test_top_k_and_top_p_renormalise_the_kept_tokens():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5]])
    counts = _frequencies(logits, 3000, temperature=1.0, top_k=2)
    probs = torch.zeros(5, dtype=torch.float64)
    probs[[0, 3]] = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), -1)
    assert _chi2(counts, probs) < 15
    full = torch.softmax(logits[0].double(), -1)            # [0.207, 0.076, 0.028, 0.563, 0.126]
    for p, support in [(0.75, [1, 0, 0, 1, 0]), (0.8, [1, 0, 0, 1, 1])]:   # 0.563 + 0.207 = 0.770
        counts = _frequencies(logits, 3000, temperature=1.0, top_p=p)
        probs = torch.where(torch.tensor(support).bool(), full, 0.0)
        assert _chi2(counts, probs / probs.sum()) < 15


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), r"temperature=-1\.0 must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p=0\.0 must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p=1\.5 must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-1), r"top_k=-1 must be >= 0"),
])
def test_invalid_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_sampling(**kwargs)
    with pytest.raises(ValueError, match=match):
        SampleConfig(**kwargs)
    model = _tiny(1)
    with pytest.raises(ValueError, match=match):
        next(generate_tokens(model, torch.tensor([[1, 2]]), 3, **kwargs))
    assert model.blocks[0].attn.kv_cache is None


def test_sample_next_rejects_negative_temperature():
    logits = torch.tensor([[0.0, 10.0]])
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1.0, generator=torch.Generator().manual_seed(0))


# --- generate_tokens: the KV cache and the sliding window -------------------------------------

def _tiny(n_kv_heads, block_size=16, **kw):
    torch.manual_seed(0)
    # a larger init spreads the logits, so greedy choices are not decided by float rounding
    return Transformer(vocab_size=23, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                       block_size=block_size, init_std=0.3, **kw).eval()


def _greedy_reference(model, prompt, n):
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model(seq[:, -model.config.block_size:])[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("prompt_len, n_new", [(1, 10), (5, 40), (16, 5), (24, 12)])
def test_greedy_decoding_equals_the_no_cache_reference(n_kv_heads, prompt_len, n_new):
    model = _tiny(n_kv_heads)
    prompt = torch.randint(0, 23, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    toks = list(generate_tokens(model, prompt, n_new, temperature=0))
    assert len(toks) == n_new and all(t.shape == (2, 1) for t in toks)
    assert torch.equal(torch.cat(toks, 1), _greedy_reference(model, prompt, n_new))
    assert all(block.attn.kv_cache is None for block in model.blocks)          # cache cleared


@pytest.mark.parametrize("pos_encoding", ["learned", "none"])
def test_greedy_decoding_past_block_size_with_other_positions(pos_encoding):
    model = _tiny(2, pos_encoding=pos_encoding)
    prompt = torch.randint(0, 23, (1, 7), generator=torch.Generator().manual_seed(0))
    got = torch.cat(list(generate_tokens(model, prompt, 30, temperature=0)), 1)
    assert torch.equal(got, _greedy_reference(model, prompt, 30))


def test_sampling_with_a_seed_is_reproducible_and_cache_is_cleared_when_stopped_early():
    model = _tiny(2)
    prompt = torch.tensor([[1, 2, 3]])

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat(list(generate_tokens(model, prompt, 25, temperature=1.0, top_k=10, top_p=0.9,
                                              generator=g)), 1)
    assert torch.equal(run(7), run(7)) and not torch.equal(run(7), run(8))
    gen = generate_tokens(model, prompt, 25, temperature=0)
    next(gen)
    assert model.blocks[0].attn.kv_cache is not None
    gen.close()
    assert all(block.attn.kv_cache is None for block in model.blocks)
    assert list(generate_tokens(model, prompt, 0, temperature=0)) == []
    assert model.blocks[0].attn.kv_cache is None


# --- TextStream --------------------------------------------------------------------------

def test_text_stream_never_splits_a_character():
    text = "héllo ✨ 日本"
    tok = ByteTokenizer()
    stream, pieces = TextStream(tok), []
    data = text.encode("utf-8")
    for i, b in enumerate(data):
        piece = stream.push(b)
        assert "\ufffd" not in piece
        pieces.append(piece)
        # everything complete so far has been emitted, nothing more
        assert "".join(pieces) == data[:i + 1].decode("utf-8", errors="ignore")
    assert "".join(pieces) + stream.flush() == text
    assert stream.flush() == ""
    assert pieces[data.index("✨".encode()) + 2] == "✨"     # emitted with its last byte


@given(st.text())
def test_text_stream_reassembles_any_text(text):
    tok = ByteTokenizer()
    stream = TextStream(tok)
    pieces = [stream.push(b) for b in text.encode("utf-8")]
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
    assert "".join(pieces) + stream.flush() == text


def test_text_stream_flushes_an_incomplete_tail_and_char_tokens_pass_through():
    stream = TextStream(ByteTokenizer())
    assert stream.push(ord("a")) == "a"
    assert stream.push(0xE6) == ""                          # first byte of a 3-byte character
    assert stream.flush() == "\ufffd"                       # cut short: shown as a replacement
    tok = CharTokenizer.train("abc ✨")
    stream = TextStream(tok)
    assert [stream.push(i) for i in tok.encode("a ✨b")] == ["a", " ", "✨", "b"]


# --- generate_text ------------------------------------------------------------------------

def test_generate_text_prompt_errors():
    tok = CharTokenizer.train("abc ")
    model = Transformer(vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_layers=1, block_size=8)
    with pytest.raises(ValueError, match=r"the prompt cannot be encoded: 2 character\(s\) not in the char "
                                         r"vocabulary: 'x', 'z'"):
        generate_text(model, tok, "abzx", SampleConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate_text(model, tok, "", SampleConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="the prompt cannot be encoded: text cannot be UTF-8 encoded"):
        generate_text(model, ByteTokenizer(), "a\ud800", SampleConfig(max_new_tokens=2))


def test_generate_text_streams_exactly_the_continuation(trained_run):
    model, tok = model_from_checkpoint(load_checkpoint(trained_run.out_dir / "best.pt"))
    cfg = SampleConfig(max_new_tokens=30, temperature=0.8, top_k=5, top_p=0.9)
    out = io.StringIO()
    text = generate_text(model, tok, "the ", cfg, generator=torch.Generator().manual_seed(3), out=out)
    assert text == "the " + out.getvalue() and len(out.getvalue()) == 30
    again = generate_text(model, tok, "the ", cfg, generator=torch.Generator().manual_seed(3))
    assert again == text
    greedy = generate_text(model, tok, "the ", SampleConfig(max_new_tokens=30, temperature=0))
    ids = torch.tensor([tok.encode("the ")])
    ref = _greedy_reference(model, ids, 30)
    assert greedy == "the " + tok.decode(ref[0].tolist())


# --- interactive mode, through stdin ------------------------------------------------------------

def _interactive(ckpt, stdin):
    return subprocess.run([sys.executable, "generate.py", "--checkpoint", str(ckpt), "--interactive",
                           "--max_new_tokens", "10", "--seed", "1"], cwd=REPO, input=stdin,
                          capture_output=True, text=True, encoding="utf-8", timeout=120, env=SUBPROCESS_ENV)


def test_interactive_mode(trained_run):
    ckpt = trained_run.out_dir / "best.pt"
    proc = _interactive(ckpt, "the \n€uro\n\nquick\nquit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    header, *turns = proc.stdout.split(">>> ")
    assert header.startswith("Interactive generation (char tokenizer, 10 new tokens")
    # the prompts: 'the ', an unencodable one, an empty line (skipped), 'quick', then quit
    assert len(turns) == 5 and turns[-1] == ""
    first, error, _, second, _ = turns
    assert error.startswith("€uro\nerror: the prompt cannot be encoded") and "'€'" in error
    assert turns[2] == ""                                   # the empty line asked again
    # each answer is the prompt and 10 new characters; identical to generate_text with the same
    # seed and sampling settings (config.yaml's sample section), one generator for the session
    model, tok = model_from_checkpoint(load_checkpoint(ckpt))
    cfg = load_config(str(REPO / "config.yaml"), ["--max_new_tokens", "10"], sections=generate.SECTIONS,
                      aliases=generate.ALIASES)["sample"]
    g = torch.Generator().manual_seed(1)
    assert first == generate_text(model, tok, "the ", cfg, generator=g) + "\n"
    assert second == generate_text(model, tok, "quick", cfg, generator=g) + "\n"
    assert "never read" not in proc.stdout


def test_interactive_mode_ends_at_eof(trained_run):
    proc = _interactive(trained_run.out_dir / "best.pt", "")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert proc.stdout.startswith("Interactive generation") and proc.stdout.endswith(">>> \n")


# --- min_p and repetition penalty (issue: generation controls) ---------------------------------

def test_min_p_keeps_tokens_above_the_scaled_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]])
    logits = probs.log()
    kept = torch.isfinite(generate.min_p_filter(logits, 0.2))      # threshold 0.2 * 0.5 = 0.1
    assert kept.tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(generate.min_p_filter(logits, 0.0)).all()
    assert torch.isfinite(generate.min_p_filter(logits, 1.0)).sum() == 1     # only the top token


def test_repetition_penalty_is_the_ctrl_rule_and_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    context = torch.tensor([[0, 1, 1]])                   # tokens 0 and 1 were seen (1 twice: once)
    out = generate.penalize_repetition(logits, context, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]        # positive / 2, negative * 2, unseen unchanged
    before, after = torch.softmax(logits, -1), torch.softmax(out, -1)
    assert (after[0, :2] < before[0, :2]).all() and (after[0, 2:] > before[0, 2:]).all()
    assert torch.equal(generate.penalize_repetition(logits, context, 1.0), logits)


def test_repetition_penalty_changes_greedy_choice_only_through_context():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    assert generate.sample_next(logits, temperature=0).item() == 0
    assert generate.sample_next(logits, temperature=0, repetition_penalty=1.5,
                                context=torch.tensor([[0]])).item() == 1


@pytest.mark.parametrize("kwargs, match", [(dict(min_p=1.5), r"min_p=1.5"), (dict(min_p=-0.1), r"min_p=-0.1"),
                                           (dict(repetition_penalty=0.0), r"repetition_penalty=0.0")])
def test_invalid_min_p_and_penalty(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate.check_sampling(temperature=1.0, **kwargs)
    with pytest.raises(ValueError, match=match):
        generate.SampleConfig(**kwargs)


def test_penalty_reduces_repeats_in_generation():
    torch.manual_seed(0)
    m = Transformer(vocab_size=12, block_size=64, d_model=32, n_heads=4, n_layers=2).eval()
    prompt = torch.tensor([[1, 2, 3]])
    def distinct(penalty):
        toks = torch.cat(list(generate.generate_tokens(m, prompt, 40, temperature=0,
                                                       repetition_penalty=penalty)), 1)
        return len(set(toks[0].tolist()))
    assert distinct(100.0) > distinct(1.0) == 1     # an untrained model repeats one token greedily


# --- stop strings ---------------------------------------------------------------------------------

def _stream_pieces(text, stops):
    tok = CharTokenizer.train(text)
    stream = TextStream(tok, stops)
    pieces = []
    for i in tok.encode(text):
        pieces.append(stream.push(i))
        if stream.done:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_stop_string_ends_the_text_and_is_never_emitted():
    pieces, stream = _stream_pieces("hello STOP world", ["STOP"])
    assert "".join(pieces) == "hello " == stream.text() and stream.done
    assert not any("S" in p for p in pieces)


def test_a_possible_stop_prefix_is_held_back_then_released():
    tok = CharTokenizer.train("abc STx")
    stream = TextStream(tok, ["STOP"])
    out = [stream.push(i) for i in tok.encode("abc ST")]
    assert "".join(out) == "abc "                           # "ST" could still become "STOP"
    assert stream.push(tok.encode("x")[0]) == "STx" and not stream.done


def test_earliest_of_several_stop_strings_wins():
    pieces, stream = _stream_pieces("one two three", ["three", "two"])
    assert "".join(pieces) == "one " and stream.done


def test_generate_text_with_stop_equals_the_plain_output_cut_at_the_stop(trained_run):
    model, tok = model_from_checkpoint(load_checkpoint(trained_run.out_dir / "best.pt"))
    plain = generate_text(model, tok, "the ", SampleConfig(max_new_tokens=60, temperature=0))
    continuation = plain[len("the "):]
    stop = continuation[10:12]                               # something the model will produce
    cfg = SampleConfig(max_new_tokens=60, temperature=0, stop=[stop])
    expected = "the " + continuation[:continuation.find(stop)]
    assert generate_text(model, tok, "the ", cfg) == expected
    buf = io.StringIO()
    generate_text(model, tok, "the ", cfg, out=buf)
    assert "the " + buf.getvalue() == expected              # streaming prints exactly the same


def test_stop_strings_from_yaml_and_repeated_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text('sample:\n  stop: ["\\n\\n", "KING:"]\n')
    assert load_config(str(path), sections=generate.SECTIONS)["sample"].stop == ["\n\n", "KING:"]
    cfg = load_config(str(path), ["--stop", "A", "--stop=B"], sections=generate.SECTIONS, aliases=generate.ALIASES)
    assert cfg["sample"].stop == ["A", "B"]


# --- interactive commands and chat --------------------------------------------------------------

def _scripted(lines):
    it = iter(lines)
    def read(_prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_interactive_commands_change_validated_settings(trained_run, capsys):
    model, tok = model_from_checkpoint(load_checkpoint(trained_run.out_dir / "best.pt"))
    cfg = SampleConfig(max_new_tokens=12, temperature=1.0, seed=1)
    generate.interactive(model, tok, cfg, torch.Generator().manual_seed(1), read=_scripted(
        ["/temperature 0", "/top_k -1", "/tempreature 1", "/stop xyz", "/settings", "the "]))
    out = capsys.readouterr().out
    assert "temperature = 0.0" in out
    assert "error: top_k=-1 must be >= 0" in out
    assert "unknown command '/tempreature'; did you mean 'temperature'" in out
    assert "stop = ['xyz']" in out and "temperature=0.0" in out
    greedy = generate_text(model, tok, "the ", SampleConfig(max_new_tokens=12, temperature=0, stop=["xyz"]))
    assert out.rstrip("\n").endswith(greedy)


def test_chat_uses_the_conversation_as_context(trained_run, capsys):
    model, tok = model_from_checkpoint(load_checkpoint(trained_run.out_dir / "best.pt"))
    cfg = SampleConfig(max_new_tokens=10, temperature=0, chat=True)
    generate.interactive(model, tok, cfg, None, read=_scripted(["the ", "dog "]))
    out = capsys.readouterr().out
    first = generate_text(model, tok, "the ", cfg)
    second = generate_text(model, tok, first + "\n" + "dog ", cfg)[len(first) + 1:]
    assert out.splitlines()[1:3] == [first, second]       # after the header line, one line per turn
    alone = generate_text(model, tok, "dog ", cfg)
    assert second != alone or first == ""                  # the history changed the context


# --- beam search ----------------------------------------------------------------------------------

def test_beam_size_one_is_greedy_even_past_block_size():
    torch.manual_seed(0)
    m = Transformer(vocab_size=7, block_size=8, d_model=16, n_heads=2, n_layers=1).eval()
    greedy = torch.cat(list(generate_tokens(m, torch.tensor([[1, 2]]), 12, temperature=0)), 1)[0].tolist()
    [(ids, _)] = generate.beam_search(m, [1, 2], 12, beam_size=1)
    assert ids == greedy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_finds_the_best_sequence_on_an_enumerable_model(seed):
    import itertools
    torch.manual_seed(seed)
    m = Transformer(vocab_size=4, block_size=16, d_model=16, n_heads=2, n_layers=1, init_std=0.5).eval()
    prompt = [1, 2]

    def score(seq):
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([prompt + list(seq)])).float(), -1)[0]
        return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))

    ranked = sorted(itertools.product(range(4), repeat=3), key=score, reverse=True)
    beams = generate.beam_search(m, prompt, 3, beam_size=16, num_return_sequences=3, length_penalty=0.0)
    assert [tuple(ids) for ids, _ in beams] == ranked[:3]            # beam 16 = 4^2 is exact here
    assert [s for _, s in beams] == pytest.approx([score(r) for r in ranked[:3]], abs=1e-4)


def test_beam_search_options_are_checked():
    m = Transformer(vocab_size=4, block_size=8, d_model=16, n_heads=2, n_layers=1).eval()
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate.beam_search(m, [1], 2, beam_size=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="beam_size"):
        SampleConfig(beam_size=0)


# --- speculative decoding -------------------------------------------------------------------------

def _pair(seed=0):
    torch.manual_seed(seed)
    target = Transformer(vocab_size=4, block_size=32, d_model=32, n_heads=4, n_layers=2, init_std=0.3).eval()
    draft = Transformer(vocab_size=4, block_size=32, d_model=16, n_heads=2, n_layers=1, init_std=0.3).eval()
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy(k):
    target, draft = _pair(3)
    greedy = torch.cat(list(generate_tokens(target, torch.tensor([[1, 2]]), 20, temperature=0)), 1)[0].tolist()
    out, rate = generate.speculative_generate(target, draft, [1, 2], 20, k=k, temperature=0)
    assert out == greedy and 0 <= rate <= 1


def test_compiled_speculative_decoding_is_still_the_target_greedy_output():
    """compile=True: the draft's one-token steps and the target's checks of k + 1 tokens run compiled."""
    target, draft = _pair(3)                      # a greedy output that is not one token repeated
    greedy = torch.cat(list(generate_tokens(target, torch.tensor([[1, 2]]), 20, temperature=0)), 1)[0].tolist()
    out, rate = generate.speculative_generate(target, draft, [1, 2], 20, k=3, temperature=0, compile=True)
    assert out == greedy and 0 < rate < 1


@pytest.mark.parametrize("compile, top_k", [(False, None), (True, None), (False, 2)])
def test_sampled_speculative_follows_the_target_distribution(compile, top_k):
    # the joint law of the first two new tokens (16 cells) vs the target's exact probabilities,
    # after the same top-k filter as plain sampling
    target, draft = _pair(1)
    prompt = [1, 2]
    law = lambda ids: generate.next_distribution(target(torch.tensor([ids]))[:, -1], temperature=1.0,  # noqa: E731
                                                 top_k=top_k)[0]
    with torch.no_grad():
        exact = torch.stack([law(prompt)[a] * law(prompt + [a]) for a in range(4)]).flatten()
    g = torch.Generator().manual_seed(0)
    n = 1500 if top_k is None else 600                # top-2 of each step leaves 4 cells to fill
    counts = torch.zeros(16)
    for _ in range(n):
        (a, b), _ = generate.speculative_generate(target, draft, prompt, 2, k=3, temperature=1.0, top_k=top_k,
                                                  generator=g, compile=compile)
        counts[a * 4 + b] += 1
    seen = exact > 0
    assert counts[~seen].sum() == 0                 # what top-k removes is never drawn
    expected = n * exact[seen]
    chi2 = ((counts[seen] - expected) ** 2 / expected).sum().item()
    assert chi2 < {16: 37.7, 4: 16.3}[int(seen.sum())]   # chi-square, p = 0.001 (15 or 3 degrees of freedom)


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_speculative_equals_target_greedy_past_block_size(compile):
    """The same window policy as plain decoding: past block_size (32) every checked position is
    predicted from the 32 tokens that end there; a long prompt is cropped the same way."""
    target, draft = _pair(3)
    for prompt, n in (([1, 2], 70), ([3, 1, 0, 2] * 10, 9)):
        greedy = torch.cat(list(generate_tokens(target, torch.tensor([prompt]), n, temperature=0)), 1)[0].tolist()
        for k in (1, 4):
            out, _ = generate.speculative_generate(target, draft, prompt, n, k=k, temperature=0, compile=compile)
            assert out == greedy, (prompt, k)


def test_speculative_errors():
    target, draft = _pair()
    with pytest.raises(ValueError, match="speculative_k=0 must be >= 1"):
        generate.speculative_generate(target, draft, [1] * 20, 10, k=0)
    other = Transformer(vocab_size=5, block_size=32, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="different vocabularies"):
        generate.speculative_generate(target, other, [1], 3)


def test_cli_speculative_reports_acceptance_and_checks_the_tokenizer(trained_run, capsys, tmp_path):
    ckpt = str(trained_run.out_dir / "best.pt")
    generate.main(["--checkpoint", ckpt, "--draft_checkpoint", ckpt, "--prompt", "the ",
                   "--max_new_tokens", "8", "--temperature", "0", "--speculative_k", "3"])
    captured = capsys.readouterr()
    model, tok = model_from_checkpoint(load_checkpoint(ckpt))
    assert captured.out.strip() == generate_text(model, tok, "the ", SampleConfig(max_new_tokens=8, temperature=0)).strip()
    assert "acceptance 100%" in captured.err and "speed-up" in captured.err   # a model drafting for itself
    other = load_checkpoint(ckpt)
    other["tokenizer"] = ByteTokenizer().state()
    from utils import save_checkpoint
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(SystemExit, match="another tokenizer"):
        generate.main(["--checkpoint", ckpt, "--draft_checkpoint", str(tmp_path / "other.pt"), "--prompt", "the "])



# --- end of text ------------------------------------------------------------------------------------

class EotBytes(ByteTokenizer):
    """Bytes, with one byte value playing the end-of-text token: choosing it among the tokens a
    model emits greedily forces that model to end its text there."""

    def __init__(self, eot_id):
        self.eot_id = eot_id


def _greedy_with_a_fresh_token(model, prompt, n=16):
    """A model's greedy continuation and an index k whose token appears there for the first time."""
    greedy = torch.cat(list(generate_tokens(model, torch.tensor([prompt]), n, temperature=0)), 1)[0].tolist()
    k = next(i for i in range(2, n) if greedy[i] not in greedy[:i])
    return greedy, k


def _byte_model():
    torch.manual_seed(0)
    return Transformer(vocab_size=256, d_model=32, n_layers=1, n_heads=4, block_size=32, init_std=0.3).eval()


def test_generation_stops_at_the_end_of_text_token_and_does_not_print_it():
    model = _byte_model()
    greedy, k = _greedy_with_a_fresh_token(model, list(b"ab"))
    tok = EotBytes(greedy[k])
    cfg = SampleConfig(max_new_tokens=16, temperature=0)
    out = io.StringIO()
    assert generate_text(model, tok, "ab", cfg, out=out) == "ab" + tok.decode(greedy[:k])
    assert out.getvalue() == tok.decode(greedy[:k])
    ignored = generate_text(model, tok, "ab", SampleConfig(max_new_tokens=16, temperature=0, eos="ignore"))
    assert ignored == "ab" + tok.decode(greedy)
    assert generate_text(model, ByteTokenizer(), "ab", cfg) == ignored        # no end-of-text token: no stop


def test_a_bpe_end_of_text_ends_streaming_and_is_shown_with_eos_ignore(monkeypatch):
    tok = BPETokenizer.train("the quick brown fox jumps over the lazy dog. " * 20, vocab_size=300)
    script = tok.encode("the quick") + [tok.eot_id] + tok.encode(" fox")
    monkeypatch.setattr(generate, "sample_next", lambda logits, **kw: torch.tensor([[script.pop(0)]]))
    torch.manual_seed(0)
    model = Transformer(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, block_size=32).eval()
    out = io.StringIO()
    assert generate_text(model, tok, "A", SampleConfig(max_new_tokens=10), out=out) == "Athe quick"
    assert out.getvalue() == "the quick"
    script[:] = tok.encode("the quick") + [tok.eot_id] + tok.encode(" fox")
    assert generate_text(model, tok, "A", SampleConfig(max_new_tokens=len(script), eos="ignore")) == \
        f"Athe quick{EOT} fox"


def test_a_prompt_may_start_a_document_with_the_end_of_text_token():
    tok = BPETokenizer.train("the quick brown fox " * 20, vocab_size=280)
    assert generate.encode_prompt(tok, EOT + "the") == [tok.eot_id] + tok.encode("the")


def test_beam_search_finishes_a_beam_at_the_end_of_text():
    model = _byte_model()
    greedy, k = _greedy_with_a_fresh_token(model, [1, 2])
    [(ids, score)] = generate.beam_search(model, [1, 2], 16, beam_size=1, eos_id=greedy[k])
    assert ids == greedy[:k]                                             # beam 1 = greedy, cut at the eos

    def logp(seq):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([[1, 2] + seq])).float(), -1)[0]
        return sum(lp[1 + i, t].item() for i, t in enumerate(seq))
    assert score == pytest.approx(logp(greedy[:k + 1]) / k, abs=1e-4)    # the eos counts, its length does not
    beams = generate.beam_search(model, [1, 2], 8, beam_size=4, num_return_sequences=4, length_penalty=0.5,
                                 eos_id=greedy[k])
    for ids, score in beams:                                             # finished beams keep their score
        assert greedy[k] not in ids
        full = ids + [greedy[k]] if len(ids) < 8 else ids
        assert score == pytest.approx(logp(full) / max(len(ids), 1) ** 0.5, abs=1e-4)
    assert [s for _, s in beams] == sorted((s for _, s in beams), reverse=True)


def test_speculative_decoding_stops_at_the_end_of_text():
    target, draft = _pair(5)                      # a greedy output with a token that comes late
    greedy, k = _greedy_with_a_fresh_token(target, [1, 2], n=20)
    out, _ = generate.speculative_generate(target, draft, [1, 2], 20, k=3, temperature=0, eos_id=greedy[k])
    assert out == greedy[:k]


def test_eos_option_is_validated_and_interactive():
    with pytest.raises(ValueError, match=r"eos='stpo'; did you mean 'stop'\? valid: stop, ignore"):
        SampleConfig(eos="stpo")
    assert generate.apply_command(SampleConfig(), "/eos ignore").eos == "ignore"
    with pytest.raises(ValueError, match="eos='never'"):
        generate.apply_command(SampleConfig(), "/eos never")
    cfg = load_config(None, ["--sample.eos=ignore"], sections=generate.SECTIONS, aliases=generate.ALIASES)
    assert cfg["sample"].eos == "ignore" and SampleConfig().eos == "stop"


# --- batched generation: left padding (--prompt_file) ---------------------------------------------

@pytest.mark.parametrize("pos_encoding", ["rope", "learned", "none"])
@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_a_left_padded_row_computes_what_it_computes_alone(pos_encoding, n_kv_heads):
    torch.manual_seed(0)
    model = Transformer(vocab_size=23, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, block_size=16,
                        pos_encoding=pos_encoding, rotary_pct=0.5).eval().double()
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
    idx, pad = generate.left_pad(prompts)
    assert idx.shape == (3, 7) and pad.tolist() == [0, 6, 3]
    with torch.no_grad():
        full = model(idx, pad=pad)                                        # no cache
        model.setup_cache(3)                                              # cache: a chunk, then steps
        cached = torch.cat([model(idx[:, :4], start_pos=0, pad=pad)]
                           + [model(idx[:, t:t + 1], start_pos=t, pad=pad) for t in range(4, 7)], 1)
        model.clear_cache()
        for row, ids in enumerate(prompts):
            alone = model(torch.tensor([ids]))[0]
            for out in (full, cached):
                assert torch.allclose(out[row, pad[row]:], alone, atol=1e-12, rtol=0), (row, out is cached)
    assert torch.isfinite(full).all()                                     # padding slots too (never NaN)


@pytest.mark.parametrize("pos_encoding", ["rope", "learned"])
def test_batched_greedy_equals_one_by_one_greedy(pos_encoding):
    # lengths 1..24 with block_size 16: short rows, a full window, a cropped prompt, and 30 new
    # tokens so every row's window slides; a repetition penalty makes the context matter
    model = _tiny(2, pos_encoding=pos_encoding)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 23, (n,), generator=g).tolist() for n in (1, 5, 16, 24, 9)]
    idx, pad = generate.left_pad(prompts)
    kw = dict(temperature=0, repetition_penalty=1.3)
    batched = torch.cat(list(generate_tokens(model, idx, 30, pad=pad, **kw)), 1)
    for row, ids in enumerate(prompts):
        alone = torch.cat(list(generate_tokens(model, torch.tensor([ids]), 30, **kw)), 1)
        assert torch.equal(batched[row], alone[0]), row


def test_left_pad_errors():
    for bad in ([], [[1], []]):
        with pytest.raises(ValueError, match="left_pad needs one or more non-empty token lists"):
            generate.left_pad(bad)


def test_generate_batch_ends_each_row_at_its_own_stop(trained_run):
    model, tok = model_from_checkpoint(load_checkpoint(trained_run.out_dir / "best.pt"))
    prompts = ["the ", "a quick brown ", "t", "over the lazy dog. the "]
    plain = SampleConfig(max_new_tokens=40, temperature=0)
    alone = [generate_text(model, tok, p, plain) for p in prompts]
    assert generate.generate_batch(model, tok, prompts, plain) == alone
    stop = alone[0][len(prompts[0]):][8:10]                  # the first row stops early; others may not
    cfg = SampleConfig(max_new_tokens=40, temperature=0, stop=[stop])
    expected = [generate_text(model, tok, p, cfg) for p in prompts]
    assert expected[0] == alone[0][:len(prompts[0]) + alone[0][len(prompts[0]):].find(stop)]
    assert generate.generate_batch(model, tok, prompts, cfg) == expected


def test_prompt_file_on_the_command_line(trained_run, tmp_path, capsys):
    ckpt = str(trained_run.out_dir / "best.pt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the \n\na quick brown \nt\n", encoding="utf-8")       # the blank line is skipped
    base = ["--config", str(REPO / "config.yaml"), "--checkpoint", ckpt, "--max_new_tokens", "12",
            "--temperature", "0"]
    generate.main([*base, "--prompt_file", str(prompts), "--batch_size", "2"])
    printed = capsys.readouterr().out[:-1].split("\n\n" + "-" * 40 + "\n")      # as --num_samples prints
    model, tok = model_from_checkpoint(load_checkpoint(ckpt))
    cfg = SampleConfig(max_new_tokens=12, temperature=0)
    assert printed == [generate_text(model, tok, p, cfg) for p in ("the ", "a quick brown ", "t")]

    prompts.write_text("the \nno €uro here\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"prompts\.txt, prompt 2: the prompt cannot be encoded: .*'€'"):
        generate.main([*base, "--prompt_file", str(prompts)])
    prompts.write_text("\n\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"prompts\.txt has no prompts \(one per line\)"):
        generate.main([*base, "--prompt_file", str(prompts)])
    prompts.write_bytes(b"caf\xe9\n")
    with pytest.raises(SystemExit, match=r"prompts\.txt is not UTF-8 text"):
        generate.main([*base, "--prompt_file", str(prompts)])
    with pytest.raises(SystemExit, match=r"prompt_file decodes a batch; it does not combine with stream, "
                                         r"beam_size > 1"):
        generate.main([*base, "--prompt_file", str(prompts), "--stream", "--beam_size", "2"])
    with pytest.raises(SystemExit, match=r"batch_size=0 must be >= 1"):
        generate.main([*base, "--prompt_file", str(prompts), "--batch_size", "0"])
    for extra, message in ((["--beam_size", "2", "--stream"], "beam_size > 1 does not combine with stream"),
                           (["--beam_size", "2", "--num_samples", "2", "--stop", "x"],
                            "beam_size > 1 does not combine with num_samples > 1, stop"),
                           (["--draft_checkpoint", str(ckpt), "--interactive"],
                            "draft_checkpoint does not combine with interactive"),
                           (["--beam_size", "2", "--top_k", "3"],
                            r"beam_size > 1 does not combine with temperature \(beam search is deterministic\), "
                            r"top_k \(beam search is deterministic\)$"),
                           (["--draft_checkpoint", str(ckpt), "--repetition_penalty", "1.3"],
                            "draft_checkpoint does not combine with repetition_penalty"),
                           (["--model.n_layers=3", "--lora.r=2"], "generate.py reads the model from its checkpoint; "
                                                                   "it does not use --model.n_layers, --lora.r$"),
                           (["--eos", "ignore"], "eos=ignore: the char tokenizer has no end-of-text token to ignore"),
                           (["--prompt", "x", "--prompt_file", str(prompts), "--num_samples", "2", "--interactive"],
                            r"--prompt \(--prompt_file and --interactive read their own\), --num_samples"),
                           (["--length_penalty", "0.5", "--speculative_k", "2", "--chat", "--batch_size", "4"],
                            r"options for a mode this command does not run: --length_penalty \(needs --beam_size > 1\), "
                            r"--speculative_k \(needs --draft_checkpoint\), --chat \(needs --interactive\), "
                            r"--batch_size \(needs --prompt_file\)$")):
        with pytest.raises(SystemExit, match=message):         # a mode never ignores an option silently
            generate.main([*base, *extra])


# --- the decoder, and compiled decoding ----------------------------------------------------------------

def test_a_decoder_steps_chunks_rewinds_and_slides_as_the_uncached_model():
    """prefill, then steps of one token and of chunks, a rewind, and past block_size: each logit
    is the uncached model's on the sequence so far, cropped to the last block_size tokens."""
    model = _tiny(2).double()
    seq = torch.randint(0, 23, (2, 40), generator=torch.Generator().manual_seed(3))

    def uncached(n, T):                # logits after each of the tokens n - T .. n - 1
        with torch.no_grad():
            return torch.stack([model(seq[:, max(0, t + 1 - 16):t + 1])[:, -1] for t in range(n - T, n)], 1)

    def close(a, b):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=1e-5)
    with generate.make_decoder(model, cache_len=12) as decoder:
        assert decoder.max_len == 16
        close(decoder.prefill(seq[:, :5]), uncached(5, 1)[:, 0])
        close(decoder.step(seq[:, 5:6]), uncached(6, 1))
        close(decoder.step(seq[:, 6:10]), uncached(10, 4))
        decoder.rewind(7)                                             # 7..9 rejected, then fed again
        close(decoder.step(seq[:, 7:14]), uncached(14, 7))           # outgrows the 12 slots
        for n in range(15, 22):                                       # the window slides at 17
            close(decoder.step(seq[:, n - 1:n]), uncached(n, 1))
        assert torch.equal(decoder.greedy(seq[:, 21:22]), uncached(22, 1)[:, -1].argmax(-1, keepdim=True))
        close(decoder.step(seq[:, 22:27]), uncached(27, 5))           # a chunk past the window
        decoder.rewind(24)
        close(decoder.step(seq[:, 24:30]), uncached(30, 6))
    assert model.blocks[0].attn.kv_cache is None                      # closed: the cache is freed


def test_a_padded_batch_steps_chunks_past_the_window_as_each_row_alone():
    model = _tiny(2).double()
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(0, 23, (n,), generator=g).tolist() for n in (14, 5)]
    more = torch.randint(0, 23, (2, 9), generator=g)
    ids, pad = generate.left_pad(rows)
    with generate.make_decoder(model) as decoder:
        decoder.prefill(ids, pad)
        got = decoder.step(more)                                      # row 0 passes 16 tokens at 17
    for b, row in enumerate(rows):
        full = torch.tensor(row + more[b].tolist())
        with torch.no_grad():
            alone = torch.stack([model(full[max(0, t + 1 - 16):t + 1][None])[0, -1]
                                 for t in range(len(row), len(full))])
        torch.testing.assert_close(got[b], alone.float(), rtol=0, atol=1e-5)


def _compiled_and_eager(model, prompt, n, **kw):
    """generate_tokens' output without and with compile=True (a fresh seeded generator each)."""
    return [torch.cat(list(generate_tokens(model, prompt, n, compile=c, generator=torch.Generator().manual_seed(1),
                                           **kw)), 1) for c in (False, True)]


def test_compiled_decoding_gives_the_tokens_of_eager_decoding(capsys):
    """The real CPU path: greedy over several spans of the cache and past block_size, sampling with
    a seed, a repetition penalty, and a left-padded batch give the tokens eager decoding gives."""
    model = _tiny(2, block_size=160)
    prompt = torch.randint(0, 23, (1, 5), generator=torch.Generator().manual_seed(0))
    for n, kw in ((170, dict(temperature=0)), (40, dict(temperature=0.8, top_k=10)),
                  (40, dict(temperature=0, repetition_penalty=1.3))):
        eager, compiled = _compiled_and_eager(model, prompt, n, **kw)
        assert torch.equal(compiled, eager), kw
    assert "torch.compile failed" not in capsys.readouterr().err          # it compiled here
    idx, pad = generate.left_pad([[1, 2, 3, 4], [5, 6]])
    assert torch.equal(*_compiled_and_eager(model, idx, 10, temperature=0, pad=pad))


def test_compiled_beam_search_equals_eager():
    model = _tiny(2, block_size=64)
    eager = generate.beam_search(model, [1, 5, 7], 40, beam_size=3, num_return_sequences=3)
    compiled = generate.beam_search(model, [1, 5, 7], 40, beam_size=3, num_return_sequences=3, compile=True)
    assert [ids for ids, _ in compiled] == [ids for ids, _ in eager]
    torch.testing.assert_close([s for _, s in compiled], [s for _, s in eager], rtol=1e-5, atol=1e-6)


def test_compiled_int8_decoding_equals_eager_int8_decoding(capsys):
    """An int8 model through the real compiled path (its layers interleaved for it), whose
    state dict is still the one it was quantized to."""
    model = quantize_model(_tiny(2), QuantConfig("int8"))
    state = model.state_dict()
    prompt = torch.randint(0, 23, (1, 5), generator=torch.Generator().manual_seed(1))
    eager, compiled = _compiled_and_eager(model, prompt, 12, temperature=0)
    assert "torch.compile failed" not in capsys.readouterr().err
    assert torch.equal(compiled, eager)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_compiled_steps_keep_neither_a_finished_generation_nor_the_model():
    """Once a generation ends, its KV cache is freed (the compiled steps let go of it), and a model
    that is dropped is freed with its compiled steps (a notebook building many models)."""
    import gc
    import weakref
    model = _tiny(2, block_size=160)
    for kw in (dict(temperature=0), dict(temperature=0.7, top_k=5)):       # greedy and logits steps
        steps = generate_tokens(model, torch.tensor([[1, 2, 3]]), 6, compile=True, **kw)
        next(steps), next(steps), next(steps)
        cache = weakref.ref(model.blocks[0].attn.kv_cache.k)
        list(steps)
        gc.collect()
        assert cache() is None
    ref = weakref.ref(model)
    del model, steps
    gc.collect()
    assert ref() is None


def test_compiled_decoding_uses_weights_replaced_between_generations():
    model = _tiny(2, block_size=160, tie_weights=False)
    prompt = torch.tensor([[1, 2, 3]])
    first = _compiled_and_eager(model, prompt, 10, temperature=0)
    assert torch.equal(*first)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.flip(0))   # another head
    second = _compiled_and_eager(model, prompt, 10, temperature=0)
    assert torch.equal(*second) and not torch.equal(first[0], second[0])


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, capsys):
    model = _tiny(2)

    def compile_that_fails_when_called(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler here")
        return call
    monkeypatch.setattr(torch, "compile", compile_that_fails_when_called)
    eager, compiled = _compiled_and_eager(model, torch.tensor([[1, 2, 3]]), 6, temperature=0)
    assert torch.equal(compiled, eager)
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed (RuntimeError: no C++ compiler here); decoding without it") == 1


def test_without_fastpath_compile_decodes_eagerly_after_one_note(trained_run, tmp_path):
    """fastpath.py deleted: generate.py --compile prints one note and the eager tokens."""
    for path in REPO.glob("*.py"):
        if path.name != "fastpath.py":
            (tmp_path / path.name).write_bytes(path.read_bytes())
    ckpt = str(trained_run.out_dir / "best.pt")
    args = ["--config", str(REPO / "config.yaml"), "--checkpoint", ckpt, "--prompt", "the ",
            "--max_new_tokens", "12", "--temperature", "0", "--num_samples", "2", "--compile"]
    out = subprocess.run([sys.executable, "generate.py", *args], cwd=tmp_path, capture_output=True, text=True,
                         env=SUBPROCESS_ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "note: fastpath.py not found; decoding eagerly"
    model, tok = model_from_checkpoint(load_checkpoint(ckpt))
    text = generate_text(model, tok, "the ", SampleConfig(max_new_tokens=12, temperature=0))
    assert out.stdout == text + "\n" + "\n" + "-" * 40 + "\n" + text + "\n"


# --- dtype -------------------------------------------------------------------------------------------

def test_dtype_for_generation(trained_run, capsys):
    ckpt = str(trained_run.out_dir / "best.pt")
    base = ["--config", str(REPO / "config.yaml"), "--checkpoint", ckpt, "--max_new_tokens", "20",
            "--temperature", "0", "--prompt", "the "]
    generate.main(base)
    fp32 = capsys.readouterr().out
    generate.main([*base, "--dtype", "bf16"])
    bf16 = capsys.readouterr().out
    assert bf16.startswith("the ") and len(bf16) == len(fp32)       # 20 characters, bf16 weights
    model, tok = model_from_checkpoint(load_checkpoint(ckpt))
    half = generate.set_dtype(model, "bf16", "cpu")
    assert half.tok_emb.weight.dtype == torch.bfloat16
    prompt = torch.tensor([tok.encode("the ")])
    first = next(generate_tokens(half, prompt, 1, temperature=0))        # sampled from float logits
    with torch.no_grad():
        assert first.item() == half(prompt)[0, -1].float().argmax().item()
    with pytest.raises(SystemExit, match=r"dtype=fp16 needs a GPU; on a CPU use bf16"):
        generate.main([*base, "--dtype", "fp16", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"dtype='bf61'; did you mean 'bf16'\?"):
        generate.main([*base, "--dtype", "bf61"])


# --- --save_attention ---------------------------------------------------------------------------

def test_save_attention_draws_the_last_layer_over_the_generated_text(trained_run, tmp_path):
    png = tmp_path / "attn.png"
    proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(trained_run.out_dir / "best.pt"),
                           "--prompt", "the ", "--max_new_tokens", "12", "--temperature", "0",
                           "--save_attention", str(png)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("the ") and f"attention: {png}" in proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_attention_with_another_mode_is_a_clear_error(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, "generate.py", "--checkpoint", str(trained_run.out_dir / "best.pt"),
                           "--beam_size", "2", "--save_attention", str(tmp_path / "a.png")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: save_attention draws one text; it does not combine with beam_size"
