"""Time series and other feature vectors: reading them, filling gaps, scaling, and the
datasets the forecasting, classification and regression tasks train on. numpy and torch
only: a user's CSV needs no pandas.

    >>> from series import read_series, SeriesScaler, forecast_windows
    >>> values, columns = read_series("sales.csv", columns=["units"])       # doctest: +SKIP
    >>> scaler = SeriesScaler.fit([values[:800]])                           # the training part only
    >>> train = forecast_windows(scaler.transform(values[:800]), lookback=96, horizon=24)
    >>> x, y = train[0]                                                     # (96, 1), (24, 1)

Files:
    .csv   a header row, then one row per time step; columns chosen by name (data.columns).
           For classification/regression, one row per series instead, its label in the
           column data.target and its steps in the others.
    .npy   an array (T,) or (T, C): one series; (N, T) or (N, T, C) with an .npz's x and y.
    .ts    the UCR/UEA archive's format: univariate or multivariate, equal or variable
           length, class labels or regression targets.

Built-in data, read from the files that installed packages ship (nothing is downloaded):
`aeon:GunPoint` (and `aeon:GunPoint_TEST`) for aeon's UCR/UEA datasets, `statsmodels:co2` and
`statsmodels:macrodata` for statsmodels' series.

Missing values (empty cells, NaN, NA, ?) are an error unless data.missing names a fill:
interpolate (linear between neighbours, the ends held), ffill (the last value before; the
start takes the first value), or zero.
"""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from config import MISSING
from model import closest

NA = {"", "nan", "na", "n/a", "null", "?", "none"}
BUILT_IN = {"statsmodels:co2": "statsmodels/datasets/co2/co2.csv",
            "statsmodels:macrodata": "statsmodels/datasets/macrodata/macrodata.csv"}
CALENDAR = {"statsmodels:co2": ("date",), "statsmodels:macrodata": ("year", "quarter")}   # an index, not a channel
SERIES_SUFFIXES = (".csv", ".npy", ".npz", ".ts")


def is_series_path(path: Optional[str]) -> bool:
    """Does data.path name series data (a built-in name, or a .csv/.npy/.npz/.ts file)?"""
    return path is not None and (str(path).startswith(("aeon:", "statsmodels:"))
                                 or Path(str(path)).suffix.lower() in SERIES_SUFFIXES)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)    # found, never imported: aeon's import is slow
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the built-in series need the '{name}' package: "
                                f"pip install -r requirements-extras.txt")
    return Path(list(spec.submodule_search_locations)[0]).parent


def resolve_path(path: str) -> Path:
    """A file path, or the file a built-in name stands for: `aeon:GunPoint` is aeon's
    GunPoint_TRAIN.ts, `aeon:GunPoint_TEST` its test split; `statsmodels:co2` a CSV.

        >>> resolve_path("aeon:ItalyPowerDemand_TEST").name                   # doctest: +SKIP
        'ItalyPowerDemand_TEST.ts'
    """
    path = str(path)
    if path in BUILT_IN:
        return _package_dir("statsmodels") / BUILT_IN[path]
    if path.startswith("statsmodels:"):
        raise FileNotFoundError(f"no built-in series '{path}'; {closest(path, BUILT_IN)}")
    if path.startswith("aeon:"):
        name = path[5:]
        split = "TEST" if name.endswith("_TEST") else "TRAIN"
        name = name.removesuffix("_TEST").removesuffix("_TRAIN")
        folder = _package_dir("aeon") / "aeon" / "datasets" / "data"
        if not (folder / name / f"{name}_{split}.ts").is_file():
            shipped = sorted(p.parent.name for p in folder.glob("*/*_TRAIN.ts"))
            raise FileNotFoundError(f"aeon ships no dataset '{name}'; {closest(name, shipped, prefix='aeon:')}")
        return folder / name / f"{name}_{split}.ts"
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"'{path}' is not a file")
    return p


# -----------------------------------------------------------------------------
# Missing values
# -----------------------------------------------------------------------------


def fill_missing(values: np.ndarray, policy: str, *, where: str) -> np.ndarray:
    """values (T,) or (T, C) with NaN gaps, filled along time as `policy` says (see MISSING);
    `error` names the first gap.

        >>> fill_missing(np.array([1.0, np.nan, 3.0]), "interpolate", where="x").tolist()
        [1.0, 2.0, 3.0]
    """
    if policy not in MISSING:
        raise ValueError(f"data.missing={policy!r}; {closest(policy, MISSING)}")
    gaps = np.isnan(values)
    if not gaps.any():
        return values
    if policy == "error":
        step = int(np.argwhere(gaps)[0][0])
        raise ValueError(f"{where}: {int(gaps.sum())} missing values (the first at step {step + 1}); "
                         f"set data.missing to interpolate, ffill or zero to fill them")
    out = values.reshape(len(values), -1).copy()
    for c in range(out.shape[1]):
        col, gap = out[:, c], np.isnan(out[:, c])
        if gap.all():
            raise ValueError(f"{where}: channel {c} has no values at all")
        known = np.flatnonzero(~gap)
        if policy == "zero":
            col[gap] = 0.0
        elif policy == "interpolate":
            col[gap] = np.interp(np.flatnonzero(gap), known, col[known])
        else:    # ffill: the index of the last known value at or before each step
            last = np.maximum.accumulate(np.where(gap, -1, np.arange(len(col))))
            col[:] = col[np.where(last < 0, known[0], last)]
    return out.reshape(values.shape)


