"""Generate text from a trained checkpoint.

    python generate.py --checkpoint out/best.pt --prompt "ROMEO:" --max_new_tokens 200 \\
        --temperature 0.8 --top_k 50 --top_p 0.95 --seed 1 [--stream] [--num_samples 3]
    python generate.py --interactive            # a prompt loop; Ctrl-D or `quit` exits
    python generate.py --temperature 0          # greedy

Defaults come from the `sample` section of config.yaml. The tokenizer travels inside the
checkpoint, so no data file is needed.

Decoding runs the prompt once (prefill into the KV cache), then one token per step, through a
decoder (LMDecoder: prefill, step, reorder, rewind), the decoding loops' only way to the model.
Context beyond block_size: the model always conditions on the last block_size tokens, as
nanoGPT does. Once prompt + output fill the window, each step re-encodes the last
block_size tokens (absolute positions shift, so cached keys cannot be reused); the result
equals running the model without a cache on the cropped sequence. A sliding-window model
(model.attention_window, with RoPE) never re-encodes: its ring cache keeps the last W positions
and decoding runs on past block_size. --compile runs the steps
through fastpath.py's compiled step; without that file they run eagerly, with the same results.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from config import (SECTIONS as RUN_SECTIONS, canonical_argv, coerce, config_file, field_types, load_config,
                    parse_overrides, refuse)
from model import closest
from tasks import pad_sequences, predict_all, task_for
from utils import PRECISION_DTYPES, CheckpointError, load_checkpoint, load_model, pick_device, plot_attention, png


@dataclass
class SampleConfig:
    """Sampling settings for generate.py (the `sample` section of config.yaml)."""

    checkpoint: Optional[str] = None   # None: <training.out_dir>/best.pt
    lora: Optional[str] = None         # a LoRA adapter checkpoint to apply to the model
    prompt: str = "\n"
    prompt_file: Optional[str] = None  # one prompt per line, generated together in batches
    batch_size: Optional[int] = None   # prompt_file: prompts per batched decode; None = all at once
    max_new_tokens: int = 300
    temperature: float = 0.8           # 0 = greedy
    top_k: Optional[int] = 50          # keep the k most likely tokens; None or 0 = off
    top_p: Optional[float] = 0.95      # keep the smallest set with this much probability; None = off
    min_p: Optional[float] = None      # drop tokens less likely than min_p * the top token's probability
    repetition_penalty: float = 1.0    # > 1 makes tokens already in the context less likely
    stop: list[str] = field(default_factory=list)  # stop strings: output ends before the first
    seed: Optional[int] = None
    num_samples: int = 1
    stream: bool = False
    interactive: bool = False
    chat: bool = False                 # interactive: each prompt continues the conversation so far
    beam_size: int = 1                 # > 1: beam search instead of sampling
    length_penalty: float = 1.0        # beam score = sum of log-probs / length ** length_penalty
    num_return_sequences: int = 1      # beam search: how many of the best beams to print
    draft_checkpoint: Optional[str] = None  # a smaller model with the same tokenizer: speculative decoding
    speculative_k: int = 4             # tokens the draft proposes per target forward
    eos: str = "stop"                  # stop | ignore: at the end-of-text token (BPE), end the output or go on
    device: str = "auto"
    dtype: str = "fp32"                # fp32 | bf16 | fp16: the weights' dtype while generating
    compile: bool = False              # torch.compile the decode steps (fastpath.py; see LMDecoder)
    save_attention: Optional[str] = None  # a PNG: every head of the last layer over the sample (or classified text)
    input: Optional[str] = None        # a model of time series: the series file to forecast or classify
    horizon: Optional[int] = None      # forecast: steps ahead (None: the model's; more rolls the forecast out)
    holdout: int = 0                   # forecast: hide the input's last steps and forecast them, beside the truth
    plot: Optional[str] = None         # forecast: a PNG of the history, the forecast and the held-out truth

    def __post_init__(self):
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       min_p=self.min_p, repetition_penalty=self.repetition_penalty)
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1")
        if self.beam_size < 1 or not 1 <= self.num_return_sequences <= self.beam_size:
            raise ValueError(f"need beam_size >= 1 and 1 <= num_return_sequences <= beam_size "
                             f"(got {self.beam_size}, {self.num_return_sequences})")
        if self.horizon is not None and self.horizon < 1 or self.holdout < 0:
            raise ValueError(f"need horizon >= 1 (or null: the model's own) and holdout >= 0 "
                             f"(got {self.horizon}, {self.holdout})")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 (or null: all prompts at once)")
        if self.dtype not in PRECISION_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; {closest(self.dtype, PRECISION_DTYPES)}")
        if self.eos not in EOS_MODES:
            raise ValueError(f"eos={self.eos!r}; {closest(self.eos, EOS_MODES)}")
        other = [name for name, on in (("prompt_file", self.prompt_file), ("interactive", self.interactive),
                                       ("draft_checkpoint", self.draft_checkpoint),
                                       ("beam_size", self.beam_size > 1)) if on]
        if self.save_attention and other:
            raise ValueError(f"save_attention draws one text; it does not combine with {other[0]}")

    def eos_id(self, tokenizer) -> Optional[int]:
        """The token that ends the output: the tokenizer's end-of-text token with eos=stop, else None."""
        return tokenizer.eot_id if self.eos == "stop" else None


EOS_MODES = ("stop", "ignore")

# -----------------------------------------------------------------------------
# Sampling: small pure functions on logits (B, vocab)
# -----------------------------------------------------------------------------


def check_sampling(*, temperature: float, top_k: Optional[int] = None, top_p: Optional[float] = None,
                   min_p: Optional[float] = None, repetition_penalty: float = 1.0):
    if min_p is not None and not 0 <= min_p <= 1:
        raise ValueError(f"min_p={min_p} must be in [0, 1]")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1 = off)")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept); the rest -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches p; the rest -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs                  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p                           # the top token is always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the most likely token's; the rest -inf."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = logp >= logp.max(dim=-1, keepdim=True).values + torch.log(torch.tensor(p))
    return logits.masked_fill(~keep, float("-inf"))


