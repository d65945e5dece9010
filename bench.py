"""Benchmarks: every speed and memory goal of the project lives here, never in tests.

    python bench.py train                          # tokens/s and MFU of training steps
    python bench.py train --nanogpt ~/nanoGPT      # side by side with nanoGPT's model.py
    python bench.py train --configs gpt2-style,small --steps 10
    python bench.py train --configs tiny --precision bf16   # autocast step time
    python bench.py memory                         # peak memory with and without gradient checkpointing
    python bench.py decode                         # batch-1 decode vs roofline and HF generate
    python bench.py decode --llama2c ~/llama2.c    # ... and llama2.c's run.c (built with make runomp)
    python bench.py decode --sizes "" --long 8192  # only the long-generation rows: full vs sliding-window cache
    python bench.py quant                          # decode speed and memory: fp32, bf16, int8, int4
    python bench.py tokenize                       # encode tokens/s: char, byte, trained BPE, tiktoken
    python bench.py classify                       # Shakespeare genres: transformer vs n-gram and majority
    python bench.py export --checkpoint out/best.pt  # every export format: size, read-back logits; llama.cpp
    python bench.py seq2seq                        # grapheme-to-phoneme on CMUdict: WER/PER vs published results
    python bench.py forecast                       # co2 and macrodata: transformer vs seasonal naive and DLinear
    python bench.py ucr                            # UCR/UEA series classification vs 1-NN and published results

`train` times each row in a fresh process. Our rows run as train.py does (glibc malloc
tuned by utils.tune_cpu_allocator); nanoGPT runs as shipped; on gpt2-style, a third row
shows ours with the default allocator, like for like.

Each sub-command prints a table. MFU is measured against this machine's sustained fp32
matmul throughput (a 2048x2048 matmul), so it reads as "fraction of what the matmul units
actually deliver here"; FLOPs per token are counted as nanoGPT and PaLM do.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from model import Transformer, TransformerConfig
from config import RUN_PRESETS
from tasks import lm_loss
from config import TrainConfig
from train import autocast, make_optimizer
from utils import flops_per_token, measure_matmul_peak, pick_device, synchronize, tune_cpu_allocator

# The comparison configuration of the foundation issue: nanoGPT's model shape, GPT-2 style.
GPT2_STYLE = dict(vocab_size=65, block_size=256, d_model=256, n_layers=6, n_heads=8, dropout=0.0,
                  norm="layernorm", pos_encoding="learned", activation="gelu", bias=False)
TRAIN_CONFIGS = {
    "gpt2-style": (GPT2_STYLE, 32),
    "tiny": (dict(TransformerConfig.from_preset("tiny", vocab_size=65).to_dict()), 32),
    "small": (dict(TransformerConfig.from_preset("small", vocab_size=65).to_dict()), 32),
    "cpu-fast": ({**RUN_PRESETS["cpu-fast"]["model"], "vocab_size": 65},
                 RUN_PRESETS["cpu-fast"]["training"]["batch_size"]),
}


def time_steps(steps_fns: list, steps: int, device: str) -> list[list[float]]:
    """Seconds per call of each function, after two warm-up calls each; the functions take
    their turns call by call, so a slower spell of the machine falls on all of them alike."""
    for step in steps_fns:
        step(), step()
    times = [[] for _ in steps_fns]
    for _ in range(steps):
        for step, t in zip(steps_fns, times):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            t.append(time.perf_counter() - start)
    return times


def train_step_fn(model, loss_fn, batch_size: int, block_size: int, vocab: int, device: str, *, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch_size, block_size), device=device)
    y = torch.randint(0, vocab, (batch_size, block_size), device=device)

    def step():
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def load_module(file, name: str):
    """A Python file imported as a module under another name (nanoGPT's model.py, or another
    revision of ours)."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no file {file}")
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module             # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def load_nanogpt(path: str):
    """nanoGPT's model.py from a checkout."""
    return load_module(Path(path).expanduser() / "model.py", "nanogpt_model")


def bench_train(args):
    """Each row group in a fresh process, so allocator state never carries over. With --nanogpt
    or --baseline, the gpt2-style models take their steps in turns in one process (the
    machine's speed drifts over seconds; turns share the drift), once with train.py's tuned
    allocator and once with the default, and the ratios compare steps taken in turns."""
    device = pick_device(args.device)
    peak = measure_matmul_peak(device=device, seconds=2.0)
    print(f"device {device}, {torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"(2048x2048 matmul)\n")
    rows, ratios = [], {}
    for name in args.configs.split(","):
        if name not in TRAIN_CONFIGS:
            sys.exit(f"unknown config '{name}'; valid: {', '.join(TRAIN_CONFIGS)}")
        if name != "gpt2-style":
            rows += _train_rows(args, name, ["ours"], True, device, peak)
            continue
        others = ["nanoGPT"] * bool(args.nanogpt) + ["baseline"] * bool(args.baseline)
        for tuned in (True, False):
            group = _train_rows(args, name, ["ours", *others], tuned, device, peak)
            rows += group
            malloc = "tuned malloc, as train.py runs" if tuned else "default malloc"
            for other in group[1:]:
                ratios[f"ours / {other['impl']} ({malloc})"] = group[0]["tps"] / other["tps"]
    print(f"{'model':37s} {'params':>8s} {'B x T':>9s} {'ms/step':>9s} {'tokens/s':>9s} {'best tok/s':>10s} {'MFU':>6s}")
    for r in rows:
        print(f"{r['name']:37s} {r['params'] / 1e6:7.2f}M {r['bt']:>9s} {r['ms']:9.0f} {r['tps']:9.0f} "
              f"{r['best']:10.0f} {r['mfu']:6.1%}")
    if ratios:
        print("\ntokens/s of steps taken in turns, medians:")
        for pair, value in ratios.items():
            print(f"  {pair}: {value:.3f}")
    return rows


def _train_rows(args, name: str, impls: list[str], tuned: bool, device: str, peak: float) -> list[dict]:
    cmd = [sys.executable, __file__, "train-row", name, "--impls", ",".join(impls), "--steps", str(args.steps),
           "--device", device, "--precision", args.precision] + (["--tuned"] if tuned else []) + \
          (["--compile"] if args.compile else [])
    cmd += ["--nanogpt", args.nanogpt] if "nanoGPT" in impls else []
    cmd += ["--baseline", args.baseline] if "baseline" in impls else []
    cmd += ["--batch_size", str(args.batch_size)] if args.batch_size else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    rows = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    for row in rows:
        row["mfu"] = row["tps"] * row["flops_per_token"] / peak
    return rows


def _train_step(impl: str, args, kw: dict, batch: int, device: str):
    """(model, one training step) of an implementation, with the optimizer its own train.py
    builds (nanoGPT's: unfused on a CPU; ours: fused)."""
    cfg = TransformerConfig(**kw)
    torch.manual_seed(0)
    if impl == "nanoGPT":
        ng = load_nanogpt(args.nanogpt)
        model = ng.GPT(ng.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layers,
                                    n_head=cfg.n_heads, n_embd=cfg.d_model, dropout=0.0, bias=cfg.bias)).to(device)
        with contextlib.redirect_stdout(sys.stderr):               # it prints its parameter counts
            optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), torch.device(device).type)
        loss_fn = lambda x, y: model(x, y)[1]
    else:                                 # ours, or another revision's model.py run as ours is
        other = load_module(args.baseline, "baseline_model") if impl == "baseline" else None
        build, config = (other.Transformer, other.TransformerConfig) if other else (Transformer, TransformerConfig)
        model = build(config(**kw)).to(device)
        optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-4), device)
        fwd = torch.compile(model) if args.compile else model
        loss_fn = lambda x, y: _loss(fwd, x, y, device, args.precision)  # noqa: E731
    return model, train_step_fn(model, loss_fn, batch, cfg.block_size, cfg.vocab_size, device, optimizer=optimizer)


