"""Train a language model on the built-in corpus or your own text.

    python train.py --config config.yaml                      # built-in Shakespeare, char-level
    python train.py --config config.yaml --data my.txt --model.n_layers=4 --training.max_iters=200
    python train.py --config config.yaml --preset cpu-fast --data ../shared/data/tinyshakespeare.txt
    python train.py --config config.yaml --resume              # continue from out/last.pt
    python train.py --config config.yaml --data corpus/ --data.tokenizer=bpe --data.vocab_size=4096
    python train.py --config config.yaml --init_from out/best.pt --lora.r=8 --data new.txt \
        --training.out_dir=out-lora                            # LoRA fine-tune (add --quantize int8: QLoRA)
    torchrun --standalone --nproc_per_node=4 train.py --config config.yaml   # DDP on 4 GPUs (or CPU processes)

Writes to training.out_dir: last.pt (for --resume), best.pt (best validation loss),
config.yaml (the resolved configuration), log.jsonl (one JSON object per event), plot.png
(the run's curves, drawn at the end; `python utils.py plot DIR` redraws it) and data/ (the
prepared token files, reused by later runs on the same inputs; data.cache_dir moves them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from config import (ALIASES, PRESETS, RUN_PRESETS, SECTIONS, TrainConfig, config_file, config_to_dict,  # noqa: F401
                    load_config)
from data import TokenDataset, prepared_dataset, tokenizer_from_state
from model import Int4Linear, Int8Linear, Transformer, TransformerConfig, apply_lora, load_lora_state_dict, lora_state_dict
from utils import (CheckpointError, JsonlLogger, base_reference, check_base, device_peak_flops, flops_per_token,
                   load_checkpoint, model_from_checkpoint, pick_device, plot_run, save_checkpoint,
                   tune_cpu_allocator, warn_compile_failed)

# -----------------------------------------------------------------------------
# Small pure pieces
# -----------------------------------------------------------------------------


def lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """learning_rate x linear warmup (over warmup_iters steps) x a decay that follows the
    fraction of the budget used (steps, or seconds with max_time), down to
    learning_rate * min_lr_ratio. The two factors multiply, so decay starts at step 0
    (negligibly, while warmup is short)."""
    warm = min(1.0, (step + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
    p = min(max(progress, 0.0), 1.0)
    decay = {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[cfg.lr_schedule]
    return cfg.learning_rate * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def dropout_at(progress: float, start: float, cfg: TrainConfig) -> float:
    """The dropout for a fraction of the budget used: `start` (model.dropout) throughout, or
    with dropout_schedule=linear moving in a straight line to dropout_final at the end.

        >>> dropout_at(0.5, 0.1, TrainConfig(dropout_schedule="linear", dropout_final=0.0))
        0.05
    """
    if cfg.dropout_schedule == "constant":
        return start
    return start + (cfg.dropout_final - start) * min(max(progress, 0.0), 1.0)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices that are not embeddings (norms, biases and
    embedding tables are left alone)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel (one pass over all parameters) exists for CPU and CUDA tensors
    fused = device.split(":")[0] in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def autocast(device: str, precision: str):
    """The autocast context for a precision; an impossible choice is a clear error."""
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = device.split(":")[0]
    if precision == "fp16" and kind == "cpu":
        raise ValueError("training.precision=fp16 needs CUDA or MPS; on CPU use bf16 or fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use training.precision=fp16")
    return torch.autocast(kind, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def lm_loss(model, x, y) -> torch.Tensor:
    logits = model(x)                                            # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

# -----------------------------------------------------------------------------
# Distributed: torchrun, DDP and FSDP
# -----------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device_name: str) -> str:
    """Join the torchrun job if there is one (WORLD_SIZE > 1) and return this rank's device:
    nccl with one GPU per rank (cuda:LOCAL_RANK), or gloo on CPU."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if not dist.is_available():
        raise ValueError("launched by torchrun, but this torch build has no torch.distributed")
    kind = device.split(":")[0]
    if kind == "mps":
        raise ValueError("distributed training runs on CUDA (nccl) or CPU (gloo), not MPS")
    if kind == "cpu":
        dist.init_process_group("gloo")
        return device
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=torch.device(device))
    return device