def _number(cell: str, where: str) -> float:
    if cell.strip().lower() in NA:
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{where}: '{cell}' is not a number") from None


# -----------------------------------------------------------------------------
# Readers
# -----------------------------------------------------------------------------


def column_names(text: Optional[str]) -> Optional[list[str]]:
    """data.columns ("a, b") as a list of names; None for every column."""
    return [c.strip() for c in text.split(",")] if text else None


def read_csv(path) -> tuple[list[str], list[list[str]]]:
    """A CSV's header and its data rows (blank lines skipped); at least one data row."""
    p = resolve_path(path)
    with open(p, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise ValueError(f"'{path}' holds no data rows (a header row, then one row per step)")
    return [h.strip() for h in rows[0]], rows[1:]


def read_csv_columns(path, columns: Optional[Sequence[str]] = None, *, table=None) -> tuple[np.ndarray, list[str]]:
    """The named columns of a CSV with a header row as a float array (rows, columns), NaN where
    a cell is missing; every column when columns is None. A name not in the header gets the
    closest one; a cell that is not a number names its row and column. table: the file's
    read_csv, when the caller has read it already."""
    header, rows = table or read_csv(path)
    names = list(columns) if columns else header
    for name in names:
        if name not in header:
            raise ValueError(f"'{path}' has no column '{name}'; {closest(name, header)}")
    index = [header.index(n) for n in names]
    out = np.empty((len(rows), len(names)))
    for r, row in enumerate(rows, 2):
        if len(row) != len(header):
            raise ValueError(f"'{path}', row {r}: {len(row)} cells where the header has {len(header)}")
        for j, i in enumerate(index):
            try:
                out[r - 2, j] = _number(row[i], "")
            except ValueError:
                hint = "" if columns else "; choose the numeric ones with data.columns"
                raise ValueError(f"'{path}', row {r}: column '{names[j]}' holds '{row[i]}', not a number"
                                 f"{hint}") from None
    return out, names


def read_series(path, *, columns: Optional[Sequence[str]] = None,
                missing: str = "error") -> tuple[np.ndarray, list[str]]:
    """One time series (T, C) and its channel names, from a CSV (a row per step, columns by
    name; a built-in's calendar columns are left out unless named) or .npy ((T,) or (T, C)),
    its gaps filled as `missing` says.

        >>> values, names = read_series("statsmodels:co2", columns=["co2"], missing="interpolate")  # doctest: +SKIP
        >>> values.shape, names                                                                     # doctest: +SKIP
        ((2284, 1), ['co2'])
    """
    p = resolve_path(path)
    if p.suffix.lower() in (".ts", ".npz"):
        raise ValueError(f"'{path}' holds labelled series (for classification or regression); a forecast reads "
                         f"one series from a .csv or .npy file")
    if columns and p.suffix.lower() != ".csv":
        raise ValueError(f"data.columns names CSV columns; '{path}' is not a CSV file")
    if p.suffix.lower() == ".npy":
        values = np.load(p, allow_pickle=False).astype(np.float64)
        if values.ndim not in (1, 2) or values.size == 0:
            raise ValueError(f"'{path}' holds an array of shape {values.shape}; a series is (steps,) or "
                             f"(steps, channels)")
        values = values.reshape(len(values), -1)
        names = [f"x{c}" for c in range(values.shape[1])]
    else:
        values, names = read_csv_columns(path, columns)
    if not columns and str(path) in CALENDAR:      # a built-in's dates are its index: every other column
        keep = [i for i, name in enumerate(names) if name not in CALENDAR[str(path)]]
        values, names = values[:, keep], [names[i] for i in keep]
    return fill_missing(values, missing, where=f"'{path}'"), names


def _ts_header(lines: list[str], path) -> tuple[dict, int]:
    meta = {}
    for n, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.lower() == "@data":
            return meta, n + 1
        key, _, rest = s[1:].partition(" ")
        meta[key.lower()] = rest.strip()
    raise ValueError(f"'{path}' has no @data line: not a .ts file")


def read_ts(path, *, missing: str = "error") -> tuple[list[np.ndarray], list, Optional[list[str]]]:
    """A UCR/UEA .ts file: (series, targets, class names). Each series is (T_i, C); targets are
    label strings (class names in the header's order), floats (@targetlabel true), or None
    where the header declares neither."""
    p = resolve_path(path)
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    meta, start = _ts_header(lines, path)
    classes = meta.get("classlabel", "false").split()
    names = classes[1:] if classes and classes[0].lower() == "true" else None
    regression = meta.get("targetlabel", "false").lower().startswith("true")
    labelled = names is not None or regression
    series, targets = [], []
    for n, line in enumerate(lines[start:], start + 1):
        if not line.strip():
            continue
        *dims, target = line.strip().split(":") + ([] if labelled else [None])
        if not dims:
            raise ValueError(f"'{path}', line {n}: no values before the label")
        chans = [[_number(v, f"'{path}', line {n}") for v in d.split(",")] for d in dims]
        if len({len(c) for c in chans}) != 1:
            raise ValueError(f"'{path}', line {n}: its channels have different lengths")
        x = np.array(chans).T                                                    # (T, C)
        series.append(fill_missing(x, missing, where=f"'{path}', line {n}"))
        targets.append(None if target is None else _number(target, f"'{path}', line {n}") if regression
                       else target.strip())
    if not series:
        raise ValueError(f"'{path}' holds no series")
    if names is not None:
        unknown = sorted(set(targets) - set(names))
        if unknown:
            raise ValueError(f"'{path}': label '{unknown[0]}' is not among the header's classes ({', '.join(names)})")
    return series, targets, names


def read_labelled_series(path, *, target: Optional[str] = None, columns: Optional[Sequence[str]] = None,
                         missing: str = "error", unlabelled: bool = False):
    """Series with a target each, for classification or regression: (series (T_i, C), targets,
    class names or None). From a .ts file, an .npz with arrays x ((N, T) or (N, T, C)) and y,
    or a CSV with one series per row, its target in the column `target`. unlabelled: series to
    predict may come without targets (no y in an .npz, no target column in a CSV): None each."""
    p = resolve_path(path)
    suffix = p.suffix.lower()
    if suffix not in (".ts", ".npz", ".csv"):
        raise ValueError(f"'{path}': labelled series come from a .ts, .npz or .csv file (a .npy holds one series, "
                         f"for a forecast)")
    if (columns or target) and suffix != ".csv":
        raise ValueError(f"data.columns and data.target name CSV columns; '{path}' is not a CSV file")
    if suffix == ".ts":
        return read_ts(path, missing=missing)
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f or ("y" not in f and not unlabelled):
                raise ValueError(f"'{path}' needs arrays named x (series) and y (targets); it has {', '.join(f.files)}")
            x, y = f["x"].astype(np.float64), (f["y"] if "y" in f.files else None)
        x = x[..., None] if x.ndim == 2 else x
        if x.ndim != 3 or (y is not None and len(x) != len(y)):
            raise ValueError(f"'{path}': x is {x.shape} and y {y.shape}; need x (N, T[, C]) and y (N,)")
        series = [fill_missing(s, missing, where=f"'{path}', series {i}") for i, s in enumerate(x)]
        if y is None:
            return series, [None] * len(series), None
        return series, [v.item() if y.dtype.kind == "f" else str(v) for v in y], None
    header, rows = table = read_csv(path)
    if target not in header and not unlabelled:
        if target is None:
            raise ValueError(f"'{path}': name the column of each row's label with data.target")
        raise ValueError(f"'{path}' has no column '{target}'; {closest(target, header)}")
    steps = [c for c in (columns or header) if c != target]
    values, _ = read_csv_columns(path, steps, table=table)
    labels = [row[header.index(target)].strip() for row in rows] if target in header else [None] * len(rows)
    series = [fill_missing(v[:, None], missing, where=f"'{path}', row {i + 2}") for i, v in enumerate(values)]
    return series, labels, None


# -----------------------------------------------------------------------------
# Scaling and datasets
# -----------------------------------------------------------------------------


class SeriesScaler:
    """Per-channel standardization, fitted on training data only and saved in checkpoints the
    way a tokenizer is (state() / from_state()).

        >>> s = SeriesScaler.fit([np.array([[0.0], [2.0]])])
        >>> s.transform(np.array([[2.0]])).tolist(), s.inverse(np.array([[1.0]])).tolist()
        ([[1.0]], [[2.0]])
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, *, columns: Optional[list[str]] = None):
        self.mean, self.std, self.columns = np.asarray(mean, float), np.asarray(std, float), columns

    @classmethod
    def fit(cls, series: Sequence[np.ndarray], *, columns: Optional[list[str]] = None) -> "SeriesScaler":
        steps = np.concatenate([np.asarray(s, float).reshape(len(s), -1) for s in series])
        std = steps.std(0)
        return cls(steps.mean(0), np.where(std > 1e-12, std, 1.0), columns=columns)

    @classmethod
    def identity(cls, channels: int) -> "SeriesScaler":
        """A scaler that leaves values as they are."""
        return cls(np.zeros(channels), np.ones(channels))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def check(self, values: np.ndarray, where: str) -> None:
        """A series must have the channels the model was trained on."""
        if values.shape[-1] != self.channels:
            named = f" ({', '.join(self.columns)})" if self.columns else ""
            raise ValueError(f"{where} has {values.shape[-1]} channels per step; the model was trained on "
                             f"input_dim={self.channels}{named}")

    def transform(self, values):
        return (values - self.mean) / self.std

    def inverse(self, values):
        return values * self.std + self.mean

    def state(self) -> dict:
        return {"kind": "scaler", "version": 1, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "columns": self.columns}

    @classmethod
    def from_state(cls, state: dict) -> "SeriesScaler":
        if state.get("kind") != "scaler" or state.get("version") != 1:
            raise ValueError(f"unsupported input scaler in checkpoint: {state.get('kind')!r} "
                             f"version {state.get('version')!r}")
        return cls(state["mean"], state["std"], columns=state.get("columns"))


class ForecastWindows(torch.utils.data.Dataset):
    """Every (lookback, horizon) pair of a series (T, C): item i is (x (lookback, C), y
    (horizon, C)), x the steps i.. and y the ones right after."""

    def __init__(self, values: np.ndarray, *, lookback: int, horizon: int, where: str = "the series"):
        n = len(values) - lookback - horizon + 1
        if n < 1:
            raise ValueError(f"{where} has {len(values)} steps; a forecast needs at least lookback + horizon = "
                             f"{lookback} + {horizon} = {lookback + horizon}")
        self.values = torch.as_tensor(np.asarray(values, np.float32))
        self.lookback, self.horizon, self.n = lookback, horizon, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        L = self.lookback
        return self.values[i:i + L], self.values[i + L:i + L + self.horizon]


def forecast_cut(steps: int, *, horizon: int, val_fraction: float) -> int:
    """Where a series of `steps` splits in time: the last val_fraction of it (at least one
    horizon) is validation."""
    return steps - max(horizon, round(steps * val_fraction))


def forecast_splits(values: np.ndarray, *, lookback: int, horizon: int, val_fraction: float,
                    where: str = "the series") -> tuple[ForecastWindows, ForecastWindows]:
    """Train and validation windows of one series, in time order: the last val_fraction of the
    steps are forecast only in validation (its windows look back into the training part)."""
    cut = forecast_cut(len(values), horizon=horizon, val_fraction=val_fraction)
    train = ForecastWindows(values[:cut], lookback=lookback, horizon=horizon, where=f"{where} (its training part)")
    return train, ForecastWindows(values[cut - lookback:], lookback=lookback, horizon=horizon, where=where)


class SeriesItems(torch.utils.data.Dataset):
    """(series (T_i, C) float32 tensor, target) items, scaled by a SeriesScaler. With
    time_shift=N (augmentation, for a training set) each series moves by a random number of
    steps in [-N, N], drawn anew each epoch from (seed, epoch, item): EpochBatches calls
    set_epoch, so a resumed run draws the same shifts."""

    def __init__(self, series: Sequence[np.ndarray], targets: Sequence, scaler: SeriesScaler, *,
                 time_shift: int = 0, seed: int = 0):
        self.items = [(torch.as_tensor(scaler.transform(np.asarray(s, float)), dtype=torch.float32), t)
                      for s, t in zip(series, targets)]
        self.time_shift, self.seed, self.epoch = time_shift, seed, 0

    def __len__(self):
        return len(self.items)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, i):
        x, y = self.items[i]
        if self.time_shift:
            steps = int(np.random.default_rng((self.seed, self.epoch, i)).integers(-self.time_shift, self.time_shift + 1))
            x = shifted(x, steps)
        return x, y


def shifted(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The series (T, C) moved later by steps (earlier when negative), its first or last value
    held over the steps it leaves; the length stays T.

        >>> shifted(torch.tensor([[1.], [2.], [3.], [4.]]), 1).flatten().tolist()
        [1.0, 1.0, 2.0, 3.0]
    """
    steps = max(-len(x) + 1, min(steps, len(x) - 1))
    if steps > 0:
        return torch.cat([x[:1].expand(steps, -1), x[:-steps]])
    if steps < 0:
        return torch.cat([x[-steps:], x[-1:].expand(-steps, -1)])
    return x
