"""Generate text from a trained checkpoint.

    python generate.py --checkpoint out/best.pt --prompt "ROMEO:" --max_new_tokens 200 \\
        --temperature 0.8 --top_k 50 --top_p 0.95 --seed 1 [--stream] [--num_samples 3]
    python generate.py --interactive            # a prompt loop; Ctrl-D or `quit` exits
    python generate.py --temperature 0          # greedy

Defaults come from the `sample` section of config.yaml. The tokenizer travels inside the
checkpoint, so no data file is needed.

Decoding runs the prompt once (prefill into the KV cache), then one token per step.
Context beyond block_size: the model always conditions on the last block_size tokens, as
nanoGPT does. Once prompt + output fill the window, each step re-encodes the last
block_size tokens (absolute positions shift, so cached keys cannot be reused); the result
equals running the model without a cache on the cropped sequence.
"""
from __future__ import annotations

import argparse
import operator
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from config import SECTIONS as RUN_SECTIONS, coerce, config_file, field_types, load_config
from model import closest
from utils import CheckpointError, load_model, pick_device, warn_compile_failed


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
    precision: str = "fp32"            # fp32 | bf16 | fp16: the weights' dtype while generating
    compile: bool = False              # torch.compile the one-token decode step (see decode_step)

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
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1 (or null: all prompts at once)")
        if self.precision not in DTYPES:
            raise ValueError(f"precision={self.precision!r}; {closest(self.precision, DTYPES)}")
        if self.eos not in EOS_MODES:
            raise ValueError(f"eos={self.eos!r}; {closest(self.eos, EOS_MODES)}")

    def eos_id(self, tokenizer) -> Optional[int]:
        """The token that ends the output: the tokenizer's end-of-text token with eos=stop, else None."""
        return tokenizer.eot_id if self.eos == "stop" else None


EOS_MODES = ("stop", "ignore")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

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
    logits = logits / temperature
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if min_p:
        logits = min_p_filter(logits, min_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)

# -----------------------------------------------------------------------------
# Decoding
# -----------------------------------------------------------------------------


def _prefill(model, seq: torch.Tensor, pad: Optional[torch.Tensor] = None):
    """Run the last block_size tokens of seq (B, T) into a fresh cache: (last logits, next position).
    pad: left-padding lengths of seq's rows (see left_pad); cropping the window shortens them."""
    window = seq[:, -model.config.block_size:]
    if pad is not None:
        pad = (pad - (seq.shape[1] - window.shape[1])).clamp(min=0)
    return model(window, start_pos=0, pad=pad)[:, -1].float(), window.shape[1]


def _next_logits(model, seq: torch.Tensor, pos: int, pad: Optional[torch.Tensor] = None,
                 compile: bool = False):
    """Logits after seq's last token (already appended), and the next position: one cached step
    (compile: the compiled one, see decode_step) while the window has room, else the window
    slides and its last block_size tokens are re-encoded."""
    if pos >= model.config.block_size:
        return _prefill(model, seq, pad)
    if compile:
        return decode_step(model)(seq[:, -1:], pos, pad).float(), pos + 1
    return model(seq[:, -1:], start_pos=pos, pad=pad)[:, -1].float(), pos + 1


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # model -> {greedy: CompiledStep}


def _clear_cache(model):
    """model.clear_cache(), its compiled steps letting go of the cache too."""
    model.clear_cache()
    for step in _STEPS.get(model, {}).values():
        step.forget()


def decode_step(model, *, greedy: bool = False) -> "CompiledStep":
    """model's compiled one-token step (a CompiledStep), made on first use and kept."""
    steps = _STEPS.setdefault(model, {})
    if greedy not in steps:
        steps[greedy] = CompiledStep(model, greedy=greedy)
    return steps[greedy]


