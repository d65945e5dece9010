"""The run's configuration: a dataclass per section of config.yaml, the named presets, and
the loader that layers dataclass defaults < config.yaml < --preset < --section.key=value.

    >>> from config import SECTIONS, load_config
    >>> cfg = load_config("config.yaml", ["--model.n_layers=4"], sections=SECTIONS, other_sections=("sample",))
    >>> cfg["model"].n_layers
    4

Sections: model (model.TransformerConfig), data (DataConfig), training (TrainConfig), lora
and quantize (model.LoRAConfig, model.QuantConfig); generate.py adds sample. This module
imports only model.py, so every script can read the configuration without a loop.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from model import PRESETS as MODEL_PRESETS, LoRAConfig, QuantConfig, TransformerConfig, closest

TOKENIZER_KINDS = ("char", "byte", "bpe")
BPE_VOCAB = 4096                     # data.vocab_size's default: tokens a learned BPE ends with
MISSING = ("error", "interpolate", "ffill", "zero")   # series.fill_missing's policies for missing values

@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and where the token files go."""

    path: Optional[str] = None     # a text file or a folder of them; None: built-in Shakespeare
    tokenizer: str = "char"        # char | byte | bpe
    bpe: str = "train"             # tokenizer=bpe: train (learn from the corpus) or a tiktoken encoding name
    vocab_size: int = BPE_VOCAB    # bpe=train: tokens to learn (256 bytes + merges + <|endoftext|>)
    val_fraction: float = 0.1      # the last fraction of the tokens is the validation split
    cache_dir: Optional[str] = None  # prepared train.bin/val.bin/meta.json; None: <training.out_dir>/data
    target_tokenizer: Optional[str] = None  # seq2seq: char | byte | bpe for the targets; None: one shared vocabulary
    truncate: bool = False         # seq2seq: cut sides longer than block_size (otherwise an error)
    val_path: Optional[str] = None  # series classification/regression: validation series from this file, not a split
    # Time series (data.path a .csv, .npy, .npz or .ts file, or aeon:NAME / statsmodels:NAME; see series.py)
    columns: Optional[str] = None  # comma-separated CSV columns to read; None: every column
    target: Optional[str] = None   # a CSV of one series per row: the column holding each row's label
    lookback: Optional[int] = None  # task=forecast: steps the model reads; None: model.block_size * patch_len
    missing: str = "error"         # missing values: error | interpolate | ffill | zero
    time_shift: int = 0            # series classification/regression: move each training series by up to this many steps

    def __post_init__(self):
        for name in ("tokenizer", "target_tokenizer"):
            kind = getattr(self, name)
            if kind is not None and kind not in TOKENIZER_KINDS:
                raise ValueError(f"data.{name}={kind!r}; {closest(kind, TOKENIZER_KINDS)}")
        if self.missing not in MISSING:
            raise ValueError(f"data.missing={self.missing!r}; {closest(self.missing, MISSING)}")
        if self.time_shift < 0:
            raise ValueError(f"data.time_shift={self.time_shift} must be >= 0 steps (0: no augmentation)")
        if self.lookback is not None and self.lookback <= 0:
            raise ValueError(f"data.lookback={self.lookback} must be a positive number of steps")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if "bpe" not in (self.tokenizer, self.target_tokenizer) and (self.bpe, self.vocab_size) != ("train", BPE_VOCAB):
            raise ValueError(f"data.bpe and data.vocab_size are for tokenizer=bpe; data.tokenizer={self.tokenizer} "
                             f"has no merges to learn or load")
        if self.bpe != "train" and self.vocab_size != BPE_VOCAB:
            raise ValueError(f"data.vocab_size is the number of tokens to learn (data.bpe=train); the "
                             f"{self.bpe} encoding has its own")
        if not 257 <= self.vocab_size <= 2 ** 32:
            raise ValueError(f"data.vocab_size={self.vocab_size} must be at least 257 (256 bytes + "
                             f"<|endoftext|>) and at most 2**32 (uint32 token files)")
        if self.bpe != "train":
            import tiktoken
            names = tiktoken.list_encoding_names()
            if self.bpe not in names:
                raise ValueError(f"data.bpe={self.bpe!r} is neither 'train' nor a tiktoken encoding; "
                                 f"{closest(self.bpe, ['train', *names])}")


