"""Shared helpers: checkpoints (versioned, atomic, one load_model for every kind), devices,
logging, plots and profiling. The configuration lives in config.py.

    >>> from utils import load_model
    >>> model, tokenizer = load_model("out/best.pt")          # doctest: +SKIP

As a script, `python utils.py COMMAND ...` runs a subcommand (`--help` lists them):

    python utils.py plot out/                                  # out/plot.png: losses, lr, grad norm
    python utils.py quantize --checkpoint out/best.pt --mode int8 --eval
    python utils.py merge-lora --lora out-lora/best.pt --out merged.pt
    python utils.py export --checkpoint out/best.pt --format hf|gguf|pt|safetensors --out PATH
    python utils.py import --hf DIR --out model.pt
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import math
import os
import pickle
import re
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from model import (GATED, HEAD_FIELDS, QUANT_MODES, Int4Linear, Int8Linear, LoRAConfig, QuantConfig, Seq2SeqTransformer,
                   Transformer, TransformerConfig, apply_lora, closest, dequantize_model, load_lora_state_dict,
                   merge_lora, quantize_model, use_kernels)
from data import tokenizer_from_state
from interop import (DTYPES, GGUF_TYPES, InteropError, atomic_path, check_out, export_gguf, export_hf,
                     gguf_tokenizer_note, hf_weight_files, input_encoder, other_than_language_model, read_hf,
                     read_safetensors, weights_payload, write_safetensors)

# =============================================================================
# Checkpoints: versioned, atomic, loaded with weights_only=True
# =============================================================================

CHECKPOINT_FORMAT = "mini-transformer"
CHECKPOINT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: a language model only (no kind or task keys)


MODEL_KINDS = {"transformer": Transformer, "seq2seq": Seq2SeqTransformer}   # a checkpoint's "kind" -> its class


class CheckpointError(RuntimeError):
    """A file that is not a usable Mini Transformer checkpoint."""


def save_checkpoint(path, payload: dict) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over `path`.

    payload needs 'model' (a state dict), 'model_config' and 'tokenizer'; the format
    name and version are added here.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    except OSError as e:                 # disk full, quota, permissions: the old file is untouched
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise CheckpointError(f"could not write {path}: {e.strerror or e}{kept}") from None


class RunLock:
    """`out_dir/.lock` while a run writes there, holding "host pid". A second run that is
    still going is refused; the lock of a run that was killed is taken over. Re-entrant
    within one process.

        >>> with RunLock("out"):                                  # doctest: +SKIP
        ...     ...                                               # train, write checkpoints
    """

    def __init__(self, out_dir):
        self.path, self.me, self.held = Path(out_dir) / ".lock", f"{socket.gethostname()} {os.getpid()}", False

    def __enter__(self):
        self.made = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self.held:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner == self.me:                              # this process holds it already
                    return self
                if owner is not None and _alive(owner):
                    raise ValueError(f"{self.path.parent} is in use by another run ({owner.split()[0]}, pid "
                                     f"{owner.split()[-1]}); wait for it or choose another training.out_dir "
                                     f"(delete {self.path} if no run uses it)")
                self.path.unlink(missing_ok=True)                 # its run is gone: take the lock over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me)
            self.held = True
        return self

    def __exit__(self, *exc):
        if self.held and self._owner() == self.me:
            self.path.unlink(missing_ok=True)
            if self.made and not any(self.path.parent.iterdir()):   # a run that failed before writing
                self.path.parent.rmdir()
        self.held = False

    def _owner(self) -> Optional[str]:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None


def _alive(owner: str) -> bool:
    """Whether a lock's "host pid" names a running process (another host's: assumed running)."""
    host, _, pid = owner.rpartition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:                # someone else's process
        return True
    return True


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Load and validate a checkpoint: a .pt file of ours (full, weights-only, quantized or a
    LoRA adapter), a safetensors file of ours (read with no pickle), or `hf:DIR`, a Hugging Face
    directory (interop.read_hf). Anything else raises CheckpointError with the reason."""
    if str(path).startswith("hf:"):
        try:
            return read_hf(str(path)[3:])
        except InteropError as e:
            raise CheckpointError(str(e)) from None
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist (train first: python train.py)")
    if path.is_dir() or path.stat().st_size == 0:
        raise CheckpointError(f"'{path}' is {'a directory' if path.is_dir() else 'empty'}, not a checkpoint")
    try:
        ckpt = (read_safetensors(path) if is_safetensors(path)
                else torch.load(path, map_location=map_location, weights_only=True))
    except InteropError as e:
        raise CheckpointError(str(e)) from None
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL (\S+)", str(e))   # what unpickling would have imported and called
        if code:
            raise CheckpointError(f"'{path}' holds Python objects besides tensors and plain data ({code[1]}); "
                                  f"refused, since loading them could run code") from None
        raise CheckpointError(f"'{path}' is not a loadable checkpoint (not a torch.save file of tensors)") from None
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"'{path}' is not a loadable checkpoint: {type(e).__name__}: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a Mini Transformer checkpoint (no '{CHECKPOINT_FORMAT}' "
                              f"format tag); foreign weights need converting first")
    if ckpt.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"'{path}' has checkpoint format version {ckpt.get('version')!r}; "
                              f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    ckpt.setdefault("kind", "transformer")
    ckpt.setdefault("task", {"name": "lm"})
    for key in ("model", "model_config", "tokenizer"):
        if key not in ckpt:
            raise CheckpointError(f"'{path}' is missing '{key}'")
    return ckpt