class CompiledStep:
    """model's one-token forward through torch.compile: step(token (B, 1), pos, pad) -> logits
    (B, vocab), or with greedy=True the argmax next tokens (B, 1), picked inside the graph.
    A chunk of T > 1 tokens (B, T) gives the logits of each of them, (B, T, vocab), from a
    graph of its own (speculative decoding's checks of k + 1 tokens).

    The graph's inputs are static: the token and its position (a 0-d tensor) live in tensors of
    the step's own, which the graph itself advances (the position always, the token when it is
    greedy), so a step fed its own output copies nothing. Each layer attends over a span of KV
    cache slots, those not written yet masked (KVCache, static mode). The span is the position
    rounded up to 64 slots, a dynamic size, so one graph serves every step (a new batch size or
    cache length compiles once more). On CUDA it runs as a CUDA graph (mode="reduce-overhead").
    On a CPU it runs through _cpu_decode_backend, and a step whose inputs are the same objects
    as the last one's (the span has not moved) is a replay, much like a CUDA graph's: it runs
    the C++ kernels again on the buffers of the last call (see _kernel_capture), without
    dynamo's guards or inductor's Python wrapper, which allocates every intermediate buffer
    again (together a tenth of a step at 15M parameters, most of it for a tiny model).
    Outputs are copies, never those buffers. If compiling fails, a warning is printed and
    decoding goes on eagerly.

    Example:
        >>> model = Transformer(vocab_size=65, d_model=64, n_heads=4, n_layers=2).eval()
        >>> model.setup_cache(1, 64); _ = model(torch.tensor([[1, 2, 3]]), start_pos=0)  # prefill
        >>> logits = decode_step(model)(torch.tensor([[4]]), 3)                         # (1, 65)
    """

    def __init__(self, model, *, greedy: bool = False):
        model_ref = weakref.ref(model)               # _STEPS must not keep the model alive

        def step(token, pos, pad):
            logits = model_ref()(token, start_pos=pos, pad=pad)
            pos.add_(token.shape[1])                 # the next step's position
            if token.shape[1] > 1:                   # a chunk: every position's logits
                return logits
            logits = logits[:, -1]
            if not greedy:
                return logits
            nxt = logits.argmax(-1, keepdim=True)
            token.copy_(nxt)                         # and its token
            return nxt
        # a code object of its own: dynamo counts recompiles (at most 8) per code object
        step.__code__ = step.__code__.replace()
        self.model_ref, self.eager, self.greedy = model_ref, step, greedy
        self.token = self.pos = None                # the graph's static inputs
        self.pos_value = self.fed = None            # what they hold: pos_value, and the token if it was fed
        self.last = None                            # (compiled graph, its inputs, its kernels, its output)
        self.replay_key = None                      # what those inputs were made of
        if model.tok_emb.weight.device.type == "cpu":
            self.fn = torch.compile(step, backend=self._backend, fullgraph=True, dynamic=False)
        else:
            self.fn = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        self.compiled = None                        # True/False once the first call has compiled or failed

    def _backend(self, graph, example_inputs):
        wrappers = []
        compiled = _cpu_decode_backend(graph, example_inputs, keep=wrappers)
        capture = _kernel_capture(wrappers)

        def run(*args):                             # dynamo calls this with every input of the graph
            kernels, out = capture(compiled, args)
            self.last = (compiled, args, kernels, out)
            return out
        return run

    def __call__(self, token: torch.Tensor, pos: int, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        model = self.model_ref()
        cache = model.blocks[0].attn.kv_cache
        T = token.shape[1]
        if self.greedy and T != 1:
            raise ValueError(f"a greedy decode step takes one token per row, got {T}")
        if cache is None or not 0 <= pos <= cache.max_len - T:   # a kernel's own check would abort the process
            where = f"position {pos}" if T == 1 else f"positions {pos}..{pos + T - 1}"
            raise ValueError(f"a decode step needs a KV cache (model.setup_cache) with a slot for {where}"
                             + (f"; it holds {cache.max_len}" if cache is not None else ""))
        if self.token is None or self.token.shape != token.shape or self.token.device != token.device:
            self.token = torch.empty_like(token, memory_format=torch.contiguous_format)
            self.pos = torch.zeros((), dtype=torch.long, device=token.device)
            self.pos_value = self.fed = None         # new tensors hold nothing yet
        if token is not self.fed:
            self.token.copy_(token)
        if pos != self.pos_value:
            self.pos.fill_(pos)
        self.pos_value = self.fed = None             # unknown until the step has run
        span = -(-(pos + T) // 64) * 64              # read the cache up to the last position, rounded up to 64
        if cache.k_span.shape[2] != min(span, cache.max_len):
            model.set_cache_span(span)
        key = (self.token, pad, cache.k_span)       # a new span or cache: new views
        if self.replay_key is not None and all(map(operator.is_, key, self.replay_key)):
            out = self._replay()
        else:
            out = self._through_dynamo(pad)
            self.replay_key = key if self.last is not None else None  # the CPU backend kept this call's inputs
        out = out.clone()                           # a replay rewrites the buffers of the last call
        self.pos_value, self.fed = pos + T, out if self.greedy else None
        return out

    def forget(self):
        """Let go of the last call's inputs, the KV cache among them, once decoding is over (the
        next call goes through dynamo anyway: a new cache is new tensors)."""
        self.last = self.replay_key = None

    def _replay(self):
        compiled, args, kernels, out = self.last
        if kernels is None:
            return compiled(*args)[0]
        for kernel, kernel_args in kernels:
            kernel(*kernel_args)
        return out[0]

    def _through_dynamo(self, pad):
        self.forget()                               # this call records anew (CPU backend)
        if self.compiled is False:
            return self.eager(self.token, self.pos, pad)
        try:
            out = self.fn(self.token, self.pos, pad)
            self.compiled = True
            return out
        except Exception as e:
            if self.compiled:                        # it ran before: a real error, not a missing compiler
                raise
            warn_compile_failed(e, "decoding")
            self.compiled = False
            return self.eager(self.token, self.pos, pad)


def _kernel_capture(wrappers: list):
    """capture(compiled, args) -> (kernels, compiled(*args)), where kernels lists each C++
    kernel that inductor's Python wrapper called, with the arguments it called it with: the
    graph's inputs and the buffers the wrapper allocated for this call, kept from then on.
    Calling them again on those arguments redoes the whole graph, its output rewritten in
    place. kernels is None unless that is all the wrapper does: one compiled graph (wrappers:
    inductor's output for it) whose call() only allocates buffers, takes views of them and
    calls cpp_fused_* kernels (no ATen operator, no check); replays then use compiled(*args)."""
    call = getattr(wrappers[0], "current_callable", None) if len(wrappers) == 1 else None
    call = getattr(call, "__func__", call)
    names = _plain_kernel_names(call)
    if names is None:
        return lambda compiled, args: (None, compiled(*args))
    module = call.__globals__

    def capture(compiled, args):
        kernels = []

        def recording(kernel):
            def record(*kernel_args):
                kernels.append((kernel, kernel_args))
                return kernel(*kernel_args)
            return record
        real = {name: module[name] for name in names}
        module.update({name: recording(kernel) for name, kernel in real.items()})
        try:
            out = compiled(*args)
        finally:
            module.update(real)
        return kernels, out
    return capture


def _plain_kernel_names(call) -> Optional[list[str]]:
    """The cpp_fused_* kernels an inductor wrapper's call() function calls, if it calls nothing
    else than them, empty_strided_cpu, reinterpret_tensor and args.clear(); else None."""
    import ast
    import inspect
    import textwrap
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(call)))
    except (TypeError, OSError, SyntaxError):
        return None
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id.startswith("cpp_fused"):
            names.add(f.id)
        elif not (isinstance(f, ast.Name) and f.id in ("empty_strided_cpu", "reinterpret_tensor")
                  or isinstance(f, ast.Attribute) and f.attr == "clear" and getattr(f.value, "id", "") == "args"):
            return None
    return sorted(names) if names else None


