"""Tasks: what a model is trained to do. A task turns dataset items into batches, and gives
the loss to minimise and the metrics to report; the Trainer (train.py) knows nothing else.

    LanguageModelTask    token ids -> the next token at every position: cross-entropy, perplexity
    ClassificationTask   a sequence -> one of num_classes labels: cross-entropy, accuracy, macro-F1
    RegressionTask       a sequence (or each position) -> real values: MSE, MAE
    ForecastTask         a lookback window of a series -> the next horizon steps: MSE, MAE

Datasets are map-style torch Datasets of (input, target) pairs; sequences of different
lengths are padded on the right and carry an attention mask (true at real tokens). The
language-model corpus of train.py (data.TokenDataset) is sampled in random windows instead.

    >>> task = ClassificationTask(num_classes=3)
    >>> batch = task.collate([(torch.tensor([5, 6, 7]), 2), (torch.tensor([8]), 0)])
    >>> batch["input"].tolist(), batch["attention_mask"].tolist(), batch["target"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[True, True, True], [True, False, False]], [2, 0])
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

HIGHER_IS_BETTER = ("accuracy", "macro_f1")   # every other metric is better lower


def pad_sequences(seqs: Sequence[torch.Tensor], *, pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-d (or (T, ...)) tensors to one length: (B, T, ...) values and a (B, T) mask.

        >>> pad_sequences([torch.tensor([1, 2]), torch.tensor([3])])[0].tolist()
        [[1, 2], [3, 0]]
    """
    seqs = [torch.as_tensor(s) for s in seqs]
    if not seqs or any(s.shape[0] == 0 for s in seqs):
        raise ValueError("every input sequence needs at least one element")
    width = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), width, *seqs[0].shape[1:]), pad_value)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]], mask[i, :s.shape[0]] = s, True
    return out, mask


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """The unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class that is
    neither predicted nor present counts as 1 (nothing to get wrong).

        >>> macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2)
        0.6666666666666666
    """
    conf = torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)
    return f1_from_confusion(conf)


def f1_from_confusion(conf: torch.Tensor) -> float:
    """Macro-F1 of a (num_classes, num_classes) confusion matrix, rows the targets."""
    conf = conf.double()
    tp = conf.diag()
    denom = conf.sum(0) + conf.sum(1)                                         # 2 TP + FP + FN
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(tp)).mean().item()


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64)


class Task:
    """The interface: collate items into a batch dict (input, target, attention_mask, on the
    device via `to`), the mean loss of a batch, and metrics over many batches. `monitor` is
    the metric that picks the best checkpoint and drives early stopping (see HIGHER_IS_BETTER)."""

    name = "task"
    monitor = "loss"
    label_smoothing: Optional[float] = None   # cross-entropy tasks: 0.0, or the Trainer's training.label_smoothing

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def statistics(self, model, batches) -> dict:
        """Sums over the batches (float64 tensors) that the metrics follow from: summed over
        ranks, they give the metrics of the whole dataset exactly."""
        raise NotImplementedError

    def summarize(self, stats: dict) -> dict:
        raise NotImplementedError

    def metrics(self, model, batches) -> dict:
        return self.summarize(self.statistics(model, batches))

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict:
        """What a checkpoint records of the task (enough to rebuild it)."""
        return {"name": self.name}


def to(batch: dict, device) -> dict:
    """The batch's tensors on the device."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def lm_loss(model, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of token ids x (B, T) against targets y (B, T)."""
    logits = model(x)                                                          # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), label_smoothing=label_smoothing)


class LanguageModelTask(Task):
    """Next-token prediction: input (B, T) ids, target (B, T) the same shifted by one."""

    name = "lm"
    label_smoothing = 0.0

    def collate(self, items: list) -> dict:
        x, y = zip(*items)
        return {"input": torch.stack([torch.as_tensor(t) for t in x]),
                "target": torch.stack([torch.as_tensor(t) for t in y])}

    def loss(self, model, batch: dict) -> torch.Tensor:
        return lm_loss(model, batch["input"], batch["target"], label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def statistics(self, model, batches) -> dict:
        total, count = _zeros(), _zeros()
        for batch in batches:
            logits = model(batch["input"])
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch["target"].flatten(), reduction="sum").cpu()
            count += batch["target"].numel()
        return {"loss_sum": total, "count": count}

    def summarize(self, stats: dict) -> dict:
        loss = (stats["loss_sum"] / stats["count"].clamp(min=1)).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input"]).argmax(-1)                                # (B, T) next tokens