def penalize_repetition(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """The usual (CTRL / Hugging Face) penalty on tokens present in context (B, T): their
    logits are divided by penalty when positive and multiplied when negative, so for
    penalty > 1 each seen token becomes less likely, whatever the sign of its logit."""
    seen = torch.gather(logits, -1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, context, seen)


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: Optional[int] = None,
                top_p: Optional[float] = None, min_p: Optional[float] = None,
                repetition_penalty: float = 1.0, context: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, vocab). Controls compose in this
    order: repetition penalty (over context), temperature, top-k, top-p, min-p."""
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty)
    logits = logits.float()
    if repetition_penalty != 1.0 and context is not None:
        logits = penalize_repetition(logits, context, repetition_penalty)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = next_distribution(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return torch.multinomial(probs, 1, generator=generator)


def next_distribution(logits: torch.Tensor, *, temperature: float, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """The distribution (B, vocab) a token is drawn from: softmax of the logits / temperature
    after top-k, top-p and min-p, or one-hot at the argmax when temperature is 0.

        >>> next_distribution(torch.tensor([[2.0, 1.0, 0.0]]), temperature=1.0, top_k=1)
        tensor([[1., 0., 0.]])
    """
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if min_p:
        logits = min_p_filter(logits, min_p)
    return torch.softmax(logits, dim=-1)

# -----------------------------------------------------------------------------
# Decoding: the loops reach the model only through a decoder
# -----------------------------------------------------------------------------


def make_decoder(model, *, compile: bool = False, cache_len: Optional[int] = None,
                 chunk_len: Optional[int] = None, source: Optional[tuple] = None):
    """The decoder the decoding loops use for model: LMDecoder, or for an encoder-decoder
    given source = (ids (B, S), mask or None), Seq2SeqDecoder (see each for the options)."""
    if hasattr(model, "encoder"):
        if source is None:
            raise ValueError("an encoder-decoder decodes a source: pass source=(ids, mask)")
        if compile:
            _note("compiled decoding is for decoder-only models; decoding the encoder-decoder eagerly")
        return Seq2SeqDecoder(model, *source)
    if source is not None:
        raise ValueError("source is for an encoder-decoder; this model is decoder-only")
    return LMDecoder(model, compile=compile, cache_len=cache_len, chunk_len=chunk_len)


class Seq2SeqDecoder:
    """LMDecoder's interface for an encoder-decoder (model.Seq2SeqTransformer). prefill encodes
    the source once (each cross-attention keeps its keys and values), then runs the target
    start tokens; steps extend the target through the decoder's KV cache; reorder moves both
    the cache rows and the memory's. A source of one row serves any number of target rows
    (beams). The target has block_size positions (max_len)."""

    def __init__(self, model, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None):
        self.model, self.device, self.max_len = model, model.device, model.config.block_size
        self.src, self.src_mask = src.to(self.device), None if src_mask is None else src_mask.to(self.device)
        self.pos = self.pad = None

    def prefill(self, ids: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.model.encode(self.src, self.src_mask)
        if self.src.shape[0] != ids.shape[0]:                       # one source, several beams
            self.model.select_rows(torch.zeros(ids.shape[0], dtype=torch.long, device=self.device))
        self.model.decoder.setup_cache(ids.shape[0], self.max_len)
        self.pos, self.pad = 0, (None if pad is None else pad.to(self.device))
        return self.step(ids)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos + tokens.shape[1] > self.max_len:
            raise ValueError(f"the target would pass block_size={self.max_len} positions; ask for fewer new tokens")
        logits = self.model.step(tokens, start_pos=self.pos, pad=self.pad)
        self.pos += tokens.shape[1]
        return logits.float()

    def greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.step(tokens)[:, -1].argmax(-1, keepdim=True)

    def reorder(self, rows: torch.Tensor):
        self.model.select_rows(rows)
        self.pad = None if self.pad is None else self.pad[rows]

    def rewind(self, n: int):
        self.pos = n

    def close(self):
        self.model.decoder.clear_cache()
        self.pos = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LMDecoder:
    """Incremental decoding of a language model: the KV cache, the positions and the window.

        prefill(ids (B, T), pad=None) -> logits (B, vocab) after each row's last token
        step(tokens (B, T)) -> logits (B, T, vocab) after each of those tokens
        greedy(tokens (B, 1)) -> step(tokens)'s argmax next tokens (B, 1)
        reorder(rows)  -- row i continues old row rows[i] (beams)
        rewind(n)      -- forget every token fed after the first n (rejected speculations)
        close()        -- free the cache (as leaving a `with` block does)
        max_len, device -- the longest context the model conditions on; where its tensors live

    Logits are float32. pad: the rows' left-padding lengths (see left_pad). The model always
    conditions on the last max_len (block_size) tokens fed, as nanoGPT does: once they fill
    the window, each step re-encodes the window (absolute positions shift, so cached keys
    cannot be reused), which equals running the model without a cache on the cropped sequence.
    A sliding-window model (attention_window, positions not learned) decodes into a ring cache
    of window + chunk_len - 1 slots instead, and runs on past max_len without re-encoding.

    cache_len: positions to allocate the cache for (at most max_len; a sequence that outgrows
    it is re-encoded into one of max_len). compile: steps run through fastpath.py's compiled
    step (decoding eagerly, after a note, where that file is missing): one-token steps, and
    chunks of chunk_len tokens (speculative checks of k + 1), other lengths running eagerly so
    that no rare length stops decoding to compile; greedy picks its token inside the graph.
    """

    def __init__(self, model, *, compile: bool = False, cache_len: Optional[int] = None,
                 chunk_len: Optional[int] = None):
        cfg = model.config
        self.model, self.device, self.max_len = model, model.device, cfg.block_size
        self.cache_len = min(cache_len or self.max_len, self.max_len)
        # a sliding-window model keeps its last W positions in a ring: no window to re-encode, ever
        self.ring = cfg.attention_window is not None and cfg.pos_encoding != "learned"
        if compile and self.ring:
            _note("compiled decoding has no sliding-window cache; decoding eagerly")
        self.fast, self.chunk_len = (_fastpath() if compile and not self.ring else None), chunk_len
        self.seq = self.pad = None   # every token fed (B, T), padding included; (B,) padding lengths
        self.pos = None              # how many of them the cache holds, None when it holds a slid window
        self.cache = None            # (rows, slots) of the cache set up

    def prefill(self, ids: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.seq, self.pad = ids, (None if pad is None else pad.to(ids.device))
        return self._encode_window(1)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self._fits(tokens):
            self.seq = torch.cat([self.seq, tokens], dim=1)
            if tokens.shape[1] > 1 and self.seq.shape[1] > self.max_len:
                return self._encode_windows(tokens.shape[1])
            return self._encode_window(tokens.shape[1])
        if self.fast and tokens.shape[1] in (1, self.chunk_len):
            logits = self.fast.decode_step(self.model)(tokens, self.pos, self.pad)
        else:
            logits = self.model(tokens, start_pos=self.pos, pad=self.pad)
        self._advance(tokens)
        return logits.float()

    def greedy(self, tokens: torch.Tensor) -> torch.Tensor:
        if not (self.fast and tokens.shape[1] == 1 and self._fits(tokens)):
            return self.step(tokens)[:, -1].argmax(-1, keepdim=True)
        nxt = self.fast.decode_step(self.model, greedy=True)(tokens, self.pos, self.pad)
        self._advance(tokens)
        return nxt

    def reorder(self, rows: torch.Tensor):
        self.seq = self.seq[rows]
        self.pad = None if self.pad is None else self.pad[rows]
        self.model.select_cache_rows(rows)
        self.cache = (rows.shape[0], self.cache[1])

    def rewind(self, n: int):
        if not 0 < n <= self.seq.shape[1]:
            raise ValueError(f"rewind({n}): {self.seq.shape[1]} tokens were fed")
        self.seq = self.seq[:, :n]
        if self.pos is not None:
            self.pos = n

    def close(self):
        self.model.clear_cache()
        if self.fast:
            self.fast.forget(self.model)
        self.seq = self.pad = self.pos = self.cache = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fits(self, tokens) -> bool:
        """Do the cached positions start at the first token, with room for tokens after them?"""
        return self.pos is not None and (self.ring or self.pos + tokens.shape[1] <= self.cache[1])

    def _advance(self, tokens):
        self.seq = torch.cat([self.seq, tokens], dim=1)
        self.pos += tokens.shape[1]

    def _encode_window(self, n: int) -> torch.Tensor:
        """Run the window, the last max_len tokens fed, into the cache from slot 0: the logits
        of its last n positions."""
        window = self.seq if self.ring else self.seq[:, -self.max_len:]
        B, W = window.shape
        cropped = self.seq.shape[1] - W
        pad = None if self.pad is None else (self.pad - cropped).clamp(min=0)   # fewer padding slots in view
        slots = self.cache_len if W < self.cache_len else self.max_len
        if self.ring:    # spare slots: a speculative check of chunk_len tokens is written before it is read
            slots = self.model.config.attention_window + (self.chunk_len or 1) - 1
        if self.cache != (B, slots):
            if self.fast:
                self.fast.setup_cache(self.model, B, slots)
            else:
                self.model.setup_cache(B, slots)
            self.cache = (B, slots)
        logits = self.model(window, start_pos=0, pad=pad)[:, -n:]
        self.pos = None if cropped else W
        return logits.float()


    def _encode_windows(self, n: int) -> torch.Tensor:
        """Past max_len, the logits after each of the last n tokens, each from the max_len tokens
        that end there (what n one-token steps give), as one batch of windows without the cache."""
        B, L, W = self.seq.shape[0], self.seq.shape[1], self.max_len
        short = max(0, W + n - 1 - L)                      # the first windows reach before the sequence
        seq = torch.cat([self.seq[:, :1].expand(B, short), self.seq], dim=1)
        windows = seq.unfold(1, W, 1)[:, -n:]                                  # (B, n, W)
        starts = torch.arange(seq.shape[1] - W - n + 1, seq.shape[1] - W + 1, device=seq.device)   # (n,)
        own = short + (torch.zeros(B, dtype=torch.long, device=seq.device) if self.pad is None else self.pad)
        pad = (own[:, None] - starts).clamp(0, W)                              # (B, n) slots before real tokens
        logits = self.model(windows.reshape(B * n, W), pad=pad.reshape(B * n))[:, -1]
        self.pos = None                                    # the cache holds no window now
        return logits.view(B, n, -1).float()


_noted: set = set()


def _note(message: str):
    """Print a note on stderr, once per process."""
    if message not in _noted:
        print(f"note: {message}", file=sys.stderr)
        _noted.add(message)


def _fastpath():
    """The fastpath module, or None (with a note on stderr, once) when fastpath.py is missing."""
    try:
        import fastpath
    except ModuleNotFoundError as e:
        if e.name != "fastpath":
            raise
        _note("fastpath.py not found; decoding eagerly")
        return None
    return fastpath


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths -> (B, T) ids aligned on the right and (B,) pad lengths.

    A row is padded with copies of its own first token: attention never sees them (see
    Transformer.forward's pad), and a repetition penalty over the row finds no token that
    is not in its prompt.
        >>> left_pad([[5, 6, 7], [8]])
        (tensor([[5, 6, 7],
                [8, 8, 8]]), tensor([0, 2]))
    """
    if not prompts or not all(prompts):
        raise ValueError("left_pad needs one or more non-empty token lists")
    width = max(map(len, prompts))
    rows = [[ids[0]] * (width - len(ids)) + list(ids) for ids in prompts]
    return torch.tensor(rows), torch.tensor([width - len(ids) for ids in prompts])