def _cpu_decode_backend(graph, example_inputs, *, keep: Optional[list] = None):
    """Inductor, with the one-token step's matrix products and attention written as plain
    multiplies, sums and a softmax (decompositions), which inductor fuses into a few loops
    split across the cores. bench.py decode measures the difference. No size asserts: dynamo's
    guards (or the replay of the same inputs, see CompiledStep) already ensure the shapes.
    keep: a list that receives inductor's output for each graph it compiles (_kernel_capture)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    def inner_compile(*args, **kwargs):
        out = compile_fx_inner(*args, **kwargs)
        if keep is not None:
            keep.append(out)
        return out
    aten = torch.ops.aten
    return compile_fx(graph, example_inputs, inner_compile=inner_compile, config_patches={"size_asserts": False},
                      decompositions={**select_decomp_table(), aten.mm.default: _one_row_mm,
                                      aten._scaled_dot_product_flash_attention_for_cpu.default: _one_query_attention})


def _one_row_mm(a, b):
    """a (1, K) @ b (K, N) as a multiply and a sum over K (other shapes: NotImplemented, which
    keeps the default). torch's CPU matrix-vector product runs on one thread at about half the
    memory bandwidth; inductor makes this one loop over b's columns that reads each weight once."""
    if a.shape[0] != 1:
        return NotImplemented
    return (_realized(a).unsqueeze(2) * b.unsqueeze(0)).sum(1)      # (1, K, 1) * (1, K, N) -> (1, N)


