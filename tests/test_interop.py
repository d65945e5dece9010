"""Models leaving and entering the project: Hugging Face export and import (checked by
transformers itself), GGUF (read back by transformers' GGUF loader), weights-only files, and
the design documents' command-line names. Every model here is tiny and random; nothing is
downloaded."""
import json
import pickle
from pathlib import Path

import pytest
import torch

import generate
import train as train_mod
import utils
from config import canonical_argv
from data import BPETokenizer, ByteTokenizer, CharTokenizer
from interop import InteropError, export_gguf, export_hf, hf_family, read_hf
from model import Seq2SeqTransformer, Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune. Naïve café, 1599!\n") * 30
SAMPLES = ["To be, or not to be", "Naïve café, 1599!\n\nthe slings", "  spaces   and\tsuch  "]
LLAMA = dict(norm="rmsnorm", pos_encoding="rope", activation="swiglu")
GPT2 = dict(norm="layernorm", pos_encoding="learned", activation="gelu", bias=True)


def tiny_model(vocab_size, **kw):
    """A random model whose every tensor matters (biases and norms are perturbed off 0 and 1)."""
    torch.manual_seed(0)
    model = Transformer(**{**dict(vocab_size=vocab_size, d_model=64, n_heads=4, n_layers=2, block_size=32), **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tokenizers():
    return {"char": CharTokenizer.train(TEXT + "".join(SAMPLES)), "byte": ByteTokenizer(),
            "bpe": BPETokenizer.train(TEXT, vocab_size=320)}


def logits(model, idx):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


# --- Hugging Face: export --------------------------------------------------------

@pytest.mark.parametrize("arch, kw", [
    ("LlamaForCausalLM", dict(LLAMA)),
    ("LlamaForCausalLM", dict(LLAMA, n_kv_heads=2, tie_weights=False, bias=True, activation="geglu")),
    ("GPT2LMHeadModel", dict(GPT2)),
    ("GPT2LMHeadModel", dict(GPT2, tie_weights=False, activation="relu")),
])
def test_export_hf_loads_in_transformers_with_the_same_logits(arch, kw, tmp_path):
    model = tiny_model(70, **kw)
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == arch
    idx = torch.randint(0, 70, (2, 32))
    torch.testing.assert_close(logits(hf, idx), logits(model, idx), atol=1e-5, rtol=0)


def test_a_sliding_window_model_exports_as_mistral_and_comes_back(tmp_path):
    """Past the window, so the window matters (the GGUF llama architecture has none: refused)."""
    model = tiny_model(70, n_kv_heads=2, attention_window=8)
    export_hf(model, None, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == 8
    idx = torch.randint(0, 70, (2, 32))
    torch.testing.assert_close(logits(hf, idx), logits(model, idx), atol=1e-5, rtol=0)
    back, _ = utils.load_model(f"hf:{tmp_path / 'hf'}")
    assert back.config.attention_window == 8
    torch.testing.assert_close(logits(back, idx), logits(model, idx), atol=0, rtol=0)
    with pytest.raises(InteropError, match="attention_window=8: GGUF's llama architecture has no sliding window"):
        export_gguf(model, None, tmp_path / "m.gguf")


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_exported_tokenizer_encodes_and_decodes_like_ours(kind, tmp_path):
    tok = tokenizers()[kind]
    export_hf(tiny_model(tok.vocab_size), tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        ids = tok.encode(text)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == text
    if kind == "bpe":      # the end-of-text token is a special token there too
        assert hf_tok("a<|endoftext|>b")["input_ids"] == tok.encode("a<|endoftext|>b", special=True)
        assert hf_tok.eos_token_id == tok.eot_id


@pytest.mark.parametrize("kw, cause", [
    (dict(LLAMA, rotary_pct=0.5), "as LlamaForCausalLM, rotary_pct=0.5 (it rotates every dim of each head)"),
    (dict(LLAMA, pre_norm=False), "as LlamaForCausalLM, pre_norm=False (it is pre-norm)"),
    (dict(norm="layernorm", pos_encoding="rope", activation="swiglu"), "as LlamaForCausalLM, norm=layernorm (it uses RMSNorm)"),
    (dict(GPT2, n_kv_heads=2), "as GPT2LMHeadModel, n_kv_heads=2 (it has one key/value head per query head)"),
    (dict(LLAMA, attention_window=8, bias=True), "as MistralForCausalLM, bias=True (it has no biases)"),
])
def test_what_hugging_face_cannot_express_is_refused_by_name(kw, cause, tmp_path):
    model = Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=1, block_size=16, **kw)
    with pytest.raises(InteropError, match="Hugging Face cannot express this model") as e:
        export_hf(model, None, tmp_path / "hf")
    assert cause in str(e.value)
    assert not (tmp_path / "hf").exists()                  # refused before anything is written


@pytest.mark.parametrize("model, kind", [
    (Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=1, head="classification", num_classes=3),
     "a classification model"),
    (Transformer(input_dim=2, d_model=32, n_heads=4, n_layers=1, head="forecast", horizon=3), "a forecast model"),
    (Seq2SeqTransformer(vocab_size=50, d_model=32, n_heads=4, n_layers=1), "an encoder-decoder"),
])
def test_only_language_models_go_to_hugging_face_and_gguf(model, kind, tmp_path):
    for fmt, export in (("hf", export_hf), ("gguf", export_gguf)):
        with pytest.raises(InteropError, match=f"--format {fmt} holds decoder-only language models and this is {kind}"):
            export(model, None, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_round_trip_ours_hf_ours_is_exact(tmp_path):
    tok = tokenizers()["bpe"]
    model = tiny_model(tok.vocab_size, n_kv_heads=2)
    export_hf(model, tok, tmp_path / "hf")
    back, back_tok = utils.load_model(f"hf:{tmp_path / 'hf'}")
    assert back.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    assert all(back_tok.encode(s) == tok.encode(s) for s in SAMPLES)


# --- Hugging Face: import --------------------------------------------------------

def hf_tokenizer(directory: Path):
    """A byte-level BPE trained by Hugging Face's own library, saved beside the model."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return fast


def hf_model(family: str):
    torch.manual_seed(0)
    common = dict(vocab_size=400, bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, activation_function="gelu",
                                      **common)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cls, cfg_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[family]
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=family == "llama",
                  **common)
    return cls(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_import_hf_gives_the_same_logits_and_tokens(family, tmp_path):
    hf = hf_model(family)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    fast = hf_tokenizer(tmp_path)
    model, tok = utils.load_model(f"hf:{tmp_path}")
    for text in SAMPLES + ["a<|endoftext|>b"]:
        assert tok.encode(text, special=True) == fast(text)["input_ids"]
    idx = torch.tensor([tok.encode(TEXT[:90])[:32]])
    torch.testing.assert_close(logits(model, idx), logits(hf, idx), atol=1e-5, rtol=0)


def test_imported_model_fine_tunes_with_lora_generates_and_quantizes(tmp_path, text_file, capsys):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    hf_tokenizer(tmp_path / "hf")
    utils.main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported.pt")])
    tiny = ["--training.max_iters=4", "--training.eval_interval=4", "--training.eval_iters=1", "--training.batch_size=4",
            "--training.progress=false", "--training.plot=false", "--device", "cpu", "--data", str(text_file)]
    for name, init in (("lora", f"hf:{tmp_path / 'hf'}"), ("full", str(tmp_path / "imported.pt"))):
        lora = ["--lora.r=4"] if name == "lora" else []
        train_mod.main([f"--training.init_from={init}", *lora, *tiny, f"--training.out_dir={tmp_path / name}"])
        capsys.readouterr()
        generate.main(["--checkpoint", str(tmp_path / name / "best.pt"), "--prompt", "To be", "--max_new_tokens", "5",
                       "--temperature", "0"])
        assert capsys.readouterr().out.strip().startswith("To be")
    utils.main(["quantize", "--checkpoint", f"hf:{tmp_path / 'hf'}", "--mode", "int8", "--out", str(tmp_path / "q.pt")])
    model, _ = utils.load_model(tmp_path / "q.pt")
    idx = torch.randint(0, 400, (1, 16))
    assert (logits(model, idx) - logits(hf, idx)).abs().max() < 0.05 * logits(hf, idx).abs().max()


def test_unsupported_hf_directory_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(utils.CheckpointError, match=r"model_type 'bert' is not supported; supported: "
                                                    r"llama \(LlamaForCausalLM\), mistral \(MistralForCausalLM\), gpt2"):
        utils.load_checkpoint(f"hf:{tmp_path}")


def test_a_pickle_in_an_hf_directory_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (Path.mkdir, (tmp_path / "pwned",))
    hf_model("llama").config.save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": RunsCode()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(utils.CheckpointError, match="refused, since loading them could run code"):
        utils.load_checkpoint(f"hf:{tmp_path}")
    assert not (tmp_path / "pwned").exists()


# --- GGUF ------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(LLAMA), dict(LLAMA, n_kv_heads=2, tie_weights=False),
                                dict(GPT2, block_size=1024)])
def test_gguf_reads_back_in_transformers(kw, tmp_path):
    """f32 matches; f16 and q8_0 within their rounding: 1% and 5% of the largest logit. The
    GPT-2 family is held to 1e-3 in f32: GGUF's gpt2 implies the tanh GELU, ours is exact
    (and transformers reads GPT-2's context as 1024 positions, hence that block_size)."""
    pytest.importorskip("gguf")
    tok = tokenizers()["bpe"]
    model = tiny_model(tok.vocab_size, **kw)
    idx = torch.randint(0, tok.vocab_size, (2, 32))
    ref = logits(model, idx)
    for dtype, tol in (("fp32", 1e-5 if kw["norm"] == "rmsnorm" else 1e-3), ("fp16", 0.01), ("q8_0", 0.05)):
        path = export_gguf(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        err = (logits(hf, idx) - ref).abs().max().item()
        assert err <= tol * (1 if dtype == "fp32" else ref.abs().max().item()), (dtype, err)


def test_gguf_errors(tmp_path):
    model = tiny_model(50)
    with pytest.raises(InteropError, match=r"GGUF type 'q4_k' is not supported; valid: fp32, fp16, bf16, q8_0"):
        export_gguf(model, None, tmp_path / "m.gguf", dtype="q4_k")
    (tmp_path / "m.gguf").write_text("keep me")
    with pytest.raises(InteropError, match="exists; choose another --out or add --force"):
        export_gguf(model, None, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_text() == "keep me"


# --- the export command and weights-only files ------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    text = root / "text.txt"
    text.write_text(TEXT)
    out = train_mod.train(train_mod.load_config(None, [
        "--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4", "--model.block_size=32",
        "--training.max_iters=30", "--training.eval_interval=30", "--training.eval_iters=1",
        "--training.progress=false", "--training.plot=false", "--training.device=cpu",
        f"--data.path={text}", f"--training.out_dir={root / 'out'}"], sections=train_mod.SECTIONS))
    return Path(out["out_dir"]) / "best.pt"


def test_an_export_without_a_suffix_is_kept_without_force(trained, tmp_path):
    args = ["export", "--checkpoint", str(trained), "--format", "pt", "--out", str(tmp_path / "small")]
    utils.main(args)
    with pytest.raises(SystemExit, match=r"small\.pt' exists; choose another --out or add --force"):
        utils.main(args)
    utils.main([*args, "--force"])


def test_a_character_vocabulary_goes_to_gguf_with_a_note(trained, tmp_path, capsys):
    """Its multi-byte characters are merges of byte pieces that are not tokens: llama.cpp
    tokenizes as we do, transformers' GGUF reader takes the model only, and the export says so."""
    pytest.importorskip("gguf")
    capsys.readouterr()
    utils.main(["export", "--checkpoint", str(trained), "--format", "gguf", "--dtype", "fp32",
                "--out", str(tmp_path / "c.gguf")])
    assert capsys.readouterr().err.startswith("note: the character vocabulary holds 2 multi-byte characters (éï): "
                                              "llama.cpp reads its tokenizer, transformers' GGUF reader only the model")
    model, tok = utils.load_model(trained)
    ids = torch.tensor([tok.encode(SAMPLES[1])])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="c.gguf", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), atol=1e-4, rtol=0)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "c.gguf"), n_ctx=32, verbose=False)
    assert llm.tokenize(SAMPLES[1].encode(), add_bos=False, special=False) == ids[0].tolist()


@pytest.mark.parametrize("fmt, dtype", [("safetensors", "fp16"), ("pt", "bf16"), ("safetensors", "fp32")])
def test_weights_only_file_is_smaller_and_generates(fmt, dtype, trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / f"small.{fmt}"
    capsys.readouterr()
    utils.main(["export", "--checkpoint", str(trained), "--format", fmt, "--dtype", dtype, "--out", str(out)])
    assert "MB (the checkpoint" in capsys.readouterr().out
    assert out.stat().st_size < trained.stat().st_size / (2.5 if dtype == "fp32" else 5)   # no optimizer state
    if fmt == "safetensors":      # read with no pickle at all
        monkeypatch.setattr(pickle, "Unpickler", None)
        monkeypatch.setattr(torch, "load", None)
    small, _ = utils.load_model(out)
    monkeypatch.undo()
    full, _ = utils.load_model(trained)
    idx = torch.randint(0, full.config.vocab_size, (2, 32))
    tol = {"fp32": 0, "fp16": 2e-2, "bf16": 1e-1}[dtype]
    torch.testing.assert_close(logits(small, idx), logits(full, idx), atol=tol, rtol=0)
    capsys.readouterr()
    generate.main(["--checkpoint", str(out), "--prompt", "To be", "--max_new_tokens", "8"])
    assert capsys.readouterr().out.startswith("To be")
    train_mod.main(["--init_from", str(out), "--training.max_iters=2", "--training.eval_iters=1",
                    "--training.progress=false", "--training.plot=false", "--device", "cpu",
                    "--data", str(trained.parent.parent / "text.txt"), f"--training.out_dir={tmp_path / 'ft'}"])
    utils.main(["quantize", "--checkpoint", str(out), "--mode", "int8", "--out", str(tmp_path / "q.pt")])
    assert (tmp_path / "ft" / "best.pt").exists() and (tmp_path / "q.pt").exists()


def test_save_model_weights_only_half_precision(trained, tmp_path):
    model, tok = utils.load_model(trained)
    path = utils.save_model_weights_only(model, tmp_path / "w.safetensors", half_precision=True, tokenizer=tok)
    back, back_tok = utils.load_model(path)
    assert back_tok.state() == tok.state() and back.config == model.config
    assert all(torch.equal(back.state_dict()[k], v.half().float()) for k, v in model.state_dict().items())


def test_export_command_errors(trained, tmp_path):
    def fails(*argv):
        with pytest.raises(SystemExit) as e:
            utils.main([str(a) for a in argv])
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message
        return message

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "exists and is not an empty directory; choose another --out or add --force" in fails(
        "export", "--checkpoint", trained, "--format", "hf", "--out", tmp_path / "full")
    utils.main(["export", "--checkpoint", str(trained), "--format", "hf", "--out", str(tmp_path / "full"), "--force"])
    assert (tmp_path / "full" / "model.safetensors").exists()
    assert "--dtype q8_0 is not supported for --format hf; valid: fp32, fp16, bf16" in fails(
        "export", "--checkpoint", trained, "--format", "hf", "--dtype", "q8_0", "--out", tmp_path / "h")
    adapter_dir = tmp_path / "lora"
    train_mod.main([f"--training.init_from={trained}", "--lora.r=2", "--training.max_iters=2", "--training.eval_iters=1",
                    "--training.progress=false", "--training.plot=false", "--device", "cpu",
                    "--data", str(trained.parent.parent / "text.txt"), f"--training.out_dir={adapter_dir}"])
    moved = tmp_path / "moved.pt"
    trained.rename(moved)
    try:
        message = fails("export", "--checkpoint", adapter_dir / "best.pt", "--format", "hf", "--out", tmp_path / "a")
        assert f"its base is not at {trained.resolve()}: pass that base as --checkpoint" in message
    finally:
        moved.rename(trained)
    utils.main(["export", "--checkpoint", str(adapter_dir / "best.pt"), "--format", "hf", "--out", str(tmp_path / "a")])
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    model, _ = utils.load_model(adapter_dir / "best.pt")
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    torch.testing.assert_close(logits(merged, idx), logits(model, idx), atol=1e-5, rtol=0)


# --- the design documents' option names -------------------------------------------

def test_seed_option_names_are_aliases_that_print_the_canonical_name_once(capsys):
    notes = []
    argv = canonical_argv(["--model_size", "small", "--batch_size", "4", "--epochs", "10", "--mixed_precision",
                           "--use_rotary_embeddings", "--gradient_checkpointing",
                           "--gradient_accumulation_steps", "2", "--batch_size", "8", "--max_seq_len", "64"],
                          log=notes.append)
    cfg, _, _ = train_mod.resolve(argv)
    assert (cfg["model"].d_model, cfg["model"].block_size, cfg["model"].pos_encoding) == (256, 64, "rope")
    t = cfg["training"]
    assert (t.batch_size, t.epochs, t.grad_accum_steps, t.gradient_checkpointing) == (8, 10, 2, True)
    assert t.precision == ("fp16" if torch.cuda.is_available() else "bf16")
    assert notes.count("note: --batch_size is --training.batch_size") == 1 and len(notes) == 7
    g = canonical_argv(["--max_tokens", "7", "--max_length=9"], log=notes.append)
    assert g == ["--sample.max_new_tokens", "7", "--sample.max_new_tokens=9"]
    assert canonical_argv(["--use_rotary_embeddings=false"], log=notes.append) == ["--model.pos_encoding=learned"]
    with pytest.raises(ValueError, match="--mixed_precision is a flag"):
        canonical_argv(["--mixed_precision=fp8"])


def test_max_seq_len_is_block_size():
    assert TransformerConfig(max_seq_len=64).block_size == 64
    assert TransformerConfig.from_dict({"max_seq_len": 48}).block_size == 48
    with pytest.raises(ValueError, match="name the same thing"):
        TransformerConfig(block_size=128, max_seq_len=64)


def test_hf_family_of_the_presets():
    assert hf_family(TransformerConfig.from_preset("small")) == "llama"
    assert hf_family(TransformerConfig.from_preset("gpt2-124M")) == "gpt2"


def test_a_tokenizer_tiktoken_cannot_encode_says_what_is_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    hf_model("llama").save_pretrained(tmp_path)
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "to": 1, "be": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(utils.CheckpointError, match=r"the tokenizer is not a byte-level BPE \(model 'WordLevel', "
                                                    r"pre-tokenizers \['Whitespace'\]\); tiktoken cannot encode it"):
        utils.load_checkpoint(f"hf:{tmp_path}")