@torch.no_grad()
def generate_tokens(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: Optional[int] = None, top_p: Optional[float] = None,
                    min_p: Optional[float] = None, repetition_penalty: float = 1.0,
                    generator: Optional[torch.Generator] = None,
                    pad: Optional[torch.Tensor] = None, compile: bool = False,
                    source: Optional[tuple] = None) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens next-token tensors (B, 1) continuing idx (B, T); pad: the rows'
    left-padding lengths when they are prompts of different lengths (see left_pad); compile:
    the steps after the prompt run compiled (see LMDecoder). For an encoder-decoder, idx is
    the target's start and source = (source ids (B, S), mask or None).

    Example:
        >>> for tok in generate_tokens(model, torch.tensor([[1, 2]]), 5, temperature=0):
        ...     print(tok.item())
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty)
    if max_new_tokens <= 0:
        return
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, generator=generator)
    greedy = temperature == 0 and repetition_penalty == 1.0
    # a cache for this call (rounded up, so that calls of similar lengths share a compiled shape)
    cache_len = -(-(idx.shape[1] + max_new_tokens) // 256) * 256
    with make_decoder(model, compile=compile, cache_len=cache_len, source=source) as decoder:
        nxt = sample_next(decoder.prefill(idx, pad), context=idx, **sampling)    # the prompt in one forward
        for i in range(max_new_tokens):
            yield nxt
            if i == max_new_tokens - 1:
                break
            if greedy:
                nxt = decoder.greedy(nxt)
            else:
                idx = torch.cat([idx, nxt], dim=1)
                nxt = sample_next(decoder.step(nxt)[:, -1], context=idx, **sampling)


@torch.no_grad()
def beam_search(model, prompt: list[int], max_new_tokens: int, *, beam_size: int,
                length_penalty: float = 1.0, num_return_sequences: int = 1,
                eos_id: Optional[int] = None, compile: bool = False,
                source: Optional[tuple] = None) -> list[tuple[list[int], float]]:
    """The num_return_sequences best continuations of prompt under beam search, best first,
    as (token ids, score); score = sum of log-probabilities / length ** length_penalty.

    Every beam is extended by one token per step (keeping the beam_size best of
    beam_size x vocab candidates) and the KV cache rows follow their beams. With beam_size 1
    this is greedy decoding. A beam that emits eos_id is finished: it keeps its score (its only
    continuation is eos again, at log-probability 0), and its output ends before the eos; its
    length is the number of tokens before it (the eos's log-probability counts, as in HF).
    compile: the steps (all beams at once) run compiled (see LMDecoder). source: an
    encoder-decoder's (ids (1, S), mask or None); prompt is then the target's start.
    """
    [ranked] = beam_search_rows(model, torch.tensor([prompt]), max_new_tokens, beam_size=beam_size,
                                length_penalty=length_penalty, num_return_sequences=num_return_sequences,
                                eos_id=eos_id, compile=compile, source=source)
    return ranked


@torch.no_grad()
def beam_search_rows(model, prompts: torch.Tensor, max_new_tokens: int, *, beam_size: int,
                     length_penalty: float = 1.0, num_return_sequences: int = 1, eos_id: Optional[int] = None,
                     compile: bool = False, source: Optional[tuple] = None) -> list[list[tuple[list[int], float]]]:
    """beam_search for every row of prompts (B, T) at once, each row keeping its own beams
    (B x beam_size rows decode together): one ranked list per row, each as beam_search gives
    it alone. source: an encoder-decoder's (ids (B, S), mask or None), a source per row."""
    if beam_size < 1 or not 1 <= num_return_sequences <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= num_return_sequences <= beam_size "
                         f"(got {beam_size}, {num_return_sequences})")
    B, T = prompts.shape
    with make_decoder(model, compile=compile, source=source) as decoder:
        seqs = prompts.to(decoder.device)[:, None]                         # (B, beams=1, T)
        scores = torch.zeros(B, 1, device=decoder.device)
        logits = decoder.prefill(prompts.to(decoder.device))
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits, dim=-1).view(B, seqs.shape[1], -1)   # (B, beams, vocab)
            if eos_id is not None and step:
                done = seqs[..., -1] == eos_id                             # finished beams stay as they are
                logp.masked_fill_(done[..., None], float("-inf"))
                logp[..., eos_id].masked_fill_(done, 0.0)
            total = (scores[..., None] + logp).flatten(1)                  # (B, beams * vocab)
            scores, flat = total.topk(min(beam_size, total.shape[1]), dim=1)
            beam, tokens = flat // logp.shape[2], flat % logp.shape[2]     # (B, new beams)
            seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, seqs.shape[2])), tokens[..., None]], 2)
            if step == max_new_tokens - 1:
                break
            rows = beam + logp.shape[1] * torch.arange(B, device=beam.device)[:, None]
            decoder.reorder(rows.flatten())                                # caches follow their beams
            logits = decoder.step(tokens.reshape(-1, 1))[:, -1]
    out = []
    for row_seqs, row_scores in zip(seqs[..., T:].tolist(), scores.tolist()):
        outputs = [_until(ids, eos_id) for ids in row_seqs]
        out.append(sorted(((ids, score / max(len(ids), 1) ** length_penalty) for ids, score in zip(outputs, row_scores)),
                          key=lambda pair: -pair[1])[:num_return_sequences])
    return out


