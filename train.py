"""Train a language model on the built-in corpus or your own text.

    python train.py --config config.yaml                      # built-in Shakespeare, char-level
    python train.py --config config.yaml --data my.txt --model.n_layers=4 --training.max_iters=200
    python train.py --config config.yaml --preset cpu-fast --data ../shared/data/tinyshakespeare.txt
    python train.py --config config.yaml --resume              # continue from out/last.pt
    python train.py --config config.yaml --data corpus/ --data.tokenizer=bpe --data.vocab_size=4096
    python train.py --config config.yaml --init_from out/best.pt --lora.r=8 --data new.txt \
        --training.out_dir=out-lora                            # LoRA fine-tune (add --quantize int8: QLoRA)

Writes to training.out_dir: last.pt (for --resume), best.pt (best validation loss),
config.yaml (the resolved configuration), log.jsonl (one JSON object per event) and data/
(the prepared token files, reused by later runs on the same inputs; data.cache_dir moves them).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from data import DataConfig, prepared_dataset, tokenizer_from_state
from model import (PRESETS as MODEL_PRESETS, Int4Linear, Int8Linear, LoRAConfig, QuantConfig, Transformer, TransformerConfig,
                   apply_lora, closest, load_lora_state_dict, lora_state_dict, quantize_model)
from utils import (CheckpointError, JsonlLogger, base_reference, check_base, config_file, config_to_dict,
                   load_checkpoint, load_config, model_from_checkpoint, pick_device, save_checkpoint,
                   tune_cpu_allocator)

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """How to train: optimisation, budget, evaluation and output."""

    out_dir: str = "out"
    init_from: Optional[str] = None  # start from this checkpoint's weights and tokenizer (fine-tuning)
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps
    seed: int = 1337
    batch_size: int = 32
    grad_accum_steps: int = 1       # micro-batches per optimizer step
    max_iters: int = 5000
    max_time: Optional[float] = None  # seconds; when set, it replaces max_iters as the budget
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1       # the schedule decays to learning_rate * min_lr_ratio
    lr_schedule: str = "cosine"     # cosine | linear | constant (after warmup)
    warmup_iters: int = 100
    weight_decay: float = 0.1       # AdamW, decoupled; not applied to norms, biases, embeddings
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # max global grad norm; 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 50            # random validation batches per periodic evaluation
    log_interval: int = 10
    precision: str = "fp32"         # fp32 | bf16 | fp16 (fp16 needs a GPU: CUDA or MPS)
    compile: bool = False           # torch.compile the model
    progress: bool = True           # tqdm progress bar

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "max_iters", "eval_interval",
                     "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"training.{name}={getattr(self, name)} must be positive")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"training.max_time={self.max_time} must be positive seconds")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"training.lr_schedule={self.lr_schedule!r}; {closest(self.lr_schedule, SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"training.precision={self.precision!r}; {closest(self.precision, PRECISIONS)}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_iters >= 0):
            raise ValueError("training: need learning_rate > 0, 0 <= min_lr_ratio <= 1, warmup_iters >= 0")


SECTIONS = {"model": TransformerConfig, "data": DataConfig, "training": TrainConfig,
            "lora": LoRAConfig, "quantize": QuantConfig}

# Run presets set model and training keys together; every model preset is a run preset too.
RUN_PRESETS = {
    # Beats nanoGPT's CPU "baby GPT" on tinyshakespeare in the same wall-clock (see readme).
    # Found by search on a 2-core CPU: within 75 s, a small, fast model that sees more
    # tokens wins over a larger one that sees fewer.
    "cpu-fast": {
        "model": dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=4, block_size=64, dropout=0.0,
                      norm="rmsnorm", pos_encoding="rope", activation="swiglu", bias=False),
        "training": dict(batch_size=16, learning_rate=4e-3, min_lr_ratio=0.05, warmup_iters=50,
                         lr_schedule="cosine", max_time=75.0, eval_interval=250, eval_iters=10,
                         weight_decay=0.1, beta2=0.99, precision="fp32"),
    },
}
PRESETS = {**{name: {"model": p} for name, p in MODEL_PRESETS.items()}, **RUN_PRESETS}
ALIASES = {"data": "data.path", "device": "training.device", "init_from": "training.init_from",
           "quantize": "quantize.mode", "group_size": "quantize.group_size"}

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


@torch.no_grad()
def estimate_loss(model, data, cfg: TrainConfig, block_size: int, device: str) -> dict:
    """Mean loss over eval_iters random batches per split; the same batches every time
    (a fixed generator), so successive evaluations compare like with like."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        g = torch.Generator().manual_seed(cfg.seed + 1)
        losses = []
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, block_size, generator=g, device=device)
            with autocast(device, cfg.precision):
                losses.append(lm_loss(model, x, y).item())
        out[split] = float(np.mean(losses))
    model.train()
    return out


