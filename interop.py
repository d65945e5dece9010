"""Models in and out of the project: Hugging Face directories, GGUF files, weights-only files.

Sections:
    1. Architectures -- which Hugging Face family (Llama, Mistral, GPT-2) expresses a config,
                        and the config.json of each, both ways
    2. Tensors       -- our state dict <-> each family's tensor names and layouts
    3. Tokenizers    -- ours <-> tokenizer.json (byte-level BPE, bytes, characters)
    4. Hugging Face  -- export_hf(DIR) and read_hf(DIR), safetensors, no transformers needed
    5. GGUF          -- export_gguf(PATH) for llama.cpp, f32 / f16 / bf16 / q8_0
    6. Weights only  -- checkpoints without training state, as .pt or safetensors

    >>> from interop import export_hf, read_hf                 # doctest: +SKIP
    >>> export_hf(model, tokenizer, "hf-out")                  # transformers loads hf-out
    >>> ckpt = read_hf("hf-out")                               # a checkpoint dict, as utils reads

This module imports only model.py and data.py: utils.py (load_checkpoint, the `export` and
`import` commands) builds on it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data import BPETokenizer, ByteTokenizer, CharTokenizer, GPT2_PATTERN, tokenizer_from_state
from model import GATED, Seq2SeqTransformer, Transformer, TransformerConfig, closest

FORMAT, VERSION = "mini-transformer", 2          # utils.CHECKPOINT_FORMAT / CHECKPOINT_VERSION
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class InteropError(ValueError):
    """A model, directory or file that cannot be converted; the message says why."""

# =============================================================================
# 1. Architectures
# =============================================================================

# What each family fixes, as (our option, the test its value must pass, why): a config exports
# as the family it matches best, and otherwise the error names the options in the way.
_ROPE_MLP = [("norm", lambda v: v == "rmsnorm", "it uses RMSNorm"), ("pos_encoding", lambda v: v == "rope", "it uses RoPE"),
             ("activation", lambda v: v in GATED, "its MLP is gated"),
             ("rotary_pct", lambda v: v == 1.0, "it rotates every dim of each head")]
_WHOLE = ("attention_window", lambda v: v is None, "it attends over the whole context")
_RULES = {
    "llama": _ROPE_MLP + [_WHOLE],
    "mistral": _ROPE_MLP + [("attention_window", lambda v: v is not None, "it has a sliding window"),
                            ("bias", lambda v: not v, "it has no biases")],
    "gpt2": [("norm", lambda v: v == "layernorm", "it uses LayerNorm"),
             ("pos_encoding", lambda v: v == "learned", "it learns its positions"),
             ("activation", lambda v: v in ("gelu", "relu", "silu"), "its MLP is not gated"),
             ("bias", lambda v: v, "it has biases everywhere"), _WHOLE],
}
_ANY = [("head", lambda v: v == "lm", "only language models export"), ("causal", lambda v: v, "it is a causal decoder"),
        ("pre_norm", lambda v: v, "it is pre-norm"), ("attention", lambda v: v == "standard", "it has standard attention")]
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _misses(cfg: TransformerConfig, family: str) -> list[str]:
    out = [f"{name}={getattr(cfg, name)} ({why})" for name, ok, why in _ANY + _RULES[family] if not ok(getattr(cfg, name))]
    if family == "gpt2" and cfg.n_kv_heads != cfg.n_heads:
        out.append(f"n_kv_heads={cfg.n_kv_heads} (it has one key/value head per query head)")
    return out


def hf_family(cfg: TransformerConfig) -> str:
    """'llama', 'mistral' or 'gpt2': the Hugging Face family whose layers are this config's, or
    an InteropError naming the options that none of them can express.

        >>> hf_family(TransformerConfig()), hf_family(TransformerConfig.from_preset("gpt2-124M"))
        ('llama', 'gpt2')
    """
    misses = {family: _misses(cfg, family) for family in _RULES}
    fewest = min(len(m) for m in misses.values())
    if fewest:     # every family as close as the closest one, with what stands in its way
        raise InteropError("Hugging Face cannot express this model: " + "; or ".join(
            f"as {HF_ARCHITECTURES[f]}, {'; '.join(m)}" for f, m in misses.items() if len(m) == fewest))
    return min(misses, key=lambda f: len(misses[f]))


def hf_config(cfg: TransformerConfig, tokenizer=None) -> dict:
    """config.json for the family of cfg (see hf_family)."""
    family = hf_family(cfg)
    eos = getattr(tokenizer, "eot_id", None)
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_weights, bos_token_id=eos,
                  eos_token_id=eos, initializer_range=cfg.init_std, torch_dtype="float32", dtype="float32")
    if family == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_positions=cfg.block_size,
                    n_ctx=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                    n_inner=cfg.d_ff, activation_function=cfg.activation, layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True, use_cache=True,
                    **common)
    extra = (dict(sliding_window=cfg.attention_window) if family == "mistral"
             else dict(attention_bias=cfg.bias, mlp_bias=cfg.bias))
    return dict(architectures=[HF_ARCHITECTURES[family]], model_type=family, hidden_size=cfg.d_model,
                intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
                hidden_act="silu" if cfg.activation == "swiglu" else "gelu",
                rope_theta=cfg.rope_theta, rope_scaling=None,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                attention_dropout=0.0, use_cache=True, **extra, **common)


def _need(hf: dict, key: str, where: str):
    if key not in hf:
        raise InteropError(f"{where}: config.json has no '{key}'")
    return hf[key]


def _gpt2_config(hf: dict, where: str) -> TransformerConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu", "relu", "silu"):
        raise InteropError(f"{where}: activation_function={act!r}; this model has exact gelu, relu or silu "
                           f"(GPT-2's own gelu_new is the tanh approximation)")
    d = _need(hf, "n_embd", where)
    return TransformerConfig(vocab_size=_need(hf, "vocab_size", where), block_size=_need(hf, "n_positions", where),
                             d_model=d, n_layers=_need(hf, "n_layer", where), n_heads=_need(hf, "n_head", where),
                             d_ff=hf.get("n_inner") or 4 * d, norm="layernorm",
                             norm_eps=hf.get("layer_norm_epsilon", 1e-5), pos_encoding="learned", activation=act,
                             bias=True, tie_weights=hf.get("tie_word_embeddings", True))


def config_from_hf(hf: dict, where: str) -> TransformerConfig:
    """Our config for a Hugging Face config.json of a supported family."""
    kind = hf.get("model_type")
    if kind not in HF_ARCHITECTURES:
        raise InteropError(f"{where}: model_type {kind!r} is not supported; supported: "
                           f"{', '.join(f'{k} ({v})' for k, v in HF_ARCHITECTURES.items())}")
    if kind == "gpt2":
        return _gpt2_config(hf, where)
    get = lambda key: _need(hf, key, where)   # noqa: E731
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise InteropError(f"{where}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                           f"supported (only plain RoPE)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "gelu"):
        raise InteropError(f"{where}: hidden_act={act!r}; supported: silu (SwiGLU), gelu (GeGLU)")
    d, heads = get("hidden_size"), get("num_attention_heads")
    if hf.get("head_dim") not in (None, d // heads):
        raise InteropError(f"{where}: head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    window = hf.get("sliding_window") if kind == "mistral" else None
    block = get("max_position_embeddings")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise InteropError(f"{where}: attention_bias and mlp_bias differ; this model has one bias switch")
    return TransformerConfig(vocab_size=get("vocab_size"), block_size=block, d_model=d, n_layers=get("num_hidden_layers"),
                             n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                             d_ff=get("intermediate_size"), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
                             pos_encoding="rope", rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                             activation="swiglu" if act == "silu" else "geglu", bias=bool(hf.get("attention_bias")),
                             tie_weights=hf.get("tie_word_embeddings", False),
                             attention_window=window if window is not None and window < block else None)

# =============================================================================
# 2. Tensors
# =============================================================================


def _llama_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"norm1": p + "input_layernorm", "norm2": p + "post_attention_layernorm", "attn.wo": p + "self_attn.o_proj",
            "mlp.w1": p + "mlp.gate_proj", "mlp.w3": p + "mlp.up_proj", "mlp.w2": p + "mlp.down_proj"}


def _gpt2_names(i: int) -> dict[str, str]:
    p = f"transformer.h.{i}."
    return {"norm1": p + "ln_1", "norm2": p + "ln_2", "attn.wqkv": p + "attn.c_attn", "attn.wo": p + "attn.c_proj",
            "mlp.w1": p + "mlp.c_fc", "mlp.w2": p + "mlp.c_proj"}


_GPT2_CONV = ("attn.wqkv", "attn.wo", "mlp.w1", "mlp.w2")   # Conv1D: weights stored (in, out)
_TOP = {"llama": {"tok_emb": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"},
        "gpt2": {"tok_emb": "transformer.wte", "pos_emb": "transformer.wpe", "norm_f": "transformer.ln_f",
                 "lm_head": "lm_head"}}


def _name_map(cfg: TransformerConfig, family: str) -> dict[str, str]:
    """Our module names -> theirs (wqkv of Llama is split apart: see to_hf_tensors)."""
    names = dict(_TOP[family])
    for i in range(cfg.n_layers):
        per = _gpt2_names(i) if family == "gpt2" else _llama_names(i)
        names.update({f"blocks.{i}.{ours}": theirs for ours, theirs in per.items()})
    return names


def _qkv_sizes(cfg: TransformerConfig) -> list[int]:
    return [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]


def to_hf_tensors(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """Our float state dict under the family's tensor names (a tied head is stored once)."""
    cfg, names = model.config, _name_map(model.config, family)
    out = {}
    for key, t in model.state_dict().items():
        module, _, kind = key.rpartition(".")
        if module == "lm_head" and cfg.tie_weights:
            continue
        if family == "llama" and module.endswith("attn.wqkv"):
            p = f"model.layers.{module.split('.')[1]}.self_attn."
            for n, part in zip("qkv", t.split(_qkv_sizes(cfg), dim=0)):
                out[f"{p}{n}_proj.{kind}"] = part
            continue
        if family == "gpt2" and kind == "weight" and module.split(".", 2)[-1] in _GPT2_CONV:
            t = t.t()
        out[f"{names[module]}.{kind}"] = t
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, torch.Tensor], cfg: TransformerConfig, family: str, where: str) -> dict:
    """The inverse of to_hf_tensors: our state dict from the family's tensors."""
    names = _name_map(cfg, family)
    with torch.device("meta"):                   # our keys and shapes, allocating nothing
        want = Transformer(cfg).state_dict()
    out = {}
    for key in want:
        module, _, kind = key.rpartition(".")
        if module == "lm_head" and cfg.tie_weights:          # the embedding again (the state dict lists both)
            out[key] = out["tok_emb.weight"]
            continue
        if family == "llama" and module.endswith("attn.wqkv"):
            p = f"model.layers.{module.split('.')[1]}.self_attn."
            out[key] = torch.cat([_take(tensors, f"{p}{n}_proj.{kind}", where) for n in "qkv"], dim=0)
            continue
        t = _take(tensors, f"{names[module]}.{kind}", where)
        if family == "gpt2" and kind == "weight" and module.split(".", 2)[-1] in _GPT2_CONV:
            t = t.t()
        out[key] = t.contiguous()
        if tuple(out[key].shape) != tuple(want[key].shape):
            raise InteropError(f"{where}: tensor for {key} has shape {tuple(out[key].shape)}; the config "
                               f"gives {tuple(want[key].shape)}")
    return out


