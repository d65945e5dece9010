"""The compiled decoding fast path: torch.compile'd decode steps and what they need.

generate.py's decoders use this module for `compile=True`; it is the one module that touches
torch's private parts (torch._dynamo, torch._inductor). Deleting this file changes only
speed: generate.py then notes it once and decodes eagerly.

    decode_step(model, greedy=False)   -- the model's CompiledStep, made on first use and kept
    setup_cache(model, batch, max_len) -- a StaticKVCache in every layer, which compiled steps use
    forget(model)                      -- the steps let go of a finished generation's cache

What it installs into a model, by swapping modules (model.py knows nothing of them):
    StaticKVCache          -- a KV cache whose compiled reads keep their shapes from step to step
    InterleavedInt8Linear  -- int8 weights in an order whose compiled one-row product is fast on CPUs
and inductor's CPU backend for one-token steps (_cpu_decode_backend), with the replay of its
kernels between steps (_kernel_capture).
"""
from __future__ import annotations

import ast
import inspect
import operator
import sys
import textwrap
import weakref
from typing import Optional

import torch

from model import Int8Linear, KVCache
from utils import warn_compile_failed

SPAN = 64         # a step reads the cache up to its position rounded up to this many slots

# -----------------------------------------------------------------------------
# A static KV cache, and the positions and mask of a step over it
# -----------------------------------------------------------------------------


class StaticKVCache(KVCache):
    """A KVCache that a compiled step reads without its shapes changing from step to step.

    `update(start, k, v)` with start a 0-d tensor writes at that position and returns the first
    n slots whatever the position (the span, `narrow(n)`; every slot at first); the step masks
    those not written yet (static_positions_and_mask). An int start is KVCache's update.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, **kw):
        # one slot more than max_len, never written: no span is then the whole buffer, so all
        # spans share their strides (a contiguous one would need a compiled graph of its own)
        super().__init__(batch_size, max_len + 1, n_kv_heads, head_dim, **kw)
        self.max_len = max_len
        self._span(max_len)

    @classmethod
    def like(cls, cache: KVCache) -> "StaticKVCache":
        """A static cache holding what `cache` holds."""
        B, H, n, hd = cache.k.shape
        static = cls(B, cache.max_len, H, hd, dtype=cache.k.dtype, device=cache.k.device)
        static.k[:, :, :n], static.v[:, :, :n] = cache.k, cache.v
        return static

    def _span(self, n: int):
        import torch._dynamo
        self.k_span, self.v_span = self.k[:, :, :n], self.v[:, :, :n]     # views: writes reach the cache
        for span in (self.k_span, self.v_span):                           # one compiled graph for every n
            torch._dynamo.maybe_mark_dynamic(span, 2)

    def narrow(self, n: int):
        """Static updates read and return slots 0..n-1 from now on (all of them if n is larger)."""
        if n < 1:
            raise ValueError(f"span {n} must be at least 1")
        if self.k_span.shape[2] != min(n, self.max_len):
            self._span(min(n, self.max_len))

    def update(self, start, k: torch.Tensor, v: torch.Tensor):
        if not isinstance(start, torch.Tensor):
            return super().update(start, k, v)
        slots = start + torch.arange(k.shape[2], device=k.device)
        self.k_span.index_copy_(2, slots, k)
        self.v_span.index_copy_(2, slots, v)
        return self.k_span, self.v_span

    def select(self, rows: torch.Tensor):
        """As KVCache.select; as many rows as before are reordered in place, so the span views
        (a compiled step's inputs) stay valid."""
        if rows.shape[0] == self.k.shape[0]:
            self.k.copy_(self.k.index_select(0, rows))
            self.v.copy_(self.v.index_select(0, rows))
            return
        super().select(rows)
        self._span(self.max_len)


def static_positions_and_mask(start: torch.Tensor, T: int, pad: Optional[torch.Tensor], span: int):
    """Positions of T slots from start (a 0-d tensor), (T,) or (B, T) with left padding pad (B,), and
    the SDPA mask over the span's slots (True = attend), later slots masked out, so that no shape
    depends on the position: (T, span), or (B, 1, T, span) with padding (see model.positions_and_mask)."""
    slots = start + torch.arange(T, device=start.device)                     # (T,)
    keys = torch.arange(span, device=start.device)                           # (S,)
    seen = keys <= slots[:, None]                                            # (T, S)
    if pad is None:
        return slots, seen
    visible = (keys >= pad[:, None, None]) | (keys == slots[:, None])       # (B, T, S)
    return (slots - pad[:, None]).clamp(min=0), (seen & visible)[:, None]


def setup_cache(model, batch_size: int, max_len: int):
    """model.setup_cache's static counterpart: a StaticKVCache in every attention layer."""
    model.clear_cache()                             # the old cache's memory goes before the new one's
    model.setup_cache(batch_size, max_len, cache_cls=StaticKVCache)

# -----------------------------------------------------------------------------
# Int8 weights interleaved for the compiled one-row product
# -----------------------------------------------------------------------------


def interleave4(t: torch.Tensor) -> torch.Tensor:
    """Reorder the last dimension K so that position 4j + b holds element b*K/4 + j: read as
    32-bit words, int8 codes in this order give word j the columns j, j+K/4, j+K/2, j+3K/4.
        >>> interleave4(torch.arange(8)).tolist()
        [0, 2, 4, 6, 1, 3, 5, 7]
    """
    return t.unflatten(-1, (4, -1)).transpose(-1, -2).flatten(-2)


def deinterleave4(t: torch.Tensor) -> torch.Tensor:
    """Inverse of interleave4."""
    return t.unflatten(-1, (-1, 4)).transpose(-1, -2).flatten(-2)


class InterleavedInt8Linear(Int8Linear):
    """An Int8Linear whose weight columns are kept in memory in interleave4's order; the state dict
    holds the plain order, and a plain one loads.

    Under torch.compile on a CPU a one-row product reads each 32-bit word of codes once and unpacks
    its four bytes with shifts, against four contiguous quarters of x: a loop that runs at about the
    speed of reading the bytes, where inductor's int8 loads are slow. The eager paths reorder x.
    """

    @classmethod
    def from_int8(cls, layer: Int8Linear) -> Optional["InterleavedInt8Linear"]:
        """The layer interleaved, or None where its words cannot be unpacked that way (in_features
        not a multiple of 4, a big-endian machine)."""
        if layer.in_features % 4 or sys.byteorder != "little":
            return None
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        new.weight, new.scales, new.bias = interleave4(layer.weight), layer.scales, layer.bias
        new.use_kernel = layer.use_kernel
        return new

    def codes(self) -> torch.Tensor:
        return deinterleave4(self.weight)

    def _one_row(self, x):
        """x (..., K) with one row @ the interleaved codes, as shifts, multiplies and a sum."""
        # through a float32 view: inductor loads float32 vectors directly, int32 ones via a copy
        words = self.weight.view(torch.float32).view(torch.int32)              # (N, K/4)
        xq = x.reshape(4, -1)                                                  # (4, K/4): x's quarters
        y = sum(((words << 24 - 8 * b) >> 24).to(x.dtype) * xq[b] for b in range(4)).sum(-1)  # byte b, signed
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x):
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == self.in_features:
            y = self._one_row(x) * self.scales.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return super().forward(interleave4(x))                 # features in the weight's column order

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.codes()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight" in state_dict:      # a plain weight came in (a partial state dict keeps ours)
            self.weight = interleave4(self.weight)


