"""The decoder-only transformer: every layer in one file.

Sections, in reading order:
    1. Config      -- TransformerConfig (validated) and the named presets
    2. Norms       -- RMSNorm, LayerNorm
    3. RoPE        -- rotary position embeddings, full or partial
    4. KV cache    -- a module holding keys/values for incremental decoding
    5. Attention   -- causal self-attention for MHA, GQA and MQA via SDPA
    6. FeedForward -- SwiGLU / GeGLU (gated) and GELU / ReLU / SiLU MLPs
    7. Block       -- pre-norm or post-norm residual block
    8. Model       -- Transformer: embeddings, blocks, head, caches

Example:
    >>> import torch
    >>> from model import Transformer
    >>> model = Transformer(vocab_size=100, d_model=64, n_heads=4, n_layers=2)
    >>> model(torch.randint(0, 100, (2, 10))).shape
    torch.Size([2, 10, 100])

There is no generation loop here: sampling lives in generate.py.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================
# 1. Config
# =============================================================================

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "none")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
GATED = ("swiglu", "geglu")


def closest(name: str, valid) -> str:
    """A hint naming the valid choice closest to `name` (for error messages)."""
    valid = list(valid)
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.0)
    hint = f"did you mean '{match[0]}'? " if match else ""
    return f"{hint}valid: {', '.join(valid)}"


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
    pos_encoding: str = "rope"
    rotary_pct: float = 1.0        # fraction of each head's dims that are rotated
    rope_theta: float = 10000.0
    activation: str = "swiglu"
    tie_weights: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TransformerConfig: {msg}")

        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.norm in NORMS, f"norm={self.norm!r}; {closest(self.norm, NORMS)}")
        need(self.pos_encoding in POSITIONS,
             f"pos_encoding={self.pos_encoding!r}; {closest(self.pos_encoding, POSITIONS)}")
        need(self.activation in ACTIVATIONS,
             f"activation={self.activation!r}; {closest(self.activation, ACTIVATIONS)}")
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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct) // 2 * 2

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        """Build from a plain dict, naming the closest valid key for unknown ones."""
        valid = [f.name for f in fields(cls)]
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
    cos and sin broadcast against x[..., :rotary_dim]: (T, 1, rd) for x of shape (B, T, H, hd)."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

# =============================================================================
# 4. KV cache
# =============================================================================


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated for (batch, max_len).

    `update(start, k, v)` writes the new positions and returns the keys and
    values of every position so far, so a step attends over the whole past
    without recomputing it.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; "
                             f"writing positions {start}..{end - 1} would overflow it")
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"KV cache was set up for batch {self.k.shape[0]}, got batch {k.shape[0]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def select(self, rows: torch.Tensor):
        """Keep (and repeat) batch rows in this order, e.g. the surviving beams."""
        self.k, self.v = self.k.index_select(0, rows), self.v.index_select(0, rows)

# =============================================================================
# 5. Attention
# =============================================================================


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; n_kv_heads < n_heads gives GQA (1: MQA)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_dim = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, qkv_dim, bias=cfg.bias)   # one matmul for q, k, v
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, rope=None, start_pos=None, mask=None):
        B, T, _ = x.shape
        H, hd, nkv = self.n_heads, self.head_dim, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * nkv, hd)      # (B, T, H + 2*Hkv, hd)
        qk, v = qkv.split([H + nkv, nkv], dim=2)
        if rope is not None:                                 # q and k rotated in one pass
            cos, sin = rope
            qk = apply_rope(qk, cos[:, None], sin[:, None])
        q, k = qk.split([H, nkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if start_pos is not None:
            k, v = self.kv_cache.update(start_pos, k, v)     # (B, Hkv, start+T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=nkv != H)
        y = y.transpose(1, 2).reshape(B, T, H * hd)           # (B, T, C)
        return self.wo(y)

# =============================================================================
# 6. FeedForward
# =============================================================================


class FeedForward(nn.Module):
    """Gated (SwiGLU, GeGLU: w2(act(w1 x) * w3 x)) or plain (w2(act(w1 x))) MLP."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.act = {"swiglu": F.silu, "silu": F.silu, "geglu": F.gelu,
                    "gelu": F.gelu, "relu": F.relu}[cfg.activation]   # exact (erf) GELU
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
        self.attn = CausalSelfAttention(cfg)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, start_pos=None, mask=None):
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), rope, start_pos, mask))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, start_pos, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))