def model_from_checkpoint(ckpt: dict, *, device="cpu", quantize: Optional[QuantConfig] = None,
                          kernels: bool = True, **config_overrides):
    """(model in eval mode, tokenizer) from a loaded full or quantized checkpoint: its kind,
    with the head its config names. A model of time series comes with its input scaler
    (series.SeriesScaler) in the tokenizer's place; None for other non-text inputs.

    quantize: quantize the weights after loading (ignored when already quantized).
    kernels: int4 layers packed for the fused kernel (the inference layout); False for QLoRA
        training. quantize.int8_kernel sets the int8 layers' kernel choice (see model.Int8Linear).
    config_overrides: model config changes that keep the weights' shapes (dropout).
    """
    if "lora" in ckpt:
        raise CheckpointError("this is a LoRA adapter, not a model: merge it first (python utils.py "
                              "merge-lora) or load it with load_model(path)")
    kind = ckpt.get("kind", "transformer")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"the checkpoint holds a '{kind}' model; this code builds {', '.join(MODEL_KINDS)}")
    cfg = TransformerConfig.from_dict({**ckpt["model_config"], **config_overrides})
    with torch.device("meta"):                      # shapes only: the checkpoint's tensors become the
        model = MODEL_KINDS[kind](cfg)              # weights, so float copies are never allocated
    stored = QuantConfig.from_stored(ckpt["quantize"]) if ckpt.get("quantize") else None
    if stored:
        quantize_model(model, stored, kernels=False)
    state = dict(ckpt["model"])
    for name, stored_as in ckpt.get("tied", {}).items():   # one tensor under two names, stored once
        state[name] = state[stored_as]
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:                       # e.g. a vocabulary the config does not have
        misfit = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\))"
                           r" from checkpoint, the shape in current model is (torch.Size\(\[[\d, ]*\]\))", str(e))
        detail = f"{misfit[1]} is {misfit[2][10:]} in the file, {misfit[3][10:]} by its config" if misfit else "missing or extra weights"
        raise CheckpointError(f"the weights do not fit the model config ({detail})") from None
    model.tie_weights()                             # assign=True gave each name its own Parameter
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model.float()                               # half is a storage format; set_dtype picks the compute one
    model.to(device)
    if quantize and quantize.mode and not stored:
        quantize_model(model, quantize, kernels=kernels)
    elif stored and kernels:
        use_kernels(model, int8_kernel=quantize.int8_kernel if quantize else None)
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt.get("tokenizer") is not None else None
    if ckpt.get("input_scaler"):                    # a model of time series: its inputs' scaler instead
        from series import SeriesScaler
        tokenizer = SeriesScaler.from_state(ckpt["input_scaler"])
    return model.eval(), tokenizer