def mean_over_ranks(value: float, device: str) -> float:
    """The mean of a number over all ranks (itself outside torchrun)."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t)                            # a sum: gloo has no average
    return t.item() / dist.get_world_size()


def wrap_distributed(model: Transformer, tcfg: TrainConfig, device: str) -> torch.nn.Module:
    """DDP(model), or model sharded in place by FSDP2's fully_shard (each block, then the rest:
    a block's full weights exist only while it runs); the model itself outside torchrun."""
    if rank_and_world()[1] == 1:
        return model
    if tcfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                       else None)
    if tcfg.precision == "fp16":    # GradScaler would see only this rank's shard of the gradients
        raise ValueError("training.distributed=fsdp does not support precision=fp16; use bf16")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:                                            # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    # explicit: the default mesh is CUDA whenever a GPU exists, even for a run on the CPU
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def grad_sync(wrapped: torch.nn.Module, sync: bool):
    """DDP and FSDP reduce gradients across ranks during backward; with gradient accumulation
    only the last micro-batch of a step needs that (no_sync / set_requires_gradient_sync)."""
    if hasattr(wrapped, "no_sync"):                                   # DDP
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):                # FSDP2
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def gather_full(state):
    """A (nested) state dict with FSDP's DTensor shards gathered into full CPU tensors, one at
    a time (a GPU never holds the whole model): the same plain checkpoint as a single process
    writes. Collective: every rank must call it."""
    if isinstance(state, dict):
        return {k: gather_full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gather_full(v) for v in state]
    return state.full_tensor().cpu() if hasattr(state, "full_tensor") else state


def shard_optimizer_state(optimizer: torch.optim.Optimizer):
    """After loading a full optimizer state for an FSDP-sharded model, keep each rank's shard
    of the tensors that have their parameter's shape (a no-op for unsharded parameters)."""
    for p, state in optimizer.state.items():
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and not hasattr(value, "device_mesh"):
                    state[key] = distribute_tensor(value, p.device_mesh, p.placements)

# -----------------------------------------------------------------------------
# Evaluation
# -----------------------------------------------------------------------------


@torch.no_grad()
def estimate_loss(model, data, cfg: TrainConfig, block_size: int, device: str) -> dict:
    """Mean loss over eval_iters random batches per split; the same batches every time
    (a fixed generator), so successive evaluations compare like with like. Distributed,
    each rank takes its share of every batch and the means are averaged."""
    rank, world = rank_and_world()
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, block_size, generator=g, device=device,
                                  rank=rank, world_size=world)
            with autocast(device, cfg.precision):
                losses.append(lm_loss(model, x, y).item())
        out[split] = mean_over_ranks(float(np.mean(losses)), device)
    model.train()
    return out


@torch.no_grad()
def split_loss(model, data, split: str, *, block_size: int, batch_size: int, device: str,
               precision: str = "fp32") -> float:
    """Mean loss over every token of a split once (non-overlapping windows). Distributed,
    every rank computes all of it (FSDP needs every rank in every forward)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in data.iter_split(split, batch_size, block_size, device=device):
        with autocast(device, precision):
            logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------


@dataclass
class Run:
    """One rank's training run: what a step uses and what a checkpoint saves."""

    model: Transformer            # the plain module: its state_dict is what checkpoints hold
    wrapped: torch.nn.Module      # model, or DDP(model); FSDP shards model in place
    fwd: torch.nn.Module          # wrapped, or torch.compile(wrapped): what forward passes call
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator    # the batch sampler's stream, alike on every rank
    data: TokenDataset
    device: str
    base_ref: Optional[dict] = None  # a LoRA run's base checkpoint {path, sha256}
    step: int = 0
    elapsed: float = 0.0          # training seconds, evaluations and checkpoint writes included
    best_val: float = float("inf")
    evals_since_best: int = 0     # for early stopping