# =============================================================================
# 8. Model
# =============================================================================


class Transformer(nn.Module):
    """Decoder-only language model: token ids (B, T) -> logits (B, T, vocab_size).

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
    """

    def __init__(self, config: Optional[TransformerConfig] = None, **kwargs):
        super().__init__()
        if config is None:
            config = TransformerConfig.from_dict(kwargs)
        elif kwargs:
            config = TransformerConfig.from_dict({**config.to_dict(), **kwargs})
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg) if cfg.pre_norm else nn.Identity()  # post-norm output is normed already
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables per (device, dtype), derived from float64 ones: not buffers, so that
        # model.to(torch.bfloat16) cannot round the float64 master copy.
        self._rope: dict = {}
        self._seen: Optional[torch.Tensor] = None   # tokens behind the cache, for use_cache=True
        self.apply(self._init_weights)
        # residual projections are scaled down with depth (GPT-2) so the stream's variance stays O(1)
        for name, p in self.named_parameters():
            if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                nn.init.normal_(p, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, *, start_pos: Optional[int] = None,
                use_cache: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        start_pos: write idx's keys/values into the KV cache (see setup_cache)
            at positions start_pos.. and attend over every cached position.
        use_cache: incremental decoding with automatic bookkeeping (see class doc).
        """
        if use_cache:
            return self._forward_incremental(idx)
        B, T = idx.shape
        start = start_pos or 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions is longer than "
                             f"block_size={self.config.block_size}; crop the input to the last "
                             f"{self.config.block_size} tokens")
        if start_pos is not None and self.blocks[0].attn.kv_cache is None:
            raise RuntimeError("start_pos needs a KV cache: call model.setup_cache(batch_size) first")
        x = self.tok_emb(idx)                                       # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        rope = None
        if self.config.pos_encoding == "rope":
            cos, sin = self._rope_tables(x.device, x.dtype)
            rope = (cos[start:start + T], sin[start:start + T])
        mask = None
        if start > 0 and T > 1:  # a chunk after cached positions: causal within, sees all before
            mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(diagonal=start)
        for block in self.blocks:
            x = block(x, rope, start_pos, mask)
        return self.lm_head(self.norm_f(x))                         # (B, T, vocab)

    def _rope_tables(self, device, dtype):
        key = (device, dtype)
        if key not in self._rope:   # computed in float64 once per (device, dtype), then rounded once
            cfg = self.config
            tables = rope_tables(cfg.rotary_dim, cfg.block_size, cfg.rope_theta)
            self._rope[key] = tuple(t.to(device=device, dtype=dtype) for t in tables)
        return self._rope[key]

    def setup_cache(self, batch_size: int, max_len: Optional[int] = None, *, dtype=None, device=None):
        """Allocate a KV cache in every attention layer for up to max_len positions."""
        max_len = max_len or self.config.block_size
        if max_len > self.config.block_size:
            raise ValueError(f"max_len={max_len} exceeds block_size={self.config.block_size}")
        ref = self.tok_emb.weight
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch_size, max_len, self.config.n_kv_heads, self.config.head_dim,
                                          dtype=dtype or ref.dtype, device=device or ref.device)
        self._seen = None

    def select_cache_rows(self, rows: torch.Tensor):
        """Reorder every layer's KV cache along the batch: row i becomes old row rows[i]."""
        for block in self.blocks:
            block.attn.kv_cache.select(rows)

    def clear_cache(self):
        """Drop the KV caches (frees their memory)."""
        for block in self.blocks:
            block.attn.kv_cache = None
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