def _take(tensors: dict, name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise InteropError(f"{where}: the weights have no tensor '{name}'")
    return tensors[name]

# =============================================================================
# 3. Tokenizers
# =============================================================================


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value, as tokenizer.json vocabularies spell bytes.

        >>> byte_chars()[ord("a")], byte_chars()[ord(" ")]
        ('a', 'Ġ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return [table[b] for b in range(256)]


def _spell(token: bytes, chars=None) -> str:
    chars = chars or byte_chars()
    return "".join(chars[b] for b in token)


def bpe_vocab(tok: BPETokenizer) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """({id: token bytes} of the mergeable tokens, the merges in priority order). For a tiktoken
    encoding the merges are recovered from its ranks: the pair BPE would merge last."""
    enc = tok.encoding
    vocab = {enc.encode_single_token(t): t for t in enc.token_byte_values()}
    ranks = {t: i for i, t in vocab.items()}
    merges = []
    for rank in sorted(vocab):
        token = vocab[rank]
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:        # replay BPE with only the merges ranked before this token
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], math.inf))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return vocab, merges


def tokenizer_json(tok) -> dict:
    """tokenizer.json (the `tokenizers` library's format) for our tokenizer, ids unchanged: a
    byte-level BPE for bpe and byte, and a character vocabulary for char (a character
    outside it is dropped by Hugging Face; ours raises)."""
    base = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "post_processor": None}
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    if isinstance(tok, CharTokenizer):
        return {**base, "pre_tokenizer": None, "decoder": {"type": "Fuse"},
                "model": {**bpe, "vocab": {c: i for i, c in enumerate(tok.chars)}, "merges": []}}
    chars = byte_chars()
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if isinstance(tok, ByteTokenizer):
        return {**base, "pre_tokenizer": level, "decoder": {**level, "use_regex": True},
                "model": {**bpe, "vocab": {chars[b]: b for b in range(256)}, "merges": []}}
    vocab, merges = bpe_vocab(tok)
    pattern = tok.encoding._pat_str   # noqa: SLF001 -- tiktoken has no public accessor for it
    special = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for s, i in sorted(tok.encoding._special_tokens.items())]  # noqa: SLF001
    return {**base, "added_tokens": special,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, level]},
            "decoder": {**level, "use_regex": True},
            "model": {**bpe, "vocab": {_spell(t, chars): i for i, t in sorted(vocab.items())},
                      "merges": [[_spell(a, chars), _spell(b, chars)] for a, b in merges]}}