def interleave_int8(model) -> int:
    """Swap the model's Int8Linear layers for InterleavedInt8Linear ones; how many were swapped."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = InterleavedInt8Linear.from_int8(child) if type(child) is Int8Linear else None
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count

# -----------------------------------------------------------------------------
# The compiled step
# -----------------------------------------------------------------------------


_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()    # model -> {greedy: CompiledStep}


def decode_step(model, *, greedy: bool = False) -> "CompiledStep":
    """model's compiled step (a CompiledStep), made on first use and kept."""
    steps = _STEPS.setdefault(model, {})
    if greedy not in steps:
        steps[greedy] = CompiledStep(model, greedy=greedy)
    return steps[greedy]


def forget(model):
    """model's compiled steps let go of the last call's inputs, its KV cache among them (once a
    generation is over)."""
    for step in _STEPS.get(model, {}).values():
        step.forget()


class CompiledStep:
    """model's forward of a few cached positions through torch.compile: step(tokens (B, T), pos,
    pad) -> logits (B, T, vocab) of those positions, or with greedy=True (T = 1) the argmax next
    tokens (B, 1), picked inside the graph. Each T compiles a graph of its own (speculative checks
    of k + 1 tokens besides one-token steps); so do a new batch size and cache length.

    The graph's inputs are static: the tokens and their position (a 0-d tensor) live in tensors of
    the step's own, which the graph itself advances (the position always, the token when it is
    greedy), so a step fed its own output copies nothing. Each layer attends over a span of
    StaticKVCache slots, those not written yet masked. The span is the position rounded up to 64
    slots, a dynamic size, so one graph serves every step. The model's caches become
    StaticKVCache ones (setup_cache, or taking over plain ones), and on a CPU its int8 layers
    InterleavedInt8Linear ones.

    On CUDA it runs as a CUDA graph (mode="reduce-overhead"). On a CPU it runs through
    _cpu_decode_backend, and a step whose inputs are the same objects as the last one's (the span
    has not moved) is a replay, much like a CUDA graph's: it runs the C++ kernels again on the
    buffers of the last call (see _kernel_capture), without dynamo's guards or inductor's Python
    wrapper, which allocates every intermediate buffer again (together a tenth of a step at 15M
    parameters). Outputs are copies, never those buffers. If compiling fails, a warning is printed
    and the step runs eagerly.

    Example:
        >>> model = Transformer(vocab_size=65, d_model=64, n_heads=4, n_layers=2).eval()
        >>> setup_cache(model, 1, 64); _ = model(torch.tensor([[1, 2, 3]]), start_pos=0)  # prefill
        >>> logits = decode_step(model)(torch.tensor([[4]]), 3)                          # (1, 1, 65)
    """

    def __init__(self, model, *, greedy: bool = False):
        model_ref = weakref.ref(model)               # _STEPS must not keep the model alive

        def step(tokens, pos, pad):
            model = model_ref()
            span = model.blocks[0].attn.kv_cache.k_span.shape[2]
            positions, mask = static_positions_and_mask(pos, tokens.shape[1], pad, span)
            logits = model.output(model.encode(tokens, positions, mask, start_pos=pos))
            pos.add_(tokens.shape[1])                # the next step's position
            if not greedy:
                return logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens.copy_(nxt)                        # and its token
            return nxt
        # a code object of its own: dynamo counts recompiles (at most 8) per code object, and a
        # notebook (or a test suite) compiles more models than that
        step.__code__ = step.__code__.replace()
        self.model_ref, self.eager, self.greedy = model_ref, step, greedy
        self.tokens = self.pos = None               # the graph's static inputs
        self.pos_value = self.fed = None            # what they hold: pos_value, and the tokens if fed
        self.last = None                            # (compiled graph, its inputs, its kernels, its output)
        self.replay_key = None                      # what those inputs were made of
        if model.device.type == "cpu":
            interleave_int8(model)
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

    def __call__(self, tokens: torch.Tensor, pos: int, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        model = self.model_ref()
        T = tokens.shape[1]
        if self.greedy and T != 1:
            raise ValueError(f"a greedy decode step takes one token per row, got {T}")
        cache = model.blocks[0].attn.kv_cache
        if cache is None or not 0 <= pos <= cache.max_len - T:   # a kernel's own check would abort the process
            where = f"position {pos}" if T == 1 else f"positions {pos}..{pos + T - 1}"
            raise ValueError(f"a decode step needs a KV cache (model.setup_cache) with a slot for {where}"
                             + (f"; it holds {cache.max_len}" if cache is not None else ""))
        if not isinstance(cache, StaticKVCache):
            for block in model.blocks:
                block.attn.kv_cache = StaticKVCache.like(block.attn.kv_cache)
            cache = model.blocks[0].attn.kv_cache
        if self.tokens is None or self.tokens.shape != tokens.shape or self.tokens.device != tokens.device:
            self.tokens = torch.empty_like(tokens, memory_format=torch.contiguous_format)
            self.pos = torch.zeros((), dtype=torch.long, device=tokens.device)
            self.pos_value = self.fed = None         # new tensors hold nothing yet
        if tokens is not self.fed:
            self.tokens.copy_(tokens)
        if pos != self.pos_value:
            self.pos.fill_(pos)
        self.pos_value = self.fed = None             # unknown until the step has run
        span = -(-(pos + T) // SPAN) * SPAN
        if cache.k_span.shape[2] != min(span, cache.max_len):
            for block in model.blocks:
                block.attn.kv_cache.narrow(span)
        key = (self.tokens, pad, cache.k_span)      # a new span or cache: new views
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
            return self.eager(self.tokens, self.pos, pad)
        try:
            out = self.fn(self.tokens, self.pos, pad)
            self.compiled = True
            return out
        except Exception as e:
            if self.compiled:                        # it ran before: a real error, not a missing compiler
                raise
            warn_compile_failed(e, "decoding")
            self.compiled = False
            return self.eager(self.tokens, self.pos, pad)

# -----------------------------------------------------------------------------
# Inductor on a CPU: the backend and the replay of its kernels
# -----------------------------------------------------------------------------


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