TASKS = ("lm", "classification", "regression", "seq2seq", "forecast")   # tasks.py: what each one trains
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")
DROPOUT_SCHEDULES = ("constant", "linear")


@dataclass
class TrainConfig:
    """How to train: optimisation, budget, evaluation and output.

    Under torchrun, batch_size and grad_accum_steps are per rank: an optimizer step sees
    batch_size * grad_accum_steps * world_size sequences.
    """

    task: str = "lm"                # lm | classification | regression | seq2seq | forecast (see readme: Tasks)
    out_dir: Optional[str] = "out"  # checkpoints, log.jsonl, plot.png; None (the Python API's default): none
    init_from: Optional[str] = None  # start from this checkpoint's weights and tokenizer (fine-tuning)
    device: str = "auto"            # auto | cpu | cuda | cuda:N | mps (under torchrun: cuda:LOCAL_RANK)
    seed: int = 1337
    batch_size: int = 32            # sequences per micro-batch, per rank
    grad_accum_steps: int = 1       # micro-batches per optimizer step, per rank
    max_iters: int = 5000
    max_time: Optional[float] = None  # seconds; when set, it replaces max_iters (and epochs) as the budget
    epochs: Optional[float] = None  # passes over the training data; when set, it replaces max_iters
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1       # the schedule decays to learning_rate * min_lr_ratio
    lr_schedule: str = "cosine"     # cosine | linear | constant (after warmup)
    warmup_iters: int = 100
    weight_decay: float = 0.1       # AdamW, decoupled; not applied to norms, biases, embeddings
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # max global grad norm; 0 disables clipping
    label_smoothing: float = 0.0    # cross-entropy tasks (lm, classification, seq2seq): the training loss's smoothing
    eval_interval: Optional[int] = 250  # steps between evaluations; None: at the end of every epoch
    eval_iters: int = 50            # random validation batches per periodic evaluation
    log_interval: int = 10
    early_stopping_patience: Optional[int] = None  # stop after this many evaluations without a new best
    monitor: Optional[str] = None   # the validation metric that picks best.pt; None: the task's (lm: loss)
    dropout_schedule: str = "constant"  # constant | linear: from model.dropout to dropout_final over the budget
    dropout_final: float = 0.0
    precision: str = "fp32"         # fp32 | bf16 | fp16 (fp16 needs a GPU: CUDA or MPS)
    compile: bool = False           # torch.compile the model (falls back to eager with a warning)
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory
    distributed: str = "ddp"        # under torchrun: ddp (a replica per rank) | fsdp (sharded, fully_shard)
    progress: bool = True           # tqdm progress bar
    plot: bool = True               # draw plot.png at the end of the run
    tensorboard: bool = False       # also log to out_dir/tensorboard (needs the tensorboard package)
    log_attention: bool = False     # at each evaluation: attention entropy per layer and head, block activations

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "max_iters", "eval_interval",
                     "eval_iters", "log_interval", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"training.{name}={getattr(self, name)} must be positive")
        if self.max_time is not None and self.max_time <= 0:
            raise ValueError(f"training.max_time={self.max_time} must be positive seconds")
        for name, valid in (("task", TASKS), ("lr_schedule", SCHEDULES), ("precision", PRECISIONS),
                            ("distributed", DISTRIBUTED), ("dropout_schedule", DROPOUT_SCHEDULES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"training.{name}={getattr(self, name)!r}; {closest(getattr(self, name), valid)}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_iters >= 0):
            raise ValueError("training: need learning_rate > 0, 0 <= min_lr_ratio <= 1, warmup_iters >= 0")
        if self.early_stopping_patience is not None and self.early_stopping_patience <= 0:
            raise ValueError(f"training.early_stopping_patience={self.early_stopping_patience} must be "
                             f"positive (or null: never stop early)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"training.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.dropout_final < 1.0:
            raise ValueError(f"training.dropout_final={self.dropout_final} must be in [0, 1)")
        if self.dropout_final and self.dropout_schedule == "constant":
            raise ValueError("training.dropout_final is where dropout_schedule=linear ends; the constant "
                             "schedule keeps model.dropout (add --training.dropout_schedule=linear)")
        if self.log_attention and self.distributed == "fsdp":
            raise ValueError("training.log_attention reads one unsharded forward of the model; "
                             "use it with distributed=ddp (or one process)")
        if self.compile and self.dropout_schedule != "constant":
            raise ValueError("training.dropout_schedule=linear changes the dropout every step, and a compiled "
                             "model recompiles for every new value: use it without training.compile")


# A run's budget is one of these: a layer of the config that names one replaces the others an
# earlier layer set, so `--training.max_iters=1` over a preset's max_time trains one step.
BUDGETS = ("max_iters", "max_time", "epochs")

SECTIONS = {"model": TransformerConfig, "data": DataConfig, "training": TrainConfig,
            "lora": LoRAConfig, "quantize": QuantConfig}

# Run presets set model and training keys together; every model preset is a run preset too.
RUN_PRESETS = {
    # A 75-second budget on a CPU: a small, fast model that sees more tokens learns more than a
    # larger one that sees fewer (readme: cpu-fast on tinyshakespeare).
    "cpu-fast": {
        "model": dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=4, block_size=64, dropout=0.0,
                      norm="rmsnorm", pos_encoding="rope", activation="swiglu", bias=False),
        "training": dict(batch_size=16, learning_rate=4e-3, min_lr_ratio=0.05, warmup_iters=50,
                         lr_schedule="cosine", max_time=75.0, eval_interval=250, eval_iters=10,
                         weight_decay=0.1, beta2=0.99, precision="fp32"),
    },
}
PRESETS = {**{name: {"model": p} for name, p in MODEL_PRESETS.items()}, **RUN_PRESETS}
ALIASES = {"task": "training.task", "data": "data.path", "device": "training.device", "init_from": "training.init_from", "epochs": "training.epochs",
           "quantize": "quantize.mode", "group_size": "quantize.group_size",
           "horizon": "model.horizon", "lookback": "data.lookback"}

# The command-line names of the original design documents, kept working: each becomes its
# canonical option (printing that once), and a flag given no value takes its fixed value.
SEED_OPTIONS = {   # seed name: (canonical option, value of the bare flag or None, value of `=false`)
    "max_tokens": ("sample.max_new_tokens", None, None),
    "max_length": ("sample.max_new_tokens", None, None),
    "model_size": ("preset", None, None),
    "batch_size": ("training.batch_size", None, None),
    "gradient_accumulation_steps": ("training.grad_accum_steps", None, None),
    "gradient_checkpointing": ("training.gradient_checkpointing", "true", "false"),
    "mixed_precision": ("training.precision", "mixed", "fp32"),   # mixed: fp16 on CUDA, else bf16
    "use_rotary_embeddings": ("model.pos_encoding", "rope", "learned"),
    "max_seq_len": ("model.block_size", None, None),
}


def canonical_argv(argv: list[str], *, own=(), log=print) -> list[str]:
    """argv with the design documents' option names (SEED_OPTIONS) spelled canonically; a name
    in `own` (the script's own aliases: generate.py's --batch_size) keeps its meaning.

        >>> canonical_argv(["--max_tokens", "50", "--mixed_precision"], log=lambda s: None)[:2]
        ['--sample.max_new_tokens', '50']
    """
    out, told = [], set()
    for i, arg in enumerate(argv):
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in SEED_OPTIONS or name in own or (i and argv[i - 1] in ("--config",)):
            out.append(arg)
            continue
        canonical, on, off = SEED_OPTIONS[name]
        if on is not None:      # a flag: bare or =true is on, =false is off
            if eq and value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--{name} is a flag (true or false), got {value!r}")
            value = off if eq and value.lower() in ("false", "0", "no") else on
            if value == "mixed":
                import torch
                value = "fp16" if torch.cuda.is_available() else "bf16"
            eq = "="
        if name not in told:
            log(f"note: --{name} is --{canonical}{'=' + value if on is not None else ''}")
            told.add(name)
        out.append(f"--{canonical}{eq}{value}" if eq else f"--{canonical}")
    return out

# =============================================================================
# Configuration: dataclass defaults < config.yaml < --preset < --section.key=value
# =============================================================================


def field_types(cls) -> dict[str, Any]:
    """{field name: its resolved type annotation} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class Quoted(str):
    """A command-line value written in quotes ("null", 'none'): always the string itself."""


def coerce(value: Any, typ, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or say what is wrong. Null is
    YAML's null or the word `null`, and only an Optional field takes it; a string field keeps
    any string ("none" too). A list field (list[str]) takes a YAML list or a single value.

        >>> coerce("none", str, "model.pos_encoding"), coerce("null", Optional[int], "model.d_ff")
        ('none', None)
    """
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        items = value if isinstance(value, list) else [value]
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
    optional = typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ)
    base = next(t for t in typing.get_args(typ) if t is not type(None)) if optional else typ
    text = value.strip().lower() if isinstance(value, str) and not isinstance(value, Quoted) else None
    if value is None or (text == "null" and (optional or base is not str)):
        if optional:
            return None
        raise ValueError(f"{where} cannot be null")
    bad = ValueError(f"{where} expects {getattr(base, '__name__', base)}, got {value!r}")
    if base is str:
        return str(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if text in ("true", "yes", "on", "1") or value == 1:
            return True
        if text in ("false", "no", "off", "0") or value == 0:
            return False
        raise bad
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        number = float(value)
    except ValueError:
        raise bad from None
    if base is float:
        return number
    if base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)               # exact, however large
        if not (number == number and abs(number) != float("inf") and number.is_integer()):
            raise bad                       # '2.5e0', '1e-3', 'nan', '1e400' are not integers
        return int(number)
    raise bad


def _apply(values: dict, section_cls, section: str, updates: dict, source: str):
    types = field_types(section_cls)
    for key, value in updates.items():
        if key not in types:
            raise ValueError(f"unknown key '{section}.{key}' in {source}; "
                             f"{closest(key, types).replace('valid: ', f'valid {section} keys: ')}")
        values[key] = coerce(value, types[key], f"{section}.{key} ({source})")


def _undotted_hint(name: str, sections: dict[str, type], aliases: dict[str, str]) -> str:
    """For an option without a section: the keys (in any section) or aliases it looks like,
    else how options are written."""
    keys = {k: [f"{s}.{k}" for s, c in sections.items() if k in field_types(c)]
            for c in sections.values() for k in field_types(c)}
    match = difflib.get_close_matches(name, [*aliases, *keys], n=1, cutoff=0.6)
    if match:
        return "did you mean " + " or ".join(f"'{m}'" for m in (
            [f"--{match[0]}"] if match[0] in aliases else keys[match[0]])) + "?"
    return (f"options look like --section.key=value (sections: {', '.join(sections)}; "
            f"--help lists the keys) or an alias: {', '.join('--' + a for a in aliases)}")


def parse_overrides(argv: list[str], *, sections: dict[str, type], aliases: dict[str, str] = None):
    """`--section.key=value`, `--section.key value` or an alias (`--device cuda`), typed.

    Returns {section: {key: raw value}}. Boolean keys may be given without a value; list
    keys collect every repetition (`--stop A --stop B`).
    """
    aliases = aliases or {}
    out: dict[str, dict] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; options look like --section.key=value")
        name, eq, value = arg[2:].partition("=")
        dotted = aliases.get(name, name)
        section, dot, key = dotted.partition(".")
        if not dot:
            raise ValueError(f"unknown option '--{name}'; {_undotted_hint(name, sections, aliases)}")
        if section not in sections:
            raise ValueError(f"unknown config section '{section}' in '--{name}'; {closest(section, sections)}")
        types = field_types(sections[section])
        if key not in types:
            raise ValueError(f"unknown option '--{name}'; {closest(key, types, prefix=section + '.')}")
        if not eq:
            is_bool = types[key] in (bool, Optional[bool])
            if i + 1 < len(argv) and not argv[i + 1].startswith("--") and not (
                    is_bool and argv[i + 1].lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0")):
                value, i = argv[i + 1], i + 1
            elif is_bool:
                value = "true"
            else:
                raise ValueError(f"option '--{name}' needs a value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = Quoted(value[1:-1])                  # quoted: the string itself, never null
        if typing.get_origin(types[key]) is list:        # repeated flags accumulate
            out.setdefault(section, {}).setdefault(key, []).append(value)
        else:
            out.setdefault(section, {})[key] = value
        i += 1
    return out


def load_config(path: Optional[str], argv: list[str] = (), *, sections: dict[str, type],
                presets: dict[str, dict] = None, preset: Optional[str] = None,
                aliases: dict[str, str] = None, base: Optional[dict] = None,
                other_sections: tuple[str, ...] = ()) -> dict:
    """Resolve the run configuration into one dataclass instance per section.

    Layers, later wins: dataclass defaults, `base` (e.g. a checkpoint's config), the YAML
    file, the named preset, then the command-line overrides; a layer that names a budget
    (BUDGETS) replaces the budget of the layers before it. Every key is type-checked and
    an unknown key names the closest valid one. other_sections: sections of the file that
    another script reads (train.py skips generate.py's `sample`).
    """
    values = {name: {} for name in sections}
    layers = []
    if base:
        layers.append(("the checkpoint", base))
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            where = getattr(e, "problem_mark", None)
            raise ValueError(f"{path} is not a YAML config" + (f" (line {where.line + 1})" if where else "")) from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        layers.append((str(path), raw))
    if preset is not None:
        presets = presets or {}
        if preset not in presets:
            raise ValueError(f"unknown preset '{preset}'; {closest(preset, presets)}")
        layers.append((f"preset '{preset}'", presets[preset]))
    layers.append(("the command line", parse_overrides(list(argv), sections=sections, aliases=aliases)))
    for source, layer in layers:
        for section, updates in layer.items():
            if section not in sections:
                if source == "the checkpoint" or section in other_sections:
                    continue
                raise ValueError(f"unknown section '{section}' in {source}; {closest(section, sections)}")
            if not isinstance(updates, dict):
                raise ValueError(f"section '{section}' in {source} must be a mapping")
            named = [k for k in BUDGETS if section == "training" and k in updates
                     and coerce(updates[k], field_types(TrainConfig)[k], f"training.{k} ({source})") is not None]
            for key in (set(BUDGETS) - set(named)) if named else ():
                values[section].pop(key, None)
            _apply(values[section], sections[section], section, updates, source)
    return {name: cls(**values[name]) for name, cls in sections.items()}


def saved_config(config: dict) -> dict:
    """A run config saved in a checkpoint, as today's checks accept it: an option that run
    ignored (an int8 group size, a vocabulary size without BPE, LoRA settings without LoRA, a
    final dropout without its schedule) goes back to its default."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    q, d, lora, t = (out.get(name) or {} for name in ("quantize", "data", "lora", "training"))
    if q.get("mode") != "int4":
        q.pop("group_size", None)
    bpe = "bpe" in (d.get("tokenizer", "char"), d.get("target_tokenizer"))
    if not bpe:
        d.pop("bpe", None)
    if not bpe or d.get("bpe", "train") != "train":
        d.pop("vocab_size", None)
    if not lora.get("r"):
        for key in ("alpha", "dropout", "targets"):
            lora.pop(key, None)
    if t.get("dropout_schedule", "constant") == "constant":
        t.pop("dropout_final", None)
    return out


def refuse(message: str, options) -> None:
    """Raise a one-line ValueError naming every option of (name, given) pairs that is given,
    in place of the {} in message; nothing when none is. An option a run would ignore is an error.

        >>> refuse("{}: not read by training.task=lm", [("model.pooling", True), ("data.truncate", False)])
        Traceback (most recent call last):
        ValueError: model.pooling: not read by training.task=lm
    """
    given = [name for name, on in options if on]
    if given:
        raise ValueError(message.replace("{}", ", ".join(given)))


def config_file(path: str, default: str = "config.yaml") -> Optional[str]:
    """The YAML file to read: a path the user named must exist (load_config says so);
    the default may be absent, and then only defaults and overrides apply."""
    return path if (path != default or Path(path).exists()) else None


def config_to_dict(cfg: dict) -> dict:
    return {name: dataclasses.asdict(c) for name, c in cfg.items()}