@torch.no_grad()
def split_loss(model, data, split: str, *, block_size: int, batch_size: int, device: str,
               precision: str = "fp32") -> float:
    """Mean loss over every token of a split once (non-overlapping windows)."""
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


def _rng_state(generator: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "batches": generator.get_state(),
            "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "python_gauss": random.getstate()[2]}


def _set_rng_state(state: dict, generator: torch.Generator):
    torch.set_rng_state(state["torch"])
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


def train(cfg: dict, *, resume_from: Optional[dict] = None) -> dict:
    """Train with a resolved config ({'model', 'data', 'training'} dataclasses).

    resume_from: a loaded last.pt checkpoint to continue from. Returns a summary dict
    (steps, best and final validation loss, paths).
    """
    tcfg: TrainConfig = cfg["training"]
    device = pick_device(tcfg.device)
    out_dir = Path(tcfg.out_dir)
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)

    base, base_ref = base_checkpoint(cfg, resume_from)
    if base:   # a fine-tune keeps the base's architecture and tokenizer
        cfg = {**cfg, "model": TransformerConfig.from_dict({**base["model_config"],
                                                            "dropout": cfg["model"].dropout})}
    block_size = cfg["model"].block_size
    known = resume_from or base
    tokenizer = tokenizer_from_state(known["tokenizer"]) if known else None
    # a fine-tune's model (and its LoRA/quantize settings) is checked before any data is prepared
    model = build_model(cfg, tokenizer, device, base) if base else None
    # tokenized once into <out_dir>/data (or data.cache_dir), reused while the inputs are unchanged
    data = prepared_dataset(cfg["data"], out_dir=out_dir, block_size=block_size, tokenizer=tokenizer,
                            progress=tcfg.progress)
    if model is None:
        model = build_model(cfg, data.tokenizer, device, None)
    # the vocabulary belongs to the tokenizer, so the model's vocab_size follows it
    model_cfg = model.config
    cfg = {**cfg, "model": model_cfg}
    lora = cfg["lora"].r > 0
    optimizer = make_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=tcfg.precision == "fp16")
    generator = torch.Generator().manual_seed(tcfg.seed)
    step, elapsed, best_val = 0, 0.0, float("inf")
    if resume_from:
        if lora:
            load_lora_state_dict(model, resume_from["model"])
        else:
            model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        step, elapsed, best_val = resume_from["step"], resume_from["elapsed"], resume_from["best_val_loss"]
        _set_rng_state(resume_from["rng"], generator)
    fwd = model
    if tcfg.compile:
        try:
            fwd = torch.compile(model)
        except Exception as e:  # e.g. no compiler toolchain, unsupported platform
            print(f"warning: torch.compile unavailable ({e}); training without it", file=sys.stderr)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    if not resume_from:                       # a new run starts a new record; --resume appends
        (out_dir / "log.jsonl").unlink(missing_ok=True)
    logger = JsonlLogger(out_dir / "log.jsonl")
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum_steps * block_size
    print(f"{n_params / 1e6:.2f}M parameters | vocab {model_cfg.vocab_size} ({data.tokenizer.kind}) | "
          f"train {data.num_tokens['train']:,} tokens, val {data.num_tokens['val']:,} | device {device}"
          f" | {tcfg.precision}")
    logger.log(event="start", step=step, params=n_params, device=device, resumed=bool(resume_from))

    def progress() -> float:
        return elapsed / tcfg.max_time if tcfg.max_time else step / tcfg.max_iters

    def checkpoint(names: list[str], val_loss: float):
        payload = {"model": lora_state_dict(model) if lora else model.state_dict(),
                   "model_config": model_cfg.to_dict(),
                   "tokenizer": data.tokenizer.state(), "config": config_to_dict(cfg),
                   "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
                   "best_val_loss": best_val, "val_loss": val_loss, "rng": _rng_state(generator)}
        if lora:     # an adapter: only its weights, and which base they belong to
            payload["lora"] = {"config": dataclasses.asdict(cfg["lora"]), "base": base_ref}
        if cfg["quantize"].mode:
            payload["quantize"] = dataclasses.asdict(cfg["quantize"])
        for name in names:
            save_checkpoint(out_dir / name, payload)

    def evaluate():
        nonlocal best_val
        losses = estimate_loss(fwd, data, tcfg, block_size, device)
        if not all(map(math.isfinite, losses.values())):   # never save diverged weights
            raise FloatingPointError(f"non-finite evaluation loss {losses} at step {step}; "
                                     f"{out_dir / 'last.pt'} is the last good checkpoint")
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        logger.log(event="eval", step=step, train_loss=losses["train"], val_loss=losses["val"],
                   perplexity=math.exp(losses["val"]), elapsed=round(elapsed, 2))
        say(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
            f"(ppl {math.exp(losses['val']):.2f}){' *best' if improved else ''} [{elapsed:.0f}s]")
        checkpoint(["best.pt", "last.pt"] if improved else ["last.pt"], losses["val"])
        return step

    bar = None
    if tcfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=int(tcfg.max_time) if tcfg.max_time else tcfg.max_iters,
                   initial=int(elapsed) if tcfg.max_time else step,
                   unit="s" if tcfg.max_time else "it", dynamic_ncols=True)
    say = bar.write if bar else print

    model.train()
    last_eval, window_tokens, window_start = -1, 0, time.perf_counter()
    while progress() < 1.0:
        t0 = time.perf_counter()
        lr = lr_at(step, progress(), tcfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for _ in range(tcfg.grad_accum_steps):
            x, y = data.get_batch("train", tcfg.batch_size, block_size, generator=generator, device=device)
            with autocast(device, tcfg.precision):
                loss = lm_loss(fwd, x, y)
            scaler.scale(loss / tcfg.grad_accum_steps).backward()
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf")).item()
        train_loss = loss_sum / tcfg.grad_accum_steps
        if not (math.isfinite(train_loss) and (math.isfinite(grad_norm) or scaler.is_enabled())):
            raise FloatingPointError(f"non-finite loss {train_loss} / grad norm {grad_norm} at step {step + 1}; "
                                     f"the weights were not updated and {out_dir / 'last.pt'} is the last good "
                                     f"checkpoint. Try a lower learning rate.")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_step
        if step % tcfg.log_interval == 0:
            now = time.perf_counter()
            tps = window_tokens / (now - window_start)
            logger.log(event="train", step=step, train_loss=train_loss, lr=lr, grad_norm=grad_norm,
                       tokens_per_sec=round(tps, 1))
            if bar:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.1e}")
            window_tokens, window_start = 0, now
        if step % tcfg.eval_interval == 0:
            last_eval = evaluate()
            window_tokens, window_start = 0, time.perf_counter()   # tokens/s counts training only
        elapsed += time.perf_counter() - t0
        if bar:
            bar.n = min(int(elapsed), bar.total) if tcfg.max_time else step
            bar.refresh()
    if bar:
        bar.close()
    if last_eval != step:
        evaluate()
    final = split_loss(fwd, data, "val", block_size=block_size, batch_size=tcfg.batch_size,
                       device=device, precision=tcfg.precision)
    logger.log(event="final", step=step, final_val_loss=final, perplexity=math.exp(final),
               elapsed=round(elapsed, 2))
    print(f"final_val_loss {final:.4f} (perplexity {math.exp(final):.2f}, every validation token once) "
          f"after {step} steps, {elapsed:.1f}s; best checkpoint: {out_dir / 'best.pt'}")
    return {"step": step, "best_val_loss": best_val, "final_val_loss": final, "elapsed": elapsed,
            "out_dir": str(out_dir)}

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
        if ckpt:
            print(f"resuming from step {ckpt['step']} of {Path(cfg['training'].out_dir) / 'last.pt'}")
        train(cfg, resume_from=ckpt)
    except (ValueError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; resume with --resume (the last checkpoint is complete)")


if __name__ == "__main__":
    main()