# GPT-2's pre-tokenizer, as ByteLevel(use_regex=True) applies it
_BYTELEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _pretokenizers(spec: Optional[dict]) -> list[dict]:
    if not spec:
        return []
    return spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]


def tokenizer_from_json(spec: dict, where: str):
    """Our tokenizer from tokenizer.json: a byte-level BPE (encoded by tiktoken, with the same
    ids), or the byte and char vocabularies this module writes."""
    model = spec.get("model") or {}
    steps = _pretokenizers(spec.get("pre_tokenizer"))
    vocab, merges = model.get("vocab") or {}, model.get("merges") or []
    chars = _char_vocabulary(spec, steps)
    if chars is not None:
        return CharTokenizer(chars)
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise InteropError(f"{where}: the tokenizer is not a byte-level BPE (model {model.get('type')!r}, "
                           f"pre-tokenizers {kinds or None}); tiktoken cannot encode it. Train with "
                           f"--data.tokenizer=... on your own text instead")
    inverse = {c: b for b, c in enumerate(byte_chars())}
    try:
        tokens = {int(i): bytes(inverse[c] for c in s) for s, i in vocab.items()}
    except KeyError:
        raise InteropError(f"{where}: a vocabulary entry is not spelled in byte-level characters") from None
    special = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", []) if t.get("special")}
    if not merges and not special and tokens == {b: bytes([b]) for b in range(256)}:
        return ByteTokenizer()
    ids = [vocab.get("".join(m.split(" ") if isinstance(m, str) else m)) for m in merges]
    if any(i is None for i in ids) or any(b <= a for a, b in zip(ids, ids[1:])):
        raise InteropError(f"{where}: the BPE's token ids are not in merge order, so tiktoken (which merges by "
                           f"id) cannot reproduce it")
    return BPETokenizer.from_tokens(tokens, pattern=_split_pattern(steps, where), special_tokens=special)