def file_sha256(path) -> str:
    """The file's sha256; of an `hf:DIR` source, its weight files' together."""
    h = hashlib.sha256()
    if str(path).startswith("hf:"):
        for f in hf_weight_files(str(path)[3:]):
            h.update(file_sha256(f).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def base_reference(path) -> dict:
    """What an adapter records of its base checkpoint: where it was and its hash."""
    where = f"hf:{Path(str(path)[3:]).resolve()}" if str(path).startswith("hf:") else str(Path(path).resolve())
    return {"path": where, "sha256": file_sha256(path)}


def check_base(adapter: dict, base_path) -> None:
    """The base file must be the one the adapter was trained on (same sha256)."""
    expected = adapter["lora"]["base"]["sha256"]
    if file_sha256(base_path) != expected:
        raise CheckpointError(f"'{base_path}' is not the base this adapter was trained on (sha256 "
                              f"{expected[:12]}... expected, from {adapter['lora']['base']['path']})")


def load_model(path, *, lora=None, quantize: Optional[QuantConfig] = None, device="cpu", kernels=True):
    """(model in eval mode, tokenizer) from a checkpoint file: full, quantized, or a LoRA
    adapter (its base is found through the reference it stores). lora: an adapter file
    to add to the model in `path`. quantize: quantize on the fly (a QLoRA adapter's
    base is quantized as in training unless quantize says otherwise).

        >>> model, tokenizer = load_model("out/best.pt", lora="out-lora/best.pt")  # doctest: +SKIP
    """
    ckpt = load_checkpoint(path)
    if "lora" in ckpt:                              # an adapter on its own: find its base
        if lora:
            raise CheckpointError(f"'{path}' is a LoRA adapter; pass the base model as the checkpoint")
        base = ckpt["lora"]["base"]["path"]
        if not Path(base.removeprefix("hf:")).exists():
            raise CheckpointError(f"the base of adapter '{path}' is not at {base}; pass it as the "
                                  f"checkpoint and the adapter with --lora")
        return load_model(base, lora=path, quantize=quantize, device=device, kernels=kernels)
    if not lora:
        return model_from_checkpoint(ckpt, device=device, quantize=quantize, kernels=kernels)
    adapter = load_checkpoint(lora)
    if "lora" not in adapter:
        raise CheckpointError(f"'{lora}' is not a LoRA adapter (it holds a full model)")
    check_base(adapter, path)
    if quantize is None or quantize.mode is None:
        quantize = QuantConfig.from_stored(adapter["quantize"]) if adapter.get("quantize") else quantize
    model, tokenizer = model_from_checkpoint(ckpt, device=device, quantize=quantize, kernels=kernels)
    head = {k: adapter["model_config"][k] for k in HEAD_FIELDS if k in adapter["model_config"]}
    if any(getattr(model.config, k) != v for k, v in head.items()):   # e.g. a classifier fine-tuned from an LM
        model.set_head(**head)
    apply_lora(model, LoRAConfig(**adapter["lora"]["config"]))
    load_lora_state_dict(model, {k: v.to(device) for k, v in adapter["model"].items()})
    return model.eval(), tokenizer

# =============================================================================
# Devices, logging, profiling
# =============================================================================


def pick_device(name: str = "auto") -> str:
    """'auto' picks cuda, then mps, then cpu; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device '{name}'; valid: auto, cpu, cuda, cuda:N, mps")
    return name


def warn_compile_failed(error: Exception, doing: str) -> None:
    """One stderr line when torch.compile fails at its first call (no C++ toolchain, an
    unsupported operator): the error's first line, and that `doing` goes on uncompiled."""
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    print(f"warning: torch.compile failed ({type(error).__name__}: {reason}); {doing} without it", file=sys.stderr)


class JsonlLogger:
    """Appends one JSON object per event to a file (and keeps nothing in memory). With
    tensorboard_dir, the numbers of every event that has a step also go to TensorBoard as
    `event/field` scalars (when the optional tensorboard package is installed)."""

    def __init__(self, path, *, tensorboard_dir=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tensorboard = tensorboard_writer(tensorboard_dir) if tensorboard_dir else None

    def log(self, **event):
        event = {"time": round(time.time(), 3), **event}
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self.tensorboard and "step" in event:
            for key, value in event.items():
                if key not in ("time", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{event['event']}/{key}", value, event["step"])
            if event["event"] != "train":      # on disk by each evaluation, even if the run dies later
                self.tensorboard.flush()

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()


def tensorboard_writer(log_dir):
    """A TensorBoard SummaryWriter, or None with a warning when tensorboard is not installed
    (it is optional: pip install tensorboard)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:          # torch.utils.tensorboard imports the tensorboard package
        print(f"warning: TensorBoard logging is off ({e}); pip install tensorboard to turn it on",
              file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def flops_per_token(cfg: TransformerConfig, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token (forward + backward), as nanoGPT and PaLM count them:
    6 per matmul weight, plus 12 * n_layers * T * d_model for attention scores and values."""
    T = seq_len or cfg.block_size
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    mlp = (3 if cfg.activation in GATED else 2) * d * cfg.d_ff
    head = d * cfg.vocab_size if cfg.head == "lm" else d * cfg.token_features if cfg.input_dim else 0  # lm_head, in_proj
    matmul_params = cfg.n_layers * (attn + mlp) + head
    return 6 * matmul_params + 12 * cfg.n_layers * T * d


def measure_matmul_peak(*, device="cpu", dtype=torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Sustained FLOP/s of a large square matmul: the denominator of MFU on this machine.
    Its random operands come from a generator of its own: measuring leaves torch's global
    random state, and so a seeded run, untouched."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    synchronize(device)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
    synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name(); more specific names first. Other devices are measured.
GPU_PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                  ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
                  ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12)]
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_peak_flops(device: str, precision: str = "fp32") -> tuple[float, str]:
    """The FLOP/s that MFU divides by, and where the number comes from.

    bf16/fp16 on a known GPU: its datasheet peak. Anything else (CPUs, fp32, other GPUs): a
    short matmul measurement in that precision, once per process (it takes about a second).

        >>> flops, source = device_peak_flops("cpu")      # e.g. (1.6e11, 'measured fp32 matmul')
    """
    if device.startswith("cuda") and precision != "fp32":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name} {precision} datasheet peak"
    return _measured_peak(device, precision, torch.get_num_threads()), f"measured {precision} matmul"


@functools.lru_cache(maxsize=None)
def _measured_peak(device: str, precision: str, threads: int) -> float:
    # big enough to reach the sustained rate of a CPU (or to be a fair test of a GPU), but
    # a low-precision matmul on a CPU without native support takes seconds at n=1024
    slow = not device.startswith("cuda") and precision != "fp32"
    n = 512 if slow else 4096 if device.startswith("cuda") else 1024
    return measure_matmul_peak(device=device, dtype=PRECISION_DTYPES[precision], n=n, seconds=0.25)


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc): without this, every training step hands
    its large activation buffers back to the OS and page-faults them in again, which costs
    about 5% of CPU training throughput (bench.py train). Linux/glibc only; True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    return all(libc.mallopt(opt, value) == 1 for opt, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    elif str(device).startswith("mps"):
        torch.mps.synchronize()

# =============================================================================
# Plots and the command line: python utils.py plot | quantize | merge-lora
# =============================================================================


def checkpoint_bytes(path) -> int:
    """Bytes of a checkpoint file, an hf:DIR's weight files, or a directory's files."""
    if str(path).startswith("hf:"):
        return sum(f.stat().st_size for f in hf_weight_files(str(path)[3:]))
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plain_payload(model, tokenizer, ckpt: dict, **extra) -> dict:
    """A checkpoint of just a model: weights, configs, what it is and its tokenizer (or input
    scaler); no training state."""
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), **input_encoder(tokenizer),
            "config": ckpt.get("config", {}), **{k: ckpt[k] for k in ("kind", "task") if k in ckpt}, **extra}