def _rng_state(generator: torch.Generator, device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    if rank_and_world()[1] > 1:       # each rank draws its own dropout masks
        state["ranks"] = [None] * dist.get_world_size()
        dist.all_gather_object(state["ranks"], {k: state[k] for k in ("torch", "cuda") if k in state})
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: str):
    rank = rank_and_world()[0]
    own = (state.get("ranks") or [state])[rank:rank + 1]   # none: a checkpoint of fewer ranks
    if own:
        torch.set_rng_state(own[0]["torch"])
        if "cuda" in own[0] and device.startswith("cuda"):
            torch.cuda.set_rng_state(own[0]["cuda"], device)
    generator.set_state(state["batches"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


def base_checkpoint(cfg: dict, resume_from: Optional[dict]) -> tuple[Optional[dict], Optional[dict]]:
    """The checkpoint a fine-tune starts from and its reference ({path, sha256}), or (None, None).
    A resumed LoRA run finds its base through the reference its adapter stores."""
    tcfg, lcfg = cfg["training"], cfg["lora"]
    if resume_from is not None:
        if "lora" not in resume_from:
            return None, None
        ref = resume_from["lora"]["base"]
        check_base(resume_from, ref["path"])
        return load_checkpoint(ref["path"]), ref
    if not tcfg.init_from:
        if lcfg.r or cfg["quantize"].mode:
            raise ValueError("LoRA and quantized training fine-tune a trained model: set training.init_from")
        return None, None
    init = Path(tcfg.init_from).resolve()
    if init.parent == Path(tcfg.out_dir).resolve():
        raise ValueError(f"training.init_from={tcfg.init_from} is inside training.out_dir, where this run "
                         f"writes its checkpoints; choose another out_dir")
    base = load_checkpoint(init)
    if "lora" in base:
        raise ValueError(f"{tcfg.init_from} is a LoRA adapter; merge it first (python utils.py merge-lora)")
    return base, base_reference(init)


def build_model(cfg: dict, tokenizer, device: str, base: Optional[dict]) -> Transformer:
    """The model to train: fresh, or the base's weights (quantized, with LoRA adapters
    trained on top, when asked)."""
    lcfg, qcfg = cfg["lora"], cfg["quantize"]
    if base is None:
        return Transformer(dataclasses.replace(cfg["model"], vocab_size=tokenizer.vocab_size)).to(device)
    if qcfg.mode and not lcfg.r:
        raise ValueError("quantized weights cannot be trained; add LoRA adapters (--lora.r=8) for QLoRA")
    if base.get("quantize") and not lcfg.r:
        raise ValueError("the base checkpoint is quantized; fine-tune it with LoRA (--lora.r=8)")
    # the base's architecture, with this run's dropout; int4 kernels have no backward
    model, _ = model_from_checkpoint(base, device=device, quantize=qcfg, kernels=False,
                                     dropout=cfg["model"].dropout)
    if lcfg.r:
        trainable = apply_lora(model, lcfg)
        # quantized weights are buffers, not parameters: count them as the weights they stand for
        total = sum(p.numel() for p in model.parameters()) + sum(
            m.in_features * m.out_features for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
        print(f"LoRA r={lcfg.r} on {','.join(lcfg.targets)}: {trainable:,} trainable parameters "
              f"({100 * trainable / total:.2f}% of {total:,})")
    return model.train()


def compile_model(wrapped: torch.nn.Module, trial) -> torch.nn.Module:
    """torch.compile(wrapped), or wrapped itself, with a warning, where compiling fails.

    torch.compile only wraps: the compiler runs, and fails (no C++ toolchain, an unsupported
    platform or operator), at the first forward and, lazily, the first backward. So
    trial(compiled) runs them here, with the random state and the gradients put back after.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        compiled = torch.compile(wrapped)
        with torch.random.fork_rng(devices=devices):
            trial(compiled)
        return compiled
    except Exception as e:
        warn_compile_failed(e, "training")
        return wrapped
    finally:
        wrapped.zero_grad(set_to_none=True)


def shared_dataset(cfg: dict, tokenizer) -> TokenDataset:
    """The run's prepared token files (tokenized once into <out_dir>/data or data.cache_dir,
    reused while the inputs are unchanged), read through np.memmap. Under torchrun rank 0
    prepares them while the other ranks wait, then every rank opens them."""
    tcfg = cfg["training"]
    rank, world = rank_and_world()

    def load(log=print):
        return prepared_dataset(cfg["data"], out_dir=tcfg.out_dir, block_size=cfg["model"].block_size,
                                tokenizer=tokenizer, progress=tcfg.progress and rank == 0, log=log)
    if world == 1:
        return load()
    if rank == 0:
        data = load()
        dist.barrier()
        return data
    dist.barrier()
    return load(log=lambda *args: None)      # reuses what rank 0 prepared


def setup(cfg: dict, device: str, resume_from: Optional[dict]) -> tuple[Run, dict]:
    """Data, model, optimizer and random streams, restored from a checkpoint when resuming.
    Returns the run and the config with model.vocab_size set from the tokenizer."""
    tcfg: TrainConfig = cfg["training"]
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    autocast(device, tcfg.precision)                 # an impossible precision fails before any work
    base, base_ref = base_checkpoint(cfg, resume_from)
    if base:   # a fine-tune keeps the base's architecture and tokenizer
        cfg = {**cfg, "model": TransformerConfig.from_dict({**base["model_config"],
                                                            "dropout": cfg["model"].dropout})}
    known = resume_from or base
    tokenizer = tokenizer_from_state(known["tokenizer"]) if known else None
    # a fine-tune's model (and its LoRA/quantize settings) is checked before any data is prepared
    model = build_model(cfg, tokenizer, device, base) if base else None
    data = shared_dataset(cfg, tokenizer)
    if model is None:    # the same seed: the same weights on every rank
        model = build_model(cfg, data.tokenizer, device, None)
    # the vocabulary belongs to the tokenizer, so the model's vocab_size follows it
    cfg = {**cfg, "model": model.config}
    lora = cfg["lora"].r > 0
    if resume_from:      # before sharding: fully_shard keeps each rank's part
        if lora:
            load_lora_state_dict(model, resume_from["model"])
        else:
            model.load_state_dict(resume_from["model"])
    rank = rank_and_world()[0]
    if rank > 0:
        torch.manual_seed(tcfg.seed + rank)          # but each rank its own dropout masks
    model.set_gradient_checkpointing(tcfg.gradient_checkpointing)
    wrapped = wrap_distributed(model, tcfg, device)
    optimizer = make_optimizer(model, tcfg, device)  # after sharding: FSDP replaced the parameters
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=tcfg.precision == "fp16")
    run = Run(model, wrapped, wrapped, optimizer, scaler, torch.Generator().manual_seed(tcfg.seed), data, device,
              base_ref=base_ref)
    if resume_from:
        optimizer.load_state_dict(resume_from["optimizer"])
        shard_optimizer_state(optimizer)
        if resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        run.step, run.elapsed, run.best_val = resume_from["step"], resume_from["elapsed"], resume_from["best_val_loss"]
        run.evals_since_best = resume_from.get("evals_since_best", 0)
        _set_rng_state(resume_from["rng"], run.generator, device)
    if tcfg.compile:
        run.fwd = compile_model(wrapped, lambda compiled: _trial_step(run, compiled, tcfg, cfg["model"].block_size))
    return run, cfg


def _trial_step(run: Run, fwd, tcfg: TrainConfig, block_size: int):
    """A training forward and backward and an evaluation forward, on a batch the run never sees."""
    rank, world = rank_and_world()
    x, y = run.data.get_batch("train", tcfg.batch_size, block_size, generator=torch.Generator().manual_seed(0),
                              device=run.device, rank=rank, world_size=world)
    with torch.no_grad(), autocast(run.device, tcfg.precision):
        run.wrapped(x)      # eagerly first: state built on first use (RoPE tables) is not traced
    with autocast(run.device, tcfg.precision):
        loss = lm_loss(fwd, x, y)
    loss.backward()
    estimate_loss(fwd, run.data, dataclasses.replace(tcfg, eval_iters=1), block_size, run.device)


def train_step(run: Run, tcfg: TrainConfig, block_size: int) -> tuple[float, float]:
    """One optimizer step over grad_accum_steps micro-batches: (mean loss over all ranks,
    gradient norm before clipping). A non-finite loss or norm raises before the update."""
    rank, world = rank_and_world()
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(tcfg.grad_accum_steps):
        x, y = run.data.get_batch("train", tcfg.batch_size, block_size, generator=run.generator,
                                  device=run.device, rank=rank, world_size=world)
        with grad_sync(run.wrapped, micro == tcfg.grad_accum_steps - 1):
            with autocast(run.device, tcfg.precision):
                loss = lm_loss(run.fwd, x, y)
            run.scaler.scale(loss / tcfg.grad_accum_steps).backward()
        loss_sum += loss.detach()
    run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tcfg.grad_clip or float("inf"))
    grad_norm = gather_full(norm).item()          # FSDP: a DTensor, the norm over all the shards
    train_loss = mean_over_ranks(loss_sum.item() / tcfg.grad_accum_steps, run.device)
    if not (math.isfinite(train_loss) and (math.isfinite(grad_norm) or run.scaler.is_enabled())):
        raise FloatingPointError(f"non-finite loss {train_loss} / grad norm {grad_norm} at step {run.step + 1}; "
                                 f"the weights were not updated and {Path(tcfg.out_dir) / 'last.pt'} is the last "
                                 f"good checkpoint. Try a lower learning rate.")
    run.scaler.step(run.optimizer)     # with fp16, skipped when the gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return train_loss, grad_norm


def checkpoint_payload(run: Run, cfg: dict, val_loss: float) -> dict:
    """Everything --resume needs, as plain full tensors. Collective under torchrun: every
    rank calls it (to gather FSDP shards and random states); rank 0 writes the result."""
    lora = cfg["lora"].r > 0
    payload = {"model": gather_full(lora_state_dict(run.model) if lora else run.model.state_dict()),
               "model_config": cfg["model"].to_dict(),
               "tokenizer": run.data.tokenizer.state(), "config": config_to_dict(cfg),
               "optimizer": gather_full(run.optimizer.state_dict()), "scaler": run.scaler.state_dict(),
               "step": run.step, "elapsed": run.elapsed, "best_val_loss": run.best_val, "val_loss": val_loss,
               "evals_since_best": run.evals_since_best, "rng": _rng_state(run.generator, run.device)}
    if lora:     # an adapter: only its weights, and which base they belong to
        payload["lora"] = {"config": dataclasses.asdict(cfg["lora"]), "base": run.base_ref}
    if cfg["quantize"].mode:
        payload["quantize"] = dataclasses.asdict(cfg["quantize"])
    return payload


def open_record(out_dir: Path, cfg: dict, *, resumed: bool) -> JsonlLogger:
    """Rank 0's output folder: the resolved config, and log.jsonl, new for a new run and
    appended to by --resume."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    for tmp in out_dir.glob(".*.pt.*.tmp"):           # left by a checkpoint write that was killed
        tmp.unlink()
    tensorboard = out_dir / "tensorboard" if cfg["training"].tensorboard else None
    if not resumed:
        (out_dir / "log.jsonl").unlink(missing_ok=True)
        if tensorboard:
            shutil.rmtree(tensorboard, ignore_errors=True)
    return JsonlLogger(out_dir / "log.jsonl", tensorboard_dir=tensorboard)


class Throughput:
    """Tokens/s and MFU over the training steps added since the last reset (evaluations excluded)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.reset()

    def reset(self):
        self.steps, self.seconds = 0, 0.0

    def add(self, seconds: float):
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds

    @property
    def tokens_per_sec(self) -> float:
        return self.steps * self.tokens_per_step / max(self.seconds, 1e-9)

    @property
    def mfu(self) -> float:
        return self.tokens_per_sec * self.flops_per_token / self.peak

    def __str__(self):
        return f"{self.tokens_per_sec:,.0f} tok/s | MFU {self.mfu:.1%}"


def train(cfg: dict, *, resume_from: Optional[dict] = None) -> dict:
    """Train with a resolved config ({'model', 'data', 'training'} dataclasses), in this
    process or, launched by torchrun, as one rank of a DDP or FSDP job.

    resume_from: a loaded last.pt checkpoint to continue from. Returns a summary dict
    (steps, best and final validation loss, whether it stopped early, the output folder).
    """
    device = init_distributed(cfg["training"].device)
    try:
        return _train(cfg, device, resume_from)
    finally:
        if rank_and_world()[1] > 1:
            dist.destroy_process_group()


def _train(cfg: dict, device: str, resume_from: Optional[dict]) -> dict:
    tcfg: TrainConfig = cfg["training"]
    run, cfg = setup(cfg, device, resume_from)
    model_cfg, block_size = cfg["model"], cfg["model"].block_size
    rank, world = rank_and_world()
    main, out_dir = rank == 0, Path(tcfg.out_dir)
    logger = open_record(out_dir, cfg, resumed=bool(resume_from)) if main else None
    peak, peak_source = device_peak_flops(device, tcfg.precision)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum_steps * block_size * world
    # per device: the job's tokens/s against the peak of all its devices
    log_speed, eval_speed = (Throughput(tokens_per_step, flops_per_token(model_cfg), peak * world)
                             for _ in range(2))
    bar = None
    if tcfg.progress and main:
        from tqdm import tqdm
        bar = tqdm(total=int(tcfg.max_time) if tcfg.max_time else tcfg.max_iters,
                   initial=int(run.elapsed) if tcfg.max_time else run.step,
                   unit="s" if tcfg.max_time else "it", dynamic_ncols=True)
    say = (bar.write if bar else print) if main else (lambda *args: None)
    n_params = sum(p.numel() for p in run.model.parameters() if p.requires_grad)   # LoRA: the adapters
    say(f"{n_params / 1e6:.2f}M parameters | vocab {model_cfg.vocab_size} "
        f"({run.data.tokenizer.kind}) | train {run.data.num_tokens['train']:,} tokens, val "
        f"{run.data.num_tokens['val']:,} | device {device}{f' x {world} ({tcfg.distributed})' if world > 1 else ''}"
        f" | {tcfg.precision} | peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")
    if main:
        logger.log(event="start", step=run.step, params=n_params, device=device,
                   resumed=bool(resume_from), world_size=world)

    def progress() -> float:
        return run.elapsed / tcfg.max_time if tcfg.max_time else run.step / tcfg.max_iters

    def evaluate(lr: float) -> bool:
        """Evaluate, log, write checkpoints; True when early stopping ends the run."""
        losses = estimate_loss(run.fwd, run.data, tcfg, block_size, device)
        if not all(map(math.isfinite, losses.values())):   # never save diverged weights
            raise FloatingPointError(f"non-finite evaluation loss {losses} at step {run.step}; "
                                     f"{out_dir / 'last.pt'} is the last good checkpoint")
        improved = losses["val"] < run.best_val
        run.best_val = min(run.best_val, losses["val"])
        run.evals_since_best = 0 if improved else run.evals_since_best + 1
        payload = checkpoint_payload(run, cfg, losses["val"])          # every rank: it gathers
        patience = tcfg.early_stopping_patience
        stop = bool(patience and run.evals_since_best >= patience)
        if main:
            logger.log(event="eval", step=run.step, train_loss=losses["train"], val_loss=losses["val"],
                       perplexity=math.exp(losses["val"]), elapsed=round(run.elapsed, 2))
            speed = f" | {eval_speed}" if eval_speed.steps else ""
            say(f"step {run.step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                f"(ppl {math.exp(losses['val']):.2f}){' *best' if improved else ''} | lr {lr:.2e}{speed} "
                f"[{run.elapsed:.0f}s]")
            for name in (["best.pt", "last.pt"] if improved else ["last.pt"]):
                save_checkpoint(out_dir / name, payload)
            if stop:
                logger.log(event="early_stop", step=run.step, best_val_loss=run.best_val, patience=patience)
                say(f"early stopping: no new best validation loss in {patience} evaluations")
        eval_speed.reset()
        return stop

    run.model.train()
    last_eval, stop = -1, False
    while progress() < 1.0 and not stop:
        t0 = time.perf_counter()
        lr = lr_at(run.step, progress(), tcfg)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        dropout = dropout_at(progress(), model_cfg.dropout, tcfg)
        if tcfg.dropout_schedule != "constant":
            run.model.set_dropout(dropout)
        train_loss, grad_norm = train_step(run, tcfg, block_size)
        for speed in (log_speed, eval_speed):
            speed.add(time.perf_counter() - t0)
        if run.step % tcfg.log_interval == 0 and main:
            scheduled = {"dropout": dropout} if tcfg.dropout_schedule != "constant" else {}
            logger.log(event="train", step=run.step, train_loss=train_loss, lr=lr, grad_norm=grad_norm,
                       tokens_per_sec=round(log_speed.tokens_per_sec, 1), mfu=round(log_speed.mfu, 4),
                       **scheduled)
            if bar:
                bar.set_postfix_str(f"loss {train_loss:.3f} | {log_speed}")
            log_speed.reset()
        if run.step % tcfg.eval_interval == 0:
            stop, last_eval = evaluate(lr), run.step
        run.elapsed += time.perf_counter() - t0
        if bar:
            bar.n = min(int(run.elapsed), bar.total) if tcfg.max_time else run.step
            bar.refresh()
    if bar:
        bar.close()
    if last_eval != run.step:
        evaluate(lr_at(run.step, progress(), tcfg))
    # eager: the pass ends with shorter batches, each of which would recompile a compiled model
    final = split_loss(run.model, run.data, "val", block_size=block_size, batch_size=tcfg.batch_size,
                       device=device, precision=tcfg.precision)
    if main:
        logger.log(event="final", step=run.step, final_val_loss=final, perplexity=math.exp(final),
                   elapsed=round(run.elapsed, 2))
        logger.close()
        print(f"final_val_loss {final:.4f} (perplexity {math.exp(final):.2f}, every validation token once) "
              f"after {run.step} steps, {run.elapsed:.1f}s; best checkpoint: {out_dir / 'best.pt'}")
        if tcfg.plot:
            draw_plot(out_dir)
    return {"step": run.step, "best_val_loss": run.best_val, "final_val_loss": final, "elapsed": run.elapsed,
            "stopped_early": stop, "out_dir": str(out_dir)}


def draw_plot(out_dir: Path):
    """plot.png at the end of a run; a failure only warns (the run itself is saved by then)."""
    try:
        plot_run(out_dir)
    except Exception as e:
        print(f"warning: could not draw {out_dir / 'plot.png'}: {type(e).__name__}: {e}", file=sys.stderr)

# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def resolve(argv: list[str]) -> tuple[dict, Optional[dict]]:
    """The run config and, with --resume, the checkpoint to resume from."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any key of config.yaml: --section.key=value (e.g. "
                                            "--model.n_layers=4 --training.max_iters=200 --data.tokenizer=byte)")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from training.out_dir/last.pt")
    parser.add_argument("--preset", help=f"named preset: {', '.join(PRESETS)}")
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(config_file(args.config), rest, sections=SECTIONS, presets=PRESETS, preset=args.preset,
                      aliases=ALIASES, other_sections=("sample",))
    if not args.resume:
        return cfg, None
    last = Path(cfg["training"].out_dir) / "last.pt"
    ckpt = load_checkpoint(last)
    # resume with the checkpoint's own configuration; only the command line changes it
    resumed = load_config(None, rest, sections=SECTIONS, base=ckpt["config"], aliases=ALIASES)
    for key, value in dataclasses.asdict(resumed["model"]).items():
        if key != "vocab_size" and ckpt["model_config"][key] != value:
            raise ValueError(f"cannot change model.{key} when resuming "
                             f"({ckpt['model_config'][key]!r} in {last}, {value!r} requested)")
    return resumed, ckpt


def main(argv=None):
    tune_cpu_allocator()
    try:
        cfg, ckpt = resolve(sys.argv[1:] if argv is None else argv)
        if ckpt and os.environ.get("RANK", "0") == "0":         # under torchrun, rank 0 speaks
            print(f"resuming from step {ckpt['step']} of {Path(cfg['training'].out_dir) / 'last.pt'}")
        train(cfg, resume_from=ckpt)
    except (ValueError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; resume with --resume (the last checkpoint is complete)")


if __name__ == "__main__":
    main()