def _char_vocabulary(spec: dict, steps: list[dict]) -> Optional[str]:
    """The characters of a char vocabulary as tokenizer_json writes it (ids in code-point
    order, no merges, no pre-tokenizer, a Fuse decoder), else None."""
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    if (model.get("type") != "BPE" or steps or model.get("merges") or (spec.get("decoder") or {}).get("type") != "Fuse"
            or not all(len(c) == 1 for c in vocab)):
        return None
    chars = "".join(sorted(vocab, key=vocab.get))
    ordered = sorted(vocab.values()) == list(range(len(vocab))) and chars == "".join(sorted(chars))
    return chars if ordered else None


def _split_pattern(steps: list[dict], where: str) -> str:
    """The pre-tokenizer's regex: a Split step's, or GPT-2's where ByteLevel splits by itself."""
    split = next((s for s in steps if s.get("type") == "Split"), None)
    level = next(s for s in steps if s.get("type") == "ByteLevel")
    pattern = (split["pattern"].get("Regex") if split else
               _BYTELEVEL_PATTERN if level.get("use_regex", True) else None)
    if not pattern or level.get("add_prefix_space"):
        raise InteropError(f"{where}: the tokenizer's pre-tokenizer ({'add_prefix_space' if pattern else 'no split pattern'}) "
                           f"has no tiktoken equivalent")
    return pattern