@torch.no_grad()
def seq2seq_generate(model, src: torch.Tensor, max_new_tokens: int, *, src_mask: Optional[torch.Tensor] = None,
                     num_beams: int = 1, length_penalty: float = 1.0, bos_id: int = 1, eos_id: Optional[int] = 2,
                     pad_id: int = 0, generator: Optional[torch.Generator] = None, **sampling) -> torch.Tensor:
    """Target ids (B, L <= max_new_tokens) for source ids (B, S) of an encoder-decoder (what
    Seq2SeqTransformer.generate calls): decoding starts from bos_id and a row ends at eos_id
    (kept; pad_id after it). num_beams > 1: beam search, every row's beams at once; otherwise
    sampling (temperature, top_k, top_p, min_p, repetition_penalty; temperature=0 is greedy). The ids
    1 = BOS, 2 = EOS, 0 = PAD are those seq2seq data reserves (data.SEQ2SEQ_SPECIALS).

        >>> model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, temperature=0.7, top_p=0.9)  # doctest: +SKIP
    """
    model.eval()
    src_mask = None if src_mask is None else src_mask.bool()
    max_new_tokens = min(max_new_tokens, model.config.block_size - 1)     # the target's positions, BOS included
    if num_beams > 1:
        start = torch.full((src.shape[0], 1), bos_id, dtype=torch.long)
        rows = [ranked[0][0] for ranked in beam_search_rows(model, start, max_new_tokens, beam_size=num_beams,
                                                            length_penalty=length_penalty, eos_id=eos_id,
                                                            source=(src, src_mask))]
        rows = [ids + ([eos_id] if eos_id is not None and len(ids) < max_new_tokens else []) for ids in rows]
    else:
        start = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=model.device)
        rows, done = [[] for _ in range(src.shape[0])], set()
        for tok in generate_tokens(model, start, max_new_tokens, generator=generator, source=(src, src_mask),
                                   **{"temperature": 1.0, **sampling}):
            for i, t in enumerate(tok[:, 0].tolist()):
                if i not in done:
                    rows[i].append(t)
                    done.update([i] if t == eos_id else [])
            if len(done) == len(rows):
                break
    width = max(map(len, rows), default=0)
    return torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in rows], dtype=torch.long, device=model.device)