class _SequenceTask(Task):
    """Shared by classification and regression: inputs padded on the right, with a mask."""

    def collate(self, items: list) -> dict:
        x, y = zip(*items)
        inputs, mask = pad_sequences(x)
        return {"input": inputs, "attention_mask": mask, "target": self._targets(y)}

    def _targets(self, ys) -> torch.Tensor:
        raise NotImplementedError

    def _outputs(self, model, batch):
        return model(batch["input"], attention_mask=batch["attention_mask"])


class ClassificationTask(_SequenceTask):
    """One label per sequence, ints in [0, num_classes); labels: optional names, in order."""

    name = "classification"
    monitor = "accuracy"
    label_smoothing = 0.0

    def __init__(self, num_classes: int, *, labels: Optional[list[str]] = None):
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} label names for num_classes={num_classes}")
        self.num_classes, self.labels = num_classes, labels

    def _targets(self, ys) -> torch.Tensor:
        y = torch.as_tensor([int(v) for v in ys])
        bad = y[(y < 0) | (y >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"label {bad[0].item()} is outside 0..{self.num_classes - 1} (num_classes="
                             f"{self.num_classes})")
        return y

    def loss(self, model, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self._outputs(model, batch).float(), batch["target"], label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def statistics(self, model, batches) -> dict:
        k = self.num_classes
        loss, confusion = _zeros(), _zeros(k, k)            # confusion[target, prediction]
        for batch in batches:
            logits = self._outputs(model, batch).float()
            loss += F.cross_entropy(logits, batch["target"], reduction="sum").cpu()
            pairs = batch["target"].cpu() * k + logits.argmax(-1).cpu()
            confusion += torch.bincount(pairs, minlength=k * k).view(k, k)
        return {"loss_sum": loss, "confusion": confusion}

    def summarize(self, stats: dict) -> dict:
        conf = stats["confusion"]
        n = conf.sum().clamp(min=1)
        return {"loss": (stats["loss_sum"] / n).item(), "accuracy": (conf.diag().sum() / n).item(),
                "macro_f1": f1_from_confusion(conf)}

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        return torch.softmax(self._outputs(model, batch).float(), dim=-1)      # (B, num_classes)

    def state(self) -> dict:
        return {"name": self.name, "num_classes": self.num_classes, "labels": self.labels}


class _ErrorMetrics(Task):
    """MSE and MAE from the errors a task's _evaluated(model, batch) gives, with how many count."""

    @torch.no_grad()
    def statistics(self, model, batches) -> dict:
        sq, ab, n = _zeros(), _zeros(), _zeros()
        for batch in batches:
            err, count = self._evaluated(model, batch)
            sq += err.double().pow(2).sum().cpu()
            ab += err.double().abs().sum().cpu()
            n += float(count)
        return {"squared": sq, "absolute": ab, "count": n}

    def summarize(self, stats: dict) -> dict:
        n = stats["count"].clamp(min=1)
        mse = (stats["squared"] / n).item()
        return {"loss": mse, "mse": mse, "mae": (stats["absolute"] / n).item()}


class RegressionTask(_ErrorMetrics, _SequenceTask):
    """Real targets: (output_dim,) per sequence, or (T, output_dim) per position; a scalar
    target is one value (output_dim=1)."""

    name = "regression"

    def _targets(self, ys) -> torch.Tensor:
        ys = [torch.as_tensor(v, dtype=torch.float32) for v in ys]
        if ys[0].dim() >= 1 and any(v.shape[0] != ys[0].shape[0] for v in ys):   # per position
            return pad_sequences(ys)[0]
        return torch.stack(ys)

    def _errors(self, model, batch):
        out = self._outputs(model, batch).float()
        target = batch["target"].reshape(out.shape) if batch["target"].numel() == out.numel() else None
        if target is None:
            raise ValueError(f"the model predicts {tuple(out.shape)} per batch, the targets are "
                             f"{tuple(batch['target'].shape)}: set output_dim (and pooling) to match")
        err = out - target
        if out.dim() == 3:                                  # per position: padding does not count
            err = err * batch["attention_mask"][..., None]
        return err, (batch["attention_mask"].sum() * out.shape[-1] if out.dim() == 3 else err.numel())

    def loss(self, model, batch: dict) -> torch.Tensor:
        err, n = self._errors(model, batch)
        return err.pow(2).sum() / n

    def _evaluated(self, model, batch):
        return self._errors(model, batch)

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        return self._outputs(model, batch).float()


class ForecastTask(_ErrorMetrics):
    """Items are (lookback (L, C), future (H, C)) windows of a series (series.ForecastWindows).
    A model with one forecast per sequence is trained on it; a causal model with a forecast at
    every token (pooling=none) is trained on all of them at once, each against the H steps
    after its patch, like a language model. Metrics are those of the forecast after the last
    step: MSE and MAE (in the scaled units the model sees)."""

    name = "forecast"
    monitor = "mse"

    def __init__(self, *, lookback: Optional[int] = None):
        self.lookback = lookback         # steps a forecast reads (recorded in checkpoints)

    def collate(self, items: list) -> dict:
        x, y = zip(*items)
        return {"input": torch.stack([torch.as_tensor(t) for t in x]),
                "target": torch.stack([torch.as_tensor(t) for t in y])}

    def _errors(self, model, batch, *, every_position: bool):
        out, y = model(batch["input"]).float(), batch["target"]              # (B, [N,] H, C)
        if out.dim() == 4 and every_position:
            N = out.shape[1]
            P = batch["input"].shape[1] // N                                  # the model may be wrapped (DDP)
            whole = torch.cat([batch["input"], y], dim=1)                     # (B, L + H, C)
            y = whole[:, P:].unfold(1, y.shape[1], P)[:, :N].transpose(2, 3)  # (B, N, H, C): after each patch
        elif out.dim() == 4:
            out = out[:, -1]
        if out.shape != y.shape:
            raise ValueError(f"the model forecasts {tuple(out.shape[1:])} per series and the targets are "
                             f"{tuple(y.shape[1:])}: set horizon and output_dim to match")
        return out - y

    def loss(self, model, batch: dict) -> torch.Tensor:
        return self._errors(model, batch, every_position=True).pow(2).mean()

    def _evaluated(self, model, batch):
        err = self._errors(model, batch, every_position=False)
        return err, err.numel()

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        out = model(batch["input"]).float()
        return out[:, -1] if out.dim() == 4 else out                          # (B, H, C)

    def state(self) -> dict:
        return {"name": self.name, "lookback": self.lookback}


class Seq2SeqTask(Task):
    """Sequence to sequence, teacher-forced: items are (source ids, target ids), the target
    framed as BOS ... EOS; the decoder reads target[:-1] and predicts target[1:]. Both sides
    are padded on the right with masks; padded target positions are left out of the loss.
    Metrics: per-token loss, perplexity and accuracy."""

    name = "seq2seq"
    label_smoothing = 0.0

    def collate(self, items: list) -> dict:
        src, tgt = zip(*items)
        src, src_mask = pad_sequences(src)
        tgt, tgt_mask = pad_sequences(tgt)
        target = tgt[:, 1:].masked_fill(~tgt_mask[:, 1:], -100)          # (B, T - 1); -100: ignored
        return {"input": src, "attention_mask": src_mask, "decoder_input": tgt[:, :-1],
                "decoder_mask": tgt_mask[:, :-1], "target": target}

    def _logits(self, model, batch):
        return model(batch["input"], batch["decoder_input"], src_mask=batch["attention_mask"],
                     tgt_mask=batch["decoder_mask"])                         # (B, T - 1, V)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch).flatten(0, 1).float(), batch["target"].flatten(),
                               label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def statistics(self, model, batches) -> dict:
        total, correct, count = _zeros(), _zeros(), _zeros()
        for batch in batches:
            logits, y = self._logits(model, batch).float(), batch["target"]
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").cpu()
            correct += ((logits.argmax(-1) == y) & (y != -100)).sum().cpu()
            count += (y != -100).sum().cpu()
        return {"loss_sum": total, "correct": correct, "count": count}

    def summarize(self, stats: dict) -> dict:
        n = stats["count"].clamp(min=1)
        loss = (stats["loss_sum"] / n).item()
        return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "token_accuracy": (stats["correct"] / n).item()}

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        """Greedy target ids (B, L), EOS included, padded after it (see generate.seq2seq_generate)."""
        return model.generate(batch["input"], model.config.block_size - 1, src_mask=batch["attention_mask"],
                              temperature=0.0)

    def length(self, item) -> int:
        return len(item[0]) + len(item[1])


def task_for(model, **kwargs) -> Task:
    """The task a model's head implies: lm, classification or regression.

        >>> from model import Transformer
        >>> task_for(Transformer(vocab_size=9, d_model=8, n_heads=2, n_layers=1)).name
        'lm'
    """
    cfg = model.config
    if hasattr(model, "encoder"):
        return Seq2SeqTask()
    if cfg.head == "classification":
        return ClassificationTask(cfg.num_classes, **kwargs)
    if cfg.head == "forecast":
        return ForecastTask()
    return RegressionTask() if cfg.head == "regression" else LanguageModelTask()


# -----------------------------------------------------------------------------
# Batch streams: what a training step draws from
# -----------------------------------------------------------------------------


class WindowBatches:
    """Random (x, y) windows of a token corpus (data.TokenDataset), as train.py's language
    model reads it: every batch is a fresh draw, so an "epoch" is as many windows as tokens.
    The generator's state is all that --resume needs to continue the same stream."""

    def __init__(self, data, *, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1):
        self.data, self.batch_size, self.block_size, self.rank, self.world = data, batch_size, block_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = max(1, data.num_tokens["train"] // (batch_size * block_size * world))

    def next(self, device) -> dict:
        x, y = self.data.get_batch("train", self.batch_size, self.block_size, generator=self.generator,
                                   device=device, rank=self.rank, world_size=self.world)
        return {"input": x, "target": y}

    def trial_batch(self, device) -> dict:
        """A batch the run never trains on (its own seed), e.g. to try compiling on."""
        x, y = self.data.get_batch("train", self.batch_size, self.block_size, generator=torch.Generator().manual_seed(0),
                                   device=device, rank=self.rank, world_size=self.world)
        return {"input": x, "target": y}

    def state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state(self, state: dict):
        self.generator.set_state(state["generator"])

    def eval_batches(self, split: str, *, iters: int, seed: int, device) -> Iterator[dict]:
        """The same iters random batches of a split every time (a fixed seed), so that
        successive evaluations compare like with like."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(iters):
            x, y = self.data.get_batch(split, self.batch_size, self.block_size, generator=g, device=device,
                                       rank=self.rank, world_size=self.world)
            yield {"input": x, "target": y}


class EpochBatches:
    """Shuffled mini-batches of a map-style dataset, epoch after epoch. Epoch e's order is a
    permutation seeded by (seed, e), so the position in the stream (micro-batches drawn) is
    all that --resume needs. Distributed, each rank takes every world-th item of a batch."""

    def __init__(self, dataset, task: Task, *, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty")
        self.dataset, self.task, self.batch_size, self.seed, self.rank, self.world = (
            dataset, task, batch_size, seed, rank, world)
        self.steps_per_epoch = math.ceil(len(dataset) / (batch_size * world))     # micro-batches
        self.drawn, self._order, self._length_cache = 0, None, None

    def next(self, device) -> dict:
        epoch, i = divmod(self.drawn, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            if hasattr(self.dataset, "set_epoch"):      # per-epoch draws (augmentation), as DistributedSampler's
                self.dataset.set_epoch(epoch)
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._order = (epoch, torch.randperm(len(self.dataset), generator=g))
            if hasattr(self.task, "length"):   # batches of similar lengths: less padding
                self._order = (epoch, bucketed(self._order[1], self._lengths(), self.batch_size * self.world, g))
        span = self._order[1][i * self.batch_size * self.world:(i + 1) * self.batch_size * self.world]
        mine = span[self.rank::self.world] if len(span) >= self.world else span
        self.drawn += 1
        return to(self.task.collate([self.dataset[j] for j in mine.tolist()]), device)

    def trial_batch(self, device) -> dict:
        return to(self.task.collate([self.dataset[j] for j in range(min(self.batch_size, len(self.dataset)))]), device)

    def _lengths(self) -> torch.Tensor:
        if self._length_cache is None:
            self._length_cache = torch.tensor([self.task.length(self.dataset[j]) for j in range(len(self.dataset))])
        return self._length_cache

    def state(self) -> dict:
        return {"drawn": self.drawn}

    def load_state(self, state: dict):
        self.drawn = state["drawn"]


def bucketed(order: torch.Tensor, lengths: torch.Tensor, batch: int, generator: torch.Generator,
             *, pool: int = 50) -> torch.Tensor:
    """A shuffled order regrouped so each batch holds items of similar length: chunks of `pool`
    batches are sorted by length and cut into batches, and the batches are shuffled.

        >>> lengths = torch.tensor([5, 1, 4, 2, 6, 3])
        >>> out = bucketed(torch.arange(6), lengths, 2, torch.Generator().manual_seed(0), pool=3)
        >>> sorted(sorted(lengths[b].tolist()) for b in out.view(3, 2))
        [[1, 2], [3, 4], [5, 6]]
    """
    chunks = [order[i:i + pool * batch] for i in range(0, len(order), pool * batch)]
    ordered = [c[lengths[c].argsort(stable=True)] for c in chunks]
    batches = [b for c in ordered for b in c.split(batch)]
    return torch.cat([batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()])


def dataset_batches(dataset, task: Task, *, batch_size: int, device, rank: int = 0, world: int = 1) -> Iterator[dict]:
    """Every item of a map-style dataset once, in order, in batches (the last may be smaller);
    distributed, rank r takes items r, r + world, ..."""
    idx = list(range(rank, len(dataset), world))
    for start in range(0, len(idx), batch_size):
        yield to(task.collate([dataset[j] for j in idx[start:start + batch_size]]), device)


@torch.no_grad()
def predict_all(model, task: Task, dataset, *, batch_size: int, device):
    """The task's predictions for every item of a dataset, in order (targets are ignored): a
    (N, ...) tensor, or, for outputs per position of sequences of different lengths, a list
    of (T_i, ...) tensors without the padding. Under autocast if the caller enters one."""
    model.eval()
    out = []
    for batch in dataset_batches(dataset, task, batch_size=batch_size, device=device):
        pred = task.predict(model, batch).cpu()
        mask = batch.get("attention_mask")
        if pred.dim() >= 3 and mask is not None:                  # per position: drop the padding
            out += [p[m] for p, m in zip(pred, mask.cpu())]
        else:
            out += list(pred)
    ragged = len({o.shape for o in out}) > 1
    return out if ragged else torch.stack(out)


def split_batches(data, split: str, *, batch_size: int, block_size: int, device) -> Iterator[dict]:
    """Every token of a corpus split once (data.TokenDataset.iter_split), as LM batches."""
    for x, y in data.iter_split(split, batch_size, block_size, device=device):
        yield {"input": x, "target": y}


@torch.no_grad()
def split_loss(model, data, split: str, *, block_size: int, batch_size: int, device) -> float:
    """A language model's mean loss over every token of a corpus split once (non-overlapping
    windows). Under autocast if the caller enters one."""
    model.eval()
    batches = split_batches(data, split, batch_size=batch_size, block_size=block_size, device=device)
    return LanguageModelTask().metrics(model, batches)["loss"]
