"""The transformer: every layer in one file, and the models built from them.

Sections, in reading order:
    1. Config      -- TransformerConfig (validated) and the named presets
    2. Norms       -- RMSNorm, LayerNorm
    3. RoPE        -- rotary position embeddings, full or partial
    4. KV cache    -- a module holding keys/values for incremental decoding, and a ring of
                      them for sliding-window attention
    5. Attention   -- causal or bidirectional self-attention, MHA, GQA and MQA via SDPA;
                      attention weights on request; registries for your own attention,
                      position encoding and activation
    6. FeedForward -- SwiGLU / GeGLU (gated) and GELU / ReLU / SiLU MLPs
    7. Block       -- pre-norm or post-norm residual block
    8. Model       -- Backbone (embeddings, blocks, final norm -> hidden states) and
                      Transformer (a backbone with an LM, classification or regression head)
    9. Seq2Seq     -- cross-attention, decoder blocks, Seq2SeqTransformer (an encoder and a
                      decoder Backbone)
   10. Surgery     -- LoRA adapters and int8/int4 weight quantization, applied by
                      swapping the nn.Linear modules of a built model

Example:
    >>> import torch
    >>> from model import Transformer
    >>> model = Transformer(vocab_size=100, d_model=64, n_heads=4, n_layers=2)
    >>> model(torch.randint(0, 100, (2, 10))).shape
    torch.Size([2, 10, 100])

There is no generation loop here: sampling lives in generate.py, and the compiled
decoding fast path in fastpath.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import InitVar, asdict, dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# =============================================================================
# 1. Config
# =============================================================================

NORMS = ("rmsnorm", "layernorm")
# The registries a config names (register_attention / register_position / register_activation add
# to them): attention classes, position modules (the built-in ones are None: built in place),
# activation functions, and which activations gate their MLP.
ATTENTIONS: dict = {}                          # "standard": SelfAttention, filled in section 5
POSITIONS: dict = {"rope": None, "learned": None, "none": None}
ACTIVATIONS: dict = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu}  # exact GELU
GATED = {"swiglu", "geglu"}
HEADS = ("lm", "classification", "regression", "forecast")
POOLINGS = ("last", "mean", "cls", "flatten", "none")   # none: an output per position
HEAD_FIELDS = ("head", "num_classes", "output_dim", "pooling", "causal", "horizon")  # what set_head may change


def closest(name: str, valid, *, prefix: str = "") -> str:
    """A hint for error messages: the valid choices, after the one `name` looks like, if any
    is close (difflib's similarity of at least 0.6: a typo, not a different word); each is
    shown after `prefix` (e.g. "model.").

        >>> closest("rmsnrom", NORMS), closest("batchnorm", NORMS)
        ("did you mean 'rmsnorm'? valid: rmsnorm, layernorm", 'valid: rmsnorm, layernorm')
    """
    valid = list(valid)
    match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
    hint = f"did you mean '{prefix}{match[0]}'? " if match else ""
    return f"{hint}valid: {', '.join(prefix + v for v in valid)}"


@dataclass
class TransformerConfig:
    """Every architectural choice of the model; validated on construction.

    Example:
        >>> cfg = TransformerConfig(vocab_size=65, d_model=128, n_heads=4, n_kv_heads=1)
        >>> cfg.head_dim, cfg.d_ff
        (32, 384)
    """

    vocab_size: int = 256
    block_size: int = 256          # longest sequence the model attends over
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); 1: MQA; between: GQA
    d_ff: Optional[int] = None     # None: 4*d_model, or ~8/3*d_model for gated MLPs
    dropout: float = 0.0
    bias: bool = False
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True
    pos_encoding: str = "rope"     # rope | learned | none | a registered one (register_position)
    rotary_pct: float = 1.0        # fraction of each head's dims that are rotated
    rope_theta: float = 10000.0
    activation: str = "swiglu"     # swiglu | geglu | gelu | relu | silu | a registered one
    tie_weights: bool = True
    init_std: float = 0.02
    causal: bool = True            # False: every position attends to every other (an encoder)
    head: str = "lm"               # lm | classification | regression (see section 8)
    num_classes: Optional[int] = None  # classification: the number of labels
    output_dim: int = 1            # regression: values predicted per sequence (or per position)
    pooling: str = "last"          # classification/regression: last | mean | cls | none
    attention_window: Optional[int] = None  # Mistral's sliding window: each token sees the last W positions
    attention: str = "standard"    # a registered attention (see register_attention)
    n_encoder_layers: Optional[int] = None  # Seq2SeqTransformer: None = n_layers
    n_decoder_layers: Optional[int] = None  # Seq2SeqTransformer: None = n_layers
    tgt_vocab_size: Optional[int] = None    # Seq2SeqTransformer: None = vocab_size, one shared embedding
    input_dim: Optional[int] = None  # feature vectors of this size per step (time series) instead of token ids
    patch_len: int = 1             # feature inputs: steps per token (PatchTST's patches)
    revin: bool = False            # feature inputs: normalize each series by its own mean/std (RevIN)
    channel_independent: bool = False  # head=forecast: each channel a univariate series, shared weights (PatchTST)
    horizon: Optional[int] = None  # head=forecast: steps predicted at once, (B, horizon, output_dim)
    ngram_buckets: int = 0         # token classifiers/regressors: hashed embeddings of the 2..4 tokens ending
                                   # at each position, this many rows per n (0: off; see NgramEmbedding)
    max_seq_len: InitVar[Optional[int]] = None   # another name for block_size (the design documents')

    def __post_init__(self, max_seq_len=None):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TransformerConfig: {msg}")

        if max_seq_len is not None:
            need(self.block_size in (256, max_seq_len),
                 f"max_seq_len={max_seq_len} and block_size={self.block_size} name the same thing; give one")
            self.block_size = max_seq_len

        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.norm in NORMS, f"norm={self.norm!r}; {closest(self.norm, NORMS)}")
        need(self.pos_encoding in POSITIONS,
             f"pos_encoding={self.pos_encoding!r}; {closest(self.pos_encoding, POSITIONS)}")
        need(self.activation in ACTIVATIONS,
             f"activation={self.activation!r}; {closest(self.activation, ACTIVATIONS)}")
        need(self.attention in ATTENTIONS, f"attention={self.attention!r} is not registered; "
             f"{closest(self.attention, ATTENTIONS)} (register_attention adds one)")
        need(self.d_model % self.n_heads == 0,
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        need(isinstance(self.n_kv_heads, int) and self.n_kv_heads > 0,
             f"n_kv_heads must be a positive integer, got {self.n_kv_heads!r}")
        need(self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.d_ff is None:
            # gated MLPs have three matrices, so ~2/3 of the width keeps the parameter count
            self.d_ff = (_round_up(8 * self.d_model // 3, 64) if self.activation in GATED
                         else 4 * self.d_model)
        need(isinstance(self.d_ff, int) and self.d_ff > 0,
             f"d_ff must be a positive integer, got {self.d_ff!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(0.0 < self.rotary_pct <= 1.0, f"rotary_pct={self.rotary_pct} must be in (0, 1]")
        if self.pos_encoding == "rope":
            need(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                 f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives "
                 f"{self.head_dim * self.rotary_pct:g} rotated dims; need an even number >= 2")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive")
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive")
        self._check_features(need)
        self._check_head(need)
        for name in ("n_encoder_layers", "n_decoder_layers", "tgt_vocab_size"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value > 0),
                 f"{name} must be a positive integer or null, got {value!r}")
        if self.attention_window is not None:
            W = self.attention_window
            need(isinstance(W, int) and 0 < W <= self.block_size,
                 f"attention_window={W!r} must be a whole number of positions in 1..block_size={self.block_size} "
                 f"(null: attend over the whole block)")
            need(self.causal, "attention_window is a causal (Mistral-style) window; it needs causal=True")

    def _check_features(self, need):
        need(self.input_dim is None or (isinstance(self.input_dim, int) and self.input_dim > 0),
             f"input_dim must be a positive integer or null (token ids), got {self.input_dim!r}")
        need(isinstance(self.patch_len, int) and self.patch_len > 0,
             f"patch_len must be a positive integer, got {self.patch_len!r}")
        need(isinstance(self.ngram_buckets, int) and self.ngram_buckets >= 0,
             f"ngram_buckets must be a whole number (0: off), got {self.ngram_buckets!r}")
        if self.input_dim is None:    # train.py sets input_dim from the data, as it sets vocab_size
            return
        if self.head == "lm":         # feature vectors have no vocabulary: predict values at every position
            self.head, self.pooling = "regression", "none"
        need(not self.channel_independent or (self.head == "forecast" and self.output_dim == self.input_dim),
             "channel_independent forecasts each channel from itself: it needs head=forecast and "
             f"output_dim=input_dim={self.input_dim}")
        need(not (self.revin and self.head == "forecast" and self.output_dim != self.input_dim),
             f"revin maps the forecast back with each input channel's statistics, so output_dim="
             f"{self.output_dim} must equal input_dim={self.input_dim}")

    def check_inputs_kind(self):
        """The options of one kind of input need that input (called when a model is built, once
        train.py has set the head from the task)."""
        if self.input_dim is None and (self.patch_len != 1 or self.revin or self.channel_independent):
            raise ValueError("TransformerConfig: patch_len, revin and channel_independent apply to feature "
                             "inputs (time series): set input_dim")
        # a decoding step sees only its new token, not the n - 1 before it that its n-grams need
        if self.ngram_buckets and (self.input_dim is not None or self.head not in ("classification", "regression")):
            kind = "reads feature vectors" if self.input_dim else f"has head={self.head}"
            raise ValueError(f"TransformerConfig: ngram_buckets embeds n-grams of token ids for head=classification "
                             f"or regression; this model {kind}")

    def _check_head(self, need):
        need(self.head in HEADS, f"head={self.head!r}; {closest(self.head, HEADS)}")
        need(self.pooling in POOLINGS, f"pooling={self.pooling!r}; {closest(self.pooling, POOLINGS)}")
        if self.head == "classification":
            need(isinstance(self.num_classes, int) and self.num_classes >= 2,
                 f"head=classification needs num_classes >= 2, got {self.num_classes!r}")
        need(isinstance(self.output_dim, int) and self.output_dim > 0,
             f"output_dim must be a positive integer, got {self.output_dim!r}")
        if self.head == "forecast":
            need(isinstance(self.horizon, int) and self.horizon > 0,
                 f"head=forecast needs horizon, the steps to predict (a positive integer), got {self.horizon!r}")
            # each token is trained on the steps after it, which a bidirectional model has already seen
            need(self.causal or self.pooling != "none",
                 "head=forecast with pooling=none forecasts from every token, which needs causal=True "
                 "(a bidirectional token would see the steps it forecasts)")
        # RevIN's statistics cover the whole input, so an output at every position would see the future
        need(not (self.revin and self.causal and self.pooling == "none"),
             "revin normalizes with the whole series' mean and std, which a causal output at every "
             "position must not see; use pooling=last (or revin=false)")
        # position 0 of a causal model sees only itself, so a [CLS] slot there would learn nothing
        need(not (self.pooling == "cls" and self.causal),
             "pooling=cls needs causal=False (a causal model's first position sees only itself); "
             "use pooling=last or mean")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def token_features(self) -> int:
        """Numbers per input token of a model of feature vectors: patch_len steps of its channels."""
        return (1 if self.channel_independent else self.input_dim) * self.patch_len

    @property
    def max_steps(self) -> int:
        """Time steps a model of feature vectors reads at most: its tokens (less a [CLS] slot)
        times patch_len."""
        return (self.block_size - (self.pooling == "cls")) * self.patch_len

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct) // 2 * 2

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """Build from a plain dict, naming the closest valid key for unknown ones."""
        valid = [f.name for f in fields(cls)] + ["max_seq_len"]
        for key in d:
            if key not in valid:
                raise ValueError(f"TransformerConfig: unknown key '{key}'; {closest(key, valid)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TransformerConfig":
        """A named preset, optionally changed: `TransformerConfig.from_preset("tiny", vocab_size=65)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset '{name}'; {closest(name, PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


# Named model sizes. The four Llama-style sizes come from the original design
# documents; gpt2-124M is GPT-2 small (LayerNorm, learned positions, GELU, biases).
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_heads=4, n_layers=4, block_size=128),
    "small": dict(d_model=256, n_heads=8, n_layers=6, block_size=256),
    "medium": dict(d_model=512, n_heads=8, n_layers=12, block_size=512),
    "large": dict(d_model=768, n_heads=12, n_layers=24, block_size=1024),
    "gpt2-124M": dict(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, block_size=1024,
                      d_ff=3072, norm="layernorm", pos_encoding="learned", activation="gelu",
                      bias=True, tie_weights=True),
}

# =============================================================================
# 2. Norms
# =============================================================================


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 for stability (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype in (torch.float32, torch.float64):       # one fused kernel
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return y * self.weight


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

# =============================================================================
# 3. RoPE
# =============================================================================


def rope_tables(rotary_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, rotary_dim) in float64, in the "rotate half" layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (L, rd/2)
    angles = torch.cat([angles, angles], dim=-1)                                 # (L, rd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head of x (..., hd); the rest pass through.
    cos and sin broadcast against x[..., :rotary_dim]: (T, 1, rd) or, with a position per
    row, (B, T, 1, rd) for x of shape (B, T, H, hd)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot.chunk(2, dim=-1)
    (c1, c2), (s1, s2) = cos.chunk(2, dim=-1), sin.chunk(2, dim=-1)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] never built: a compiled
    # decode step then computes the rotation in one pass instead of storing that copy first
    out = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

# =============================================================================
# 4. KV cache
# =============================================================================


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated for (batch, max_len).

    `update(start, k, v)` writes the new positions and returns the keys and values of
    every position so far, so a step attends over the whole past without recomputing it.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.max_len = max_len
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; "
                             f"writing positions {start}..{end - 1} would overflow it")
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache was set up for batch {self.k.shape[0]}, got batch {k.shape[0]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def select(self, rows: torch.Tensor):
        """Keep (and repeat) batch rows in this order, e.g. the surviving beams."""
        self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)

    def key_positions(self, start: int, T: int) -> Optional[torch.Tensor]:
        """The positions of the keys update(start, ...) returns, (S,); None: 0..start+T-1."""
        return None


class RingKVCache(KVCache):
    """The KV cache of a sliding-window model: max_len slots (at least the window) reused in a
    ring, position p in slot p % max_len, so memory stays O(window) however long the text.

    A chunk of up to max_len - window + 1 tokens (one step, or a speculative check) is written
    first and every slot is returned: key_positions says which position each slot holds, and
    the mask hides the unwritten ones and those outside each query's window. The spare slots
    keep what a rewound speculation overwrote out of every later window. A longer chunk (a
    prompt) attends over the window before it plus itself, then leaves its last max_len
    positions in the ring.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, *, window: int,
                 dtype=torch.float32, device=None):
        if max_len < window:
            raise ValueError(f"a sliding-window cache needs at least window={window} slots, got {max_len}")
        super().__init__(batch_size, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.window = window

    def _in_place(self, T: int) -> bool:
        return T <= self.max_len - self.window + 1

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        T, R = k.shape[2], self.max_len
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache was set up for batch {self.k.shape[0]}, got batch {k.shape[0]}")
        if self._in_place(T):
            slots = torch.arange(start, start + T, device=k.device) % R
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            return self.k, self.v
        before = torch.arange(max(0, start - self.window + 1), start, device=k.device) % R
        keys = torch.cat([self.k.index_select(2, before), k], dim=2)       # (B, Hkv, S, hd), in order
        values = torch.cat([self.v.index_select(2, before), v], dim=2)
        n = min(T, R)
        slots = torch.arange(start + T - n, start + T, device=k.device) % R
        self.k.index_copy_(2, slots, k[:, :, -n:])
        self.v.index_copy_(2, slots, v[:, :, -n:])
        return keys, values

    def key_positions(self, start: int, T: int) -> torch.Tensor:
        end, R, device = start + T, self.max_len, self.k.device
        if self._in_place(T):   # slot s holds the latest position p < end with p = s (mod R); < 0: none yet
            return end - 1 - (end - 1 - torch.arange(R, device=device)) % R
        return torch.arange(max(0, start - self.window + 1), end, device=device)

# =============================================================================
# 5. Attention
# =============================================================================


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, causal: bool,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) under the mask SDPA is given (True = attend), or the
    causal mask, aligned to the last query, where it is given none: (B, H, T, S). Fewer key
    heads (GQA, MQA) are repeated to the query heads.

        >>> w = attention_weights(torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), causal=True)
        >>> w.shape, w[0, 0, 0].tolist()[1:]
        (torch.Size([1, 2, 3, 3]), [0.0, 0.0])
    """
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)      # (B, H, S, hd)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5       # (B, H, T, S)
    T, S = scores.shape[-2:]
    if mask is None and causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention, causal or bidirectional; n_kv_heads < n_heads gives GQA (1: MQA).

    `weights`: None, or a list that each forward appends its attention weights (B, H, T, S) to,
    computed apart from SDPA (which never returns them): see Backbone.get_attention_weights.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_dim = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, qkv_dim, bias=cfg.bias)   # one matmul for q, k, v
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout, self.causal = cfg.dropout, cfg.causal
        self.kv_cache: Optional[KVCache] = None
        self.weights: Optional[list] = None

    def forward(self, x, rope=None, start_pos=None, mask=None):
        B, T, _ = x.shape
        H, hd, nkv = self.n_heads, self.head_dim, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * nkv, hd)      # (B, T, H + 2*Hkv, hd)
        qk, v = qkv.split([H + nkv, nkv], dim=2)
        if rope is not None:                                 # q and k rotated in one pass
            cos, sin = rope
            qk = apply_rope(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))
        q, k = qk.split([H, nkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if start_pos is not None:
            k, v = self.kv_cache.update(start_pos, k, v)     # (B, Hkv, S, hd)
        y = self.attend(q, k, v, mask)                       # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)           # (B, T, C)
        return self.wo(y)

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(hd)) v for q (B, H, T, hd) and k, v (B, Hkv, S, hd) under the
        SDPA mask (True = attend; None: causal, or everything). A registered attention
        overrides this: changing the mask and calling it keeps the weights on request right."""
        if self.weights is not None:
            self.weights.append(attention_weights(q, k, causal=self.causal, mask=mask))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None and q.shape[2] > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=k.shape[1] != q.shape[1])


ATTENTIONS["standard"] = SelfAttention


def _register(registry: dict, kind: str, name: str, obj, built_in):
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} needs a non-empty name, got {name!r}")
    if name in built_in:
        raise ValueError(f"{kind} '{name}' is built in; register yours under another name")
    registry[name] = obj
    return obj


def register_attention(name: str, cls=None):
    """Make an attention available as TransformerConfig(attention=name): cls(config) -> a module
    like SelfAttention, usually a subclass overriding attend(q, k, v, mask). Use it as a call
    or a class decorator. Register before building or loading a model that names it.

        >>> @register_attention("local4")
        ... class Local(SelfAttention):
        ...     def attend(self, q, k, v, mask):
        ...         _, mask = positions_and_mask(k.shape[2] - q.shape[2], q.shape[2], window=4, device=q.device)
        ...         return super().attend(q, k, v, mask)
        >>> Transformer(vocab_size=10, d_model=16, n_heads=2, n_layers=1, attention="local4").blocks[0].attn.__class__.__name__
        'Local'
    """
    if cls is None:
        return lambda c: register_attention(name, c)
    return _register(ATTENTIONS, "attention", name, cls, ("standard",))


def register_position(name: str, factory=None):
    """Make a position encoding available as pos_encoding=name: factory(config) -> a module whose
    forward(x (B, T, C), pos ((T,) or (B, T))) returns the embeddings with positions added."""
    if factory is None:
        return lambda f: register_position(name, f)
    return _register(POSITIONS, "position encoding", name, factory, ("rope", "learned", "none"))


def register_activation(name: str, fn=None, *, gated: bool = False):
    """Make an activation available as activation=name: fn(tensor) -> tensor; gated=True puts it
    in a gated MLP (w2(fn(w1 x) * w3 x), as SwiGLU)."""
    if fn is None:
        return lambda f: register_activation(name, f, gated=gated)
    _register(ACTIVATIONS, "activation", name, fn, ("swiglu", "geglu", "gelu", "relu", "silu"))
    (GATED.add if gated else GATED.discard)(name)
    return fn

# =============================================================================
# 6. FeedForward
# =============================================================================


class FeedForward(nn.Module):
    """Gated (SwiGLU, GeGLU: w2(act(w1 x) * w3 x)) or plain (w2(act(w1 x))) MLP."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.activation in GATED else None
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        h = self.act(self.w1(x))                 # (B, T, d_ff)
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)

# =============================================================================
# 7. Block
# =============================================================================


class Block(nn.Module):
    """Attention then MLP, each in a residual branch; norm before (pre) or after (post)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = ATTENTIONS[cfg.attention](cfg)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, start_pos=None, mask=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), rope, start_pos, mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, start_pos, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))

# =============================================================================
# 8. Model: a backbone (inputs -> blocks -> final norm) with a head on top
# =============================================================================


def positions_and_mask(start: int, T: int, *, causal: bool = True, pad: Optional[torch.Tensor] = None,
                       attention_mask: Optional[torch.Tensor] = None, window: Optional[int] = None,
                       keys: Optional[torch.Tensor] = None, device=None):
    """Positions of T slots from start, (T,) or (B, T) for padded rows, and the attention mask
    for SDPA (True = attend), or None where is_causal (or nothing) will do.

    pad: (B,) left-padding lengths (generation, with a KV cache).
    attention_mask: (B, T), true at real tokens, padding anywhere (training, no cache).
    Either way a row's positions count from its first real token, so it computes what it
    would alone; a padding slot sees only itself (its output is never used, but a row with
    nothing to attend to would be NaN).
    window: a query sees only keys fewer than `window` slots back (a sliding window).
    keys: (S,) the slot of each cached key (a RingKVCache's key_positions; negative: empty);
    default 0..start+T-1.

        >>> positions_and_mask(0, 3, attention_mask=torch.tensor([[1, 1, 0]]))[0].tolist()
        [[0, 1, 1]]
        >>> positions_and_mask(0, 3, window=2)[1].int().tolist()
        [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    if attention_mask is not None:
        real = attention_mask.to(device=device, dtype=torch.bool)                  # (B, T)
        visible = real[:, None, :] & _seen(torch.arange(T, device=device), torch.arange(T, device=device),
                                           causal, window)                         # (B, T, S=T)
        visible = visible | torch.eye(T, dtype=torch.bool, device=device)
        return (real.long().cumsum(1) - 1).clamp(min=0), visible[:, None]          # (B, T), (B, 1, T, T)
    slots = torch.arange(start, start + T, device=device)
    seen = _seen(slots, torch.arange(start + T, device=device) if keys is None else keys, causal, window)
    if pad is None:   # is_causal, or nothing, does where every query sees every key up to itself
        whole = causal and keys is None and (window is None or start + T <= window)
        return slots, (None if not causal or (whole and (start == 0 or T == 1)) else seen)
    keys = torch.arange(start + T, device=device) if keys is None else keys        # (S,)
    visible = (keys >= pad[:, None, None]) | (keys == slots[:, None])              # (B, T, S)
    return (slots - pad[:, None]).clamp(min=0), (seen & visible)[:, None]          # (B, T), (B, 1, T, S)


def _seen(slots: torch.Tensor, keys: torch.Tensor, causal: bool, window: Optional[int]) -> torch.Tensor:
    """(T, S): may the query at each slot see the key at each slot (ignoring padding)?"""
    seen = (keys >= 0) & (keys <= slots[:, None]) if causal else torch.ones(
        len(slots), len(keys), dtype=torch.bool, device=slots.device)
    return seen if window is None else seen & (slots[:, None] - keys < window)


def patches(x: torch.Tensor, attention_mask: Optional[torch.Tensor], patch_len: int):
    """Feature series (B, T, F) -> tokens (B, N, patch_len * F), N = ceil(T / patch_len): each
    token is patch_len consecutive steps (PatchTST), padding steps zero-filled (so a padded row
    makes the tokens it would alone); a token is real where any of its steps is. The mask (B, T)
    becomes (B, N).

        >>> x, m = patches(torch.arange(5.).view(1, 5, 1), torch.tensor([[1, 1, 1, 0, 0]]), 2)
        >>> x.tolist(), m.tolist()
        ([[[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]]], [[True, True, False]])
    """
    if patch_len == 1:
        return x, attention_mask
    if attention_mask is not None:
        x = x * attention_mask[..., None].to(x.dtype)
    B, T, F_ = x.shape
    N = -(-T // patch_len)
    x = F.pad(x, (0, 0, 0, N * patch_len - T)).reshape(B, N, patch_len * F_)
    return x, patch_mask(attention_mask, patch_len)


def patch_mask(attention_mask: Optional[torch.Tensor], patch_len: int) -> Optional[torch.Tensor]:
    """A mask over steps (B, T) as one over patches (B, ceil(T / patch_len)): real where any step is."""
    if attention_mask is None or patch_len == 1:
        return attention_mask
    B, T = attention_mask.shape
    N = -(-T // patch_len)
    return F.pad(attention_mask.bool(), (0, N * patch_len - T)).view(B, N, patch_len).any(-1)


def series_stats(x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, eps: float = 1e-5):
    """RevIN's statistics of each series x (B, T, F) over its real steps: mean and std, (B, 1, F).

        >>> [t.flatten().tolist() for t in series_stats(torch.tensor([[[1.], [3.], [9.]]]), torch.tensor([[1, 1, 0]]))]
        [[2.0], [1.0000050067901611]]
    """
    real = (torch.ones(x.shape[:2], device=x.device) if attention_mask is None
            else attention_mask.to(device=x.device, dtype=x.dtype))[..., None]     # (B, T, 1)
    n = real.sum(1, keepdim=True).clamp(min=1)
    mean = (x * real).sum(1, keepdim=True) / n
    var = ((x - mean) ** 2 * real).sum(1, keepdim=True) / n
    return mean, (var + eps).sqrt()


def pool(h: torch.Tensor, how: str, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One vector per sequence from hidden states h (B, T, C), over its real positions only:
    the last one, their mean, position 0 (cls), or every position side by side (flatten,
    (B, T * C), PatchTST's head; padding contributes zeros); `none` keeps every position.

        >>> pool(torch.arange(6.).view(1, 3, 2), "mean", torch.tensor([[1, 1, 0]])).tolist()
        [[1.0, 2.0]]
    """
    if how == "none":
        return h
    if how == "cls":
        return h[:, 0]
    real = (torch.ones(h.shape[:2], device=h.device) if attention_mask is None
            else attention_mask.to(device=h.device, dtype=h.dtype))               # (B, T)
    if how == "mean":
        return (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
    if how == "flatten":
        return (h * real[..., None]).flatten(1)
    last = (real.long() * torch.arange(h.shape[1], device=h.device)).argmax(1)     # (B,): the last real slot
    return h[torch.arange(h.shape[0], device=h.device), last]


class PooledHead(nn.Module):
    """Classification logits or regression values from hidden states: pool, then a linear layer.
    (B, T, C) -> (B, out), or (B, T, out) with pooling=none (an output per position)."""

    def __init__(self, d_model: int, out_dim: int, pooling: str, *, positions: int = 1, **factory):
        super().__init__()
        self.pooling, self.positions = pooling, positions
        self.proj = nn.Linear(d_model * (positions if pooling == "flatten" else 1), out_dim, **factory)

    def forward(self, h, attention_mask=None):
        if self.pooling == "flatten" and h.shape[1] < self.positions:   # shorter inputs: zeros after them
            pad = self.positions - h.shape[1]
            real = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if attention_mask is None else attention_mask
            h, attention_mask = F.pad(h, (0, 0, 0, pad)), F.pad(real.bool(), (0, pad))
        return self.proj(pool(h, self.pooling, attention_mask))


def init_module(module: nn.Module, std: float):
    """N(0, std) for the weights of linear and embedding layers, zero biases (apply it with
    module.apply)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_weights(model: nn.Module):
    """GPT-2's initialization: N(0, init_std) for linear and embedding weights, zero biases, and
    the residual projections scaled down with depth so the stream's variance stays O(1)."""
    cfg = model.config
    model.apply(lambda m: init_module(m, cfg.init_std))
    for name, p in model.named_parameters():
        if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
            nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))


def check_inputs(cfg: TransformerConfig, idx: torch.Tensor, start: int, *, cache, cached: bool,
                 pad=None, attention_mask=None) -> None:
    """The errors a forward pass can raise about its inputs, before any work."""
    T = idx.shape[1]
    if start + T > cfg.block_size and not isinstance(cache, RingKVCache):   # a ring slides past block_size
        cls = cfg.pooling == "cls"
        if cfg.input_dim is not None:
            most = cfg.max_steps
            raise ValueError(f"a series of {T * cfg.patch_len} steps is longer than the model's {most} (block_size="
                             f"{cfg.block_size} tokens of patch_len={cfg.patch_len}); crop it to its last {most} steps")
        raise ValueError(f"sequence of {start + T} positions is longer than block_size={cfg.block_size}; "
                         f"crop the input to the last {cfg.block_size - cls} tokens")
    if cached and cache is None:
        raise RuntimeError("start_pos needs a KV cache: call model.setup_cache(batch_size) first")
    if pad is not None and attention_mask is not None:
        raise ValueError("give pad (left padding, with a KV cache) or attention_mask, not both")
    if attention_mask is not None and attention_mask.shape != idx.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; the input has {tuple(idx.shape)}")


def make_cache(cfg: TransformerConfig, batch_size: int, max_len: Optional[int], *, dtype, device,
               cache_cls: type = KVCache) -> KVCache:
    """One attention layer's cache: for up to max_len positions (default block_size), or for a
    sliding-window model without learned positions a RingKVCache of max_len slots (default the
    window), which decodes past block_size."""
    if cfg.attention_window and cfg.pos_encoding != "learned" and cache_cls is KVCache:
        return RingKVCache(batch_size, max_len or cfg.attention_window, cfg.n_kv_heads, cfg.head_dim,
                           window=cfg.attention_window, dtype=dtype, device=device)
    max_len = max_len or cfg.block_size
    if max_len > cfg.block_size:
        raise ValueError(f"max_len={max_len} exceeds block_size={cfg.block_size}")
    return cache_cls(batch_size, max_len, cfg.n_kv_heads, cfg.head_dim, dtype=dtype, device=device)


class NgramEmbedding(nn.Module):
    """Hashed n-gram embeddings: for n = 2..4, the n tokens ending at each position are hashed
    into one of `buckets` rows of that n's table, and the three rows are summed (B, T, C). Added
    to the token embeddings, they give each position its local spelling or phrase as one vector,
    as fastText's hashed n-grams and the Byte Latent Transformer's byte n-grams do. Positions
    before the first token, and padding (real = 0), hash as a token of their own, so a padded
    row embeds exactly as it does alone.

        >>> emb = NgramEmbedding(1000, 8)
        >>> emb(torch.tensor([[5, 6, 7]])).shape
        torch.Size([1, 3, 8])
    """

    ORDERS = (2, 3, 4)
    PRIME, MODULUS = 1_000_003, (1 << 31) - 1       # hash * PRIME stays below 2**51: no int64 overflow

    def __init__(self, buckets: int, d_model: int):
        super().__init__()
        self.buckets = buckets
        self.tables = nn.ModuleList(nn.Embedding(buckets, d_model) for _ in self.ORDERS)

    def forward(self, idx: torch.Tensor, real: Optional[torch.Tensor] = None) -> torch.Tensor:
        ids = idx + 1 if real is None else (idx + 1) * real.to(idx.device).long()   # 0: no token
        h, out = ids, 0
        for n, table in zip(self.ORDERS, self.tables):
            before = F.pad(ids, (n - 1, 0))[:, :idx.shape[1]]       # the token n - 1 steps back
            h = (h * self.PRIME + before) % self.MODULUS               # the hash of the n tokens ending here
            out = out + table(h % self.buckets)
        return out


class Backbone(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, d_model): embeddings, blocks, final norm.

    `hidden_states(idx)` checks its inputs and builds positions and the attention mask;
    `encode(idx, pos, mask)` is the computation itself. The KV cache lives in each
    attention layer (setup_cache); causal=False makes an encoder, which has none.
    """

    def __init__(self, config: TransformerConfig, *, block_cls: type = None):
        super().__init__()
        self.config = cfg = config
        cfg.check_inputs_kind()
        features = cfg.input_dim is not None     # time series: a linear projection of each (patch of) step(s)
        self.tok_emb = None if features else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.in_proj = nn.Linear(cfg.token_features, cfg.d_model) if features else None
        self.ngram_emb = NgramEmbedding(cfg.ngram_buckets, cfg.d_model) if cfg.ngram_buckets else None
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_encoding == "learned" else None
        plugin = POSITIONS[cfg.pos_encoding]           # a registered position encoding
        self.positions = plugin(cfg) if plugin is not None else None
        # a learned [CLS] vector before the first token, for pooling=cls
        self.cls_emb = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.pooling == "cls" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList((block_cls or Block)(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg) if cfg.pre_norm else nn.Identity()  # post-norm output is normed already
        # RoPE tables per (device, dtype), derived from float64 ones: not buffers, so that
        # model.to(torch.bfloat16) cannot round the float64 master copy.
        self._rope: dict = {}
        self._rope_len = 0          # positions the tables cover beyond block_size (a sliding window's decoding)
        self.gradient_checkpointing = False

    @property
    def input_layer(self) -> nn.Module:
        return self.tok_emb if self.in_proj is None else self.in_proj

    @property
    def device(self) -> torch.device:
        return self.input_layer.weight.device        # the input layer is never quantized

    def hidden_states(self, idx: torch.Tensor, *, start_pos: Optional[int] = None,
                      pad: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states (B, T, d_model) for token ids idx (B, T), or for features (B, T, input_dim)
        (then T / patch_len tokens, rounded up); with pooling=cls, (B, 1 + T, C), the [CLS] slot
        first. Options as in Transformer.forward.

            >>> model = Transformer(vocab_size=10, d_model=16, n_heads=2, n_layers=1)
            >>> model.hidden_states(torch.tensor([[1, 2, 3]])).shape
            torch.Size([1, 3, 16])
        """
        if self.in_proj is not None:
            idx, attention_mask = self.feature_tokens(idx, attention_mask)
        B, T = idx.shape[:2]
        start, cls = start_pos or 0, self.cls_emb is not None
        cache = self.blocks[0].attn.kv_cache if start_pos is not None else None
        check_inputs(self.config, idx, start + cls, cache=cache, cached=start_pos is not None, pad=pad,
                     attention_mask=attention_mask)
        tokens_mask = attention_mask                                  # (B, T): which tokens are real
        if cls:
            real = (torch.ones(idx.shape[:2], dtype=torch.bool, device=idx.device) if attention_mask is None
                    else attention_mask.bool())
            attention_mask = torch.cat([real.new_ones(B, 1), real], dim=1)
        if start + T > max(self.config.block_size, self._rope_len):   # a ring cache slides past block_size
            self._rope_len, self._rope = 2 * (start + T), {}          # longer RoPE tables, doubling
        pos, mask = positions_and_mask(start, T + cls, causal=self.config.causal, pad=pad,
                                       attention_mask=attention_mask, window=self.config.attention_window,
                                       keys=cache.key_positions(start, T) if cache is not None else None,
                                       device=idx.device)
        return self.encode(idx, pos, mask, start_pos=start_pos, real=tokens_mask)

    def feature_tokens(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        """Feature inputs (B, T, input_dim) as tokens (B, N, patch_len * input_dim) and their mask."""
        cfg = self.config
        channels = 1 if cfg.channel_independent else cfg.input_dim
        if x.dim() != 3 or x.shape[-1] != channels:
            raise ValueError(f"the model reads feature vectors (batch, steps, input_dim={channels}); "
                             f"got a tensor of shape {tuple(x.shape)}")
        if attention_mask is not None and attention_mask.shape != x.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; the input has "
                             f"{tuple(x.shape[:2])} steps")
        return patches(x, attention_mask, cfg.patch_len)

    def get_attention_weights(self, idx: torch.Tensor, **options) -> list[torch.Tensor]:
        """Every layer's attention weights, a list of (B, n_heads, T, S) tensors (S = T, or the
        cached positions plus T with start_pos), for token ids idx and the options of
        hidden_states (attention_mask, pad, start_pos). Rows sum to 1; masked keys (the future
        of a causal model, padding) get exactly 0; GQA/MQA key heads are expanded to the query
        heads; with pooling=cls slot 0 is [CLS]. Attention dropout is not applied. The model's
        own forward stays on SDPA: the weights are computed only here.

            >>> model = Transformer(vocab_size=10, d_model=16, n_heads=2, n_layers=3)
            >>> [w.shape for w in model.get_attention_weights(torch.tensor([[1, 2, 3]]))][0]
            torch.Size([1, 2, 3, 3])
        """
        layers = [block.attn for block in self.blocks]
        for attn in layers:
            attn.weights = []
        try:
            self.hidden_states(idx, **options)
            if any(not attn.weights for attn in layers):
                raise ValueError(f"attention '{self.config.attention}' does not record its weights (its attend "
                                 f"does not end in SelfAttention.attend)")
            return [attn.weights[0] for attn in layers]
        finally:
            for attn in layers:
                attn.weights = None

    def encode(self, idx, pos, mask, *, start_pos=None, real=None) -> torch.Tensor:
        """The backbone at positions pos ((T,) or (B, T)) under an SDPA mask (or None); real:
        the (B, T) mask of real tokens, if any."""
        x = self.input_layer(idx)                                   # (B, T, C)
        if self.ngram_emb is not None:
            x = x + self.ngram_emb(idx, real)
        if self.cls_emb is not None:
            x = torch.cat([self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        if self.positions is not None:
            x = self.positions(x, pos)
        x = self.drop(x)
        rope = None
        if self.config.pos_encoding == "rope":
            cos, sin = self._rope_tables(x.device, x.dtype)
            rope = cos[pos], sin[pos]                               # (T, rd) or (B, T, rd)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and start_pos is None
        for block in self.blocks:   # recompute: autograd keeps only the block's input and reruns it in backward
            x = (checkpoint(block, x, rope, None, mask, use_reentrant=False) if recompute
                 else block(x, rope, start_pos, mask))
        return self.norm_f(x)                                       # (B, T, C)

    def _rope_tables(self, device, dtype):
        key = (device, dtype)
        if key not in self._rope:   # computed in float64 once per (device, dtype), then rounded once
            cfg = self.config
            tables = rope_tables(cfg.rotary_dim, max(cfg.block_size, self._rope_len), cfg.rope_theta)
            self._rope[key] = tuple(t.to(device=device, dtype=dtype) for t in tables)
        return self._rope[key]

    def setup_cache(self, batch_size: int, max_len: Optional[int] = None, *, dtype=None, device=None,
                    cache_cls: type = KVCache):
        """Allocate a KV cache (cache_cls: KVCache or a subclass) in every attention layer for up
        to max_len positions (see make_cache: a sliding-window model gets a ring)."""
        if not self.config.causal:
            raise ValueError("a bidirectional model (causal=False) has no incremental decoding")
        for block in self.blocks:
            block.attn.kv_cache = make_cache(self.config, batch_size, max_len, cache_cls=cache_cls,
                                             dtype=dtype or self.input_layer.weight.dtype, device=device or self.device)

    def select_cache_rows(self, rows: torch.Tensor):
        """Reorder every layer's KV cache along the batch: row i becomes old row rows[i]."""
        for block in self.blocks:
            block.attn.kv_cache.select(rows)

    def clear_cache(self):
        """Drop the KV caches (frees their memory)."""
        for block in self.blocks:
            block.attn.kv_cache = None

    def set_dropout(self, p: float):
        """Set the probability of every dropout (embeddings, residual branches, attention
        weights), e.g. model.set_dropout(0.0); config.dropout keeps the built-with value."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout={p} must be in [0, 1)")
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, SelfAttention):
                m.dropout = p

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each block in backward instead of keeping its activations (training only):
        the same loss and gradients, far less memory, about one more forward of compute."""
        self.gradient_checkpointing = enabled


class Transformer(Backbone):
    """The backbone with a head: by default a language model, token ids (B, T) -> logits
    (B, T, vocab_size); head=classification gives (B, num_classes) and head=regression
    (B, output_dim), pooled over each sequence (per position with pooling=none).

    Build it from a config or from keyword arguments:
        >>> model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=65))
        >>> model = Transformer(vocab_size=65, d_model=64, n_heads=4, n_layers=2)

    Incremental decoding with the KV cache:
        >>> _ = model.eval(); model.setup_cache(batch_size=1)
        >>> prompt = torch.tensor([[1, 2, 3]])
        >>> logits = model(prompt, start_pos=0)                   # prefill, (1, 3, 65)
        >>> logits = model(torch.tensor([[4]]), start_pos=3)      # one step, (1, 1, 65)

    `model(idx, use_cache=True)` does the same bookkeeping for you: when idx
    extends the sequence of the previous call, only the new positions are
    computed, and the logits of those new positions are returned.

    A classifier over padded sequences (the mask is true at real tokens):
        >>> clf = Transformer(vocab_size=65, d_model=64, n_heads=4, n_layers=2, causal=False,
        ...                   head="classification", num_classes=3, pooling="mean")
        >>> clf(torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]])).shape
        torch.Size([1, 3])

    Training knobs, not architecture: set_dropout(p), set_gradient_checkpointing(enabled).
    """

    def __init__(self, config: Optional[TransformerConfig] = None, **kwargs):
        if config is None:
            config = TransformerConfig.from_dict(kwargs)
        elif kwargs:
            config = TransformerConfig.from_dict({**config.to_dict(), **kwargs})
        super().__init__(config)
        self._make_head(config)
        self._seen: Optional[torch.Tensor] = None   # tokens behind the cache, for use_cache=True
        init_weights(self)
        self.tie_weights()

    def _make_head(self, cfg: TransformerConfig, **factory):
        self.lm_head = self.head = None
        if cfg.head == "lm":
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False, **factory)
        else:
            per_step = 1 if cfg.channel_independent else cfg.output_dim
            out = {"classification": cfg.num_classes, "forecast": (cfg.horizon or 0) * per_step}.get(
                cfg.head, cfg.output_dim)
            self.head = PooledHead(cfg.d_model, out, cfg.pooling, positions=cfg.block_size, **factory)

    def set_head(self, **head) -> "Transformer":
        """Put a new head on this model's trained backbone, in place (HEAD_FIELDS: head,
        num_classes, output_dim, pooling, causal): e.g. fine-tune a language model as a
        classifier. The new head starts as a fresh model's would; the backbone keeps its weights.

            >>> lm = Transformer(vocab_size=65, d_model=64, n_heads=4, n_layers=2)
            >>> clf = lm.set_head(head="classification", num_classes=3, pooling="mean")
            >>> clf(torch.tensor([[1, 2, 3]])).shape
            torch.Size([1, 3])
        """
        other = sorted(set(head) - set(HEAD_FIELDS))
        if other:
            raise ValueError(f"set_head changes only {', '.join(HEAD_FIELDS)}; not {', '.join(other)}")
        cfg = TransformerConfig.from_dict({**self.config.to_dict(), **head})
        cfg.check_inputs_kind()
        ref = self.input_layer.weight
        factory = dict(device=ref.device, dtype=ref.dtype)
        self.config = cfg
        for block in self.blocks:
            block.attn.causal = cfg.causal
        self.cls_emb = nn.Parameter(torch.zeros(cfg.d_model, **factory)) if cfg.pooling == "cls" else None
        self._make_head(cfg, **factory)
        for module in (self.lm_head, self.head):
            if module is not None:
                module.apply(lambda m: init_module(m, cfg.init_std))
        self.tie_weights()
        return self

    def tie_weights(self):
        """Share the LM head's weight with the token embedding (tie_weights=True), again after
        loading with assign=True or swapping the head's module."""
        if self.config.tie_weights and isinstance(self.lm_head, nn.Linear) and self.tok_emb is not None:
            self.lm_head.weight = self.tok_emb.weight

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, *, start_pos: Optional[int] = None, use_cache: bool = False,
                pad: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head's output for token ids idx (B, T): LM logits (B, T, vocab_size), or the
        classification/regression head's (B, out) or (B, T, out).

        start_pos: write idx's keys/values into the KV cache (see setup_cache)
            at positions start_pos.. and attend over every cached position.
        use_cache: incremental decoding with automatic bookkeeping (see class doc).
        pad: (B,) left-padding lengths, for a batch of sequences of different lengths
            aligned on the right: the first pad[b] slots of row b (in the cache too) are
            hidden from attention, and its positions count from its first real token, so
            each row computes what it would alone.
        attention_mask: (B, T), true (or 1) at real tokens and false at padding, anywhere
            in the row (no cache): padding is hidden from attention and from pooling.
        """
        if use_cache:
            return self._forward_incremental(idx)
        cfg, stats = self.config, None
        if cfg.revin:                                                # each series on its own scale
            stats = series_stats(idx, attention_mask)                # mean, std: (B, 1, input_dim)
            idx = (idx - stats[0]) / stats[1]
        if cfg.channel_independent:    # every channel its own univariate series, through the same weights
            if idx.dim() != 3 or idx.shape[-1] != cfg.input_dim:
                raise ValueError(f"the model reads feature vectors (batch, steps, input_dim={cfg.input_dim}); "
                                 f"got a tensor of shape {tuple(idx.shape)}")
            B, T, C = idx.shape
            idx = idx.transpose(1, 2).reshape(B * C, T, 1)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(C, 0)
        h = self.hidden_states(idx, start_pos=start_pos, pad=pad, attention_mask=attention_mask)
        out = self.output(h, patch_mask(attention_mask, cfg.patch_len))
        if cfg.channel_independent:                                  # (B * C, H, 1) -> (B, H, C)
            out = out.view(B, C, *out.shape[1:-1]).movedim(1, -1)
        if stats is not None and cfg.head == "forecast":             # back to the series' own scale
            shape = (out.shape[0], *[1] * (out.dim() - 2), out.shape[-1])
            out = out * stats[1].view(shape) + stats[0].view(shape)
        return out

    def output(self, h: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head applied to hidden states h (B, T, C) (attention_mask: over tokens)."""
        if self.lm_head is not None:
            return self.lm_head(h)                                   # (B, T, vocab)
        if self.cls_emb is not None and attention_mask is not None:  # the [CLS] slot is real
            attention_mask = torch.cat([attention_mask.new_ones(h.shape[0], 1), attention_mask], dim=1)
        out = self.head(h, attention_mask)
        cfg = self.config
        if cfg.head == "forecast":                                   # (B, [T,] horizon, output_dim)
            out = out.unflatten(-1, (cfg.horizon, 1 if cfg.channel_independent else cfg.output_dim))
        return out

    def setup_cache(self, batch_size: int, max_len: Optional[int] = None, *, dtype=None, device=None,
                    cache_cls: type = KVCache):
        super().setup_cache(batch_size, max_len, dtype=dtype, device=device, cache_cls=cache_cls)
        self._seen = None

    def clear_cache(self):
        super().clear_cache()
        self._seen = None

    def _forward_incremental(self, idx):
        B, T = idx.shape
        seen = self._seen
        reuse = (seen is not None and self.blocks[0].attn.kv_cache is not None
                 and seen.shape[0] == B and seen.shape[1] < T
                 and torch.equal(idx[:, :seen.shape[1]], seen))
        n = seen.shape[1] if reuse else 0
        if not reuse:
            self.setup_cache(B)
        logits = self(idx[:, n:], start_pos=n)
        self._seen = idx.detach().clone()
        return logits

# =============================================================================
# 9. Encoder-decoder: the same blocks, with cross-attention in the decoder
# =============================================================================


class CrossAttention(nn.Module):
    """Decoder queries over the encoder's output (the memory). Its keys and values are
    projected once per source (set_memory) and kept, so a decoding step projects only its
    query; beams reorder them with the self-attention cache (select)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.kv = self.mask = None               # the memory's (k, v), (B, Hkv, S, hd); its (B, 1, 1, S) mask
        self.weights: Optional[list] = None

    def set_memory(self, memory: torch.Tensor, mask: Optional[torch.Tensor]):
        B, S, _ = memory.shape
        kv = self.wkv(memory).view(B, S, 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        self.kv, self.mask = kv.split(self.n_kv_heads, dim=1), mask

    def select(self, rows: torch.Tensor):
        self.kv = tuple(t.index_select(0, rows) for t in self.kv)
        self.mask = None if self.mask is None else self.mask.index_select(0, rows)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)   # (B, H, T, hd)
        k, v = self.kv
        if self.weights is not None:
            self.weights.append(attention_weights(q, k, causal=False, mask=self.mask))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))                     # (B, T, C)


class DecoderBlock(Block):
    """Causal self-attention, then cross-attention over the memory, then the MLP; each in a
    residual branch with its own norm, before (pre) or after (post), as torch.nn.TransformerDecoderLayer."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg)
        self.cross, self.cross_norm = CrossAttention(cfg), make_norm(cfg)

    def forward(self, x, rope=None, start_pos=None, mask=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), rope, start_pos, mask))
            x = x + self.drop(self.cross(self.cross_norm(x)))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, start_pos, mask)))
        x = self.cross_norm(x + self.drop(self.cross(x)))
        return self.norm2(x + self.drop(self.mlp(x)))


def seq2seq_configs(cfg: TransformerConfig) -> tuple[TransformerConfig, TransformerConfig]:
    """The encoder's config (bidirectional, n_encoder_layers, the source vocabulary) and the
    decoder's (causal, n_decoder_layers, the target vocabulary)."""
    enc = dataclasses.replace(cfg, causal=False, n_layers=cfg.n_encoder_layers or cfg.n_layers, head="lm",
                              pooling="last", attention_window=None)
    dec = dataclasses.replace(cfg, causal=True, n_layers=cfg.n_decoder_layers or cfg.n_layers, head="lm",
                              pooling="last", vocab_size=cfg.tgt_vocab_size or cfg.vocab_size)
    return enc, dec


class Seq2SeqTransformer(nn.Module):
    """An encoder-decoder from the same blocks: source ids (B, S) -> memory (B, S, C) through a
    bidirectional Backbone; target ids (B, T) -> logits (B, T, tgt_vocab) through a causal
    Backbone of DecoderBlocks that cross-attend to the memory; pre-norm stacks end in a norm.
    tgt_vocab_size=None shares one vocabulary and one embedding table;
    tie_weights ties the output head to the target embedding.

        >>> model = Seq2SeqTransformer(vocab_size=100, d_model=64, n_heads=4, n_layers=2)
        >>> model(torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (2, 5))).shape
        torch.Size([2, 5, 100])

    Decoding (generate.py's loops, through Seq2SeqDecoder): encode once, set_memory, then
    decoder.hidden_states with start_pos and a KV cache, as a language model decodes.
    """

    def __init__(self, config: Optional[TransformerConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = TransformerConfig.from_dict(kwargs)
        elif kwargs:
            config = TransformerConfig.from_dict({**config.to_dict(), **kwargs})
        self.config = config
        enc, dec = seq2seq_configs(config)
        self.encoder, self.decoder = Backbone(enc), Backbone(dec, block_cls=DecoderBlock)
        if config.tgt_vocab_size is None:
            self.decoder.tok_emb = self.encoder.tok_emb              # one vocabulary, one table
        self.lm_head = nn.Linear(config.d_model, dec.vocab_size, bias=False)
        init_weights(self)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_weights and isinstance(self.lm_head, nn.Linear):   # a quantized head keeps its codes
            self.lm_head.weight = self.decoder.tok_emb.weight
        if self.config.tgt_vocab_size is None:
            self.decoder.tok_emb = self.encoder.tok_emb

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_dropout(self, p: float):
        """As Transformer.set_dropout, in both stacks and the cross-attention."""
        for stack in (self.encoder, self.decoder):
            stack.set_dropout(p)
        for block in self.decoder.blocks:
            block.cross.dropout = p

    def set_gradient_checkpointing(self, enabled: bool = True):
        self.encoder.set_gradient_checkpointing(enabled)
        self.decoder.set_gradient_checkpointing(enabled)

    def encode(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The memory (B, S, C), given to every decoder layer's cross-attention (set_memory)."""
        memory = self.encoder.hidden_states(src, attention_mask=src_mask)
        mask = None if src_mask is None else src_mask.to(device=memory.device, dtype=torch.bool)[:, None, None, :]
        for block in self.decoder.blocks:
            block.cross.set_memory(memory, mask)
        return memory

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *, src_mask: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, tgt_vocab) after each target position. Masks are
        true at real tokens (right padding)."""
        self.encode(src, src_mask)
        return self.lm_head(self.decoder.hidden_states(tgt, attention_mask=tgt_mask))

    def step(self, tgt: torch.Tensor, *, start_pos: int, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits after target tokens at start_pos.., over the memory of the last encode and the
        decoder's KV cache (decoder.setup_cache)."""
        return self.lm_head(self.decoder.hidden_states(tgt, start_pos=start_pos, pad=pad))

    def select_rows(self, rows: torch.Tensor):
        """Row i continues old row rows[i]: the self-attention caches and the memory's keys and values."""
        self.decoder.select_cache_rows(rows)
        for block in self.decoder.blocks:
            block.cross.select(rows)

    def get_attention_weights(self, src, tgt, *, src_mask=None, tgt_mask=None) -> dict[str, list[torch.Tensor]]:
        """{'encoder', 'decoder', 'cross'}: each a list over layers of (B, H, T_query, T_key)."""
        crosses = [block.cross for block in self.decoder.blocks]
        for c in crosses:
            c.weights = []
        try:
            encoder = self.encoder.get_attention_weights(src, attention_mask=src_mask)
            self.encode(src, src_mask)
            decoder = self.decoder.get_attention_weights(tgt, attention_mask=tgt_mask)
            return {"encoder": encoder, "decoder": decoder, "cross": [c.weights[-1] for c in crosses]}
        finally:
            for c in crosses:
                c.weights = None

    def generate(self, src: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Seed 000's API: target ids (B, <= max_new_tokens) for source ids (B, S), sampled by
        generate.py's loops (options: temperature, top_k, top_p, min_p, repetition_penalty,
        num_beams, length_penalty, bos_id, eos_id, src_mask)."""
        import generate      # at call time: the loops live in generate.py, which imports this module
        return generate.seq2seq_generate(self, src, max_new_tokens, **options)

# =============================================================================
# 10. Surgery: LoRA and quantization
# =============================================================================
# Both swap nn.Linear modules of a built model for modules with the same in/out
# features (gpt-fast's approach), so nothing above this line knows they exist.

LORA_TARGETS = ("q", "k", "v", "o", "mlp")
QUANT_MODES = ("int8", "int4")


@dataclass
class LoRAConfig:
    """Low-rank adapters: W x + (alpha / r) B A x, with W frozen and A, B trained.

    r = 0 turns LoRA off. targets name projections: q, k, v (slices of the fused
    wqkv, each with its own adapter), o (attention output) and mlp (w1, w2, w3).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = [t.strip() for item in self.targets for t in item.split(",") if t.strip()]
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"lora.targets: unknown target '{t}'; {closest(t, LORA_TARGETS)}")
        if not (isinstance(self.r, int) and self.r >= 0):
            raise ValueError(f"lora.r={self.r!r} must be an integer >= 0 (0 turns LoRA off)")
        if self.r and not self.targets:
            raise ValueError(f"lora.targets is empty; choose from {', '.join(LORA_TARGETS)}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")
        off = [f"lora.{f.name}" for f in dataclasses.fields(self) if f.name != "r" and getattr(self, f.name) != (
            f.default_factory() if f.default is dataclasses.MISSING else f.default)]
        if not self.r and off:
            raise ValueError(f"{', '.join(off)}: LoRA is off (lora.r=0); set lora.r to train adapters")


@dataclass
class QuantConfig:
    """Weight-only quantization of the linear layers: int8 per output channel, or
    int4 in groups of group_size input columns. mode None keeps float weights."""

    mode: Optional[str] = None
    group_size: int = 64
    int8_kernel: Optional[bool] = None   # None: by the device (Int8Linear); true/false forces it

    def __post_init__(self):
        if self.mode is not None and self.mode not in QUANT_MODES:
            raise ValueError(f"quantize mode {self.mode!r}; {closest(str(self.mode), QUANT_MODES)}")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"quantize group_size={self.group_size}; valid: 32, 64, 128, 256")
        if self.group_size != QuantConfig.group_size and self.mode != "int4":
            raise ValueError(f"quantize group_size={self.group_size} is an int4 option (the mode here is "
                             f"{self.mode}); int8 keeps one scale per output row")

    def stored(self) -> dict:
        """What a checkpoint records: the weights' format (the kernel choice is the runtime's)."""
        return {"mode": self.mode, "group_size": self.group_size}

    @classmethod
    def from_stored(cls, stored: dict) -> "QuantConfig":
        """The config stored() wrote; the group size older int8 files recorded is dropped."""
        return cls(stored["mode"], stored["group_size"] if stored["mode"] == "int4" else cls.group_size)


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B A dropout(x). B starts at zero, so a fresh adapter
    changes nothing. `segments` are output slices [lo, hi) that each get their own
    A and B: q, k and v of a fused wqkv behave as three separately adapted layers."""

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
                 segments: Optional[list[tuple[int, int]]] = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.segments = segments or [(0, base.out_features)]
        self.r, self.scaling = r, alpha / r
        kw = dict(device=next(iter([*base.parameters(), *base.buffers()])).device)
        self.lora_A = nn.Parameter(torch.empty(len(self.segments) * r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(sum(hi - lo for lo, hi in self.segments), r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))    # nn.Linear's (and PEFT's) init
        self.dropout = nn.Dropout(dropout)

    def _full_B(self) -> torch.Tensor:
        """B as one (out_features, n_segments * r) block matrix: zero outside the segments."""
        if self.segments == [(0, self.out_features)]:
            return self.lora_B
        B = self.lora_B.new_zeros(self.out_features, len(self.segments) * self.r)
        row = 0
        for j, (lo, hi) in enumerate(self.segments):
            B[lo:hi, j * self.r:(j + 1) * self.r] = self.lora_B[row:row + hi - lo]
            row += hi - lo
        return B

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A, the change the adapter makes to the weight: (out, in)."""
        return self.scaling * self._full_B() @ self.lora_A

    def forward(self, x):
        a = self.dropout(x) @ self.lora_A.to(x.dtype).T                  # (..., n*r)
        return self.base(x) + self.scaling * (a @ self._full_B().to(x.dtype).T)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this module computes (dropout aside)."""
        base = self.base
        weight = base.weight if isinstance(base, nn.Linear) else base.dequantize()
        bias = base.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                        device=weight.device, dtype=self.lora_A.dtype)
        with torch.no_grad():
            out.weight.copy_(weight.float() + self.delta_weight())
            if bias is not None:
                out.bias.copy_(bias)
        return out


def _swap(model: nn.Module, make) -> int:
    """Replace each child module m (found by a depth-first walk) with make(path, m) when
    that returns a module; returns how many were replaced."""
    count = 0
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = make(f"{path}.{name}" if path else name, child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def apply_lora(model: "Transformer", cfg: LoRAConfig) -> int:
    """Freeze every weight of the model and add adapters to cfg.targets; returns the
    number of trainable parameters. A classification or regression head is new to the
    task, so it stays trainable and is saved with the adapters (as PEFT's modules_to_save).

        >>> model = Transformer(vocab_size=16, d_model=32, n_heads=4, n_layers=2)
        >>> apply_lora(model, LoRAConfig(r=4, targets=["q", "v"]))
        1024
    """
    if cfg.r <= 0:
        raise ValueError("apply_lora needs lora.r > 0")
    model.requires_grad_(False)
    c = model.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    slices = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    wanted = {"attn.wqkv": [slices[t] for t in "qkv" if t in cfg.targets],
              "attn.wo": [None] if "o" in cfg.targets else [],
              # an encoder-decoder's cross-attention: q from the decoder, k and v from the memory
              "cross.wq": [None] if "q" in cfg.targets else [],
              "cross.wkv": [{"k": (0, kv), "v": (kv, 2 * kv)}[t] for t in "kv" if t in cfg.targets],
              "cross.wo": [None] if "o" in cfg.targets else [],
              **{f"mlp.{w}": [None] if "mlp" in cfg.targets else [] for w in ("w1", "w2", "w3")}}

    def make(path, module):     # blocks.N.<name>, or encoder./decoder.blocks.N.<name>
        inside = re.match(r"(?:\w+\.)?blocks\.\d+\.(.+)$", path)
        segments = wanted.get(inside[1]) if inside else None
        if segments and not isinstance(module, LoRALinear):
            return LoRALinear(module, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                              segments=None if segments == [None] else segments)
        return None

    _swap(model, make)
    for name, p in model.named_parameters():
        p.requires_grad_(_task_owned(name) or p.requires_grad)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _task_owned(name: str) -> bool:
    """A task head's weights and the [CLS] vector: new to the task, trained in full beside adapters."""
    return name.startswith("head.") or name == "cls_emb"


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter weights (and a task head's): what an adapter checkpoint stores."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or _task_owned(k)}


def load_lora_state_dict(model: nn.Module, state: dict) -> None:
    """Load adapter weights into a model that apply_lora prepared the same way."""
    mine = lora_state_dict(model)
    if set(mine) != set(state) or any(mine[k].shape != state[k].shape for k in mine):
        raise ValueError("the adapter does not fit this model: its rank, targets or the base "
                         "model's shape differ from those it was trained with")
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (W + (alpha/r) B A); a model without adapters
    is returned unchanged, so merging twice equals merging once."""
    _swap(model, lambda path, m: m.merged() if isinstance(m, LoRALinear) else None)
    return model


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output channel: w ~= q * scale[:, None], q in [-127, 127] (int8)."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127                # (N,)
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per group of input columns: codes in [0, 15] (uint8, (N, K)) and
    scales_and_zeros (K / group_size, N, 2) with w ~= (code - 8) * scale + zero,
    the layout PyTorch's int4 kernels take."""
    N, K = w.shape
    g = w.float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                                     # (N, K/g)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    zero = lo + 8 * scale                                                       # code 8 <-> zero
    return codes.reshape(N, K), torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, column 2j in the low nibble: (N, K) -> (N, K/2) uint8."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/2) uint8 -> (N, K) codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


def _fused(op: str) -> bool:
    """Does this torch build have the fused kernel `op`? (Checked, never assumed.)"""
    return hasattr(torch.ops.aten, op)


def int8_kernel_suits(device_type: str) -> bool:
    """Does torch's fused int8 matmul suit decoding-sized inputs on this device? Decided by the
    device, never by timing, so results do not depend on how a measurement came out: CPUs with
    AVX-512 run it faster than dequantize-then-matmul, AVX2-only ones several times slower."""
    return (device_type == "cpu" and _fused("_weight_int8pack_mm")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: y = (x @ q.T) * scale (+ bias).

    use_kernel: True uses torch's fused `_weight_int8pack_mm` (CPU, no gradient needed);
    False dequantizes then multiplies, which gives the same result; None (default) uses the
    kernel for decoding-sized inputs (<= 16 rows) where int8_kernel_suits the device. Large
    batches always take the fallback: the dequantization is amortized over the rows and
    BLAS wins. QuantConfig.int8_kernel sets it for every layer.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.use_kernel: Optional[bool] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device)
        layer.weight, layer.scales = quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def codes(self) -> torch.Tensor:
        """The int8 weight (out_features, in_features)."""
        return self.weight

    def dequantize(self) -> torch.Tensor:
        return self.codes().float() * self.scales[:, None]                     # (N, K)

    def _kernel_wanted(self, x) -> bool:
        if self.use_kernel is False or x.device.type != "cpu" or not _fused("_weight_int8pack_mm"):
            return False
        if torch.is_grad_enabled() and x.requires_grad:                         # the kernel has no backward
            return False
        return bool(self.use_kernel) or (x.numel() // self.in_features <= 16 and int8_kernel_suits("cpu"))

    def forward(self, x):
        scales = self.scales.to(x.dtype)
        if self._kernel_wanted(x):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(),
                                                   self.weight, scales)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * scales
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """Weight-only int4 linear layer, group-wise (see quantize_int4).

    The state dict always holds the portable layout (pack_int4: two codes per byte).
    `to_kernel_layout()` repacks the weight in memory for torch's fused int4 matmul
    on CPU (and CUDA), after checking that the kernel reproduces the codes; the state
    dict is still written in the portable layout. Without a kernel, or while a
    gradient is needed (QLoRA training), it dequantizes then multiplies.
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 64,
                 bias: bool = False, device=None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 needs in_features ({in_features}) divisible by group_size "
                             f"({group_size}); choose another quantize group_size")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(in_features // group_size, out_features, 2,
                                                             device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.layout = "portable"           # or the device type whose kernel layout `weight` is in

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, group_size=group_size,
                    bias=linear.bias is not None, device=linear.weight.device)
        codes, layer.scales_and_zeros = quantize_int4(linear.weight.detach(), group_size)
        layer.weight = pack_int4(codes)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    # -- torch's fused kernels, per device type: (repack codes, matmul, activation dtype) --
    @staticmethod
    def _kernel(device_type: str):
        if device_type == "cpu" and _fused("_weight_int4pack_mm_for_cpu"):
            return (lambda codes: torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1),
                    torch.ops.aten._weight_int4pack_mm_for_cpu, None)
        if device_type == "cuda" and _fused("_weight_int4pack_mm"):     # bf16 only; even column high
            return (lambda codes: torch.ops.aten._convert_weight_to_int4pack(
                        (codes[:, 0::2] << 4) | codes[:, 1::2], 8),
                    torch.ops.aten._weight_int4pack_mm, torch.bfloat16)
        return None

    def _matmul(self, x: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        """x (M, K) @ the packed weight through the kernel, in the kernel's dtype."""
        _, mm, dtype = self._kernel(self.layout)
        dtype = dtype or x.dtype
        return mm(x.to(dtype), self.weight, self.group_size, scales_and_zeros.to(dtype)).to(x.dtype)

    def _kernel_codes(self) -> torch.Tensor:
        """Read the codes back through the kernel: identity input, scale 1, zero 8."""
        K, N, g = self.in_features, self.out_features, self.group_size
        eye = torch.eye(K, device=self.weight.device)                    # codes <= 15: exact in bf16
        unit = torch.tensor([1.0, 8.0], device=eye.device).expand(K // g, N, 2).contiguous()
        return self._matmul(eye, unit).T.round().to(torch.uint8)

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.weight) if self.layout == "portable" else self._kernel_codes()

    def to_kernel_layout(self) -> bool:
        """Repack for the fused kernel of the weight's device; False (and unchanged) when
        there is none, the shape does not suit it, or it does not reproduce the codes."""
        kernel = self._kernel(self.weight.device.type)
        if self.layout != "portable" or kernel is None:
            return self.layout != "portable"
        codes = self.codes()
        try:
            packed = kernel[0](codes)
        except RuntimeError:                     # e.g. the CPU kernel needs N % 16 == 0
            return False
        portable, self.weight, self.layout = self.weight, packed, self.weight.device.type
        if not torch.equal(self._kernel_codes(), codes):
            self.weight, self.layout = portable, "portable"
            return False
        return True

    def dequantize(self) -> torch.Tensor:
        scale, zero = self.scales_and_zeros.repeat_interleave(self.group_size, dim=0).unbind(-1)  # (K, N)
        return ((self.codes().float() - 8) * scale.T + zero.T)                                    # (N, K)

    def forward(self, x):
        if self.layout != "portable" and not (torch.is_grad_enabled() and x.requires_grad):
            if x.device.type != self.layout:
                raise RuntimeError(f"int4 weights packed for {self.layout} used on {x.device.type}; "
                                   f"quantize after moving the model to its device")
            y = self._matmul(x.reshape(-1, self.in_features).contiguous(), self.scales_and_zeros)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "portable":
            destination[prefix + "weight"] = pack_int4(self.codes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # only a state dict holding this layer's weight replaces it: a partial one (an
        # adapter, loaded strict=False) must leave the kernel-layout weight as it is
        kernel = self.layout != "portable" and prefix + "weight" in state_dict
        if kernel:
            self.weight = torch.zeros(self.out_features, self.in_features // 2, dtype=torch.uint8,
                                      device=self.weight.device)
            self.layout = "portable"
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if kernel:
            self.to_kernel_layout()


def quantize_model(model: "Transformer", cfg: QuantConfig, *, kernels: bool = True) -> "Transformer":
    """Swap every nn.Linear (blocks and head) for an int8 or int4 one, in place.

    kernels: int4 weights repacked for the fused kernel (the inference layout). Training a
    QLoRA adapter passes False: the kernel has no backward, and dequantizing the portable
    layout is cheap. A tied head gets its own quantized copy; the embedding (or a model of
    feature vectors' input projection) stays float.

        >>> model = Transformer(vocab_size=64, d_model=64, n_heads=4, n_layers=1)
        >>> type(quantize_model(model, QuantConfig("int8")).lm_head).__name__
        'Int8Linear'
    """
    if cfg.mode is None:
        return model

    def make(path, module):
        if type(module) is not nn.Linear or path.endswith("in_proj"):   # the input layer stays float, as an embedding
            return None
        if cfg.mode == "int8":
            layer = Int8Linear.from_linear(module)
            layer.use_kernel = cfg.int8_kernel
            return layer
        layer = Int4Linear.from_linear(module, group_size=cfg.group_size)
        if kernels:
            layer.to_kernel_layout()
        return layer

    with torch.no_grad():
        _swap(model, make)
    return model


def use_kernels(model: nn.Module, *, int8_kernel: Optional[bool] = None) -> nn.Module:
    """Repack int4 layers for their device's fused kernel (after loading or moving), and set
    the int8 layers' kernel choice when int8_kernel is given (see Int8Linear)."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.to_kernel_layout()
        elif isinstance(m, Int8Linear) and int8_kernel is not None:
            m.use_kernel = int8_kernel
    return model


def dequantize_model(model: "Transformer") -> "Transformer":
    """Swap quantized layers back for float nn.Linear ones (in place). A tied head is
    tied to the (never quantized) embedding again, which restores it exactly."""
    def make(path, module):
        if not isinstance(module, (Int8Linear, Int4Linear)):
            return None
        layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device)
        with torch.no_grad():
            layer.weight.copy_(module.dequantize())
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    _swap(model, make)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