def _realized(x):
    """x computed into a buffer of its own before the loop that reads it: otherwise inductor
    inlines whatever made x (a norm and its square root, a rotation) into that loop, where it is
    recomputed for every weight row or cache slot."""
    from torch._inductor import inductor_prims
    return inductor_prims.force_stride_order(x, x.stride())


def _one_query_attention(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """torch's CPU flash attention (output, logsumexp) for one query position, as arithmetic
    inductor fuses: the kernel is tuned for long queries and costs more than the work at one.
    q (B, H, 1, hd); k, v (B, Hkv, S, hd), Hkv dividing H (GQA); attn_mask bool or additive."""
    B, H, T, hd = q.shape
    if T != 1 or is_causal or dropout_p:
        return NotImplemented
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv                                                    # query heads per kv head
    q = _realized(q)                                                # rotated once, not once per slot
    scores = (q.view(B, Hkv, g, 1, hd) * k.unsqueeze(2)).sum(-1) * (scale or hd ** -0.5)  # (B, Hkv, g, S)
    if attn_mask is not None:
        mask = attn_mask.expand(B, H, 1, S).reshape(B, Hkv, g, S)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    scores = scores.float()
    top = scores.amax(-1, keepdim=True)
    e = (scores - top).exp()                                        # softmax, normalized after the sum:
    total = e.sum(-1, keepdim=True)                                 # one division per output, not per slot
    y = (e.to(v.dtype).unsqueeze(-1) * v.unsqueeze(2)).sum(-2) / total.to(v.dtype)  # (B, Hkv, g, hd)
    return y.reshape(B, H, 1, hd), (top + total.log()).reshape(B, H, 1)


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
                    pad: Optional[torch.Tensor] = None, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens next-token tensors (B, 1) continuing idx (B, T); pad: the rows'
    left-padding lengths when they are prompts of different lengths (see left_pad); compile:
    run the one-token steps through decode_step(model) (the prompt runs eagerly).

    Example:
        >>> for tok in generate_tokens(model, torch.tensor([[1, 2]]), 5, temperature=0):
        ...     print(tok.item())
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                   repetition_penalty=repetition_penalty)
    if pad is not None:
        pad = pad.to(idx.device)
    # a compiled step attends over the whole cache: size it to this call (rounded up, so that
    # calls of similar lengths share a compiled shape), or block_size if the window will slide
    block = model.config.block_size
    model.setup_cache(idx.shape[0], min(block, -(-(idx.shape[1] + max_new_tokens) // 256) * 256))
    logits, pos = _prefill(model, idx, pad)              # the prompt in one forward
    try:
        if compile and temperature == 0 and repetition_penalty == 1.0 and pos + max_new_tokens <= block + 1:
            step = decode_step(model, greedy=True)       # picks each next token inside the graph
            nxt = sample_next(logits, temperature=0)
            for i in range(max_new_tokens):
                yield nxt
                if i < max_new_tokens - 1:
                    nxt = step(nxt, pos + i, pad)
            return
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, context=idx, generator=generator)
            yield nxt
            if i == max_new_tokens - 1:
                break
            idx = torch.cat([idx, nxt], dim=1)
            logits, pos = _next_logits(model, idx, pos, pad, compile)
    finally:
        _clear_cache(model)


@torch.no_grad()
def beam_search(model, prompt: list[int], max_new_tokens: int, *, beam_size: int,
                length_penalty: float = 1.0, num_return_sequences: int = 1,
                eos_id: Optional[int] = None, compile: bool = False) -> list[tuple[list[int], float]]:
    """The num_return_sequences best continuations of prompt under beam search, best first,
    as (token ids, score); score = sum of log-probabilities / length ** length_penalty.

    Every beam is extended by one token per step (keeping the beam_size best of
    beam_size x vocab candidates) and the KV cache rows follow their beams. With beam_size 1
    this is greedy decoding. A beam that emits eos_id is finished: it keeps its score (its only
    continuation is eos again, at log-probability 0), and its output ends before the eos; its
    length is the number of tokens before it (the eos's log-probability counts, as in HF).
    compile: the one-token steps (all beams at once) run through decode_step(model).
    """
    if beam_size < 1 or not 1 <= num_return_sequences <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= num_return_sequences <= beam_size "
                         f"(got {beam_size}, {num_return_sequences})")
    device = next(model.parameters()).device
    seqs = torch.tensor([prompt], device=device)                       # (1, T): one beam to start
    scores = torch.zeros(1, device=device)
    model.setup_cache(1)                                               # grows to the beams after step 1
    try:
        logits, pos = _prefill(model, seqs)
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)               # (beams, vocab)
            if eos_id is not None and step:
                done = seqs[:, -1] == eos_id                               # finished beams stay as they are
                logp[done] = float("-inf")
                logp[done, eos_id] = 0.0
            total = (scores[:, None] + logp).flatten()
            scores, flat = total.topk(min(beam_size, total.numel()))
            rows, tokens = flat // logp.shape[1], flat % logp.shape[1]
            seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
            if step == max_new_tokens - 1:
                break
            model.select_cache_rows(rows)                                  # caches follow their beams
            logits, pos = _next_logits(model, seqs, pos, compile=compile)
    finally:
        _clear_cache(model)
    outputs = [_until(ids, eos_id) for ids in seqs[:, len(prompt):].tolist()]
    ranked = sorted(((ids, score / max(len(ids), 1) ** length_penalty) for ids, score in zip(outputs, scores.tolist())),
                    key=lambda pair: -pair[1])
    return ranked[:num_return_sequences]