# =============================================================================
# 4. Hugging Face
# =============================================================================


def check_out(path, *, force: bool, directory: bool) -> Path:
    """An output path that will not clobber anything unless force: a directory that is absent or
    empty, or a file that is absent."""
    path = Path(path)
    if directory:
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
            raise InteropError(f"'{path}' exists and is not an empty directory; choose another --out or add --force")
        if path.exists() and not path.is_dir():
            raise InteropError(f"'{path}' is a file; an export to Hugging Face writes a directory")
    elif path.exists() and not force:
        raise InteropError(f"'{path}' exists; choose another --out or add --force")
    return path


def _check_float(model: Transformer) -> None:
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            raise InteropError(f"'{name}' is not a float tensor (a quantized model): export the float model")


def other_than_language_model(model) -> Optional[str]:
    """None for a decoder-only language model; otherwise what the model is, for an error message
    ("an encoder-decoder", "a classification model", ...)."""
    if hasattr(model, "encoder"):
        return "an encoder-decoder"
    return None if model.config.head == "lm" and model.config.input_dim is None else f"a {model.config.head} model"


def _check_language_model(model, fmt: str) -> None:
    """Only decoder-only language models go to Hugging Face and GGUF files; others are refused by name."""
    kind = other_than_language_model(model)
    if kind:
        raise InteropError(f"--format {fmt} holds decoder-only language models and this is {kind}; "
                           f"--format pt or safetensors keeps it whole")


def export_hf(model: Transformer, tokenizer, out_dir, *, dtype: str = "fp32", force: bool = False) -> list[Path]:
    """Write a Hugging Face directory (config.json, model.safetensors, generation_config.json,
    tokenizer.json, tokenizer_config.json, README.md) that transformers' AutoModelForCausalLM
    and AutoTokenizer load with no code of ours. Returns the files written."""
    from safetensors.torch import save_file
    _check_language_model(model, "hf")
    cfg = model.config
    hf = hf_config(cfg, tokenizer)       # refuses what Hugging Face cannot express, before writing
    out = check_out(out_dir, force=force, directory=True)
    _check_float(model)
    family = "gpt2" if hf["model_type"] == "gpt2" else "llama"
    tensors = {k: v.to(DTYPES[dtype]).cpu() for k, v in to_hf_tensors(model, family).items()}
    hf["torch_dtype"] = hf["dtype"] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    out.mkdir(parents=True, exist_ok=True)
    files = {"config.json": hf, "generation_config.json": {
        "bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"],
        "do_sample": True, "temperature": 0.8, "top_k": 200}}
    if tokenizer is not None:
        files["tokenizer.json"] = tokenizer_json(tokenizer)
        eos = None if tokenizer.eot_id is None else files["tokenizer.json"]["added_tokens"][0]["content"]
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                                          "eos_token": eos, "bos_token": eos, "clean_up_tokenization_spaces": False,
                                          "model_input_names": ["input_ids", "attention_mask"]}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "README.md").write_text(model_card(cfg, tokenizer, hf["architectures"][0]))
    return sorted(out.iterdir())