def val_perplexity(model, tokenizer, ckpt: dict, data_path: Optional[str] = None) -> float:
    """Perplexity over every validation token once, on the data the checkpoint trained on
    (or data_path), split as in training."""
    from config import DataConfig, saved_config
    from data import load_dataset
    from tasks import split_loss
    data_cfg = DataConfig(**{**saved_config(ckpt.get("config", {})).get("data", {}),
                             **({"path": data_path} if data_path else {})})
    block = model.config.block_size
    data = load_dataset(data_cfg, block_size=block, tokenizer=tokenizer)
    device = str(model.device)
    return math.exp(split_loss(model, data, "val", block_size=block, batch_size=16, device=device))


def quantize_main(argv: list[str]) -> None:
    """python utils.py quantize --checkpoint out/best.pt --mode int8|int4 [--group_size 64]
    [--out q.pt] [--eval] [--force]: write a weight-only quantized checkpoint."""
    p = argparse.ArgumentParser(prog="utils.py quantize", description=quantize_main.__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--mode", required=True, choices=QUANT_MODES)
    p.add_argument("--group_size", type=int, help=f"int4 group (32|64|128|256; default {QuantConfig.group_size})")
    p.add_argument("--out", help="default: <checkpoint>-<mode>.pt beside it")
    p.add_argument("--eval", action="store_true", help="validation perplexity before and after")
    p.add_argument("--data", help="--eval on this text instead of the checkpoint's training data")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    if args.group_size is not None and args.mode != "int4":
        raise ValueError(f"--group_size is for int4; {args.mode} keeps one scale per output row")
    if args.data and not args.eval:
        raise ValueError("--data is the text --eval measures; add --eval")
    qcfg = QuantConfig(args.mode, args.group_size or QuantConfig.group_size)
    src = Path(str(args.checkpoint).removeprefix("hf:"))
    out = check_out(args.out or src.with_name(f"{src.stem}-{args.mode}.pt"), force=args.force, directory=False)
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt.get("quantize"):         # its layers are quantized already: nothing to measure or redo
        raise CheckpointError(f"'{args.checkpoint}' is already quantized ({ckpt['quantize']['mode']}); "
                              f"quantize the float checkpoint it came from")
    model, tokenizer = model_from_checkpoint(ckpt)
    if args.eval and other_than_language_model(model):
        raise ValueError("--eval measures a language model's validation perplexity; this checkpoint holds "
                         + other_than_language_model(model))
    linear_fp32 = _bytes(m.weight for m in model.modules() if type(m) is torch.nn.Linear)
    before = val_perplexity(model, tokenizer, ckpt, args.data) if args.eval else None
    # portable int4 layout: evaluation runs big batches, where dequantize-then-matmul beats
    # torch's int4 kernel by far on some CPUs (tests check that both paths agree)
    quantize_model(model, qcfg, kernels=False)
    linear_q = sum(_bytes(b for n, b in m.state_dict().items() if n != "bias")
                   for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    save_checkpoint(out, _plain_payload(model, tokenizer, ckpt, quantize=qcfg.stored()))
    print(f"{out}: {out.stat().st_size / 1e6:.2f} MB (from {checkpoint_bytes(args.checkpoint) / 1e6:.2f} MB); linear "
          f"weights {linear_fp32 / 1e6:.2f} -> {linear_q / 1e6:.2f} MB ({linear_fp32 / linear_q:.1f}x smaller)")
    if args.eval:
        after = val_perplexity(model, tokenizer, ckpt, args.data)
        print(f"validation perplexity: fp32 {before:.4f}, {args.mode} {after:.4f} "
              f"({100 * (after / before - 1):+.2f}%)")


def merge_lora_main(argv: list[str]) -> None:
    """python utils.py merge-lora --lora adapter.pt [--checkpoint base.pt] --out merged.pt [--force]:
    fold a LoRA adapter into its base and write a plain float checkpoint."""
    p = argparse.ArgumentParser(prog="utils.py merge-lora", description=merge_lora_main.__doc__)
    p.add_argument("--lora", required=True, help="the adapter checkpoint")
    p.add_argument("--checkpoint", help="its base (default: the base the adapter refers to)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    check_out(args.out, force=args.force, directory=False)
    adapter = load_checkpoint(args.lora)
    if "lora" not in adapter:
        raise CheckpointError(f"'{args.lora}' is not a LoRA adapter (it holds a full model)")
    if args.checkpoint:
        model, tokenizer = load_model(args.checkpoint, lora=args.lora, kernels=False)
    else:
        model, tokenizer = load_model(args.lora, kernels=False)
    dequantize_model(merge_lora(model))            # a QLoRA base becomes float again
    save_checkpoint(args.out, _plain_payload(model, tokenizer, adapter))
    print(f"merged {args.lora} into {adapter['lora']['base']['path']} -> {args.out}")


def save_model_weights_only(model, path, half_precision: bool = False, *, tokenizer=None,
                            dtype: Optional[str] = None, config: Optional[dict] = None,
                            task: Optional[dict] = None) -> Path:
    """Save only what inference needs (weights, model config, tokenizer; no optimizer or RNG
    state), as safetensors when path ends in .safetensors (read back with no pickle) and as
    a .pt checkpoint otherwise. half_precision stores fp16; dtype="bf16" bfloat16. generate.py,
    --init_from and utils.py quantize read the file like any checkpoint.

        >>> save_model_weights_only(model, "small.safetensors", half_precision=True,  # doctest: +SKIP
        ...                         tokenizer=tokenizer)
    """
    dtype = dtype or ("fp16" if half_precision else "fp32")
    payload = weights_payload(model, tokenizer, dtype=dtype, config=config, task=task)
    path = Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(path, payload)
    else:
        save_checkpoint(path, payload)
    return path


EXPORT_FORMATS = ("hf", "gguf", "pt", "safetensors")


def export_main(argv: list[str]) -> None:
    """python utils.py export --checkpoint out/best.pt --format hf|gguf|pt|safetensors --out PATH
    [--dtype fp32|fp16|bf16|q8_0] [--lora adapter.pt] [--force]: the model for other programs
    (Hugging Face transformers, llama.cpp) or as a small weights-only file."""
    p = argparse.ArgumentParser(prog="utils.py export", description=export_main.__doc__)
    p.add_argument("--checkpoint", required=True, help="a checkpoint of ours, a LoRA adapter, or hf:DIR")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="a directory for hf, a file otherwise")
    p.add_argument("--dtype", help="fp32|fp16|bf16, or q8_0 for gguf (default: fp32; gguf: fp16)")
    p.add_argument("--lora", help="an adapter to merge into the checkpoint first")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    dtype = args.dtype or ("fp16" if args.format == "gguf" else "fp32")
    valid = GGUF_TYPES if args.format == "gguf" else tuple(DTYPES)
    if dtype not in valid:
        raise ValueError(f"--dtype {dtype} is not supported for --format {args.format}; {closest(dtype, valid)}")
    ckpt = load_checkpoint(args.lora or args.checkpoint)
    if "lora" in ckpt and not args.lora and not Path(ckpt["lora"]["base"]["path"].removeprefix("hf:")).exists():
        raise CheckpointError(f"'{args.checkpoint}' is a LoRA adapter; its base is not at "
                              f"{ckpt['lora']['base']['path']}: pass that base as --checkpoint and this file as --lora")
    model, tokenizer = load_model(args.checkpoint, lora=args.lora, kernels=False)
    dequantize_model(merge_lora(model))             # what was trained, as plain float layers
    out = Path(args.out)
    if args.format == "hf":
        export_hf(model, tokenizer, out, dtype=dtype, force=args.force)
    elif args.format == "gguf":
        export_gguf(model, tokenizer, out, dtype=dtype, force=args.force)
        if note := gguf_tokenizer_note(tokenizer):
            print(f"note: {note}", file=sys.stderr)
    else:
        out = check_out(out.with_suffix(f".{args.format}") if not out.suffix else out, force=args.force, directory=False)
        save_model_weights_only(model, out, tokenizer=tokenizer, dtype=dtype, config=ckpt.get("config"),
                                task=ckpt["task"])
    print(f"{out}: {args.format} {dtype}, {checkpoint_bytes(out) / 1e6:.2f} MB (the checkpoint {args.checkpoint} is "
          f"{checkpoint_bytes(args.checkpoint) / 1e6:.2f} MB)")


def import_main(argv: list[str]) -> None:
    """python utils.py import --hf DIR --out model.pt [--force]: a Hugging Face directory
    (Llama, Mistral or GPT-2, as save_pretrained writes it) as a checkpoint of ours. --init_from
    and --checkpoint also take hf:DIR directly."""
    p = argparse.ArgumentParser(prog="utils.py import", description=import_main.__doc__)
    p.add_argument("--hf", required=True, help="the directory")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    check_out(args.out, force=args.force, directory=False)
    ckpt = load_checkpoint(f"hf:{args.hf}")
    cfg = TransformerConfig.from_dict(ckpt["model_config"])
    save_checkpoint(args.out, {**{k: v for k, v in ckpt.items() if k not in ("format", "version", "source")},
                               "config": {"model": cfg.to_dict()}})
    print(f"{args.out}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, tokenizer "
          f"{(ckpt['tokenizer'] or {}).get('kind', 'none')} (from {args.hf})")


def _by_step(rows: list[dict], event: str) -> list[dict]:
    """The rows of one event in step order; a step logged twice (the steps a resumed run
    redid after its last checkpoint) keeps its latest row."""
    return sorted({r["step"]: r for r in rows if r["event"] == event}.values(), key=lambda r: r["step"])


def plot_run(run_dir, path=None) -> Path:
    """Draw a run's log.jsonl into a PNG (default run_dir/plot.png): train and validation
    loss, learning rate and gradient norm against the step, and with training.log_attention
    each layer's attention entropy. Returns the path.

        >>> png = plot_run("out")                        # out/plot.png  # doctest: +SKIP
    """
    from matplotlib.figure import Figure     # no pyplot: no global backend, nothing shown (Agg)

    run_dir = Path(run_dir)
    if not (run_dir / "log.jsonl").exists():
        raise FileNotFoundError(f"'{run_dir / 'log.jsonl'}' does not exist (give a training.out_dir)")
    rows = read_jsonl(run_dir / "log.jsonl")
    train, evals = _by_step(rows, "train"), _by_step(rows, "eval")
    if not train and not evals:
        raise ValueError(f"{run_dir / 'log.jsonl'} has no train or eval records to plot yet")
    diagnostics = _by_step(rows, "diagnostics")
    fig = Figure(figsize=(17 if diagnostics else 13, 3.8), layout="constrained")
    loss_ax, lr_ax, norm_ax, *entropy_ax = fig.subplots(1, 4 if diagnostics else 3)
    if diagnostics:                     # training.log_attention: each layer's mean over its heads
        layers = sorted({int(k.split("/")[1][1:]) for k in diagnostics[0] if k.startswith("attn_entropy/")})
        for layer in layers:
            means = [np.mean([v for k, v in r.items() if k.startswith(f"attn_entropy/L{layer}/")])
                     for r in diagnostics]
            entropy_ax[0].plot([r["step"] for r in diagnostics], means, "o-", label=f"layer {layer}")
        entropy_ax[0].legend(fontsize=8)
    steps = [r["step"] for r in train]
    loss_ax.plot(steps, [r["train_loss"] for r in train], alpha=0.5, label="train (logged steps)")
    loss_ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    lr_ax.plot(steps, [r["lr"] for r in train])
    norm_ax.plot(steps, [r["grad_norm"] for r in train])
    titles = ["loss", "learning rate", "gradient norm (before clipping)", "attention entropy (nats, mean of heads)"]
    for ax, title in zip([loss_ax, lr_ax, norm_ax, *entropy_ax], titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    fig.suptitle(str(run_dir.resolve().name))
    path = png(path or run_dir / "plot.png")
    fig.savefig(path, dpi=100)
    return path


def png(path) -> Path:
    """The file a figure saved to path lands in: matplotlib adds .png to a name without a suffix."""
    path = Path(path)
    return path if path.suffix else path.with_suffix(".png")


def plot_forecast(history, forecast, truth=None, *, names=None, path="forecast.png", context: int = 200) -> Path:
    """A PNG per channel: the last `context` steps of the history, the forecast after it, and
    the truth where known (the held-out steps), on one time axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    history, forecast = np.asarray(history, float), np.asarray(forecast, float)
    C, T = history.shape[1], len(history)
    names = names or [f"x{c}" for c in range(C)]
    fig, axes = plt.subplots(C, 1, figsize=(10, 2.6 * C + 0.6), squeeze=False, sharex=True)
    start = max(0, T - context)
    for c, ax in enumerate(axes[:, 0]):
        ax.plot(range(start, T), history[start:, c], color="0.3", lw=1.2, label="history")
        ahead = range(T - 1, T + len(forecast))          # joined to the last known step
        if truth is not None:
            ax.plot(ahead[:len(truth) + 1], [history[-1, c], *np.asarray(truth, float)[:, c]], color="tab:green",
                    lw=1.2, label="truth")
        ax.plot(ahead, [history[-1, c], *forecast[:, c]], color="tab:orange", lw=1.8, label="forecast")
        ax.axvline(T - 0.5, color="0.6", ls=":", lw=1)
        ax.set_ylabel(names[c])
        ax.grid(alpha=0.25)
    axes[0, 0].legend(loc="upper left", frameon=False, ncol=3)
    axes[0, 0].set_title(f"forecast of {len(forecast)} steps from {T} steps of history")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = png(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check_index(what: str, i: int, n: int) -> None:
    if not -n <= i < n:
        raise ValueError(f"{what}={i} is out of range: the weights have {n} {what}s (0..{n - 1})")


def plot_attention(weights, *, layer: int = 0, head: Optional[int] = 0, tokens=None, queries=None, path=None,
                   title=None):
    """Draw attention weights as a heatmap: query positions down, key positions across, from
    Transformer.get_attention_weights (a list over layers of (B, H, T, S); the first row of the
    batch is drawn). head=None draws every head of the layer in a grid. tokens: labels of the
    key positions; queries: of the query positions (default: the last T tokens, as in
    self-attention; cross-attention has its own). Returns the matplotlib Figure, saved as a
    PNG when path is given.

        >>> w = model.get_attention_weights(ids)                          # doctest: +SKIP
        >>> plot_attention(w, layer=0, head=None, tokens=["To", " be", ","], path="attn.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure     # no pyplot: no global backend, nothing shown (Agg)

    if isinstance(weights, torch.Tensor):
        weights = [weights]
    _check_index("layer", layer, len(weights))
    w = weights[layer].detach().float().cpu()
    w = w[0] if w.dim() == 4 else w                                           # (H, T, S)
    heads = range(w.shape[0]) if head is None else [head]
    if head is not None:
        _check_index("head", head, w.shape[0])
    T, S = w.shape[-2:]
    if tokens is not None and len(tokens) != S:
        raise ValueError(f"{len(tokens)} token labels for {S} key positions")
    if queries is not None and len(queries) != T:
        raise ValueError(f"{len(queries)} query labels for {T} query positions")
    cols = math.ceil(math.sqrt(len(heads)))
    rows = -(-len(heads) // cols)
    side = min(10.0 if len(heads) == 1 else 6.0, 2.0 + 0.2 * S)              # room for the labels
    fig = Figure(figsize=(side * cols, side * rows * T / S + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, h in zip(axes, heads):
        image = ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer % len(weights)}, head {h % w.shape[0]}")
        if tokens is not None and S <= 64:                                   # past 64 labels overlap
            def shown(labels):
                return [repr(t)[1:-1].replace(" ", "\u2423") for t in labels]     # spaces shown as ␣
            ax.set_xticks(range(S), shown(tokens), rotation=90, fontsize=8)
            ax.set_yticks(range(T), shown(tokens[S - T:] if queries is None else queries), fontsize=8)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
    for ax in axes[len(heads):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes[:len(heads)].tolist(), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(png(path), dpi=100)
    return fig


def plot_main(argv: list[str]):
    parser = argparse.ArgumentParser(prog="utils.py plot", description="Draw a run's log.jsonl (train and "
                                     "validation loss, learning rate, gradient norm against the step) into a PNG.")
    parser.add_argument("run_dir", help="a training.out_dir holding log.jsonl")
    parser.add_argument("--output", "-o", help="the PNG to write (default: RUN_DIR/plot.png)")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.output))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


COMMANDS = {"plot": plot_main, "quantize": quantize_main, "merge-lora": merge_lora_main,
            "export": export_main, "import": import_main}


def main(argv=None) -> None:
    """`python utils.py COMMAND [options]`: dispatch to one of COMMANDS."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: python utils.py {{{','.join(COMMANDS)}}} ...  (COMMAND --help for its options)")
        return
    if not argv:
        sys.exit(f"error: no command given; valid: {', '.join(COMMANDS)}")
    if argv[0] not in COMMANDS:
        sys.exit(f"error: unknown command {argv[0]!r}; {closest(argv[0], COMMANDS)}")
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, CheckpointError) as e:   # InteropError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
