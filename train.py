"""Train a model: TransformerTrainer, one loop for every task, and the command line that runs
it: a language model (the built-in corpus or your own text), a classifier or regressor
(text<TAB>target rows), or an encoder-decoder (source<TAB>target rows).

    >>> from train import TransformerTrainer
    >>> trainer = TransformerTrainer(model, learning_rate=1e-3, batch_size=32)   # doctest: +SKIP
    >>> history = trainer.train(train_dataset, epochs=10, val_dataset=val_dataset)

    python train.py --config config.yaml                      # built-in Shakespeare, char-level
    python train.py --config config.yaml --data my.txt --model.n_layers=4 --training.max_iters=200
    python train.py --config config.yaml --preset cpu-fast --data ../shared/data/tinyshakespeare.txt
    python train.py --config config.yaml --resume              # continue from out/last.pt
    python train.py --config config.yaml --data corpus/ --data.tokenizer=bpe --data.vocab_size=4096
    python train.py --config config.yaml --init_from out/best.pt --lora.r=8 --data new.txt \
        --training.out_dir=out-lora                            # LoRA fine-tune (add --quantize int8: QLoRA)
    python train.py --config config.yaml --epochs 2            # a budget in passes over the data
    python train.py --config config.yaml --task seq2seq --data pairs.tsv --training.out_dir=out-s2s
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
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
import yaml

from config import (ALIASES, PRESETS, SECTIONS, DataConfig, TrainConfig, canonical_argv, config_file,
                    config_to_dict, load_config, parse_overrides, refuse, saved_config)
from data import (Document, EncodedPairs, EncodedTexts, PairTokenizer, TokenDataset, build_tokenizer,
                  prepared_dataset, read_labelled, split_rows, tokenizer_from_state)
from model import (HEAD_FIELDS, Int4Linear, Int8Linear, Seq2SeqTransformer, Transformer, TransformerConfig,
                   apply_lora, closest, load_lora_state_dict, lora_state_dict)
from series import (SeriesItems, SeriesScaler, column_names, forecast_cut, forecast_splits, is_series_path, read_labelled_series,
                    read_series)
from tasks import (HIGHER_IS_BETTER, ClassificationTask, EpochBatches, ForecastTask, LanguageModelTask, RegressionTask,
                   Seq2SeqTask, Task, WindowBatches, dataset_batches, predict_all, split_loss, task_for)
from utils import (CheckpointError, JsonlLogger, RunLock, base_reference, check_base, device_peak_flops, flops_per_token,
                   load_checkpoint, model_from_checkpoint, pick_device, plot_run, save_checkpoint,
                   tune_cpu_allocator, warn_compile_failed)

# -----------------------------------------------------------------------------
# Small pure pieces
# -----------------------------------------------------------------------------


def tokens_in(cfg, inputs: torch.Tensor) -> int:
    """Tokens the model reads in a batch: ids, or a series' patches (per channel, if independent)."""
    if getattr(cfg, "input_dim", None) is None:
        return inputs.shape[0] * inputs.shape[1]
    return inputs.shape[0] * -(-inputs.shape[1] // cfg.patch_len) * (cfg.input_dim if cfg.channel_independent else 1)


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


def sum_over_ranks(t: torch.Tensor, device: str) -> torch.Tensor:
    """A tensor summed over all ranks (itself outside torchrun)."""
    if rank_and_world()[1] == 1:
        return t
    total = t.to(device)
    dist.all_reduce(total)
    return total.cpu()


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
# Random state and checkpoints
# -----------------------------------------------------------------------------


def _rng_state(device: str) -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
             "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    if rank_and_world()[1] > 1:       # each rank draws its own dropout masks
        state["ranks"] = [None] * dist.get_world_size()
        dist.all_gather_object(state["ranks"], {k: state[k] for k in ("torch", "cuda") if k in state})
    return state


def _set_rng_state(state: dict, device: str):
    rank = rank_and_world()[0]
    own = (state.get("ranks") or [state])[rank:rank + 1]   # none: a checkpoint of fewer ranks
    if own:
        torch.set_rng_state(own[0]["torch"])
        if "cuda" in own[0] and device.startswith("cuda"):
            torch.cuda.set_rng_state(own[0]["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))


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


class SignalStop:
    """While in use (in the main thread), SIGINT and SIGTERM ask the loop to stop after its
    current step instead of killing it; a second signal acts as usual.
    `received(device)`: the signal, once every rank has heard of it (one reduction a step)."""

    def __enter__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self.__exit__()

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def received(self, device: str) -> Optional[int]:
        if rank_and_world()[1] > 1:                     # all ranks stop at the same step
            heard = torch.tensor(self.signum or 0, device=device)
            dist.all_reduce(heard, op=dist.ReduceOp.MAX)
            self.signum = int(heard.item()) or None
        return self.signum


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after a whole step, with last.pt written there."""

    def __init__(self, signum: int, step: int, out_dir: Optional[Path]):
        self.signum = signum
        where = (f"{out_dir / 'last.pt'} holds it; resume with --resume" if out_dir
                 else "no out_dir, so nothing was saved")
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}; {where}")


class Throughput:
    """Tokens/s and MFU over the training steps added since the last reset (evaluations excluded)."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self.reset()

    def reset(self):
        self.steps, self.tokens, self.seconds = 0, 0, 0.0

    def add(self, seconds: float, tokens: int):
        self.steps, self.tokens, self.seconds = self.steps + 1, self.tokens + tokens, self.seconds + seconds

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mfu(self) -> float:
        return self.tokens_per_sec * self.flops_per_token / self.peak

    def __str__(self):
        return f"{self.tokens_per_sec:,.0f} tok/s | MFU {self.mfu:.1%}"

# -----------------------------------------------------------------------------
# The Trainer: one loop for every task
# -----------------------------------------------------------------------------


def attention_diagnostics(model, idx: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None) -> dict:
    """What the attention and the blocks do on a batch, as flat numbers for log.jsonl and
    TensorBoard: `attn_entropy/L{l}/H{h}`, the mean entropy (nats) of each head's attention
    rows (0: one key; log(S): uniform), and `act/L{l}/{mean,std,max_abs}` of each block's
    output, over real (unpadded) positions.

        >>> model = Transformer(vocab_size=10, d_model=16, n_heads=2, n_layers=1)
        >>> sorted(attention_diagnostics(model, torch.tensor([[1, 2, 3]])))[:2]
        ['act/L0/max_abs', 'act/L0/mean']
    """
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, out: outputs.append(out)) for block in model.blocks]
    try:
        weights = model.get_attention_weights(idx, attention_mask=attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for layer, (w, x) in enumerate(zip(weights, outputs)):
        if attention_mask is None:   # (B, T) tokens: series rows may be channels, series tokens patches
            rows = torch.ones(w.shape[0], w.shape[-2], dtype=torch.bool, device=w.device)
        else:
            real = attention_mask.bool()
            rows = real if w.shape[-2] == real.shape[1] else F.pad(real, (1, 0), value=True)   # a [CLS] slot
        entropy = torch.special.entr(w.float()).sum(-1)                     # (B, H, T)
        per_head = (entropy * rows[:, None]).sum((0, 2)) / rows.sum()       # (H,)
        out.update({f"attn_entropy/L{layer}/H{h}": round(v, 5) for h, v in enumerate(per_head.tolist())})
        x = x.float()[rows]                                                 # (real positions, C)
        out.update({f"act/L{layer}/mean": round(x.mean().item(), 5),
                    f"act/L{layer}/std": round(x.std(correction=0).item(), 5),
                    f"act/L{layer}/max_abs": round(x.abs().max().item(), 5)})
    return out


# where the Python API's defaults differ from the command line's: no files unless asked, and
# an evaluation at the end of every epoch
API_DEFAULTS = dict(out_dir=None, progress=False, plot=False, eval_interval=None)


class TransformerTrainer:
    """Train any model of model.py on a task: one loop with precision, compile, gradient
    accumulation and clipping, schedules, DDP/FSDP, exact resume, early stopping on the task's
    metric, dropout annealing, logging and plots. `python train.py` is a thin layer over it.

        >>> trainer = TransformerTrainer(model, learning_rate=1e-3, batch_size=32)   # doctest: +SKIP
        >>> history = trainer.train(train_dataset, epochs=10, val_dataset=val_dataset)
        >>> trainer.evaluate(test_dataset)        # {'loss': ..., 'accuracy': ..., 'macro_f1': ...}
        >>> probs = trainer.predict(test_dataset)  # (N, num_classes) for a classifier

    Datasets are map-style torch Datasets of (input, target) pairs (see tasks.py), or the
    token corpus of data.py (random windows, as train.py uses). task: from the model's head
    unless given. Options are TrainConfig's fields (learning_rate=..., batch_size=...,
    out_dir=... to write checkpoints, log.jsonl and plot.png there); config: a whole TrainConfig.
    tokenizer or input_scaler (series.SeriesScaler): saved in the checkpoints with the model.
    """

    def __init__(self, model, *, task: Optional[Task] = None, config: Optional[TrainConfig] = None,
                 device: Optional[str] = None, tokenizer=None, input_scaler=None, run_config: Optional[dict] = None,
                 **options):
        cfg = dataclasses.replace(config or TrainConfig(**{**API_DEFAULTS, **options}), **(options if config else {}))
        self.cfg, self.task, self.tokenizer = cfg, task or task_for(model), tokenizer
        if cfg.label_smoothing and self.task.label_smoothing is None:
            raise ValueError(f"training.label_smoothing smooths a cross-entropy; the {self.task.name} task's loss is not one")
        if cfg.label_smoothing:
            self.task.label_smoothing = cfg.label_smoothing
        self.device = device or init_distributed(cfg.device)
        self.model = model.to(self.device)
        self.run_config = run_config or {"training": cfg}       # what checkpoints record as "config"
        self.monitor = cfg.monitor or self.task.monitor
        self.step, self.elapsed, self.evals_since_best, self.history = 0, 0.0, 0, []
        self.best: Optional[float] = None            # the best value of the monitored metric so far
        self.best_metric = self.monitor              # which metric that is ("loss" without validation data)
        self.best_val_loss, self.extra_payload, self._resume = math.inf, {}, None
        if input_scaler is not None:   # a model of time series: its scaler travels in every checkpoint
            self.extra_payload["input_scaler"] = input_scaler.state()
        autocast(self.device, cfg.precision)             # an impossible precision fails before any work
        model.set_gradient_checkpointing(cfg.gradient_checkpointing)
        self.wrapped = self.fwd = wrap_distributed(self.model, cfg, self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)  # after sharding: FSDP replaced the parameters
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0], enabled=cfg.precision == "fp16")

    def resume(self, path):
        """Continue from a last.pt this trainer's run wrote: the model's weights, then load_state."""
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.load_state(ckpt)

    def load_state(self, ckpt: dict):
        """Continue from a checkpoint this trainer wrote (last.pt): weights, optimizer, random
        streams and the position in the data, for a bit-identical continuation."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        shard_optimizer_state(self.optimizer)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.elapsed = ckpt["step"], ckpt["elapsed"]
        self.best_val_loss = ckpt["best_val_loss"]
        best = ckpt.get("best", {"metric": "loss", "value": self.best_val_loss})   # version 1: the val loss
        self.best, self.best_metric = best["value"], best["metric"]
        self.evals_since_best = ckpt.get("evals_since_best", 0)
        self._resume = ckpt

    # -- the loop ------------------------------------------------------------------------------
    def train(self, train_dataset, epochs: Optional[float] = None, val_dataset=None) -> list[dict]:
        """Train until the budget (epochs, else training.epochs, max_time or max_iters) is spent
        or early stopping ends the run; returns the history, one dict per evaluation."""
        cfg, rank = self.cfg, rank_and_world()[0]
        stream = self._stream(train_dataset)
        epochs = epochs if epochs is not None else cfg.epochs
        steps_per_epoch = math.ceil(stream.steps_per_epoch / cfg.grad_accum_steps)
        total_steps = math.ceil(epochs * steps_per_epoch) if epochs else cfg.max_iters
        eval_interval = cfg.eval_interval or steps_per_epoch
        if self._resume is not None:
            stream.load_state(self._resume.get("stream") or {"generator": self._resume["rng"]["batches"]})
            _set_rng_state(self._resume["rng"], self.device)
        if rank > 0 and self._resume is None:
            torch.manual_seed(cfg.seed + rank)          # each rank its own dropout masks
        spent = lambda: self.elapsed / cfg.max_time if cfg.max_time else self.step / total_steps  # noqa: E731
        if self._resume is not None and spent() >= 1.0:
            budget = f"max_time={cfg.max_time:g} s" if cfg.max_time else (
                f"epochs={epochs:g}" if epochs else f"max_iters={cfg.max_iters}")
            raise ValueError(f"nothing to train: the resumed run is at step {self.step} and its budget "
                             f"(training.{budget}) is spent; raise it to go on")
        if cfg.compile and self.fwd is self.wrapped:
            self.fwd = compile_model(self.wrapped, lambda fwd: self._trial(fwd, stream))
        last_eval, stop, losses = -1, False, list((self._resume or {}).get("losses", []))
        with Record(self, resumed=self._resume is not None, total=cfg.max_time or total_steps) as record, \
                SignalStop() as signals:
            record.start(train_dataset)
            self.model.train()
            while spent() < 1.0 and not stop:
                t0 = time.perf_counter()
                lr = lr_at(self.step, spent(), cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                dropout = dropout_at(spent(), self.model.config.dropout, cfg)
                if cfg.dropout_schedule != "constant":
                    self.model.set_dropout(dropout)
                loss, grad_norm, tokens = self._step(stream)
                losses.append(loss)
                record.step(time.perf_counter() - t0, tokens, loss=loss, lr=lr, grad_norm=grad_norm,
                            **({"dropout": dropout} if cfg.dropout_schedule != "constant" else {}))
                if self.step % eval_interval == 0:
                    stop, last_eval = self._evaluate(record, stream, val_dataset, losses, lr), self.step
                    losses = []
                self.elapsed += time.perf_counter() - t0
                record.update_bar()
                if signals.received(self.device):
                    record.interrupted(signals.signum, lambda: self.checkpoint(stream, None, losses=losses))
                    raise Interrupted(signals.signum, self.step, record.out_dir)
            record.close_bar()
            if last_eval != self.step:
                stop = self._evaluate(record, stream, val_dataset, losses, lr_at(self.step, spent(), cfg)) or stop
            self.final = self._final(train_dataset, val_dataset)
            self.final_val_loss, self.stopped_early = self.final.get("loss"), stop
            record.finish(self.final)
        return self.history

    def _stream(self, dataset):
        cfg, (rank, world) = self.cfg, rank_and_world()
        if isinstance(dataset, TokenDataset):
            return WindowBatches(dataset, batch_size=cfg.batch_size, block_size=self.model.config.block_size,
                                 seed=cfg.seed, rank=rank, world=world)
        return EpochBatches(dataset, self.task, batch_size=cfg.batch_size, seed=cfg.seed, rank=rank, world=world)

    def _trial(self, fwd, stream):
        """A training forward and backward and an evaluation forward, on a batch the run never sees."""
        batch = stream.trial_batch(self.device)
        with torch.no_grad(), autocast(self.device, self.cfg.precision):
            self.task.loss(self.wrapped, batch)   # eagerly first: state built on first use (RoPE tables) is not traced
        with autocast(self.device, self.cfg.precision):
            self.task.loss(fwd, batch).backward()
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.cfg.precision):
            self.task.loss(fwd, batch)
        self.model.train()

    def _step(self, stream) -> tuple[float, float, int]:
        """One optimizer step over grad_accum_steps micro-batches: (mean loss over all ranks,
        gradient norm before clipping, tokens seen). A non-finite loss or norm raises before the update."""
        cfg = self.cfg
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for micro in range(cfg.grad_accum_steps):
            batch = stream.next(self.device)
            tokens += tokens_in(self.model.config, batch["input"])
            with grad_sync(self.wrapped, micro == cfg.grad_accum_steps - 1):
                with autocast(self.device, cfg.precision):
                    loss = self.task.loss(self.fwd, batch)
                self.scaler.scale(loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = gather_full(norm).item()          # FSDP: a DTensor, the norm over all the shards
        train_loss = mean_over_ranks(loss_sum.item() / cfg.grad_accum_steps, self.device)
        if not (math.isfinite(train_loss) and (math.isfinite(grad_norm) or self.scaler.is_enabled())):
            where = f"; {Path(cfg.out_dir) / 'last.pt'} is the last good checkpoint" if cfg.out_dir else ""
            raise FloatingPointError(f"non-finite loss {train_loss} / grad norm {grad_norm} at step {self.step + 1}; "
                                     f"the weights were not updated{where}. Try a lower learning rate.")
        self.scaler.step(self.optimizer)     # with fp16, skipped when the gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return train_loss, grad_norm, tokens * rank_and_world()[1]

    # -- evaluation ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self, model):
        """model in eval mode under the run's autocast, then back in the mode it was in."""
        was_training = model.training
        model.eval()
        try:
            with autocast(self.device, self.cfg.precision):
                yield model
        finally:
            model.train(was_training)

    def _metrics(self, batches, *, model=None) -> dict:
        with self._evaluating(model or self.fwd) as model:
            stats = self.task.statistics(model, batches)
        return self.task.summarize({k: sum_over_ranks(v, self.device) for k, v in stats.items()})

    def _diagnostics(self, stream, val_dataset) -> dict:
        """attention_diagnostics of the first validation batch (of the training data without one)."""
        if isinstance(stream, WindowBatches):
            batch = next(stream.eval_batches("val", iters=1, seed=self.cfg.seed + 1, device=self.device))
        else:
            batch = next(dataset_batches(val_dataset if val_dataset is not None else stream.dataset, self.task,
                                         batch_size=self.cfg.batch_size, device=self.device))
        with self._evaluating(self.model) as model, torch.no_grad():
            return attention_diagnostics(model, batch["input"], attention_mask=batch.get("attention_mask"))

    def _val_metrics(self, stream, val_dataset, losses: list) -> tuple[dict, dict]:
        """(train metrics, val metrics): a corpus is sampled in eval_iters random batches of each
        split; a dataset is read whole, and the training loss is the mean since the last evaluation."""
        cfg = self.cfg
        if isinstance(stream, WindowBatches):
            train = self._metrics(stream.eval_batches("train", iters=cfg.eval_iters, seed=cfg.seed + 1,
                                                      device=self.device))
            return train, self._metrics(stream.eval_batches("val", iters=cfg.eval_iters, seed=cfg.seed + 1,
                                                            device=self.device))
        train = {"loss": float(np.mean(losses))} if losses else {}
        return train, (self._dataset_metrics(val_dataset) if val_dataset is not None else {})

    def _dataset_metrics(self, dataset, *, model=None) -> dict:
        rank, world = rank_and_world()
        return self._metrics(dataset_batches(dataset, self.task, batch_size=self.cfg.batch_size, device=self.device,
                                             rank=rank, world=world), model=model)

    def _evaluate(self, record, stream, val_dataset, losses, lr) -> bool:
        """Evaluate, log, write checkpoints; True when early stopping ends the run."""
        train, val = self._val_metrics(stream, val_dataset, losses)
        if not all(map(math.isfinite, [*train.values(), *val.values()])):   # never save diverged weights
            raise FloatingPointError(f"non-finite evaluation {val or train} at step {self.step}"
                                     + (f"; {Path(self.cfg.out_dir) / 'last.pt'} is the last good checkpoint"
                                        if self.cfg.out_dir else ""))
        judged = val or train                        # no validation data: the training loss decides
        monitor = self.monitor if val else "loss"
        if monitor not in judged:
            raise ValueError(f"training.monitor={monitor!r} is not a metric of the {self.task.name} task; "
                             f"{closest(monitor, judged)}")
        value = judged[monitor]
        better = (lambda a, b: a > b) if monitor in HIGHER_IS_BETTER else (lambda a, b: a < b)
        improved = self.best is None or better(value, self.best)
        if improved:
            self.best, self.best_metric = value, monitor
        self.best_val_loss = min(self.best_val_loss, judged.get("loss", math.inf))
        self.evals_since_best = 0 if improved else self.evals_since_best + 1
        patience = self.cfg.early_stopping_patience
        stop = bool(patience and self.evals_since_best >= patience)
        entry = {"step": self.step, "epoch": self._epoch(stream), "train_loss": train.get("loss"),
                 **{f"val_{k}": v for k, v in val.items()}}
        self.history.append(entry)
        if self.cfg.log_attention:
            record.log(event="diagnostics", step=self.step, **self._diagnostics(stream, val_dataset))
        record.evaluation(entry, train, val, improved=improved, stop=stop, patience=patience, lr=lr,
                          payload=lambda: self.checkpoint(stream, judged.get("loss")))
        return stop

    def _epoch(self, stream) -> float:
        per = stream.steps_per_epoch / self.cfg.grad_accum_steps
        return round(self.step / per, 3)

    def _final(self, train_dataset, val_dataset) -> dict:
        """The final validation metrics: every validation token (a corpus) or item (a dataset)
        once; none without validation data."""
        # evaluate() runs the model eagerly: the last batch is shorter, and would recompile it
        if isinstance(train_dataset, TokenDataset):
            return self.evaluate(train_dataset)
        return self.evaluate(val_dataset) if val_dataset is not None else {}

    def evaluate(self, dataset) -> dict:
        """The task's metrics over every item of a dataset (or validation token of a corpus)."""
        if isinstance(dataset, TokenDataset):
            with autocast(self.device, self.cfg.precision):
                loss = split_loss(self.model, dataset, "val", block_size=self.model.config.block_size,
                                  batch_size=self.cfg.batch_size, device=self.device)
            return {"loss": loss, "perplexity": math.exp(min(loss, 700))}
        return self._dataset_metrics(dataset, model=self.model)

    def predict(self, dataset):
        """The task's predictions for every item, in order: class probabilities (N, num_classes),
        regression values (N, output_dim), or a language model's most likely next tokens. Outputs
        per position of sequences of different lengths come as a list, one (T_i, ...) tensor per
        item. Targets are ignored."""
        with autocast(self.device, self.cfg.precision):
            return predict_all(self.model, self.task, dataset, batch_size=self.cfg.batch_size, device=self.device)

    def checkpoint(self, stream, val_loss, *, losses=()) -> dict:
        """Everything --resume needs, as plain full tensors, and what the model is (kind, task,
        tokenizer); losses: the training losses since the last evaluation (a run stopped between
        evaluations). Collective under torchrun: every rank calls it; rank 0 writes the result."""
        state = self.model.state_dict() if not self.extra_payload.get("lora") else lora_state_dict(self.model)
        kind = "seq2seq" if isinstance(self.model, Seq2SeqTransformer) else "transformer"
        return {"kind": kind, "task": self.task.state(), "model": gather_full(state),
                "model_config": self.model.config.to_dict(),
                "tokenizer": self.tokenizer.state() if self.tokenizer is not None else None,
                "config": config_to_dict(self.run_config), "optimizer": gather_full(self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict(), "step": self.step, "elapsed": self.elapsed,
                "best_val_loss": self.best_val_loss, "best": {"metric": self.best_metric, "value": self.best},
                "val_loss": val_loss, "evals_since_best": self.evals_since_best, "stream": stream.state(),
                "losses": list(losses),
                "rng": {**_rng_state(self.device), **({"batches": stream.generator.get_state()}
                                                       if isinstance(stream, WindowBatches) else {})},
                **self.extra_payload}


class Record:
    """What a run shows and keeps (rank 0): the progress bar and lines printed, log.jsonl,
    TensorBoard, the checkpoints and the plot. Without out_dir, only the history in memory."""

    def __init__(self, trainer: TransformerTrainer, *, resumed: bool, total):
        cfg = trainer.cfg
        self.t, self.cfg, self.main = trainer, cfg, rank_and_world()[0] == 0
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        self.lock = RunLock(self.out_dir).__enter__() if self.main and self.out_dir else None
        self.logger = open_record(self.out_dir, trainer.run_config, resumed=resumed) if self.lock else None
        self.bar = None
        if cfg.progress and self.main:
            from tqdm import tqdm
            self.bar = tqdm(total=int(total), initial=int(trainer.elapsed) if cfg.max_time else trainer.step,
                            unit="s" if cfg.max_time else "it", dynamic_ncols=True)
        self.say = (self.bar.write if self.bar else print) if self.main else (lambda *args: None)
        peak, self.peak_source = device_peak_flops(trainer.device, cfg.precision)
        self.peak = peak * rank_and_world()[1]          # per device: the job's tokens/s against all its devices
        self.log_speed, self.eval_speed = (Throughput(flops_per_token(trainer.model.config), self.peak)
                                           for _ in range(2))

    def log(self, **event):
        if self.logger:
            self.logger.log(**event)

    def start(self, dataset):
        t, world = self.t, rank_and_world()[1]
        n_params = sum(p.numel() for p in t.model.parameters() if p.requires_grad)   # LoRA: the adapters
        if isinstance(dataset, TokenDataset):
            data = (f"vocab {t.model.config.vocab_size} ({dataset.tokenizer.kind}) | train "
                    f"{dataset.num_tokens['train']:,} tokens, val {dataset.num_tokens['val']:,}")
        else:
            data = f"{t.task.name} | {len(dataset):,} training items"
        self.say(f"{n_params / 1e6:.2f}M parameters | {data} | device {t.device}"
                 f"{f' x {world} ({self.cfg.distributed})' if world > 1 else ''} | {self.cfg.precision} | "
                 f"peak {self.peak / world / 1e12:.3g} TFLOP/s ({self.peak_source})")
        self.log(event="start", step=t.step, params=n_params, device=t.device, resumed=t._resume is not None,
                 world_size=world, task=t.task.name)

    def step(self, seconds: float, tokens: int, *, loss, lr, grad_norm, **scheduled):
        for speed in (self.log_speed, self.eval_speed):
            speed.add(seconds, tokens)
        if self.t.step % self.cfg.log_interval == 0 and self.main:
            self.log(event="train", step=self.t.step, train_loss=loss, lr=lr, grad_norm=grad_norm,
                     tokens_per_sec=round(self.log_speed.tokens_per_sec, 1), mfu=round(self.log_speed.mfu, 4),
                     **scheduled)
            if self.bar:
                self.bar.set_postfix_str(f"loss {loss:.3f} | {self.log_speed}")
            self.log_speed.reset()

    def update_bar(self):
        if self.bar:
            self.bar.n = min(int(self.t.elapsed), self.bar.total) if self.cfg.max_time else self.t.step
            self.bar.refresh()

    def close_bar(self):
        if self.bar:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close_bar()
        if self.logger:
            self.logger.close()
        if self.lock:
            self.lock.__exit__()

    def interrupted(self, signum: int, payload):
        """last.pt at this step (every rank builds the payload: it gathers), and the log's event."""
        ckpt = payload() if self.out_dir else None
        if self.main and ckpt is not None:
            save_checkpoint(self.out_dir / "last.pt", ckpt)
        self.log(event="interrupted", step=self.t.step, signal=signal.Signals(signum).name,
                 elapsed=round(self.t.elapsed, 2))

    def evaluation(self, entry: dict, train: dict, val: dict, *, improved, stop, patience, lr, payload):
        t = self.t
        ckpt = payload() if self.out_dir else None           # every rank: it gathers
        if not self.main:
            return
        lm = "perplexity" in val
        row = {"train_loss": train.get("loss"), "val_loss": val.get("loss"),
               **({"perplexity": val["perplexity"]} if lm else {f"val_{k}": v for k, v in val.items() if k != "loss"})}
        self.log(event="eval", step=t.step, **{k: v for k, v in row.items() if v is not None},
                 elapsed=round(t.elapsed, 2))
        speed = f" | {self.eval_speed}" if self.eval_speed.steps else ""
        shown = ", ".join([f"train {train['loss']:.4f}"] * ("loss" in train) + (
            [f"val {val['loss']:.4f} (ppl {val['perplexity']:.2f})"] if lm else
            [f"val {k} {v:.4f}" for k, v in val.items()]))
        self.say(f"step {t.step}: {shown}{' *best' if improved else ''} | lr {lr:.2e}{speed} [{t.elapsed:.0f}s]")
        if ckpt is not None:
            for name in (["best.pt", "last.pt"] if improved else ["last.pt"]):
                save_checkpoint(self.out_dir / name, ckpt)
        if stop:
            self.log(event="early_stop", step=t.step, best=t.best, monitor=t.best_metric,
                     best_val_loss=t.best_val_loss, patience=patience)
            self.say(f"early stopping: no new best {t.best_metric} in {patience} evaluations")
        self.eval_speed.reset()

    def finish(self, final: dict):
        t = self.t
        if not self.main:
            return
        if final:
            self.log(event="final", step=t.step, final_val_loss=final["loss"],
                     **{k if k == "perplexity" else f"final_val_{k}": v for k, v in final.items() if k != "loss"},
                     elapsed=round(t.elapsed, 2))
        best = f"; best checkpoint: {self.out_dir / 'best.pt'}" if self.out_dir else ""
        if final and t.task.name == "lm":
            print(f"final_val_loss {final['loss']:.4f} (perplexity {final['perplexity']:.2f}, every validation token "
                  f"once) after {t.step} steps, {t.elapsed:.1f}s{best}")
        elif final:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
            print(f"final validation: {shown} (every validation item once) after {t.step} steps, "
                  f"{t.elapsed:.1f}s{best}")
        if self.cfg.plot and self.out_dir:
            draw_plot(self.out_dir)

# -----------------------------------------------------------------------------
# train.py's run: a language model on a corpus, through the Trainer
# -----------------------------------------------------------------------------


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
    hf = tcfg.init_from.startswith("hf:")           # a Hugging Face directory (interop.read_hf)
    init = Path(tcfg.init_from.removeprefix("hf:")).resolve()
    if init.parent == Path(tcfg.out_dir).resolve() and not hf:
        raise ValueError(f"training.init_from={tcfg.init_from} is inside training.out_dir, where this run "
                         f"writes its checkpoints; choose another out_dir")
    init = f"hf:{init}" if hf else init
    base = load_checkpoint(init)
    if "lora" in base:
        raise ValueError(f"{tcfg.init_from} is a LoRA adapter; merge it first (python utils.py merge-lora)")
    return base, base_reference(init)


def check_fine_tune_options(cfg: dict, overrides: dict, base: dict):
    """A fine-tune keeps its base's architecture and tokenizer (the head and dropout are the
    run's own): an option the user gave that would change them is an error, not dropped."""
    stored = TransformerConfig.from_dict(base["model_config"]).to_dict()
    changed = [f"model.{k}" for k in overrides.get("model", {})
               if k not in (*HEAD_FIELDS, "dropout", "vocab_size") and getattr(cfg["model"], k) != stored[k]]
    tokenizer = base.get("tokenizer") or {}
    kind = tokenizer.get("source", tokenizer).get("kind")      # a seq2seq pair: its source side
    changed += [f"data.{k}" for k in overrides.get("data", {}) if k in ("bpe", "vocab_size", "target_tokenizer")
                or k == "tokenizer" and kind and cfg["data"].tokenizer != kind]
    if changed:
        raise ValueError(f"{', '.join(changed)}: a fine-tune keeps the architecture and tokenizer of "
                         f"training.init_from={cfg['training'].init_from}")


def build_model(cfg: dict, tokenizer, device: str, base: Optional[dict]) -> Transformer:
    """The model to train: fresh, or the base's weights (quantized, with LoRA adapters
    trained on top, when asked) under this run's head."""
    lcfg, qcfg = cfg["lora"], cfg["quantize"]
    if base is None and cfg["training"].task == "seq2seq":      # pair_data set both vocabularies
        return Seq2SeqTransformer(cfg["model"]).to(device)
    if base is None:
        vocab = {"vocab_size": tokenizer.vocab_size} if tokenizer is not None else {}   # series: no vocabulary
        return Transformer(dataclasses.replace(cfg["model"], **vocab)).to(device)
    if qcfg.mode and not lcfg.r:
        raise ValueError("quantized weights cannot be trained; add LoRA adapters (--lora.r=8) for QLoRA")
    if base.get("quantize") and not lcfg.r:
        raise ValueError("the base checkpoint is quantized; fine-tune it with LoRA (--lora.r=8)")
    # the base's architecture, with this run's dropout; int4 kernels have no backward
    model, _ = model_from_checkpoint(base, device=device, quantize=qcfg, kernels=False,
                                     dropout=cfg["model"].dropout)
    head = {k: getattr(cfg["model"], k) for k in HEAD_FIELDS}
    if any(getattr(model.config, k) != v for k, v in head.items()):   # e.g. a language model -> a classifier
        model.set_head(**head)
    if lcfg.r:
        trainable = apply_lora(model, lcfg)
        # quantized weights are buffers, not parameters: count them as the weights they stand for
        total = sum(p.numel() for p in model.parameters()) + sum(
            m.in_features * m.out_features for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
        print(f"LoRA r={lcfg.r} on {','.join(lcfg.targets)}: {trainable:,} trainable parameters "
              f"({100 * trainable / total:.2f}% of {total:,})")
    return model.train()


def labelled_data(cfg: dict, tokenizer, known_task: Optional[dict]):
    """(train dataset, val dataset, task, tokenizer, head fields) of a classification or
    regression run: the text<TAB>target rows of data.path, a seeded data.val_fraction of them
    held out. Labels are sorted names (those of a resumed or fine-tuned classifier are kept);
    texts longer than block_size are cut to it."""
    dcfg, tcfg, mcfg = cfg["data"], cfg["training"], cfg["model"]
    if dcfg.path is None:
        raise ValueError(f"training.task={tcfg.task} reads data.path: a file of text<TAB>target lines "
                         f"(the built-in corpus has no labels)")
    rows = read_labelled(dcfg.path)
    if tokenizer is None:   # from every text, so that no validation character is unknown
        tokenizer = build_tokenizer(dcfg, [Document("texts", 0, text="\n".join(t for t, _ in rows))])
    if tcfg.task == "classification":
        check_two_columns(rows, dcfg.path, "classification rows are text<TAB>label")
        labels = label_names([target[0] for _, target in rows], None, known_task, where=dcfg.path)
        task, head = ClassificationTask(len(labels), labels=labels), dict(num_classes=len(labels))
        rows = [(text, labels.index(target[0])) for text, target in rows]
    else:
        rows = [(text, _numbers(target, f"{dcfg.path}, row {n}")) for n, (text, target) in enumerate(rows, 1)]
        task, head = RegressionTask(), dict(output_dim=len(rows[0][1]))
    max_len = mcfg.block_size - (mcfg.pooling == "cls")
    try:
        encoded = EncodedTexts(rows, tokenizer, max_len=max_len)
    except ValueError as e:
        raise ValueError(f"{dcfg.path}: {e}") from None
    if encoded.truncated and rank_and_world()[0] == 0:
        print(f"note: {encoded.truncated} of {len(rows)} texts are longer than {max_len} tokens and are cut to "
              f"their first {max_len} (model.block_size)")
    train, val = split_rows(encoded.items, dcfg.val_fraction, seed=tcfg.seed)
    return train, val, task, tokenizer, dict(head=tcfg.task, **head)


def check_two_columns(rows: list, path, what: str):
    if len(rows[0][1]) != 1:
        raise ValueError(f"{path}: {what}, two columns; these have {len(rows[0][1]) + 1}")


def pair_data(cfg: dict, tokenizer, known_task: Optional[dict]):
    """(train dataset, val dataset, task, tokenizer, model fields) of a seq2seq run: the
    source<TAB>target rows of data.path, a seeded data.val_fraction of them held out. One
    tokenizer learned from both sides (a shared vocabulary), or with data.target_tokenizer a
    second one for the targets; a fine-tuned or resumed model keeps its own."""
    dcfg, tcfg, mcfg = cfg["data"], cfg["training"], cfg["model"]
    if dcfg.path is None:
        raise ValueError("training.task=seq2seq reads data.path: a file of source<TAB>target lines")
    rows = read_labelled(dcfg.path)
    check_two_columns(rows, dcfg.path, "seq2seq rows are source<TAB>target")
    rows = [(source, target[0]) for source, target in rows]
    if tokenizer is None:
        def side(kind, texts):
            return build_tokenizer(dataclasses.replace(dcfg, tokenizer=kind), [Document("texts", 0, text="\n".join(texts))])
        if dcfg.target_tokenizer is None:
            tokenizer = PairTokenizer(side(dcfg.tokenizer, [t for row in rows for t in row]))
        else:
            tokenizer = PairTokenizer(side(dcfg.tokenizer, [s for s, _ in rows]),
                                      side(dcfg.target_tokenizer, [t for _, t in rows]))
    elif not isinstance(tokenizer, PairTokenizer):
        raise ValueError("training.task=seq2seq needs an encoder-decoder; the checkpoint holds a decoder-only model")
    try:
        pairs = EncodedPairs(rows, tokenizer, max_source=mcfg.block_size, max_target=mcfg.block_size,
                             truncate=dcfg.truncate)
    except ValueError as e:
        raise ValueError(f"{dcfg.path}, {e}") from None
    train, val = split_rows(pairs.items, dcfg.val_fraction, seed=tcfg.seed)
    fields = dict(vocab_size=tokenizer.vocab_size, tgt_vocab_size=None if tokenizer.shared else tokenizer.target_vocab_size)
    return train, val, Seq2SeqTask(), tokenizer, fields


def series_data(cfg: dict, known: Optional[dict], *, resumed: bool):
    """(train dataset, val dataset, task, input scaler, model fields) of a run on time series
    (series.py reads the file): forecasting windows of one series, split in time, or labelled
    series for classification/regression. The per-channel scaler is fitted on the training part
    (a resumed run keeps its own; a fine-tune fits the new data)."""
    dcfg, tcfg, mcfg = cfg["data"], cfg["training"], cfg["model"]
    check_series_options(cfg)
    columns = column_names(dcfg.columns)
    stored = (known or {}).get("input_scaler") if resumed else None
    if tcfg.task == "forecast":
        return forecast_data(cfg, columns, stored)
    series, targets, classes = read_labelled_series(dcfg.path, target=dcfg.target, columns=columns,
                                                    missing=dcfg.missing)
    rows = list(zip(series, targets))
    if dcfg.val_path:
        v_series, v_targets, _ = read_labelled_series(dcfg.val_path, target=dcfg.target, columns=columns,
                                                      missing=dcfg.missing)
        train_rows, val_rows = rows, list(zip(v_series, v_targets))
    else:
        train_rows, val_rows = split_rows(rows, dcfg.val_fraction, seed=tcfg.seed)
    if any(t is None for _, t in train_rows + val_rows):
        raise ValueError(f"'{dcfg.path}' has series without a {tcfg.task} target")
    scaler = SeriesScaler.from_state(stored) if stored else SeriesScaler.fit([s for s, _ in train_rows])
    for s, _ in train_rows + val_rows:
        scaler.check(s, f"'{dcfg.path}'")
    if tcfg.task == "classification":
        labels = label_names([t for _, t in train_rows + val_rows], classes, (known or {}).get("task"), where=dcfg.path)
        encode = lambda part: [(s, labels.index(str(t))) for s, t in part]          # noqa: E731
        task, head = ClassificationTask(len(labels), labels=labels), dict(num_classes=len(labels))
    else:
        encode = lambda part: [(s, _numbers([t], f"{dcfg.path}")) for s, t in part]   # noqa: E731
        task, head = RegressionTask(), dict(output_dim=1)
    longest = max(len(s) for s, _ in train_rows + val_rows)
    fields = dict(head=tcfg.task, input_dim=series[0].shape[1],
                  block_size=-(-longest // mcfg.patch_len) + (mcfg.pooling == "cls"), **head)
    train = SeriesItems(*zip(*encode(train_rows)), scaler, time_shift=dcfg.time_shift, seed=tcfg.seed)
    val = SeriesItems(*zip(*encode(val_rows)), scaler)
    return train, val, task, scaler, fields


def check_series_options(cfg: dict):
    """Options that belong to one kind of series run are refused by the others."""
    dcfg, tcfg, mcfg = cfg["data"], cfg["training"], cfg["model"]
    unused = f"{{}}: not used by training.task={tcfg.task}"
    if tcfg.task == "forecast":
        refuse(unused, (("data.val_path", dcfg.val_path), ("data.target", dcfg.target),
                        ("data.time_shift", dcfg.time_shift)))
    else:
        refuse(unused, (("model.horizon", mcfg.horizon), ("data.lookback", dcfg.lookback),
                        ("data.val_fraction (data.val_path is the validation split)",
                         dcfg.val_path and dcfg.val_fraction != DataConfig.val_fraction)))


def forecast_data(cfg: dict, columns: Optional[list[str]], stored: Optional[dict]):
    """series_data's forecasting part: windows of lookback + horizon steps, split in time."""
    dcfg, mcfg = cfg["data"], cfg["model"]
    if mcfg.horizon is None:
        raise ValueError("training.task=forecast needs the steps to predict: --horizon N (model.horizon)")
    values, names = read_series(dcfg.path, columns=columns, missing=dcfg.missing)
    P, H = mcfg.patch_len, mcfg.horizon
    L = dcfg.lookback or mcfg.max_steps
    if L % P:
        raise ValueError(f"data.lookback={L} is not a whole number of patches of model.patch_len={P}")
    cut = forecast_cut(len(values), horizon=H, val_fraction=dcfg.val_fraction)
    if cut < L + H:
        raise ValueError(f"'{dcfg.path}' has {len(values)} steps; its training part ({cut} steps, before the last "
                         f"data.val_fraction) needs at least lookback + horizon = {L} + {H} = {L + H}")
    scaler = SeriesScaler.from_state(stored) if stored else SeriesScaler.fit([values[:cut]], columns=names)
    scaler.check(values, f"'{dcfg.path}'")
    train, val = forecast_splits(scaler.transform(values), lookback=L, horizon=H, val_fraction=dcfg.val_fraction,
                                 where=f"'{dcfg.path}'")
    C = values.shape[1]
    return train, val, ForecastTask(lookback=L), scaler, dict(head="forecast", input_dim=C, output_dim=C,
                                                               block_size=L // P + (mcfg.pooling == "cls"))


def series_run(cfg: dict) -> bool:
    """Is this a run on time series? A forecast, or classification/regression of a series file:
    .ts, .npz, .npy, a built-in name, or a CSV with data.target (a CSV without it holds text rows)."""
    path, task = cfg["data"].path, cfg["training"].task
    if task == "forecast":
        return True
    if task not in ("classification", "regression") or not is_series_path(path):
        return False
    return not str(path).lower().endswith(".csv") or cfg["data"].target is not None


def check_run_kind(cfg: dict, base: Optional[dict], *, series: bool):
    """A run on time series and a run on text do not mix: not in the data, the base checkpoint,
    or the options (one a run of the other kind would ignore is an error)."""
    tcfg, d, m = cfg["training"], cfg["data"], cfg["model"]
    if tcfg.task == "forecast" and not series:
        raise ValueError(f"training.task=forecast reads a series: data.path a .csv or .npy file, or a built-in "
                         f"name (statsmodels:co2); got {d.path!r}")
    if base and (base["model_config"].get("input_dim") is not None) != series:
        held, read = ("time series", "text") if not series else ("tokens", "time series")
        raise ValueError(f"{tcfg.init_from} holds a model of {held}; this run reads {read}")
    if not series:
        refuse("{}: for runs on time series; data.path is read as text here", (
            ("data.columns", d.columns), ("data.target", d.target), ("data.lookback", d.lookback),
            ("data.val_path", d.val_path), ("data.missing", d.missing != "error"), ("model.horizon", m.horizon),
            ("model.patch_len", m.patch_len != 1), ("model.revin", m.revin),
            ("model.channel_independent", m.channel_independent), ("data.time_shift", d.time_shift)))
    else:
        refuse("{}: a run on time series reads numbers, not tokens", (
            ("data.tokenizer", d.tokenizer != "char"), ("data.target_tokenizer", d.target_tokenizer),
            ("model.ngram_buckets", m.ngram_buckets)))


def check_task_options(cfg: dict, overrides: dict):
    """An option that only other tasks read is an error, never silently ignored."""
    d, m, t = cfg["data"], cfg["model"], cfg["training"]
    pooled = ("classification", "regression", "forecast")
    readers = (("model.pooling", m.pooling != "last", pooled), ("model.causal=false", not m.causal, pooled),
               ("model.num_classes", m.num_classes is not None, ("classification",)),
               ("model.output_dim", m.output_dim != 1, ("regression", "forecast")),
               ("model.ngram_buckets", m.ngram_buckets > 0, ("classification", "regression")),
               ("model.tie_weights=false", not m.tie_weights, ("lm", "seq2seq")),
               ("model.n_encoder_layers", m.n_encoder_layers is not None, ("seq2seq",)),
               ("model.n_decoder_layers", m.n_decoder_layers is not None, ("seq2seq",)),
               ("model.tgt_vocab_size", m.tgt_vocab_size is not None, ("seq2seq",)),
               ("data.target_tokenizer", d.target_tokenizer is not None, ("seq2seq",)),
               ("data.truncate", d.truncate, ("seq2seq",)), ("data.cache_dir", d.cache_dir is not None, ("lm",)),
               ("training.eval_iters (other tasks evaluate every validation row)",
                "eval_iters" in overrides.get("training", {}), ("lm",)),
               ("training.log_attention", t.log_attention, ("lm", *pooled)),
               ("model.vocab_size (the tokenizer sets it)", "vocab_size" in overrides.get("model", {}), ()))
    refuse(f"{{}}: not read by training.task={t.task}", ((name, given and t.task not in tasks)
                                                         for name, given, tasks in readers))


def with_data_fields(cfg: dict, fields: dict, overrides: dict) -> dict:
    """The run config with the model fields its data decides (vocabularies, input size,
    classes, block_size of a series); one the user gave otherwise is an error."""
    given = overrides.get("model", {})
    refuse("{}: leave it to the data", ((f"model.{k}={getattr(cfg['model'], k)} (the data makes it {v})",
                                         k in given and getattr(cfg["model"], k) != v) for k, v in fields.items()))
    return {**cfg, "model": dataclasses.replace(cfg["model"], **fields)}


def label_names(targets: list, classes: Optional[list[str]], known_task: Optional[dict], *, where) -> list[str]:
    """A classifier's label names, in the order of its outputs: those of the checkpoint's task
    it continues (a label it never saw is an error), else the file's own class list, else sorted."""
    kept = known_task.get("labels") if (known_task or {}).get("name") == "classification" else None
    found = sorted(set(map(str, targets)), key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))
    names = kept or classes or found      # integer labels in numeric order: 2 before 10
    unknown = sorted(set(map(str, targets)) - set(names))
    if unknown:
        raise ValueError(f"label {unknown[0]!r} of {where} is not one the checkpoint was trained on ({', '.join(names)})")
    if len(names) < 2:
        raise ValueError(f"{where} has one label ({names[0]!r}); classification needs at least 2")
    return names


def _numbers(values: list[str], where: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"{where}: regression targets are numbers, got {values}") from None


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


def train(cfg: dict, *, resume_from: Optional[dict] = None, overrides: Optional[dict] = None) -> dict:
    """Train a model with a resolved config ({'model', 'data', 'training', 'lora', 'quantize'}
    dataclasses), in this process or, launched by torchrun, as one rank of a DDP or FSDP job.

    resume_from: a loaded last.pt checkpoint to continue from. overrides: the options the user
    gave ({section: {key: value}}); a fine-tune refuses those that would change its base's
    architecture or tokenizer, which it keeps. Returns a summary dict
    (steps, best and final validation loss, whether it stopped early, the output folder).
    """
    device = init_distributed(cfg["training"].device)
    out_dir = cfg["training"].out_dir
    try:     # the lock first: data preparation writes in out_dir too
        with RunLock(out_dir) if out_dir and rank_and_world()[0] == 0 else contextlib.nullcontext():
            return _train(cfg, device, resume_from, overrides or {})
    finally:
        if rank_and_world()[1] > 1:
            dist.destroy_process_group()


def _train(cfg: dict, device: str, resume_from: Optional[dict], overrides: dict) -> dict:
    tcfg: TrainConfig = cfg["training"]
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    autocast(device, tcfg.precision)                 # an impossible precision fails before any work
    if cfg["model"].head not in ("lm", tcfg.task):
        raise ValueError(f"model.head={cfg['model'].head} contradicts training.task={tcfg.task}; the task "
                         f"sets the head (--task {cfg['model'].head})")
    if resume_from is None:       # the user's options (a resumed run's were checked when it started)
        check_task_options(cfg, overrides)
    base, base_ref = base_checkpoint(cfg, resume_from)
    if base:   # a fine-tune keeps the base's architecture and tokenizer, under this run's head
        check_fine_tune_options(cfg, overrides, base)
        head = {k: getattr(cfg["model"], k) for k in HEAD_FIELDS}
        cfg = {**cfg, "model": TransformerConfig.from_dict({**base["model_config"], **head,
                                                            "dropout": cfg["model"].dropout})}
    known = resume_from or base
    if base and base["tokenizer"] is None and tcfg.task == "lm":
        raise ValueError(f"{tcfg.init_from} has no tokenizer (no tokenizer.json), so its token ids mean nothing "
                         f"here; add the tokenizer.json it was trained with")
    tokenizer = tokenizer_from_state(known["tokenizer"]) if known and known.get("tokenizer") else None
    val, scaler = None, None
    series = series_run(cfg)
    check_run_kind(cfg, base, series=series)
    if series:
        data, val, task, scaler, fields = series_data(cfg, known, resumed=resume_from is not None)
        cfg, model = with_data_fields(cfg, fields, overrides), None
    elif tcfg.task == "lm":
        # a fine-tune's model (and its LoRA/quantize settings) is checked before any data is prepared
        model = build_model(cfg, tokenizer, device, base) if base else None
        data = shared_dataset(cfg, tokenizer)
        task, tokenizer = LanguageModelTask(), data.tokenizer
    else:
        read = pair_data if tcfg.task == "seq2seq" else labelled_data
        data, val, task, tokenizer, fields = read(cfg, tokenizer, known and known.get("task"))
        cfg, model = with_data_fields(cfg, fields, overrides), None
    if model is None:    # the same seed: the same weights on every rank
        model = build_model(cfg, tokenizer, device, base)
    cfg = {**cfg, "model": model.config}           # the vocabulary belongs to the tokenizer
    if resume_from:      # before sharding: fully_shard keeps each rank's part
        (load_lora_state_dict if cfg["lora"].r else type(model).load_state_dict)(model, resume_from["model"])
    trainer = TransformerTrainer(model, task=task, config=tcfg, device=device, tokenizer=tokenizer,
                                 input_scaler=scaler, run_config=cfg)
    if cfg["lora"].r:     # an adapter: only its weights, and which base they belong to
        trainer.extra_payload["lora"] = {"config": dataclasses.asdict(cfg["lora"]), "base": base_ref}
    if cfg["quantize"].mode:
        trainer.extra_payload["quantize"] = cfg["quantize"].stored()
    if resume_from:
        trainer.load_state(resume_from)
    trainer.train(data, val_dataset=val)
    return {"step": trainer.step, "best_val_loss": trainer.best_val_loss, "final_val_loss": trainer.final_val_loss,
            "final": trainer.final, "elapsed": trainer.elapsed, "stopped_early": trainer.stopped_early,
            "out_dir": str(tcfg.out_dir)}


def draw_plot(out_dir: Path):
    """plot.png at the end of a run; a failure only warns (the run itself is saved by then)."""
    try:
        plot_run(out_dir)
    except Exception as e:
        print(f"warning: could not draw {out_dir / 'plot.png'}: {type(e).__name__}: {e}", file=sys.stderr)

# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------


def resolve(argv: list[str]) -> tuple[dict, Optional[dict], dict]:
    """The run config; with --resume, the checkpoint to resume from; otherwise the command
    line's options ({section: {key: value}}), which a fine-tune checks against its base."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any key of config.yaml: --section.key=value (e.g. "
                                            "--model.n_layers=4 --training.max_iters=200 --data.tokenizer=byte)")
    parser.add_argument("--config", default="config.yaml", help="YAML config (default: config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from training.out_dir/last.pt")
    parser.add_argument("--preset", help=f"named preset: {', '.join(PRESETS)}")
    args, rest = parser.parse_known_args(canonical_argv(argv, log=lambda s: print(s, file=sys.stderr)))
    cfg = load_config(config_file(args.config), rest, sections=SECTIONS, presets=PRESETS, preset=args.preset,
                      aliases=ALIASES, other_sections=("sample",))
    if not args.resume:
        return cfg, None, parse_overrides(rest, sections=SECTIONS, aliases=ALIASES)
    last = Path(cfg["training"].out_dir) / "last.pt"
    ckpt = load_checkpoint(last)
    # resume with the checkpoint's own configuration; only the command line changes it
    resumed = load_config(None, rest, sections=SECTIONS, base=saved_config(ckpt["config"]), aliases=ALIASES)
    stored = TransformerConfig.from_dict(ckpt["model_config"]).to_dict()   # keys newer than the file: defaults
    for key, value in dataclasses.asdict(resumed["model"]).items():
        if key != "vocab_size" and stored[key] != value:
            raise ValueError(f"cannot change model.{key} when resuming "
                             f"({stored[key]!r} in {last}, {value!r} requested)")
    return resumed, ckpt, {}


def main(argv=None):
    tune_cpu_allocator()
    try:
        cfg, ckpt, overrides = resolve(sys.argv[1:] if argv is None else argv)
        if ckpt and os.environ.get("RANK", "0") == "0":         # under torchrun, rank 0 speaks
            print(f"resuming from step {ckpt['step']} of {Path(cfg['training'].out_dir) / 'last.pt'}")
        train(cfg, resume_from=ckpt, overrides=overrides)
    except (ValueError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        sys.exit("interrupted; resume with --resume (the last checkpoint is complete)")


if __name__ == "__main__":
    main()