def _until(ids: list[int], eos_id: Optional[int]) -> list[int]:
    """ids up to (not including) the first eos_id."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def speculative_generate(target, draft, prompt: list[int], max_new_tokens: int, *, k: int = 4,
                         temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                         min_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                         eos_id: Optional[int] = None, compile: bool = False):
    """Speculative decoding: the draft proposes k tokens, the target checks them in one forward.

    Token x drawn from the draft's q is kept with probability min(1, p(x) / q(x)) under the
    target's p; the first rejected one is replaced by a draw from normalize(max(0, p - q)),
    and when all k are kept the target adds one more. Outputs are distributed exactly as
    sampling from the target alone (both distributions filtered by top_k, top_p and min_p, as
    sample_next does); at temperature 0 they equal its greedy output. The output
    ends before the first eos_id, if one is given and drawn. compile: the draft's one-token
    steps and the target's checks of k + 1 tokens run compiled (see LMDecoder).
    Returns (new token ids, acceptance rate of the draft's proposals).
    """
    if k < 1:
        raise ValueError(f"speculative_k={k} must be >= 1")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("the draft and target models have different vocabularies")
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    dist = functools.partial(next_distribution, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    checker = make_decoder(target, compile=compile, chunk_len=k + 1)
    proposer = make_decoder(draft, compile=compile)
    device = checker.device

    def ids(tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], device=device)
    seq = list(prompt)
    proposed = accepted = 0
    with checker, proposer:
        after_prompt, logits = checker.prefill(ids(prompt)), proposer.prefill(ids(prompt))
        fed_t = fed_d = len(seq)                 # how many tokens of seq each decoder was fed
        while len(seq) - len(prompt) < max_new_tokens:
            if fed_d < len(seq):
                logits = proposer.step(ids(seq[fed_d:]))[:, -1]
            xs, qs = [], []
            for i in range(k):                                   # the draft proposes k tokens
                q = dist(logits)[0]
                x = torch.multinomial(q, 1, generator=generator).item()
                xs.append(x)
                qs.append(q)
                if i < k - 1:
                    logits = proposer.step(ids([x]))[:, -1]
            chunk = seq[fed_t:] + xs                             # the target checks them at once
            checked = checker.step(ids(chunk))[0]
            if len(chunk) == k:                                  # the first round: the prompt's last
                checked = torch.cat([after_prompt, checked])     # position was the prefill's
            ps = dist(checked)                                   # (k+1, vocab)
            before = len(seq)
            for i, (x, q) in enumerate(zip(xs, qs)):
                proposed += 1
                u = torch.rand(1, generator=generator, device=q.device).item()
                if u < min(1.0, (ps[i, x] / q[x]).item()):
                    seq.append(x)
                    accepted += 1
                    continue
                residual = (ps[i] - q).clamp(min=0)
                seq.append(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
                break
            else:                                                 # all k kept: one more from the target
                seq.append(torch.multinomial(ps[k], 1, generator=generator).item())
            if eos_id in seq[before:]:                            # the text ended: stop there
                return seq[len(prompt):seq.index(eos_id, before)], accepted / max(proposed, 1)
            kept = len(seq) - before - 1                          # draft tokens kept this round
            fed_t, fed_d = before + kept, before + min(kept, k - 1)   # the new last token is fed next round
            checker.rewind(fed_t)
            proposer.rewind(fed_d)
    return seq[len(prompt):len(prompt) + max_new_tokens], accepted / max(proposed, 1)


class TextStream:
    """Turns a growing list of token ids into text pieces, never splitting a character:
    a trailing U+FFFD (an incomplete UTF-8 sequence) is held back until it completes.

    With stop strings, the text ends just before the first one (which is never emitted), and
    a tail that could still grow into a stop string is held back until it cannot; `done`
    turns true once a stop string has appeared.
    """

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0
        self.stops, self.done = [s for s in stops if s], False

    def text(self) -> str:
        """The continuation so far, cut before the first stop string."""
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=None)
        self.done = cut is not None
        return text if cut is None else text[:cut]

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text()
        stable = len(text.rstrip("\ufffd"))
        if not self.done:   # hold back a suffix that is the start of some stop string
            stable -= max((k for s in self.stops for k in range(1, len(s))
                           if text[:stable].endswith(s[:k])), default=0)
        piece, self.emitted = text[self.emitted:stable], max(self.emitted, stable)
        return piece

    def flush(self) -> str:
        text = self.text()
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt; `<|endoftext|>` in it is the special token (BPE), so a prompt of
    just that starts a new document, as GPT-2's unconditional samples do."""
    try:
        ids = tokenizer.encode(prompt, special=True)
    except ValueError as e:
        raise ValueError(f"the prompt cannot be encoded: {e}") from None
    if not ids:
        raise ValueError("the prompt is empty; give at least one character (e.g. --prompt '\\n')")
    return ids


def generate_text(model, tokenizer, prompt: str, cfg: SampleConfig, *, generator=None, out=None) -> str:
    """Prompt + continuation as text; with out (a file), the continuation is streamed to it.
    Decoding stops at a stop string, and (eos=stop) at the end-of-text token, which is not shown."""
    ids = encode_prompt(tokenizer, prompt)
    device = next(model.parameters()).device
    stream, eos_id = TextStream(tokenizer, cfg.stop), cfg.eos_id(tokenizer)
    for tok in generate_tokens(model, torch.tensor([ids], device=device), cfg.max_new_tokens,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                               min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                               generator=generator, compile=cfg.compile):
        if tok.item() == eos_id:                      # the model ended the text
            break
        piece = stream.push(tok.item())
        if out and piece:
            out.write(piece)
            out.flush()
        if stream.done:                               # a stop string appeared: stop decoding
            break
    rest = stream.flush()
    if out and rest:
        out.write(rest)
    return prompt + stream.text()


@torch.no_grad()
def save_attention(model, tokenizer, text: str, path) -> str:
    """Draw every head of the last layer's attention over text into the PNG path; returns the
    path. A language model reads the text's last block_size tokens, a classifier or regressor
    its first (as it was trained), with [CLS] in front under pooling=cls.

        >>> save_attention(model, tokenizer, "ROMEO: But soft!", "attn.png")   # doctest: +SKIP
        'attn.png'
    """
    cls = model.config.pooling == "cls"
    n = model.config.block_size - cls
    ids = encode_prompt(tokenizer, text)
    ids = ids[:n] if model.config.head != "lm" else ids[-n:]
    weights = model.get_attention_weights(torch.tensor([ids], device=next(model.parameters()).device))
    tokens = ["[CLS]"] * cls + [tokenizer.decode([i]) for i in ids]
    plot_attention(weights, layer=-1, head=None, tokens=tokens, path=path,
                   title=f"attention of the last layer over {len(ids)} tokens")
    return str(png(path))


def generate_batch(model, tokenizer, prompts: list[str], cfg: SampleConfig, *, generator=None) -> list[str]:
    """Prompt + continuation for each prompt, decoded together as one left-padded batch.
    Greedy (temperature 0), each result is what generate_text gives for that prompt alone;
    a row that reaches a stop string or the end-of-text token is finished (the batch goes
    on until every row is)."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    return [p + text for p, text in zip(prompts, _continue_batch(model, tokenizer, ids, cfg, generator))]


def _continue_batch(model, tokenizer, ids: list[list[int]], cfg: SampleConfig, generator) -> list[str]:
    """The continuations (text) of encoded prompts, decoded as one left-padded batch."""
    idx, pad = left_pad(ids)
    device = next(model.parameters()).device
    streams, eos_id = [TextStream(tokenizer, cfg.stop) for _ in ids], cfg.eos_id(tokenizer)
    finished = [False] * len(ids)
    for tok in generate_tokens(model, idx.to(device), cfg.max_new_tokens, temperature=cfg.temperature,
                               top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                               repetition_penalty=cfg.repetition_penalty, generator=generator, pad=pad,
                               compile=cfg.compile):
        for row, token in enumerate(tok[:, 0].tolist()):
            if finished[row]:
                continue
            if token == eos_id:
                finished[row] = True
            else:
                streams[row].push(token)
                finished[row] = streams[row].done
        if all(finished):
            break
    return [stream.text() for stream in streams]


def set_dtype(model, dtype: str, device: str):
    """The model with its floating-point weights in this dtype (bf16 halves the
    bytes a decode step reads); fp16 needs a GPU (CPUs emulate it slowly)."""
    if dtype == "fp16" and device.split(":")[0] == "cpu":
        raise ValueError("dtype=fp16 needs a GPU; on a CPU use bf16 (or fp32)")
    return model if dtype == "fp32" else model.to(PRECISION_DTYPES[dtype])


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 file, one prompt each."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt_file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"prompt_file {path} has no prompts (one per line)")
    return prompts


def prompt_file_main(model, tokenizer, cfg: SampleConfig, generator):
    """generate.py --prompt_file: every prompt (num_samples times) in batched decodes, printed
    in file order."""
    refuse("prompt_file decodes a batch; it does not combine with {}",
           (("stream", cfg.stream), ("interactive", cfg.interactive), ("beam_size > 1", cfg.beam_size > 1),
            ("draft_checkpoint", cfg.draft_checkpoint)))
    prompts, encoded = read_prompts(cfg.prompt_file), []
    for n, prompt in enumerate(prompts, 1):        # all of them before any output; name the bad one
        try:
            encoded.append(encode_prompt(tokenizer, prompt))
        except ValueError as e:
            raise ValueError(f"{cfg.prompt_file}, prompt {n}: {e}") from None
    rows = [(p, ids) for p, ids in zip(prompts, encoded) for _ in range(cfg.num_samples)]
    size = cfg.batch_size or len(rows)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        texts = _continue_batch(model, tokenizer, [ids for _, ids in chunk], cfg, generator)
        for i, ((prompt, _), text) in enumerate(zip(chunk, texts), start):
            print(("\n" + "-" * 40 + "\n" if i else "") + prompt + text)

# -----------------------------------------------------------------------------
# Encoder-decoders: a target text per source text
# -----------------------------------------------------------------------------


def translate(model, tokenizer, sources: list[str], cfg: SampleConfig, *, generator=None) -> list[str]:
    """The target text for each source (its encoder-decoder's tokenizer: data.PairTokenizer),
    decoded as cfg says: sampling or greedy, or beam search with beam_size > 1."""
    ids = []
    for n, text in enumerate(sources, 1):
        try:
            ids.append(torch.tensor(tokenizer.encode(text)))
        except ValueError as e:
            raise ValueError(f"source {n} ({text[:30]!r}): {e}") from None
        if len(ids[-1]) > model.config.block_size:
            raise ValueError(f"source {n} is {len(ids[-1])} tokens, longer than block_size={model.config.block_size}")
        if not len(ids[-1]):
            raise ValueError(f"source {n} is empty")
    src, mask = pad_sequences(ids)
    out = model.generate(src.to(model.device), cfg.max_new_tokens, src_mask=mask.to(model.device),
                         num_beams=cfg.beam_size, length_penalty=cfg.length_penalty, temperature=cfg.temperature,
                         top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                         repetition_penalty=cfg.repetition_penalty, generator=generator)
    return [tokenizer.decode(row.tolist()) for row in out]


def save_cross_attention(model, tokenizer, source: str, target: str, path) -> str:
    """Draw every head of the last decoder layer's cross-attention: which source tokens each
    target token looked at (the row of a token is the query that produced it), into the PNG
    path; returns the path."""
    src = torch.tensor([tokenizer.encode(source)], device=model.device)
    tgt = torch.tensor([tokenizer.encode_target(target)], device=model.device)   # BOS ... EOS
    weights = model.get_attention_weights(src, tgt[:, :-1])["cross"]
    keys = [tokenizer.source.decode([i - tokenizer.OFFSET]) for i in src[0].tolist()]
    produced = [tokenizer.decode([i]) or "<eos>" for i in tgt[0, 1:].tolist()]
    plot_attention(weights, layer=-1, head=None, tokens=keys, queries=produced, path=path,
                   title=f"cross-attention of the last decoder layer: {source!r} -> {target!r}")
    return str(png(path))


def translate_main(model, tokenizer, cfg: SampleConfig, generator, *, read=input, given=()):
    """generate.py on an encoder-decoder: --prompt (one source), --prompt_file (a batch, one
    source per line) or --interactive (a source per line typed); prints each target."""
    refuse("an encoder-decoder prints one target per source, ending at its EOS; it does not take {}",
           (("num_samples > 1", cfg.num_samples > 1), ("stop", bool(cfg.stop)), ("eos=ignore", cfg.eos != "stop"),
            ("stream", cfg.stream), ("chat", cfg.chat), ("num_return_sequences > 1", cfg.num_return_sequences > 1),
            ("draft_checkpoint", cfg.draft_checkpoint), ("compile", cfg.compile), *sampling_knobs(cfg, given)))
    if cfg.interactive:
        print("Interactive translation: a source per line; Ctrl-D or 'quit' exits.")
        for line in filter(None, typed_lines(read)):
            try:
                print(translate(model, tokenizer, [line], cfg, generator=generator)[0])
            except ValueError as e:
                print(f"error: {e}")
        return
    sources = read_prompts(cfg.prompt_file) if cfg.prompt_file else [cfg.prompt]
    size = cfg.batch_size or len(sources)
    for start in range(0, len(sources), size):
        for target in translate(model, tokenizer, sources[start:start + size], cfg, generator=generator):
            print(target)
    if cfg.save_attention:
        if len(sources) > 1:
            raise ValueError("save_attention draws one translation; use --prompt, not --prompt_file")
        print(f"attention: {save_cross_attention(model, tokenizer, sources[0], target, cfg.save_attention)}",
              file=sys.stderr)

# -----------------------------------------------------------------------------
# Classifiers and regressors: a row of outputs per text
# -----------------------------------------------------------------------------


def predict_texts(model, tokenizer, texts: list[str], *, labels: Optional[list[str]] = None,
                  batch_size: int = 32) -> list[torch.Tensor]:
    """The head's outputs for each text, cut to its first block_size tokens as in training:
    class probabilities (num_classes,), or regression values ((output_dim,) or per position)."""
    task = task_for(model, labels=labels) if model.config.head == "classification" else task_for(model)
    max_len = model.config.block_size - (model.config.pooling == "cls")
    items = [(torch.tensor(encode_prompt(tokenizer, text)[:max_len]), 0) for text in texts]
    return list(predict_all(model, task, items, batch_size=batch_size, device=model.device))


def prediction_table(outputs: list[torch.Tensor], labels: Optional[list[str]]) -> list[str]:
    """Tab-separated lines, a header first: the label and every class's probability, or the
    values (a row of outputs per position, rows of one text joined by ' | ').

        >>> prediction_table([torch.tensor([0.2, 0.8])], ["neg", "pos"])
        ['label\tneg\tpos', 'pos\t0.2000\t0.8000']
    """
    if labels is not None:
        return ["\t".join(["label", *labels])] + [
            "\t".join([labels[int(p.argmax())], *(f"{v:.4f}" for v in p.tolist())]) for p in outputs]
    width = outputs[0].shape[-1]
    rows = [" | ".join("\t".join(f"{v:.6g}" for v in row) for row in o.reshape(-1, width).tolist())
            for o in outputs]
    return ["\t".join(f"output_{i}" for i in range(width))] + rows


def typed_lines(read=input) -> Iterator[str]:
    """The lines typed at a `>>> ` prompt, until Ctrl-D, Ctrl-C, `quit` or `exit`."""
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("quit", "exit"):
            return
        yield line


def predict_main(model, tokenizer, task: dict, cfg: SampleConfig, *, read=input):
    """generate.py with a classifier or regressor: --prompt, --prompt_file (a text per line) or
    --interactive, printed as prediction_table's tab-separated lines."""
    labels = task.get("labels") if model.config.head == "classification" else None
    if model.config.head == "classification" and labels is None:
        labels = [str(i) for i in range(model.config.num_classes)]
    if not cfg.interactive:
        texts = read_prompts(cfg.prompt_file) if cfg.prompt_file else [cfg.prompt]
        outputs = predict_texts(model, tokenizer, texts, labels=labels, batch_size=cfg.batch_size or 32)
        print("\n".join(prediction_table(outputs, labels)))
        if cfg.save_attention:             # one --prompt: SampleConfig refuses it beside --prompt_file
            print(f"attention: {save_attention(model, tokenizer, cfg.prompt, cfg.save_attention)}", file=sys.stderr)
        return
    print(f"Interactive {model.config.head} ({tokenizer.kind} tokenizer): a text per line. Ctrl-D or 'quit' exits.")
    for text in typed_lines(read):
        try:
            if text:
                print("\n".join(prediction_table(predict_texts(model, tokenizer, [text], labels=labels), labels)))
        except ValueError as e:
            print(f"error: {e}")

# -----------------------------------------------------------------------------
# Time series: forecasts, and labels or values per series
# -----------------------------------------------------------------------------


@torch.no_grad()
def forecast(model, scaler, values, *, horizon: Optional[int] = None, lookback: Optional[int] = None):
    """The next `horizon` steps (horizon, C) after a series values (T, C), in its own units: the
    scaled last lookback steps go through the model; past the model's own horizon the forecast
    is rolled out, each forecast appended to the input of the next.

        >>> model, scaler = load_model("fc.pt")                                  # doctest: +SKIP
        >>> forecast(model, scaler, values, horizon=24).shape                    # doctest: +SKIP
        (24, 1)
    """
    import numpy as np
    cfg = model.config
    lookback = lookback or cfg.max_steps
    horizon = horizon or cfg.horizon
    if horizon <= 0:
        raise ValueError(f"horizon={horizon} must be a positive number of steps")
    if len(values) < lookback:
        raise ValueError(f"the series has {len(values)} steps; the model forecasts from the last lookback={lookback}")
    history = torch.as_tensor(scaler.transform(np.asarray(values, float)), dtype=model.input_layer.weight.dtype)
    model.eval()
    out = []
    while sum(len(o) for o in out) < horizon:
        window = history[-lookback:][None].to(model.device)                 # (1, L, C)
        step = model(window)
        step = (step[:, -1] if step.dim() == 4 else step)[0].cpu()          # (H, C)
        out.append(step)
        history = torch.cat([history, step])
    return scaler.inverse(torch.cat(out)[:horizon].float().numpy().astype(float))


def series_main(model, scaler, ckpt: dict, cfg: SampleConfig):
    """generate.py with a model of time series: --input FILE. A forecaster prints the forecast
    as CSV (with --holdout, beside the truth; --plot draws them); a classifier prints each
    series' label and class probabilities, a regressor its values."""
    from series import SeriesScaler, column_names, read_labelled_series
    if not cfg.input:
        raise ValueError("this model reads time series: give the series with --input FILE (.csv, .npy, .npz or .ts)")
    scaler = scaler or SeriesScaler.identity(model.config.input_dim)   # a model saved without one reads raw values
    if model.config.head != "forecast":
        refuse(f"{{}}: for a forecaster; this model is a {model.config.head} model",
               ((f"--{k}", getattr(cfg, k)) for k in FORECASTING))
    data, task = ckpt.get("config", {}).get("data", {}), ckpt.get("task") or {}
    if model.config.head == "forecast":
        return forecast_main(model, scaler, cfg, missing=data.get("missing", "error"), lookback=task.get("lookback"))
    csv_file = cfg.input.lower().endswith(".csv")
    columns = column_names(data.get("columns")) if csv_file else None
    series, targets, _ = read_labelled_series(cfg.input, target=data.get("target") if csv_file else None,
                                              columns=columns, unlabelled=True, missing=data.get("missing", "error"))
    labels = task.get("labels") if model.config.head == "classification" else None
    unknown = sorted({str(t) for t in targets if t is not None} - set(labels)) if labels else []
    if unknown:
        raise ValueError(f"'{cfg.input}' has label '{unknown[0]}', which training never saw ({', '.join(labels)})")
    for s in series:
        scaler.check(s, f"'{cfg.input}'")
    dtype = model.input_layer.weight.dtype
    items = [(torch.as_tensor(scaler.transform(s), dtype=dtype), 0) for s in series]
    task = task_for(model, labels=labels) if labels else task_for(model)
    outputs = list(predict_all(model, task, items, batch_size=cfg.batch_size or 32, device=model.device))
    print("\n".join(prediction_table(outputs, labels)))


def forecast_main(model, scaler, cfg: SampleConfig, *, missing: str, lookback: Optional[int]):
    """The forecast after the series of --input (or of its first part, --holdout), as CSV: a
    row per step, the channels by name, then the held-out truth where known."""
    from series import read_series, resolve_path
    from utils import plot_forecast
    csv_file = resolve_path(cfg.input).suffix.lower() == ".csv"
    values, names = read_series(cfg.input, columns=scaler.columns if csv_file else None, missing=missing)
    scaler.check(values, f"'{cfg.input}'")
    if not 0 <= cfg.holdout < len(values):
        raise ValueError(f"holdout={cfg.holdout} must leave some of the {len(values)} steps as history")
    if cfg.horizon and cfg.holdout > cfg.horizon:
        raise ValueError(f"holdout={cfg.holdout} is longer than horizon={cfg.horizon}: the forecast would stop "
                         f"before the held-out truth does")
    history, truth = (values[:-cfg.holdout], values[-cfg.holdout:]) if cfg.holdout else (values, values[:0])
    pred = forecast(model, scaler, history, horizon=cfg.horizon or cfg.holdout or None, lookback=lookback)
    print(",".join(["step", *names] + [f"{n}_true" for n in names] * bool(cfg.holdout)))
    for h, row in enumerate(pred):
        known = list(truth[h]) if h < len(truth) else []
        print(",".join([str(len(history) + h + 1), *(f"{v:.6g}" for v in list(row) + known)]))
    if cfg.plot:
        shown = plot_forecast(history, pred, truth if cfg.holdout else None, names=names, path=cfg.plot)
        print(f"plot: {shown}", file=sys.stderr)

# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

SECTIONS = {**RUN_SECTIONS, "sample": SampleConfig}
ALIASES = {**{name: f"sample.{name}" for name in SampleConfig.__dataclass_fields__},
           "quantize": "quantize.mode", "group_size": "quantize.group_size"}


# The sample options of a model that predicts (labels, values or forecasts) rather than writes
PREDICTING = ("checkpoint", "lora", "device", "dtype", "batch_size")
TEXT_PREDICTING = (*PREDICTING, "prompt", "prompt_file", "interactive", "save_attention")
FORECASTING = ("horizon", "holdout", "plot")           # the options only a forecaster reads
SERIES_PREDICTING = (*PREDICTING, "input", *FORECASTING)


def check_prediction_options(model, cfg: SampleConfig, given) -> None:
    """A classifier, regressor or forecaster refuses the command-line sample options it would
    ignore (sampling, beams, lengths; a batch size for one input), naming them."""
    series = model.config.input_dim is not None
    used = SERIES_PREDICTING if series else TEXT_PREDICTING
    one_input = model.config.head == "forecast" or not (series or cfg.prompt_file)
    prints = {"classification": "labels and probabilities", "forecast": "a forecast"}.get(model.config.head, "values")
    refuse(f"a {model.config.head} model{' of time series' * series} prints {prints}; it does not use {{}}",
           ((f"--{k}", k not in used or k == "batch_size" and one_input) for k in given))


SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def check_mode_options(cfg: SampleConfig, given=()) -> None:
    """An option of a decoding mode that this command does not run is an error. given: the
    sample options on the command line (a default cannot tell a --prompt from config.yaml's)."""
    refuse("options for a mode this command does not run: {}", (
        ("--length_penalty (needs --beam_size > 1)", cfg.length_penalty != SampleConfig.length_penalty
         and cfg.beam_size == 1),
        ("--speculative_k (needs --draft_checkpoint)", cfg.speculative_k != SampleConfig.speculative_k
         and not cfg.draft_checkpoint),
        ("--chat (needs --interactive)", cfg.chat and not cfg.interactive),
        ("--batch_size (needs --prompt_file)", cfg.batch_size is not None and not cfg.prompt_file),
        ("--prompt (--prompt_file and --interactive read their own)",
         "prompt" in given and (cfg.prompt_file or cfg.interactive)),
        ("--num_samples (--interactive writes one per prompt)", cfg.num_samples > 1 and cfg.interactive)))


def sampling_knobs(cfg: SampleConfig, given) -> tuple:
    """(name, given) pairs for refuse(): the sampling options on the command line, which
    deterministic beam search would ignore."""
    return tuple((f"{k} (beam search is deterministic)", cfg.beam_size > 1 and k in given) for k in SAMPLING_KNOBS)


def check_lm_mode(cfg: SampleConfig, given=()) -> None:
    """A language model decodes one prompt in one mode: beam search and speculative decoding
    refuse the options they would otherwise ignore (given: the sample options typed)."""
    if cfg.beam_size > 1:
        refuse("beam_size > 1 does not combine with {}", (("stream", cfg.stream), ("num_samples > 1", cfg.num_samples > 1),
                                                       ("stop", bool(cfg.stop)), ("interactive", cfg.interactive),
                                                       ("draft_checkpoint", cfg.draft_checkpoint),
                                                       *sampling_knobs(cfg, given)))
    if cfg.draft_checkpoint:
        refuse("draft_checkpoint does not combine with {}", (("stream", cfg.stream), ("interactive", cfg.interactive),
                                                          ("repetition_penalty", cfg.repetition_penalty != 1.0)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sampling options (--prompt, --temperature, ...) are the keys of "
                                            "the `sample` section of config.yaml.")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    try:
        args, rest = parser.parse_known_args(canonical_argv(sys.argv[1:] if argv is None else argv, own=ALIASES,
                                                            log=lambda s: print(s, file=sys.stderr)))
        cfg = load_config(config_file(args.config), rest, sections=SECTIONS, aliases=ALIASES)
        overrides = parse_overrides(rest, sections=SECTIONS, aliases=ALIASES)
        refuse("generate.py reads the model from its checkpoint; it does not use {}",
               ((f"--{section}.{key}", section not in ("sample", "quantize") and (section, key) != ("training", "out_dir"))
                for section, keys in overrides.items() for key in keys))
        scfg: SampleConfig = cfg["sample"]
        path = scfg.checkpoint or str(Path(cfg["training"].out_dir) / "best.pt")
        device = pick_device(scfg.device)
        model, tokenizer = load_model(path, lora=scfg.lora, quantize=cfg["quantize"], device=device)
        model = set_dtype(model, scfg.dtype, device)
        dispatch(model, tokenizer, scfg, overrides.get("sample", {}), path=path, device=device)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        sys.exit(f"error: {e}")


def dispatch(model, tokenizer, cfg: SampleConfig, given, *, path: str, device: str):
    """What generate.py does with a loaded model: predict (a classifier, regressor or model of
    series), translate (an encoder-decoder), or write text in the mode cfg asks for. given:
    the sample options typed on the command line."""
    if model.config.input_dim is None:
        refuse(f"{{}}: for a model of time series; {path} holds a model of text",
               ((f"--{k}", getattr(cfg, k)) for k in ("input", *FORECASTING)))
    if model.config.head != "lm":
        check_prediction_options(model, cfg, given)
    if model.config.input_dim is not None:   # time series: forecasts, labels or values
        return series_main(model, tokenizer, load_checkpoint(cfg.lora or path), cfg)
    if model.config.head != "lm":            # a classifier or regressor: outputs, not text
        return predict_main(model, tokenizer, load_checkpoint(cfg.lora or path)["task"], cfg)
    generator = torch.Generator(device=device)
    if cfg.seed is not None:
        generator.manual_seed(cfg.seed)
    else:
        generator.seed()
    check_mode_options(cfg, given)
    if hasattr(model, "encoder"):             # an encoder-decoder: a translation per source
        return translate_main(model, tokenizer, cfg, generator, given=given)
    if cfg.eos != "stop" and tokenizer.eot_id is None:
        raise ValueError(f"eos=ignore: the {tokenizer.kind} tokenizer has no end-of-text token to ignore")
    if cfg.prompt_file:
        return prompt_file_main(model, tokenizer, cfg, generator)
    check_lm_mode(cfg, given)
    if cfg.interactive:
        return interactive(model, tokenizer, cfg, generator)
    if cfg.draft_checkpoint:
        return speculative_main(model, tokenizer, cfg, generator, device)
    if cfg.beam_size > 1:
        return beam_main(model, tokenizer, cfg)
    sample_main(model, tokenizer, cfg, generator)


def beam_main(model, tokenizer, cfg: SampleConfig):
    """generate.py --beam_size K: the num_return_sequences best beams, each with its score."""
    ranked = beam_search(model, encode_prompt(tokenizer, cfg.prompt), cfg.max_new_tokens, beam_size=cfg.beam_size,
                         length_penalty=cfg.length_penalty, num_return_sequences=cfg.num_return_sequences,
                         eos_id=cfg.eos_id(tokenizer), compile=cfg.compile)
    for i, (ids, score) in enumerate(ranked):
        print(("\n" if i else "") + f"[beam {i + 1}, score {score:.4f}]\n{cfg.prompt}{tokenizer.decode(ids)}")


def sample_main(model, tokenizer, cfg: SampleConfig, generator):
    """generate.py's default mode: num_samples texts from the prompt (streamed with --stream),
    then --save_attention over the last."""
    for i in range(cfg.num_samples):
        if i:
            print("\n" + "-" * 40)
        if cfg.stream:
            sys.stdout.write(cfg.prompt)
            text = generate_text(model, tokenizer, cfg.prompt, cfg, generator=generator, out=sys.stdout)
            print()
        else:
            text = generate_text(model, tokenizer, cfg.prompt, cfg, generator=generator)
            print(text)
    if cfg.save_attention:
        print(f"attention: {save_attention(model, tokenizer, text, cfg.save_attention)}", file=sys.stderr)


SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "stop", "eos",
            "chat")


def apply_command(cfg: SampleConfig, line: str) -> SampleConfig:
    """`/temperature 0.5`-style settings change for interactive mode: a new, validated config."""
    name, _, value = line[1:].strip().partition(" ")
    if name not in SETTINGS:
        raise ValueError(f"unknown command '/{name}'; {closest(name, SETTINGS)}")
    return replace(cfg, **{name: coerce(value, field_types(SampleConfig)[name], f"/{name}")})


def speculative_main(model, tokenizer, cfg: SampleConfig, generator, device):
    """generate.py --draft_checkpoint: print each sample, then the acceptance rate and the
    speed-up over decoding with the target alone (measured on the same prompt and length)."""
    draft, draft_tok = load_model(cfg.draft_checkpoint, device=device)
    draft = set_dtype(draft, cfg.dtype, device)
    if draft_tok.state() != tokenizer.state():
        raise ValueError(f"the draft checkpoint '{cfg.draft_checkpoint}' has another tokenizer than the target")
    ids = encode_prompt(tokenizer, cfg.prompt)
    if cfg.compile:      # compile the draft's step, and the target's for the comparison, before timing
        speculative_generate(model, draft, ids, min(cfg.max_new_tokens, cfg.speculative_k + 2), k=cfg.speculative_k,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                             generator=torch.Generator(device=device), compile=True)
        for _ in generate_tokens(model, torch.tensor([ids], device=device), 2, temperature=cfg.temperature,
                                 generator=torch.Generator(device=device), compile=True):
            pass
    for i in range(cfg.num_samples):
        start = time.perf_counter()
        new, rate = speculative_generate(model, draft, ids, cfg.max_new_tokens, k=cfg.speculative_k,
                                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                         min_p=cfg.min_p, generator=generator,
                                         eos_id=cfg.eos_id(tokenizer), compile=cfg.compile)
        spec_s = time.perf_counter() - start
        stream = TextStream(tokenizer, cfg.stop)
        for tok in new:
            stream.push(tok)
            if stream.done:
                break
        print(("\n" + "-" * 40 + "\n" if i else "") + cfg.prompt + stream.text())
        n = max(len(new), 1)                  # as many tokens as the output (fewer after an eos)
        start = time.perf_counter()
        for _ in generate_tokens(model, torch.tensor([ids], device=device), n, temperature=cfg.temperature,
                                 top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                                 generator=torch.Generator(device=device), compile=cfg.compile):
            pass
        plain_s = time.perf_counter() - start
        print(f"[speculative k={cfg.speculative_k}: acceptance {rate:.0%}, {len(new) / spec_s:.0f} tokens/s; "
              f"target alone {n / plain_s:.0f} tokens/s; speed-up {plain_s / spec_s:.2f}x]",
              file=sys.stderr)


def interactive(model, tokenizer, cfg: SampleConfig, generator, *, read=input):
    """A prompt loop: Ctrl-D or `quit` exits; `/key value` changes a setting (`/settings`
    shows them); with chat, the conversation so far is the context of each new prompt."""
    print(f"Interactive generation ({tokenizer.kind} tokenizer, {cfg.max_new_tokens} new tokens, "
          f"temperature {cfg.temperature}). Ctrl-D or 'quit' exits; /settings lists the settings.")
    history = ""
    for prompt in typed_lines(read):
        if not prompt:
            continue
        try:
            if prompt.strip() == "/settings":
                print(", ".join(f"{name}={getattr(cfg, name)!r}" for name in SETTINGS))
            elif prompt.startswith("/"):
                cfg = apply_command(cfg, prompt)
                name = prompt[1:].split()[0]
                print(f"{name} = {getattr(cfg, name)!r}")
            else:
                sys.stdout.write(prompt)
                context = history + prompt if cfg.chat else prompt
                text = generate_text(model, tokenizer, context, cfg, generator=generator, out=sys.stdout)
                print()
                history = text + "\n" if cfg.chat else ""
        except ValueError as e:
            print(f"\nerror: {e}")


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:        # the reader left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        sys.exit(1)