def _until(ids: list[int], eos_id: Optional[int]) -> list[int]:
    """ids up to (not including) the first eos_id."""
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / T), or one-hot argmax at T = 0."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def speculative_generate(target, draft, prompt: list[int], max_new_tokens: int, *, k: int = 4,
                         temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                         eos_id: Optional[int] = None, compile: bool = False):
    """Speculative decoding: the draft proposes k tokens, the target checks them in one forward.

    Token x drawn from the draft's q is kept with probability min(1, p(x) / q(x)) under the
    target's p; the first rejected one is replaced by a draw from normalize(max(0, p - q)),
    and when all k are kept the target adds one more. Outputs are distributed exactly as
    sampling from the target alone; at temperature 0 they equal its greedy output. The output
    ends before the first eos_id, if one is given and drawn. compile: the draft's one-token
    steps run through decode_step(draft), and the target's checks of k + 1 tokens (every round
    after the first, which also reads the prompt) through decode_step(target).
    Returns (new token ids, acceptance rate of the draft's proposals).
    """
    if k < 1:
        raise ValueError(f"speculative_k={k} must be >= 1")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("the draft and target models have different vocabularies")
    limit = min(target.config.block_size, draft.config.block_size)
    if len(prompt) + max_new_tokens + k > limit:
        raise ValueError(f"speculative decoding needs prompt + max_new_tokens + k <= block_size "
                         f"({len(prompt)} + {max_new_tokens} + {k} > {limit})")
    device = next(target.parameters()).device
    seq = list(prompt)
    fed_t = fed_d = 0                       # how many tokens of seq each KV cache holds
    proposed = accepted = 0

    def draft_logits(tokens: list[int], pos: int) -> torch.Tensor:
        if compile and len(tokens) == 1:
            return decode_step(draft)(torch.tensor([tokens], device=device), pos)
        return draft(torch.tensor([tokens], device=device), start_pos=pos)[:, -1]
    target.setup_cache(1)
    draft.setup_cache(1)
    try:
        while len(seq) - len(prompt) < max_new_tokens:
            logits = draft_logits(seq[fed_d:], fed_d)
            fed_d = len(seq)
            xs, qs = [], []
            for i in range(k):                                   # the draft proposes k tokens
                q = _probs(logits, temperature)[0]
                x = torch.multinomial(q, 1, generator=generator).item()
                xs.append(x)
                qs.append(q)
                if i < k - 1:
                    logits = draft_logits([x], fed_d + i)
            chunk = seq[fed_t:] + xs                                   # the target checks them at once
            if compile and len(chunk) == k + 1:                        # (after the first round)
                checked = decode_step(target)(torch.tensor([chunk], device=device), fed_t)[0]
            else:
                checked = target(torch.tensor([chunk], device=device), start_pos=fed_t)[0, -(k + 1):]
            ps = _probs(checked.float(), temperature)                  # (k+1, vocab)
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
            fed_t = before + kept                                 # the new last token is not cached yet
            fed_d = before + min(kept, k - 1)
    finally:
        _clear_cache(target)
        _clear_cache(draft)
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