def bench_train_row(args):
    """Time implementations of one configuration in this process, their steps taken in turns,
    and print a JSON line each (used by bench_train)."""
    device = pick_device(args.device)
    if args.tuned:
        tune_cpu_allocator()
    kw, batch = TRAIN_CONFIGS[args.config]
    batch = args.batch_size or batch
    impls = args.impls.split(",")
    built = [_train_step(impl, args, kw, batch, device) for impl in impls]
    times = time_steps([step for _, step in built], args.steps, device)
    tokens = batch * kw["block_size"]
    for impl, (model, _), t in zip(impls, built, times):
        med = statistics.median(t)
        name = f"{impl} {args.config}" + (" (compiled)" if args.compile else "") + \
            ("" if args.precision == "fp32" else f" {args.precision}") + ("" if args.tuned else " (default malloc)")
        print(json.dumps({"name": name, "impl": impl, "params": sum(p.numel() for p in model.parameters()),
                          "bt": f"{batch}x{kw['block_size']}", "ms": med * 1e3, "tps": tokens / med,
                          "best": tokens / min(t), "flops_per_token": flops_per_token(TransformerConfig(**kw))}))


def _loss(fwd, x, y, device: str, precision: str):
    with autocast(device, precision):
        return lm_loss(fwd, x, y)


def bench_memory(args):
    """Peak memory and time of a training step without and with gradient checkpointing,
    each measured in a fresh process (so one cannot inherit the other's peak)."""
    device = pick_device(args.device)
    print(f"device {device}; peak memory of a training step (forward, backward, AdamW) above the memory "
          f"in use before it{'' if device.startswith('cuda') else ' (resident set)'}\n")
    print(f"{'model':12s} {'params':>8s} {'B x T':>9s} {'peak MB':>9s} {'ckpt MB':>9s} {'ratio':>6s} "
          f"{'ms/step':>8s} {'ckpt ms':>8s}")
    for name in args.configs.split(","):
        if name not in TRAIN_CONFIGS:
            sys.exit(f"unknown config '{name}'; valid: {', '.join(TRAIN_CONFIGS)}")
        rows = []
        for ckpt in (False, True):
            cmd = [sys.executable, __file__, "memory-row", name, "--steps", str(args.steps), "--device", device]
            cmd += (["--checkpointing"] if ckpt else []) + (["--batch_size", str(args.batch_size)]
                                                           if args.batch_size else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain, ckpt = rows
        print(f"{name:12s} {plain['params'] / 1e6:7.2f}M {plain['bt']:>9s} {plain['peak_mb']:9.0f} "
              f"{ckpt['peak_mb']:9.0f} {ckpt['peak_mb'] / plain['peak_mb']:6.2f} {plain['ms']:8.0f} {ckpt['ms']:8.0f}")


def bench_memory_row(args):
    """One configuration's peak memory of a training step (MB) and its median step time, as
    one JSON line. A batch-1 step first sets up what every step shares (the optimizer state,
    library workspaces), so the peak is what the batch itself costs: activations and gradients."""
    device = pick_device(args.device)
    kw, batch = TRAIN_CONFIGS[args.config]
    batch = args.batch_size or batch
    cfg = TransformerConfig(**kw)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    model.set_gradient_checkpointing(args.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch_size: int):
        x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), device=device)
        _loss(model, x[:, :-1], x[:, 1:], device, "fp32").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    step(1)
    before = _memory_mark(device)
    step(batch)
    peak_mb = (_memory_peak(device) - before) / 2 ** 20
    ms = statistics.median(time_steps([lambda: step(batch)], args.steps, device)[0]) * 1e3 if args.steps else float("nan")
    print(json.dumps({"params": model.num_params(), "bt": f"{batch}x{cfg.block_size}", "peak_mb": peak_mb,
                      "ms": ms}))