def model_card(cfg: TransformerConfig, tokenizer, architecture: str) -> str:
    kind = getattr(tokenizer, "kind", None)
    tok = {"char": f"one token per character: the {getattr(tokenizer, 'vocab_size', 0)} characters of the "
                   f"training text, ids in code-point order (tokenizer.json's vocab lists them). A character "
                   f"outside the vocabulary is dropped by Hugging Face's tokenizer; decode joins tokens with "
                   f"nothing between them",
           "byte": "the 256 UTF-8 byte values (id = byte), as a byte-level BPE with no merges",
           "bpe": "a byte-level BPE (tokenizer.json)", None: "none (the model was trained on non-text inputs)"}[kind]
    return (f"# A Mini Transformer model\n\n{architecture}: {cfg.n_layers} layers, d_model {cfg.d_model}, "
            f"{cfg.n_heads} heads ({cfg.n_kv_heads} key/value), context {cfg.block_size}.\n\n"
            f"Tokenizer: {tok}.\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"DIR\")\ntokenizer = AutoTokenizer.from_pretrained(\"DIR\")\n```\n")


def _read_json(path: Path, where: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{where}: cannot read {path.name} ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise InteropError(f"{where}: {path.name} is not a JSON object")
    return obj


def hf_weight_files(directory) -> list[Path]:
    """The weight files of a save_pretrained directory: safetensors (one or sharded), or
    pytorch_model.bin."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(_read_json(index, str(d)).get("weight_map", {}).values()))
        return [d / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).exists():
            return [d / name]
    raise InteropError(f"'{d}' has no model.safetensors or pytorch_model.bin")


def _load_tensors(files: list[Path], where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    out = {}
    for f in files:
        try:
            out.update(load_file(str(f)) if f.suffix == ".safetensors"
                       else torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:
            raise InteropError(f"{where}: {f.name} holds Python objects besides tensors; refused, since "
                               f"loading them could run code") from None
        except (SafetensorError, Exception) as e:     # truncated, corrupt, not a tensor file
            reason = (str(e).splitlines() or [""])[0][:200]
            raise InteropError(f"{where}: cannot read {f.name} ({type(e).__name__}: {reason})") from None
    return out


def read_hf(directory) -> dict:
    """A checkpoint dict (as utils.load_checkpoint returns) from a Hugging Face directory in the
    layout of save_pretrained: a Llama, Mistral or GPT-2 causal LM, and its tokenizer when it is
    one tiktoken can encode (otherwise None, and the text commands say what is missing)."""
    d = Path(directory)
    where = f"hf:{d}"
    if not d.is_dir():
        raise InteropError(f"'{d}' is not a directory (hf: needs a folder written by save_pretrained)")
    if not (d / "config.json").exists():
        raise InteropError(f"'{d}' has no config.json (hf: needs a folder written by save_pretrained)")
    hf = _read_json(d / "config.json", where)
    cfg = config_from_hf(hf, where)
    family = "gpt2" if hf["model_type"] == "gpt2" else "llama"      # Mistral's tensors are Llama's
    tensors = {k.removeprefix("base_model."): v for k, v in _load_tensors(hf_weight_files(d), where).items()}
    if family == "llama" and not cfg.tie_weights and "lm_head.weight" not in tensors:
        raise InteropError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
    state = from_hf_tensors(tensors, cfg, family, where)
    tokenizer = None
    if (d / "tokenizer.json").exists():
        tokenizer = tokenizer_from_json(_read_json(d / "tokenizer.json", where), where)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise InteropError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens; the model {cfg.vocab_size}")
    return {"format": FORMAT, "version": VERSION, "kind": "transformer", "task": {"name": "lm"},
            "model": state, "model_config": cfg.to_dict(),
            "tokenizer": tokenizer.state() if tokenizer else None, "source": where}

# =============================================================================
# 5. GGUF (llama.cpp, Ollama)
# =============================================================================

GGUF_TYPES = ("fp32", "fp16", "bf16", "q8_0")


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs, as its converter does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names, for the model's family."""
    cfg = model.config
    family = hf_family(cfg)
    sd = model.state_dict()
    out = {"token_embd.weight": sd["tok_emb.weight"], "output_norm.weight": sd["norm_f.weight"]}
    if not cfg.tie_weights:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"norm1": "attn_norm", "norm2": "ffn_norm", "attn.wo": "attn_output", "mlp.w2": "ffn_down",
             "mlp.w1": "ffn_gate" if family == "llama" else "ffn_up", "mlp.w3": "ffn_up", "attn.wqkv": "attn_qkv"}
    if family == "gpt2":
        out["position_embd.weight"] = sd["pos_emb.weight"]
        out["output_norm.bias"] = sd["norm_f.bias"]
    for key, t in sd.items():
        if not key.startswith("blocks."):
            continue
        _, i, rest = key.split(".", 2)
        module, _, kind = rest.rpartition(".")
        if family == "llama" and module == "attn.wqkv":
            q, k, v = t.split(_qkv_sizes(cfg), dim=0)
            heads = (cfg.n_heads, cfg.n_kv_heads, None)
            for n, part, h in zip(("attn_q", "attn_k", "attn_v"), (q, k, v), heads):
                out[f"blk.{i}.{n}.{kind}"] = _permute_rope(part, h) if h else part
            continue
        out[f"blk.{i}.{names[module]}.{kind}"] = t
    return out