def set_precision(model, precision: str, device: str):
    """The model with its floating-point weights in the precision's dtype (bf16 halves the
    bytes a decode step reads); fp16 needs a GPU (CPUs emulate it slowly)."""
    if precision == "fp16" and device.split(":")[0] == "cpu":
        raise ValueError("precision=fp16 needs a GPU; on a CPU use bf16 (or fp32)")
    return model if precision == "fp32" else model.to(DTYPES[precision])


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
    unsupported = [name for name, on in (("stream", cfg.stream), ("interactive", cfg.interactive),
                                         ("beam_size > 1", cfg.beam_size > 1),
                                         ("draft_checkpoint", cfg.draft_checkpoint)) if on]
    if unsupported:
        raise ValueError(f"prompt_file decodes a batch; it does not combine with {', '.join(unsupported)}")
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
# Command line
# -----------------------------------------------------------------------------

SECTIONS = {**RUN_SECTIONS, "sample": SampleConfig}
ALIASES = {**{name: f"sample.{name}" for name in SampleConfig.__dataclass_fields__},
           "quantize": "quantize.mode", "group_size": "quantize.group_size"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Sampling options (--prompt, --temperature, ...) are the keys of "
                                            "the `sample` section of config.yaml.")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_file(args.config), rest, sections=SECTIONS, aliases=ALIASES)
        scfg: SampleConfig = cfg["sample"]
        path = scfg.checkpoint or str(Path(cfg["training"].out_dir) / "best.pt")
        device = pick_device(scfg.device)
        model, tokenizer = load_model(path, lora=scfg.lora, quantize=cfg["quantize"], device=device)
        model = set_precision(model, scfg.precision, device)
        generator = torch.Generator(device=device)
        if scfg.seed is not None:
            generator.manual_seed(scfg.seed)
        else:
            generator.seed()
        if scfg.prompt_file:
            return prompt_file_main(model, tokenizer, scfg, generator)
        if scfg.interactive:
            return interactive(model, tokenizer, scfg, generator)
        if scfg.draft_checkpoint:
            return speculative_main(model, tokenizer, scfg, generator, device)
        if scfg.beam_size > 1:
            ranked = beam_search(model, encode_prompt(tokenizer, scfg.prompt), scfg.max_new_tokens,
                                 beam_size=scfg.beam_size, length_penalty=scfg.length_penalty,
                                 num_return_sequences=scfg.num_return_sequences,
                                 eos_id=scfg.eos_id(tokenizer), compile=scfg.compile)
            for i, (ids, score) in enumerate(ranked):
                print(("\n" if i else "") + f"[beam {i + 1}, score {score:.4f}]\n{scfg.prompt}{tokenizer.decode(ids)}")
            return
        for i in range(scfg.num_samples):
            if i:
                print("\n" + "-" * 40)
            if scfg.stream:
                sys.stdout.write(scfg.prompt)
                generate_text(model, tokenizer, scfg.prompt, scfg, generator=generator, out=sys.stdout)
                print()
            else:
                print(generate_text(model, tokenizer, scfg.prompt, scfg, generator=generator))
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        sys.exit(f"error: {e}")


COMMANDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens", "stop", "eos",
            "chat")


def apply_command(cfg: SampleConfig, line: str) -> SampleConfig:
    """`/temperature 0.5`-style settings change for interactive mode: a new, validated config."""
    name, _, value = line[1:].strip().partition(" ")
    if name not in COMMANDS:
        raise ValueError(f"unknown command '/{name}'; {closest(name, COMMANDS)}")
    return replace(cfg, **{name: coerce(value, field_types(SampleConfig)[name], f"/{name}")})


def speculative_main(model, tokenizer, cfg: SampleConfig, generator, device):
    """generate.py --draft_checkpoint: print each sample, then the acceptance rate and the
    speed-up over decoding with the target alone (measured on the same prompt and length)."""
    draft, draft_tok = load_model(cfg.draft_checkpoint, device=device)
    draft = set_precision(draft, cfg.precision, device)
    if draft_tok.state() != tokenizer.state():
        raise ValueError(f"the draft checkpoint '{cfg.draft_checkpoint}' has another tokenizer than the target")
    ids = encode_prompt(tokenizer, cfg.prompt)
    if cfg.compile:      # compile the draft's step, and the target's for the comparison, before timing
        speculative_generate(model, draft, ids, min(cfg.max_new_tokens, cfg.speculative_k + 2), k=cfg.speculative_k,
                             temperature=cfg.temperature, generator=torch.Generator(device=device), compile=True)
        for _ in generate_tokens(model, torch.tensor([ids], device=device), 2, temperature=cfg.temperature,
                                 generator=torch.Generator(device=device), compile=True):
            pass
    for i in range(cfg.num_samples):
        start = time.perf_counter()
        new, rate = speculative_generate(model, draft, ids, cfg.max_new_tokens, k=cfg.speculative_k,
                                         temperature=cfg.temperature, generator=generator,
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
    while True:
        try:
            prompt = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt.strip() in ("quit", "exit"):
            return
        if not prompt:
            continue
        try:
            if prompt.strip() == "/settings":
                print(", ".join(f"{name}={getattr(cfg, name)!r}" for name in COMMANDS))
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
    main()