def _memory_mark(device: str) -> int:
    """Bytes in use now, and the peak counter restarted from here: CUDA, torch's allocator;
    CPU, the resident set (Linux restarts its high-water mark through /proc/self/clear_refs;
    elsewhere the mark is the peak so far, which the measured step must exceed to register)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmRSS")
    except OSError:
        return _max_rss()


def _memory_peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        return _max_rss()


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024                      # the kernel reports kB
    raise OSError(f"no {field} in /proc/self/status")


def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024          # bytes on macOS, KiB on Linux


# Llama-shaped decode sizes of the generation issue (llama2.c's 15M and 110M shapes).
DECODE_CONFIGS = {
    "15M": dict(vocab_size=32000, d_model=288, n_layers=6, n_heads=6, d_ff=768, block_size=1024),
    "110M": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, d_ff=2048, block_size=1024),
}


def measure_bandwidth(*, n_bytes: int = 1 << 28, seconds: float = 1.0) -> float:
    """Sustained read bandwidth (bytes per second): summing a tensor far larger than the caches,
    as decoding reads every weight once per token."""
    src = torch.ones(n_bytes // 4, dtype=torch.float32)
    src.sum()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        src.sum()
        iters += 1
    return n_bytes * iters / (time.perf_counter() - start)


def bench_decode(args):
    """Batch-1 greedy decode tokens/s: ours eager and with --compile (fastpath.py), ours
    without the cache, Hugging Face LlamaForCausalLM.generate (when transformers is installed)
    and llama2.c's run.c (with --llama2c), against the roofline of reading every weight once
    per token.

    Memory bandwidth can drift from second to second (other tenants, other jobs), so ours (compiled,
    or eager with --no-compile) and llama2.c run side by side in five rounds, each run between two
    bandwidth measurements; a run's % of the roofline uses the mean of those two, ours/llama2.c
    is taken within a round, and each column is the median over the rounds."""
    from generate import generate_tokens
    if args.tokens < 2:
        sys.exit(f"bench.py decode: --tokens={args.tokens} must be >= 2 (tokens/s are timed from the first new token on)")
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; {args.tokens} new tokens after a {args.prompt_len}-token prompt, "
          f"fp32, greedy; ours timed from the first new token on, as llama2.c times itself; five rounds of "
          f"ours ({'compiled' if args.compile else 'eager'}) and llama2.c side by side, each run between two "
          f"bandwidth measurements, medians over the rounds\n")
    print(f"{'model':6s} {'params':>8s} {'GB/s':>5s} {'roofline':>8s} {'eager':>6s} {'compiled':>8s} {'% roofline':>10s} "
          f"{'no-cache':>8s} {'cache speed-up':>14s} {'HF':>5s} {'ours/HF':>7s} {'llama2.c':>8s} "
          f"{'% roofline':>10s} {'ours/llama2.c':>13s}  (tokens/s)")
    nan = float("nan")
    for name in filter(None, args.sizes.split(",")):
        cfg = TransformerConfig(**DECODE_CONFIGS[name], tie_weights=True)   # as llama2.c's models
        model = Transformer(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the tied head reads all
        bandwidths = []

        def ours(compile=False, tokens=args.tokens) -> float:
            """tokens/s from the first new token on (the prompt's forward excluded), as llama2.c
            times itself"""
            steps = generate_tokens(model, prompt, tokens, temperature=0, compile=compile)
            next(steps)
            start = time.perf_counter()
            for _ in steps:
                pass
            return (tokens - 1) / (time.perf_counter() - start)

        def between_measurements(run) -> tuple[float, float]:
            """run()'s tokens/s and its fraction of the roofline at the bandwidth around it"""
            before = measure_bandwidth(seconds=0.3)
            tps = run()
            after = measure_bandwidth(seconds=0.3)
            bandwidths.extend((before, after))
            return tps, tps * weight_bytes / ((before + after) / 2)
        eager_tps = max(ours() for _ in range(2))
        if args.compile:
            ours(True, 8)                          # compiles (the measured calls reuse the step)
        mine, theirs = [], []
        for _ in range(5):
            mine.append(between_measurements(lambda: ours(args.compile)))
            if args.llama2c:
                theirs.append(between_measurements(lambda: _llama2c_decode(args.llama2c, model, args.tokens)))
        bandwidth = statistics.median(bandwidths)
        ours_tps, ours_roof = (statistics.median(col) for col in zip(*mine))
        l2c_tps, l2c_roof, vs_l2c = nan, nan, nan
        if theirs:
            l2c_tps, l2c_roof = (statistics.median(col) for col in zip(*theirs))
            vs_l2c = statistics.median(m[0] / t[0] for m, t in zip(mine, theirs))   # within each round
        nocache_tps = nan
        if not args.skip_nocache:
            def nocache():
                seq = prompt
                with torch.no_grad():
                    for _ in range(args.tokens):
                        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
            nocache_tps = args.tokens / _timed(nocache)
        hf_tps = _hf_decode(cfg, model, prompt, args.tokens) if args.hf else nan
        print(f"{name:6s} {model.num_params() / 1e6:7.1f}M {bandwidth / 1e9:5.1f} {bandwidth / weight_bytes:8.0f} "
              f"{eager_tps:6.0f} {ours_tps if args.compile else nan:8.0f} {ours_roof:10.0%} {nocache_tps:8.0f} "
              f"{eager_tps / nocache_tps:13.1f}x {hf_tps:5.0f} {ours_tps / hf_tps:6.2f}x {l2c_tps:8.0f} "
              f"{l2c_roof:10.0%} {vs_l2c:12.0%}")
    if args.long:
        bench_decode_long(args)


def bench_decode_long(args):
    """Long generation: --long new tokens from one 15M model with a full KV cache (block_size =
    --long) and from the same weights with a sliding window of --window positions (a ring
    cache of that many slots): tokens/s over the whole generation, and the KV cache's size."""
    from generate import make_decoder
    print(f"\nlong generation: {args.long} new tokens, 15M model, fp32 greedy, eager")
    print("| cache | block_size | attention_window | KV cache MB | tokens/s |")
    print("|---|---|---|---|---|")
    for name, window in (("full", None), ("ring (sliding window)", args.window)):
        torch.manual_seed(0)                              # the same weights for both
        model = Transformer(TransformerConfig(**{**DECODE_CONFIGS["15M"], "block_size": args.long},
                                              tie_weights=True, attention_window=window)).eval()
        tokens = torch.randint(0, model.config.vocab_size, (1, 1))
        with torch.no_grad(), make_decoder(model, cache_len=args.long) as decoder:
            nxt = decoder.prefill(tokens).argmax(-1, keepdim=True)
            cache = sum(b.attn.kv_cache.k.nbytes + b.attn.kv_cache.v.nbytes for b in model.blocks)
            start = time.perf_counter()
            for _ in range(args.long - 1):
                nxt = decoder.step(nxt)[:, -1].argmax(-1, keepdim=True)
            seconds = time.perf_counter() - start
        print(f"| {name} | {args.long} | {window or '-'} | {cache / 1e6:.1f} | {(args.long - 1) / seconds:.0f} |",
              flush=True)


def _llama2c_decode(directory: str, model: Transformer, tokens: int) -> float:
    """tokens/s of llama2.c's run.c (built in directory, e.g. `make runomp`) on model's weights,
    written in its file format. Its RoPE pairs dimensions differently from ours, so it computes
    another function of the same weights, at the same cost, which is what is compared."""
    import struct
    import tempfile
    cfg, d = model.config, Path(directory)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layers = range(cfg.n_layers)
    parts = [sd["tok_emb.weight"]] + [sd[f"blocks.{i}.norm1.weight"] for i in layers]
    for rows in (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)):      # wq, wk, wv
        parts += [sd[f"blocks.{i}.attn.wqkv.weight"][rows] for i in layers]
    parts += [sd[f"blocks.{i}.attn.wo.weight"] for i in layers] + [sd[f"blocks.{i}.norm2.weight"] for i in layers]
    for w in ("w1", "w2", "w3"):
        parts += [sd[f"blocks.{i}.mlp.{w}.weight"] for i in layers]
    parts += [sd["norm_f.weight"], np.zeros(cfg.block_size * cfg.head_dim, np.float32)]   # + unused RoPE tables
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        with open(path, "wb") as f:
            f.write(struct.pack("7i", cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                                cfg.vocab_size, cfg.block_size))
            for part in parts:
                f.write(np.ascontiguousarray(part, dtype=np.float32).tobytes())
        out = subprocess.run([str(d / "run"), str(path), "-z", str(d / "tokenizer.bin"), "-n", str(tokens),
                              "-t", "0", "-i", "Once upon a time"], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    found = [line for line in out.stderr.splitlines() if line.startswith("achieved tok/s:")]
    if out.returncode or not found:
        sys.exit(f"llama2.c's run failed ({d / 'run'}):\n{out.stderr[-2000:]}")
    return float(found[-1].split(":")[1])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _hf_decode(cfg, model, prompt, tokens) -> float:
    """tokens/s of transformers' LlamaForCausalLM.generate with its cache, same shape (random weights)."""
    try:
        import transformers
    except ImportError:
        return float("nan")
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                      intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                      max_position_embeddings=cfg.block_size, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        hf.generate(prompt, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        return tokens / min(_timed(lambda: hf.generate(prompt, **kwargs)) for _ in range(2))


QUANT_ROWS = ("fp32", "bf16", "int8", "int4")


def bench_quant(args):
    """Batch-1 decode tokens/s (eager, and compiled as generate.py --compile) and memory of one
    model stored as fp32, bf16, int8 and int4. Each row loads a checkpoint (written here, as `utils.py quantize` writes them) in a fresh
    process, so its peak memory is that of loading and decoding that file alone."""
    import tempfile
    from model import QuantConfig, quantize_model
    from utils import save_checkpoint
    from data import ByteTokenizer
    cfg = TransformerConfig(**DECODE_CONFIGS[args.size], tie_weights=True)
    if args.group_size is None:     # the largest of 128, 64, 32 that divides every layer's input width
        args.group_size = next(g for g in (128, 64, 32) if cfg.d_model % g == 0 and cfg.d_ff % g == 0)
    print(f"{args.size} Llama shape ({cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
          f"tied head), {torch.get_num_threads()} threads; {args.tokens} new tokens after a "
          f"{args.prompt_len}-token prompt, greedy; int4 group size {args.group_size}\n")
    print(f"{'weights':8s} {'file MB':>8s} {'in memory MB':>12s} {'peak RSS MB':>11s} {'tokens/s':>9s} "
          f"{'vs fp32':>8s} {'compiled':>9s} {'vs fp32':>8s} {'logits rel. err':>15s}")
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for mode in args.modes.split(","):
            model, qcfg = base, None
            if mode in ("int8", "int4"):
                qcfg = QuantConfig(mode, args.group_size if mode == "int4" else QuantConfig.group_size)
                model = quantize_model(copy.deepcopy(base), qcfg, kernels=False)
            path = Path(tmp) / f"{mode}.pt"
            payload = {"model": model.state_dict(), "model_config": cfg.to_dict(),
                       "tokenizer": ByteTokenizer().state()}   # a stand-in: decoding never decodes text
            if qcfg:
                payload["quantize"] = qcfg.stored()
            save_checkpoint(path, payload)
            del model
            cmd = [sys.executable, __file__, "quant-row", str(path), "--tokens", str(args.tokens),
                   "--prompt_len", str(args.prompt_len)] + (["--bf16"] if mode == "bf16" else []) + \
                  ([] if args.compile else ["--no-compile"])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
            row = {"mode": mode, "file_mb": path.stat().st_size / 1e6, **json.loads(out.stdout.splitlines()[-1])}
            rows.append(row)
            ref = rows[0] if rows[0]["mode"] == "fp32" else None
            speed, speed_c = (f"{row[k] / ref[k]:7.2f}x" if ref else f"{'':8s}" for k in ("tps", "compiled_tps"))
            err = (torch.tensor(row["logits"]) - torch.tensor(ref["logits"])).norm() / torch.tensor(
                ref["logits"]).norm() if ref else float("nan")
            print(f"{mode:8s} {row['file_mb']:8.1f} {row['model_mb']:12.1f} {row['peak_mb']:11.0f} "
                  f"{row['tps']:9.1f} {speed} {row['compiled_tps']:9.1f} {speed_c} {err:15.2e}")
    return rows


def bench_quant_row(args):
    """Load one checkpoint, decode, print one JSON line (used by bench_quant)."""
    from generate import generate_tokens
    from utils import load_model
    model, _ = load_model(args.checkpoint)
    if args.bf16:
        model = model.to(torch.bfloat16)
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()
    model_mb = sum(t.numel() * t.element_size() for t in tensors) / 1e6
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
    with torch.no_grad():
        logits = model(prompt)[0, -1, :64].float().tolist()     # accuracy probe: same prompt, every row

    def decode():
        for _ in generate_tokens(model, prompt, args.tokens, temperature=0):
            pass
    tps = args.tokens / min(_timed(decode) for _ in range(2))
    # VmHWM, of this process's own address space (ru_maxrss survives exec: it would report the
    # peak of the parent that started this row); read before compiling, which has its own peak
    peak_mb = _memory_peak("cpu") / 2 ** 20
    compiled_tps = float("nan")
    if args.compile:                 # generate.py --compile: the first call compiles, then timed
        def decode_compiled(tokens=args.tokens):
            for _ in generate_tokens(model, prompt, tokens, temperature=0, compile=True):
                pass
        decode_compiled(8)
        compiled_tps = args.tokens / min(_timed(decode_compiled) for _ in range(2))
    print(json.dumps({"tps": tps, "compiled_tps": compiled_tps, "model_mb": model_mb, "peak_mb": peak_mb,
                      "logits": logits}))


def bench_tokenize(args):
    """Encoding speed (tokens/s and MB/s of UTF-8 input) of each tokenizer on one text, one
    thread, best of args.repeats: char, byte, a BPE learned from the text (its learning time
    is printed too) and the named tiktoken encodings whose vocabulary is available offline."""
    from data import BPETokenizer, ByteTokenizer, CharTokenizer, builtin_corpus
    text = Path(args.text).read_text(encoding="utf-8") if args.text else builtin_corpus()
    mb = len(text.encode("utf-8")) / 1e6
    print(f"{len(text):,} characters ({mb:.2f} MB of UTF-8) from {args.text or 'the built-in corpus'}; "
          f"encode_array on the whole text, best of {args.repeats}\n")
    start = time.perf_counter()
    bpe = BPETokenizer.train(text, vocab_size=args.vocab_size)
    learned = time.perf_counter() - start
    rows = [("char", CharTokenizer.train(text)), ("byte", ByteTokenizer()), ("bpe (learned)", bpe)]
    skipped = []
    for name in filter(None, args.encodings.split(",")):
        try:
            rows.append((f"tiktoken {name}", BPETokenizer.from_tiktoken(name)))
        except ValueError:           # not in tiktoken's cache, and no download possible (data.load_tiktoken)
            skipped.append(f"tiktoken {name}: skipped, its vocabulary is neither cached (TIKTOKEN_CACHE_DIR) "
                           f"nor downloadable here")
    print(f"{'tokenizer':22s} {'vocab':>7s} {'tokens':>10s} {'bytes/token':>11s} {'seconds':>8s} "
          f"{'tokens/s':>12s} {'MB/s':>7s}")
    for name, tok in rows:
        seconds = min(_timed(lambda: tok.encode_array(text)) for _ in range(args.repeats))
        n = len(tok.encode_array(text))
        print(f"{name:22s} {tok.vocab_size:7,d} {n:10,d} {mb * 1e6 / n:11.2f} {seconds:8.3f} "
              f"{n / seconds:12,.0f} {mb / seconds:7.1f}")
    print(f"\nthe {bpe.vocab_size}-token BPE was learned from this text in {learned:.1f}s")
    for line in skipped:
        print(line)



def ngram_features(texts: list[str], *, orders=(1, 2, 3, 4), dim: int = 1 << 18) -> torch.Tensor:
    """Hashed bag of character n-grams: a sparse (len(texts), dim) CSR matrix of each text's
    n-gram frequencies (counts / n-grams in the text). A polynomial hash of each n-gram's
    bytes, vectorized over the text."""
    idx, rows = [], []
    for row, text in enumerate(texts):
        b = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        for n in orders:
            if len(b) < n:
                continue
            h = np.full(len(b) - n + 1, n, dtype=np.int64)
            for j in range(n):
                h = (h * 1000003 + b[j:len(b) - n + 1 + j]) % (1 << 61)
            idx.append(h % dim)
            rows.append(np.full(len(h), row))
    idx, rows = torch.from_numpy(np.concatenate(idx)), torch.from_numpy(np.concatenate(rows))
    per_text = torch.bincount(rows, minlength=len(texts)).double()
    x = torch.sparse_coo_tensor(torch.stack([rows, idx]), 1.0 / per_text[rows], (len(texts), dim),
                                check_invariants=False)     # built right above: the indices are in range
    with warnings.catch_warnings():                 # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return x.coalesce().float().to_sparse_csr()


def ngram_baseline(train, test, num_classes: int, *, steps: int = 300, lr: float = 0.05) -> np.ndarray:
    """The test labels a linear classifier (multinomial logistic regression, full-batch Adam) on
    hashed character 1-4-gram frequencies predicts. The gradient is computed by hand, X^T (softmax - Y) / N,
    as two sparse products."""
    x, x_test = ngram_features([t for t, _ in train]), ngram_features([t for t, _ in test])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        xt = x.t().to_sparse_csr()
    y = torch.nn.functional.one_hot(torch.tensor([label for _, label in train]), num_classes).float()
    w, b = torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        g = (torch.softmax(x @ w + b, -1) - y) / len(train)       # d(mean cross-entropy)/d(logits)
        w.grad, b.grad = xt @ g, g.sum(0)
        opt.step()
    return (x_test @ w + b).argmax(-1).numpy()


def bench_classify(args):
    """Shakespeare's plays by genre (comedy, history, tragedy), in grouped cross-validation over
    plays: a transformer classifier trained through TransformerTrainer against the majority
    class and a linear bag-of-character-n-grams baseline, on the same folds in the same run.
    Every passage is tested once, by models that never saw its play."""
    from data import shakespeare_genres
    from tasks import macro_f1
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise ValueError(f"--vocab_size is the BPE's; --tokenizer {args.tokenizer} has a fixed vocabulary")
    args.vocab_size = args.vocab_size or 2048
    if args.pretrain_epochs and args.ngram_buckets:    # a decoding step has no earlier tokens to hash
        raise ValueError("--pretrain_epochs trains a language model, which has no n-gram embeddings: "
                         "add --ngram_buckets 0")
    folds = range(args.folds) if args.fold is None else [args.fold]
    names = ["majority class (of the training passages)", "linear, hashed char 1-4-grams (logistic regression)",
             f"transformer ({args.n_layers} layers x {args.d_model}, "
             + (f"BPE {args.vocab_size}, " if args.tokenizer == "bpe" else f"{args.tokenizer}s, ")
             + (f"hashed 2-4-grams of {args.ngram_buckets} rows, " if args.ngram_buckets else "")
             + (f"{args.pretrain_epochs:g} epochs as an LM, then LoRA " if args.pretrain_epochs else "")
             + f"{args.epochs:g} epoch{'s' * (args.epochs != 1)})"]
    preds, seconds, truth = {n: [] for n in names}, {n: 0.0 for n in names}, []
    for k in folds:
        split = shakespeare_genres(chars=args.chars, folds=args.folds, fold=k, seed=args.seed)
        train, test, labels = split["train"], split["test"], split["labels"]
        print(f"fold {k + 1}/{args.folds}: {len(train):,} train / {len(test):,} test passages of {args.chars} "
              f"characters; test plays: {', '.join(split['test_plays'])}", flush=True)
        majority = np.bincount([label for _, label in train]).argmax()
        runs = [lambda: np.full(len(test), majority), lambda: ngram_baseline(train, test, len(labels)),
                lambda: genre_transformer(train, test, labels, args)]
        truth.append(np.array([label for _, label in test]))
        for name, run in zip(names, runs):
            start = time.perf_counter()
            preds[name].append(run())
            seconds[name] += time.perf_counter() - start
    every = torch.from_numpy(np.concatenate(truth))
    print(f"\n| model | {' | '.join(f'fold {k + 1}' for k in folds)} | all test passages | macro-F1 | seconds |")
    print("|---|" + "---|" * (len(folds) + 3))
    for name in names:
        per_fold = " | ".join(f"{(p == t).mean():.3f}" for p, t in zip(preds[name], truth))
        pred = torch.from_numpy(np.concatenate(preds[name]))
        print(f"| {name} | {per_fold} | **{(pred == every).double().mean():.3f}** | "
              f"{macro_f1(pred, every, 3):.3f} | {seconds[name]:.0f} |")


def genre_transformer(train, test, labels, args) -> np.ndarray:
    """The labels a transformer classifier, trained through TransformerTrainer, predicts for the
    test passages. With --pretrain_epochs it first learns the training passages as a causal
    language model (the text without its labels), then a classification head and LoRA adapters
    are trained on top; otherwise a bidirectional encoder is trained from scratch."""
    from data import BPETokenizer, ByteTokenizer, EncodedTexts
    from model import LoRAConfig, apply_lora
    from tasks import ClassificationTask, LanguageModelTask
    from train import TransformerTrainer
    torch.manual_seed(args.seed)
    texts = [t for t, _ in train]
    tok = BPETokenizer.train(texts, vocab_size=args.vocab_size) if args.tokenizer == "bpe" else ByteTokenizer()
    train_set, test_set = EncodedTexts(train, tok), EncodedTexts(test, tok)
    longest = max(len(ids) for ids, _ in train_set.items + test_set.items)   # a non-ASCII character is several bytes
    shape = dict(vocab_size=tok.vocab_size, d_model=args.d_model, n_heads=4, n_layers=args.n_layers,
                 block_size=longest, dropout=args.dropout)
    head = dict(head="classification", num_classes=len(labels), pooling="mean")
    if args.pretrain_epochs:
        model = Transformer(**shape)
        ids = torch.tensor(tok.encode("".join(texts)))    # the passages are consecutive slices
        T = 128
        windows = ids[:(len(ids) - 1) // T * T + 1].unfold(0, T + 1, T)               # (N, T + 1)
        TransformerTrainer(model, task=LanguageModelTask(), learning_rate=args.lr, batch_size=32,
                           warmup_iters=50).train(list(zip(windows[:, :-1], windows[:, 1:])),
                                                  epochs=args.pretrain_epochs)
        apply_lora(model.set_head(**head), LoRAConfig(r=8, alpha=16))                  # the head trains in full
    else:
        model = Transformer(**shape, **head, causal=False, ngram_buckets=args.ngram_buckets)
    trainer = TransformerTrainer(model, task=ClassificationTask(len(labels), labels=labels),
                                 learning_rate=args.lr, batch_size=32, warmup_iters=50)
    trainer.train(train_set, epochs=args.epochs)
    return trainer.predict(test_set).argmax(-1).numpy()


# -----------------------------------------------------------------------------
# Time series: forecasting and classification on real data (python bench.py forecast)
# -----------------------------------------------------------------------------

# Series that installed packages ship, split 70/10/20 in time (train/validation/test), as in
# the DLinear paper's protocol; period: the seasonal naive baseline's season.
FORECASTS = {
    "co2": dict(path="statsmodels:co2", columns=["co2"], missing="interpolate", lookback=104, horizon=52,
                period=52, patch_len=8),
    # quarterly US rates: T-bill rate, unemployment, inflation, real interest rate
    "macrodata": dict(path="statsmodels:macrodata", columns=["tbilrate", "unemp", "infl", "realint"],
                      missing="error", lookback=24, horizon=8, period=4, patch_len=4),
    # its seven trending levels (GDP, consumption, investment, ...)
    "macrodata-levels": dict(path="statsmodels:macrodata",
                             columns=["realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1"],
                             missing="error", lookback=24, horizon=8, period=4, patch_len=4),
}


def forecast_split(spec: dict):
    """(scaler, train, val, test windows) of a FORECASTS entry: the scaler fitted on the
    training part only; validation and test windows look back into the part before them."""
    from series import ForecastWindows, SeriesScaler, read_series
    values, names = read_series(spec["path"], columns=spec["columns"], missing=spec["missing"])
    n = len(values)
    a, b = round(0.7 * n), round(0.8 * n)
    scaler = SeriesScaler.fit([values[:a]], columns=names)
    z = scaler.transform(values)
    L, H = spec["lookback"], spec["horizon"]
    return scaler, *(ForecastWindows(part, lookback=L, horizon=H) for part in (z[:a], z[a - L:b], z[b - L:]))


def windows_arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    x, y = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(x).numpy().astype(np.float64), torch.stack(y).numpy().astype(np.float64)


def seasonal_naive(x: np.ndarray, horizon: int, period: int) -> np.ndarray:
    """Each future step repeats the step one season (or several) before it: (N, L, C) -> (N, H, C)."""
    back = [h - period * (h // period + 1) for h in range(horizon)]      # negative offsets into x
    return x[:, back]


def dlinear_features(x: np.ndarray, kernel: int = 25) -> np.ndarray:
    """DLinear's decomposition of lookback windows (N, L): the moving-average trend and the
    remainder (replicate padding at both ends, as its reference code), (N, 2L)."""
    pad = (kernel - 1) // 2
    padded = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], 1)
    c = np.cumsum(np.pad(padded, ((0, 0), (1, 0))), 1)
    trend = (c[:, kernel:] - c[:, :-kernel]) / kernel
    return np.concatenate([trend, x - trend], 1)


def dlinear(train, val, test) -> np.ndarray:
    """DLinear (Zeng et al. 2023): a linear map of the trend and one of the remainder of the
    lookback, shared by every channel (its default, individual=False). Its loss is MSE, so it
    is fitted here by its exact least-squares solution, the ridge penalty chosen on validation."""
    def flat(ds):                                # channel-independent rows: (N * C, L), (N * C, H)
        x, y = windows_arrays(ds)
        return (dlinear_features(x.transpose(0, 2, 1).reshape(-1, x.shape[1])),
                y.transpose(0, 2, 1).reshape(-1, y.shape[1]))
    (xt, yt), (xv, yv), (xs, _) = flat(train), flat(val), flat(test)
    add1 = lambda f: np.concatenate([f, np.ones((len(f), 1))], 1)  # noqa: E731
    best = None
    for lam in (1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100):
        w = np.linalg.solve(add1(xt).T @ add1(xt) + lam * len(xt) * np.eye(xt.shape[1] + 1), add1(xt).T @ yt)
        err = ((add1(xv) @ w - yv) ** 2).mean()
        best = min(best or (err, w), (err, w), key=lambda t: t[0])
    x = windows_arrays(test)[0]
    return (add1(xs) @ best[1]).reshape(len(x), x.shape[2], -1).transpose(0, 2, 1)


def forecast_transformer(spec: dict, train, val, test, args) -> np.ndarray:
    """A patch transformer (RevIN, patches as tokens, channels independent, one forecast from
    the last token), trained through TransformerTrainer; the forecasts for the test windows."""
    from train import TransformerTrainer
    torch.manual_seed(args.seed)
    C, L = train[0][0].shape[1], spec["lookback"]
    model = Transformer(input_dim=C, output_dim=C, head="forecast", horizon=spec["horizon"], revin=True,
                        patch_len=spec["patch_len"], block_size=L // spec["patch_len"], d_model=args.d_model,
                        n_heads=4, n_layers=args.n_layers, dropout=args.dropout, pooling=args.pooling,
                        causal=False, channel_independent=True)
    trainer = TransformerTrainer(model, learning_rate=args.lr, batch_size=32, warmup_iters=20,
                                 weight_decay=args.weight_decay)
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train(train, epochs=args.epochs, val_dataset=val)
    return trainer.predict(test).numpy().astype(np.float64)


def bench_forecast(args):
    names = [n for n in args.series.split(",") if n]
    print(f"| series | lookback -> horizon | model | test MSE | test MAE | seconds |\n|---|---|---|---|---|---|")
    for name in names:
        spec = FORECASTS[name]
        scaler, train, val, test = forecast_split(spec)
        x, y = windows_arrays(test)
        rows = {"seasonal naive": lambda: seasonal_naive(x, spec["horizon"], spec["period"]),
                "DLinear": lambda: dlinear(train, val, test),
                "transformer": lambda: forecast_transformer(spec, train, val, test, args)}
        for model, run in rows.items():
            start = time.perf_counter()
            pred = run()
            took = time.perf_counter() - start
            print(f"| {name} | {spec['lookback']} -> {spec['horizon']} | {model} | {((pred - y) ** 2).mean():.4f} | "
                  f"{np.abs(pred - y).mean():.4f} | {took:.0f} |", flush=True)


# aeon's copy of the UCR/UEA archive, and each dataset's transformer: patch length, dropout,
# learning rate, epochs per member, and how many members (seeds) are trained, their class
# probabilities averaged (InceptionTime, the anchor, is itself an ensemble of five networks);
# time_shift moves each training series by up to that many steps each epoch (augmentation).
# Epochs, not a time budget, so that a run repeats exactly; each ensemble trains in under 2 minutes
# on the 2-core machine (the seconds column).
UCR = {
    "ItalyPowerDemand": dict(patch_len=1, dropout=0.5, lr=1e-3, epochs=550, members=3),
    "GunPoint": dict(patch_len=5, dropout=0.3, lr=1e-3, epochs=1000, members=2, time_shift=8),
    "BasicMotions": dict(patch_len=5, dropout=0.3, lr=1e-3, epochs=800, members=2),
    "JapaneseVowels": dict(patch_len=1, dropout=0.3, lr=1e-3, epochs=100, members=2),
}


def published_accuracy(name: str) -> dict:
    """The mean test accuracy over 30 resamples of HIVE-COTE 2 and InceptionTime on a dataset,
    from the results files that aeon ships (None where it has none)."""
    import csv
    from series import _package_dir
    folder = _package_dir("aeon") / "aeon" / "testing" / "example_results_files" / "classification" / "accuracy"
    out = {}
    for label, file in (("HIVE-COTE 2", "HC2_accuracy.csv"), ("InceptionTime", "InceptionTime_accuracy.csv")):
        rows = {row[0]: row[1:] for row in csv.reader(open(folder / file))}
        values = [float(v) for v in rows.get(name, []) if v]
        out[label] = statistics.mean(values) if values else None
    return out


def nearest_neighbour(train, test) -> np.ndarray:
    """1-NN with the Euclidean distance over series zero-padded to one length: labels (N_test,)."""
    T = max(len(x) for x, _ in train + test)
    flat = lambda part: np.stack([np.pad(np.asarray(x), ((0, T - len(x)), (0, 0))).ravel() for x, _ in part])  # noqa: E731
    a, b = flat(train), flat(test)
    d = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
    return np.array([y for _, y in train])[d.argmin(1)]


def ucr_ensemble(spec: dict, train, test, *, input_dim: int, classes: int, longest: int, seed: int) -> np.ndarray:
    """The class probabilities (N_test, classes) of spec's ensemble of transformers, each trained
    through TransformerTrainer from its own seed."""
    from train import TransformerTrainer
    probs = []
    for member in range(spec["members"]):
        torch.manual_seed(seed + member)
        model = Transformer(input_dim=input_dim, head="classification", num_classes=classes, causal=False,
                            pooling="mean", patch_len=spec["patch_len"], dropout=spec["dropout"],
                            block_size=-(-longest // spec["patch_len"]), d_model=64, n_heads=4, n_layers=2)
        trainer = TransformerTrainer(model, learning_rate=spec["lr"], batch_size=16, warmup_iters=20,
                                     eval_interval=10 ** 9, seed=seed + member)
        items = copy.copy(train)                       # this member's augmentation draws
        items.time_shift, items.seed = spec.get("time_shift", 0), seed + member
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train(items, epochs=spec["epochs"])
        probs.append(trainer.predict(test).numpy())
    return np.mean(probs, 0)


def bench_ucr(args):
    """Series classification on the official train/test splits of UCR/UEA datasets: ensembles of
    transformers trained through TransformerTrainer (--seeds of them, each from its own seeds),
    against the majority class and 1-NN (Euclidean) in the same run, and the published means
    over 30 resamples that aeon ships."""
    from series import SeriesItems, SeriesScaler, read_labelled_series
    print("| dataset | train / test series | majority | 1-NN Euclidean | transformer: mean (each run) | seconds per run "
          "| InceptionTime | HIVE-COTE 2 |\n|---|---|---|---|---|---|---|---|")
    for name in [n for n in args.datasets.split(",") if n]:
        (tr_s, tr_y, classes), (te_s, te_y, _) = (read_labelled_series(f"aeon:{name}{split}") for split in ("", "_TEST"))
        classes = classes or sorted(set(tr_y))
        scaler = SeriesScaler.fit(tr_s)                            # the training split only
        train, test = (SeriesItems(s, [classes.index(v) for v in y], scaler) for s, y in ((tr_s, tr_y), (te_s, te_y)))
        truth = np.array([y for _, y in test])
        majority = (truth == np.bincount([y for _, y in train]).argmax()).mean()
        knn = (nearest_neighbour(list(train), list(test)) == truth).mean()
        spec = UCR.get(name, dict(patch_len=1, dropout=0.1, lr=1e-3, epochs=100, members=1))
        accs, start = [], time.perf_counter()
        for run in range(args.seeds):
            probs = ucr_ensemble(spec, train, test, input_dim=tr_s[0].shape[1], classes=len(classes),
                                 longest=max(len(s) for s in tr_s + te_s), seed=args.seed + 100 * run)
            accs.append((probs.argmax(1) == truth).mean())
        took = (time.perf_counter() - start) / args.seeds
        ref = published_accuracy(name)
        show = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {name} | {len(train)} / {len(test)} | {majority:.3f} | {knn:.3f} | **{np.mean(accs):.3f}** "
              f"({', '.join(f'{a:.3f}' for a in accs)}) | {took:.0f} | {show(ref['InceptionTime'])} | "
              f"{show(ref['HIVE-COTE 2'])} |", flush=True)


G2P_RUN = dict(minutes=30.0, d_model=128, n_heads=4, layers=3, dropout=0.1, batch_size=128, lr=2e-3,
               precision="fp32", label_smoothing=0.0)   # bench_seq2seq's training defaults; layers: each side

G2P_ANCHORS = [("Sequitur joint-sequence model (Bisani & Ney 2008)", 24.53, 5.88),
               ("Bi-LSTM with alignment (Yao & Zweig 2015)", 23.55, 5.45),
               ("Transformer 4x4 (Yolchuyeva et al. 2019)", 22.1, 5.23)]


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance between two sequences."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def g2p_scores(predictions: list[str], references: list[list[str]]) -> tuple[float, float]:
    """(WER, PER) in %: a word is right if it matches any of its pronunciations; PER is the
    phoneme edit distance to the closest one over that one's length, summed over words."""
    wrong = errors = length = 0
    for pred, refs in zip(predictions, references):
        dist, ref = min((edit_distance(pred.split(), r.split()), r) for r in refs)
        wrong += dist > 0
        errors, length = errors + dist, length + len(ref.split())
    return 100 * wrong / len(references), 100 * errors / length


def bench_seq2seq(args):
    """English grapheme-to-phoneme conversion on CMUdict (12,000 held-out words): an
    encoder-decoder trained through train.py's run for --minutes (or the run of --checkpoint),
    then greedy and beam WER/PER against the published anchors, and decode words/s with and
    without the KV cache."""
    from data import cmudict_g2p
    from generate import SampleConfig, translate
    from utils import load_model
    training = [f"--{k}" for k in (*G2P_RUN, "out_dir") if getattr(args, k) is not None]
    if args.checkpoint and training:
        raise ValueError(f"--checkpoint scores a trained run; {', '.join(training)} would train one")
    for name, default in G2P_RUN.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    split = cmudict_g2p(test_words=args.test_words, seed=args.seed)
    print(f"CMUdict: {len(split['train']):,} training pronunciations, {len(split['test']):,} held-out words", flush=True)
    if args.checkpoint is None:
        args.checkpoint = train_g2p(split, args)
    model, tok = load_model(args.checkpoint)
    words, refs = [w for w, _ in split["test"]], [r for _, r in split["test"]]
    rows = []
    for name, beams in (("greedy", 1), (f"beam {args.beams}", args.beams)):
        start = time.perf_counter()
        preds = [p for i in range(0, len(words), 256)        # every word's beams decode at once
                 for p in translate(model, tok, words[i:i + 256],
                                    SampleConfig(temperature=0.0, beam_size=beams, max_new_tokens=30))]
        rows.append((name, *g2p_scores(preds, refs), len(words) / (time.perf_counter() - start)))
    print("| system | WER % | PER % | words/s |\n|---|---|---|---|")
    for name, wer, per in G2P_ANCHORS:
        print(f"| {name} | {wer} | {per} | |")
    shape = f"{len(model.encoder.blocks)}+{len(model.decoder.blocks)} layers x {model.config.d_model}"
    for name, wer, per, speed in rows:
        print(f"| ours, {name} ({shape}) | {wer:.2f} | {per:.2f} | {speed:.0f} |")
    print(f"\ndecode words/s, greedy, batches of 256: cached {rows[0][3]:.0f}, uncached "
          f"{_uncached_g2p_speed(model, tok, words[:1024]):.0f} (every step re-runs the decoder over the whole target)")


def train_g2p(split: dict, args) -> Path:
    """Train bench_seq2seq's encoder-decoder through train.py's run for args.minutes: its best.pt."""
    import tempfile
    from config import SECTIONS, load_config
    from train import train
    tmp = Path(args.out_dir or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "g2p.tsv").write_text("".join(f"{w}\t{p}\n" for w, p in split["train"]))
    print(f"{args.minutes:g} minutes of training on {torch.get_num_threads()} threads", flush=True)
    cfg = load_config(None, [
        "--training.task=seq2seq", f"--data.path={tmp / 'g2p.tsv'}", "--data.tokenizer=char",
        "--data.target_tokenizer=bpe", "--data.vocab_size=400", "--data.val_fraction=0.02",
        f"--model.d_model={args.d_model}", f"--model.n_heads={args.n_heads}", f"--model.n_layers={args.layers}",
        "--model.block_size=40", f"--model.dropout={args.dropout}",
        f"--training.max_time={args.minutes * 60}", f"--training.batch_size={args.batch_size}",
        f"--training.learning_rate={args.lr}", "--training.warmup_iters=500", "--training.eval_interval=1000",
        "--training.weight_decay=0.01", f"--training.precision={args.precision}", "--training.progress=false",
        f"--training.label_smoothing={args.label_smoothing}",
        f"--training.out_dir={tmp / 'run'}", "--training.device=cpu"], sections=SECTIONS)
    summary = train(cfg)
    print(f"\ntrained {summary['step']} steps in {summary['elapsed']:.0f}s; best validation loss "
          f"{summary['best_val_loss']:.4f}; log and curve: {tmp / 'run'}\n")
    return tmp / "run" / "best.pt"


@torch.no_grad()
def _uncached_g2p_speed(model, tok, words: list[str]) -> float:
    from tasks import pad_sequences
    start = time.perf_counter()
    for i in range(0, len(words), 256):
        src, mask = pad_sequences([torch.tensor(tok.encode(w)) for w in words[i:i + 256]])
        tgt = torch.ones(src.shape[0], 1, dtype=torch.long)
        for _ in range(30):
            nxt = model(src, tgt, src_mask=mask)[:, -1].argmax(-1, keepdim=True)
            tgt = torch.cat([tgt, nxt], 1)
            if ((tgt == 2).any(1)).all():
                break
    return len(words) / (time.perf_counter() - start)


def bench_export(args):
    """A trained checkpoint through every export format: file size, and the largest logit
    difference from our model when the file is read back by the reader that matters
    (transformers for hf and gguf, load_model for weights-only files); then, if llama-cpp-python
    is installed, one GGUF file through llama.cpp: its tokens, logits and greedy text against ours."""
    import tempfile
    from generate import SampleConfig, generate_text
    from interop import export_gguf, export_hf
    from utils import checkpoint_bytes, load_model, save_model_weights_only
    model, tok = load_model(args.checkpoint)
    ids = tok.encode(args.prompt)
    idx = torch.tensor([ids])
    with torch.no_grad():
        ref = model(idx)
    tmp = Path(tempfile.mkdtemp())
    print(f"{args.checkpoint}: {model.num_params():,} parameters, {checkpoint_bytes(args.checkpoint) / 1e6:.2f} MB "
          f"(weights, optimizer, RNG and data state)\n")
    print("| format | file | MB | read back by | max |logit diff| |")
    print("|---|---|---|---|---|")

    def row(fmt, path, reader, other):
        with torch.no_grad():
            out = other(idx)
        diff = (getattr(out, "logits", out).float() - ref).abs().max().item()
        print(f"| {fmt} | {path.name} | {checkpoint_bytes(path) / 1e6:.2f} | {reader} | {diff:.2e} |", flush=True)

    for dtype in ("fp32", "fp16"):
        for suffix in (".pt", ".safetensors"):
            path = save_model_weights_only(model, tmp / f"weights-{dtype}{suffix}", tokenizer=tok, dtype=dtype)
            row(f"weights only, {dtype}", path, "utils.load_model", load_model(path)[0])
    try:
        import transformers
    except ImportError:
        print("(transformers is not installed: no hf or gguf rows)")
        return
    export_hf(model, tok, tmp / "hf")
    row("hf, fp32", tmp / "hf", "transformers AutoModelForCausalLM",
        transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").eval())
    for dtype in ("fp32", "fp16", "q8_0"):
        path = export_gguf(model, tok, tmp / f"model-{dtype}.gguf", dtype=dtype)
        row(f"gguf, {dtype}", path, "transformers (gguf_file=)", transformers.AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=path.name, dtype=torch.float32).eval())
    try:
        from llama_cpp import Llama
    except ImportError:
        print("\n(llama-cpp-python is not installed: no llama.cpp run)")
        return
    path = tmp / f"model-{args.llama_cpp_type}.gguf"
    llm = Llama(str(path), n_ctx=model.config.block_size, logits_all=True, verbose=False, n_threads=os.cpu_count())
    same_tokens = llm.tokenize(args.prompt.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    diff = np.abs(np.array(llm.scores[:len(ids)]) - ref[0].numpy()).max()
    n = min(args.tokens, model.config.block_size - len(ids))    # llama.cpp stops at its context
    llm.reset()
    start = time.perf_counter()
    theirs = llm.create_completion(args.prompt, max_tokens=n, temperature=0.0, top_k=1)["choices"][0]["text"]
    seconds = time.perf_counter() - start
    ours = generate_text(model, tok, args.prompt, SampleConfig(max_new_tokens=n, temperature=0.0))[len(args.prompt):]
    print(f"\nllama.cpp (llama-cpp-python) on {path.name}: the same prompt tokens as ours: {same_tokens}; "
          f"max |logit diff| over the prompt {diff:.2e}; {n} greedy tokens in {seconds:.2f}s")
    print(f"llama.cpp: {args.prompt + theirs!r}")
    print(f"ours:      {args.prompt + ours!r}")
    print(f"identical greedy text: {theirs == ours}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="training tokens/s and MFU")
    p.add_argument("--configs", default="gpt2-style,tiny,small,cpu-fast",
                   help=f"comma-separated: {', '.join(TRAIN_CONFIGS)}")
    p.add_argument("--steps", type=int, default=8, help="timed steps per config (after 2 warm-up steps)")
    p.add_argument("--batch_size", type=int, default=None, help="override every config's batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    p.add_argument("--nanogpt", help="path to a nanoGPT checkout: time its model.py on gpt2-style too")
    p.add_argument("--baseline", metavar="FILE", help="another revision's model.py (git show REV:model.py > FILE): "
                   "time it on gpt2-style too, as ours runs")
    p.set_defaults(func=bench_train)
    d = sub.add_parser("decode", help="batch-1 decode tokens/s vs the bandwidth roofline and Hugging Face")
    d.add_argument("--sizes", default="15M,110M", help=f"comma-separated: {', '.join(DECODE_CONFIGS)}")
    d.add_argument("--tokens", type=int, default=512, help="new tokens per measurement")
    d.add_argument("--prompt_len", type=int, default=16)
    d.add_argument("--no-hf", dest="hf", action="store_false", help="skip the Hugging Face comparison")
    d.add_argument("--skip-nocache", action="store_true", help="skip the (slow) no-cache measurement")
    d.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decode")
    d.add_argument("--llama2c", metavar="DIR", help="a llama2.c checkout with run built (make runomp)")
    d.add_argument("--long", type=int, default=8192, help="new tokens of the long-generation rows (0: skip them)")
    d.add_argument("--window", type=int, default=256, help="the sliding window of the long-generation row")
    d.set_defaults(func=bench_decode)
    q = sub.add_parser("quant", help="decode tokens/s and memory for fp32, bf16, int8 and int4 weights")
    q.add_argument("--size", default="110M", choices=list(DECODE_CONFIGS))
    q.add_argument("--modes", default=",".join(QUANT_ROWS), help="comma-separated, fp32 first")
    q.add_argument("--tokens", type=int, default=64, help="new tokens per measurement")
    q.add_argument("--prompt_len", type=int, default=16)
    q.add_argument("--group_size", type=int, default=None, help="int4 group (default: largest that fits)")
    q.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled decode")
    q.set_defaults(func=bench_quant)
    qr = sub.add_parser("quant-row", help=argparse.SUPPRESS)   # one row of `quant`, in its own process
    qr.add_argument("checkpoint")
    qr.add_argument("--tokens", type=int, default=64)
    qr.add_argument("--prompt_len", type=int, default=16)
    qr.add_argument("--bf16", action="store_true")
    qr.add_argument("--no-compile", dest="compile", action="store_false")
    qr.set_defaults(func=bench_quant_row)
    t = sub.add_parser("tokenize", help="encode tokens/s of char, byte, a learned BPE and tiktoken encodings")
    t.add_argument("--text", help="a UTF-8 text file (default: the built-in corpus)")
    t.add_argument("--vocab_size", type=int, default=4096, help="of the BPE learned from the text")
    t.add_argument("--encodings", default="gpt2", help="comma-separated tiktoken encodings ('' for none)")
    t.add_argument("--repeats", type=int, default=3)
    t.set_defaults(func=bench_tokenize)
    c = sub.add_parser("classify", help="genre classification of Shakespeare passages vs majority and n-gram baselines")
    c.add_argument("--chars", type=int, default=256)
    c.add_argument("--folds", type=int, default=4, help="grouped cross-validation over plays")
    c.add_argument("--fold", type=int, default=None, help="run only this fold (0-based)")
    c.add_argument("--epochs", type=float, default=1)
    c.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte")
    c.add_argument("--vocab_size", type=int, default=None, help="of the BPE (with --tokenizer bpe; default 2048)")
    c.add_argument("--ngram_buckets", type=int, default=8192, help="hashed 2-4-gram embeddings (0: none)")
    c.add_argument("--d_model", type=int, default=64)
    c.add_argument("--n_layers", type=int, default=2)
    c.add_argument("--dropout", type=float, default=0.1)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--pretrain_epochs", type=float, default=0,
                   help="first train the backbone as a language model on the training passages, then LoRA")
    c.set_defaults(func=bench_classify)
    s2 = sub.add_parser("seq2seq", help="grapheme-to-phoneme on CMUdict: WER/PER against published results")
    for name, default in G2P_RUN.items():          # None: not given (--checkpoint refuses them)
        s2.add_argument(f"--{name}", type=type(default), help=f"training (default {default})",
                        choices=["fp32", "bf16"] if name == "precision" else None)
    s2.add_argument("--beams", type=int, default=4)
    s2.add_argument("--test_words", type=int, default=12000)
    s2.add_argument("--seed", type=int, default=0)
    s2.add_argument("--out_dir", help="keep the data and the run here (default: a temporary folder)")
    s2.add_argument("--checkpoint", help="decode and score this trained run instead of training one")
    s2.set_defaults(func=bench_seq2seq)
    f = sub.add_parser("forecast", help="forecasting real series: transformer vs seasonal naive and DLinear")
    f.add_argument("--series", default=",".join(FORECASTS), help=f"comma-separated: {', '.join(FORECASTS)}")
    f.add_argument("--epochs", type=float, default=20)
    f.add_argument("--d_model", type=int, default=64)
    f.add_argument("--n_layers", type=int, default=2)
    f.add_argument("--dropout", type=float, default=0.1)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--weight_decay", type=float, default=0.1)
    f.add_argument("--pooling", default="last", choices=["last", "mean", "flatten"])
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=bench_forecast)
    u = sub.add_parser("ucr", help="series classification on UCR/UEA datasets vs 1-NN, majority and published results")
    u.add_argument("--datasets", default=",".join(UCR), help=f"comma-separated: {', '.join(UCR)}")
    u.add_argument("--seeds", type=int, default=3, help="runs of each ensemble, from different seeds")
    u.add_argument("--seed", type=int, default=0)
    u.set_defaults(func=bench_ucr)
    e = sub.add_parser("export", help="file sizes and read-back logit differences of every export format; llama.cpp")
    e.add_argument("--checkpoint", default="out/best.pt")
    e.add_argument("--prompt", default="ROMEO:\nWhat light through yonder window breaks?")
    e.add_argument("--tokens", type=int, default=100, help="greedy tokens from llama.cpp and from ours")
    e.add_argument("--llama_cpp_type", default="fp16", choices=["fp32", "fp16", "q8_0"])
    e.set_defaults(func=bench_export)
    row = sub.add_parser("train-row", help=argparse.SUPPRESS)   # one row of `train`, in its own process
    row.add_argument("config", choices=list(TRAIN_CONFIGS))
    row.add_argument("--impls", default="ours", help="comma-separated: ours, nanoGPT, baseline")
    row.add_argument("--steps", type=int, default=8)
    row.add_argument("--batch_size", type=int, default=None)
    row.add_argument("--device", default="auto")
    row.add_argument("--tuned", action="store_true", help="apply utils.tune_cpu_allocator() as train.py does")
    row.add_argument("--compile", action="store_true")
    row.add_argument("--precision", default="fp32")
    row.add_argument("--nanogpt")
    row.add_argument("--baseline")
    row.set_defaults(func=bench_train_row)
    m = sub.add_parser("memory", help="peak memory of a training step with and without gradient checkpointing")
    m.add_argument("--configs", default="gpt2-style,small", help=f"comma-separated: {', '.join(TRAIN_CONFIGS)}")
    m.add_argument("--steps", type=int, default=3, help="timed steps per row after the measured first step (0: memory only)")
    m.add_argument("--batch_size", type=int, default=None, help="override every config's batch size")
    m.add_argument("--device", default="auto")
    m.set_defaults(func=bench_memory)
    mrow = sub.add_parser("memory-row", help=argparse.SUPPRESS)  # one row of `memory`, in its own process
    mrow.add_argument("config", choices=list(TRAIN_CONFIGS))
    mrow.add_argument("--checkpointing", action="store_true")
    mrow.add_argument("--steps", type=int, default=3)
    mrow.add_argument("--batch_size", type=int, default=None)
    mrow.add_argument("--device", default="auto")
    mrow.set_defaults(func=bench_memory_row)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