def export_gguf(model: Transformer, tokenizer, path, *, dtype: str = "fp16", force: bool = False) -> Path:
    """Write a GGUF file (llama or gpt2 architecture) with the metadata llama.cpp reads: f32, f16,
    bf16 or q8_0 matrices (norms and biases stay f32), and the tokenizer as a byte-level BPE."""
    import gguf
    if dtype not in GGUF_TYPES:
        raise InteropError(f"GGUF type {dtype!r} is not supported; {closest(dtype, GGUF_TYPES)}")
    _check_language_model(model, "gguf")
    family = hf_family(model.config)
    if family == "mistral":
        raise InteropError(f"attention_window={model.config.attention_window}: GGUF's llama architecture has no "
                           f"sliding window, so llama.cpp would attend over the whole context")
    path = check_out(path, force=force, directory=False)
    _check_float(model)
    with atomic_path(path) as tmp:
        _write_gguf(gguf.GGUFWriter(tmp, family), model, tokenizer, dtype)
    return path


def _write_gguf(w, model: Transformer, tokenizer, dtype: str) -> None:
    import gguf
    cfg = model.config
    family = hf_family(cfg)
    qtype = {"fp32": gguf.GGMLQuantizationType.F32, "fp16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    ftype = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_name(f"mini-transformer-{family}")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_file_type(ftype)
    if family == "llama":
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.rotary_dim)
        w.add_vocab_size(cfg.vocab_size)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    if tokenizer is not None:
        _gguf_tokenizer(w, tokenizer, cfg.vocab_size)
    for name, t in gguf_tensors(model).items():
        data = t.detach().float().cpu().numpy()
        if data.ndim == 1 or dtype == "fp32" or (dtype == "q8_0" and data.shape[-1] % 32):
            w.add_tensor(name, data.astype(np.float32))
        elif dtype == "fp16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_tokenizer_note(tokenizer) -> Optional[str]:
    """What a reader of the GGUF tokenizer should know: a character vocabulary with multi-byte
    characters needs merges of byte pieces that are not tokens themselves, which llama.cpp
    accepts and transformers' GGUF reader refuses (it still loads the model)."""
    wide = [c for c in getattr(tokenizer, "chars", "") if len(c.encode()) > 1]
    if not isinstance(tokenizer, CharTokenizer) or not wide:
        return None
    shown = "".join(wide[:5]) + "..." * (len(wide) > 5)
    return (f"the character vocabulary holds {len(wide)} multi-byte characters ({shown}): llama.cpp "
            f"reads its tokenizer, transformers' GGUF reader only the model (--format hf carries the tokenizer there)")


def _gguf_tokenizer(w, tokenizer, vocab_size: int):
    """llama.cpp's "gpt2" (byte-level BPE) tokenizer: tokens spelled in byte-level characters,
    merges as "a b", special tokens marked as control; unused ids are padding entries."""
    import gguf
    chars = byte_chars()
    if isinstance(tokenizer, CharTokenizer):   # a multi-byte character is its bytes merged left to right
        vocab = {i: c.encode() for i, c in enumerate(tokenizer.chars)}
        merges = [(t[:n], t[n:n + 1]) for t in vocab.values() for n in range(1, len(t))]
    elif isinstance(tokenizer, ByteTokenizer):
        vocab, merges = {b: bytes([b]) for b in range(256)}, []
    else:
        vocab, merges = bpe_vocab(tokenizer)
    # llama.cpp refuses a BPE without merges: bytes C0 C1 never occur in UTF-8, so this one never applies
    merges = merges or [(b"\xc0", b"\xc1")]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i, t in vocab.items():
        tokens[i], types[i] = _spell(t, chars), gguf.TokenType.NORMAL
    for s, i in getattr(getattr(tokenizer, "encoding", None), "_special_tokens", {}).items():
        tokens[i], types[i] = s, gguf.TokenType.CONTROL
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{_spell(a, chars)} {_spell(b, chars)}" for a, b in merges])
    if tokenizer.eot_id is not None:
        w.add_bos_token_id(tokenizer.eot_id)
        w.add_eos_token_id(tokenizer.eot_id)

# =============================================================================
# 6. Weights-only files
# =============================================================================


def weights_payload(model, tokenizer=None, *, dtype: str = "fp32", config: Optional[dict] = None,
                    task: Optional[dict] = None) -> dict:
    """A checkpoint dict with only what inference needs: weights (floats cast to dtype), the
    model config, kind, task, tokenizer and run config; no optimizer, RNG or data state. A tensor
    reached under two names (a tied head, a shared embedding) is stored once: `tied` maps each
    other name to it, and model_from_checkpoint restores them."""
    if dtype not in DTYPES:
        raise InteropError(f"dtype {dtype!r}; {closest(dtype, DTYPES)}")
    state, first, tied = {}, {}, {}
    for name, t in model.state_dict().items():
        same = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and same in first:
            tied[name] = first[same]
            continue
        first[same] = name
        state[name] = (t.to(DTYPES[dtype]) if t.is_floating_point() else t).detach().cpu().clone()
    seq2seq = isinstance(model, Seq2SeqTransformer)
    return {"format": FORMAT, "version": VERSION, "kind": "seq2seq" if seq2seq else "transformer",
            "task": task or {"name": "seq2seq" if seq2seq else "lm"}, "model": state, "tied": tied,
            "model_config": model.config.to_dict(), **input_encoder(tokenizer), "config": config or {},
            "weights_only": True}


def input_encoder(tokenizer) -> dict:
    """How a checkpoint stores what encodes a model's inputs: a tokenizer under "tokenizer", or a
    model of time series' scaler (series.SeriesScaler) under "input_scaler"."""
    state = tokenizer.state() if tokenizer is not None else None
    if (state or {}).get("kind") == "scaler":
        return {"tokenizer": None, "input_scaler": state}
    return {"tokenizer": state}


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds it is fsynced and becomes
    `path` (a reader, or a crash, never sees half a file), and otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp creates 0600; these are ordinary files
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_safetensors(path, payload: dict) -> None:
    """A checkpoint as safetensors: tensors in the body, every other entry as JSON in its
    metadata. Reading it back runs no pickle."""
    from safetensors.torch import save_file
    meta = {k: json.dumps(v) for k, v in payload.items() if k != "model"}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in payload["model"].items()}, tmp, metadata=meta)


def read_safetensors(path) -> dict:
    """The checkpoint dict of write_safetensors (no pickle), or InteropError."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        payload = {k: json.loads(v) for k, v in meta.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = (str(e).splitlines() or [""])[0][:200]
        raise InteropError(f"'{path}' is not a readable safetensors file ({type(e).__name__}: {reason})") from None
    return {**payload, "model": state}
