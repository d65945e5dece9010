"""Feature vectors and time series: the model's input layer, patches, RevIN and the forecast
head; series files, missing values and scaling; training and prediction from the command line."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import Transformer, TransformerConfig
from series import (ForecastWindows, SeriesScaler, fill_missing, read_labelled_series, read_series)
from tasks import ForecastTask
import train as train_mod
from train import TransformerTrainer
from utils import load_model

ROOT = Path(__file__).resolve().parent.parent


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def seasonal(n=600, period=12, seed=0, channels=1):
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    return (np.sin(2 * np.pi * t / period + np.arange(channels)) + 0.02 * t / period
            + 0.05 * rng.standard_normal((n, channels)))


def write_ts(path, series, labels, *, classes):
    lines = ["@problemName toy", "@timeStamps false", "@univariate false", f"@classLabel true {' '.join(classes)}",
             "@data"]
    lines += [":".join(",".join(f"{v:.5f}" for v in s[:, c]) for c in range(s.shape[1])) + f":{y}"
              for s, y in zip(series, labels)]
    Path(path).write_text("\n".join(lines) + "\n")


def test_seed_example_shapes():
    config = TransformerConfig(input_dim=7, d_model=64, output_dim=7, n_heads=4, n_layers=3, d_ff=128, dropout=0.1)
    model = Transformer(config)
    assert model(torch.randn(8, 96, 7)).shape == (8, 96, 7)
    fc = Transformer(input_dim=7, output_dim=7, head="forecast", horizon=24, d_model=32, n_heads=4, n_layers=2,
                     patch_len=8, block_size=12, revin=True)
    assert fc(torch.randn(8, 96, 7)).shape == (8, 24, 7)


@pytest.mark.parametrize("options", [dict(), dict(patch_len=4, pos_encoding="learned", n_kv_heads=1),
                                     dict(head="forecast", horizon=6, output_dim=3, pooling="none", patch_len=2)])
def test_causal_model_of_features_does_not_look_ahead(options):
    torch.manual_seed(0)
    model = Transformer(input_dim=3, d_model=32, n_heads=4, n_layers=2, block_size=32, **options).eval()
    P = options.get("patch_len", 1)
    x = torch.randn(2, 32 * P, 3)
    t = 16                                        # change every step after token t's patch
    y = x.clone()
    y[:, (t + 1) * P:] = torch.randn_like(y[:, (t + 1) * P:])
    a, b = model(x), model(y)
    assert torch.equal(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("options", [dict(patch_len=1), dict(patch_len=4, revin=True), dict(pooling="cls", patch_len=3)])
def test_padded_batch_classifies_as_rows_alone(options):
    torch.manual_seed(0)
    model = Transformer(input_dim=2, head="classification", num_classes=3, causal=False,
                        **{"pooling": "mean", **options}, d_model=32, n_heads=4, n_layers=2, block_size=31).eval()
    lengths = [30, 13, 7]
    x = torch.randn(3, 30, 2)
    mask = torch.arange(30)[None] < torch.tensor(lengths)[:, None]
    batched = model(x, attention_mask=mask)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(batched[i], model(x[i:i + 1, :n])[0], rtol=0, atol=1e-5)


def test_channel_independent_forecast_is_the_univariate_model_per_channel():
    torch.manual_seed(0)
    shape = dict(head="forecast", horizon=5, revin=True, patch_len=4, block_size=6, d_model=32, n_heads=4, n_layers=2)
    multi = Transformer(input_dim=3, output_dim=3, channel_independent=True, **shape).eval()
    uni = Transformer(input_dim=1, output_dim=1, **shape).eval()
    uni.load_state_dict(multi.state_dict())
    x = torch.randn(2, 24, 3)
    out = multi(x)
    for c in range(3):
        torch.testing.assert_close(out[..., c], uni(x[..., c:c + 1])[..., 0], rtol=0, atol=1e-5)


def test_revin_forecast_follows_the_series_scale():
    torch.manual_seed(0)
    model = Transformer(input_dim=2, output_dim=2, head="forecast", horizon=4, revin=True, d_model=32, n_heads=4,
                        n_layers=2, block_size=16).eval()
    x = torch.randn(3, 16, 2)
    torch.testing.assert_close(model(100 + 7 * x), 100 + 7 * model(x), rtol=1e-4, atol=1e-3)


def test_feature_options_and_shapes_are_checked():
    with pytest.raises(ValueError, match="set input_dim"):
        Transformer(vocab_size=10, d_model=16, n_heads=2, n_layers=1, revin=True)
    with pytest.raises(ValueError, match="needs horizon"):
        TransformerConfig(input_dim=2, head="forecast")
    with pytest.raises(ValueError, match="must equal input_dim"):
        TransformerConfig(input_dim=2, head="forecast", horizon=3, output_dim=1, revin=True)
    with pytest.raises(ValueError, match="whole series' mean"):
        TransformerConfig(input_dim=2, revin=True)            # causal outputs at every position
    model = Transformer(input_dim=3, d_model=16, n_heads=2, n_layers=1, block_size=8, patch_len=2)
    with pytest.raises(ValueError, match="input_dim=3"):
        model(torch.randn(1, 8, 2))
    with pytest.raises(ValueError, match="crop it to its last 16 steps"):
        model(torch.randn(1, 17, 3))


# -----------------------------------------------------------------------------
# Files, missing values, scaling
# -----------------------------------------------------------------------------


def test_fill_policies_and_the_default_error():
    x = np.array([[np.nan, 1.0], [2.0, np.nan], [np.nan, 5.0], [4.0, np.nan]])
    with pytest.raises(ValueError, match="2 .*missing|4 missing values .*step 1"):
        fill_missing(x, "error", where="s")
    assert fill_missing(x, "interpolate", where="s").tolist() == [[2, 1], [2, 3], [3, 5], [4, 5]]
    assert fill_missing(x, "ffill", where="s").tolist() == [[2, 1], [2, 1], [2, 5], [4, 5]]
    assert fill_missing(x, "zero", where="s").tolist() == [[0, 1], [2, 0], [0, 5], [4, 0]]


def test_csv_columns_by_name_and_bad_cells(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("date,temp,load\n1,10.5,3\n2,,4\n3,12.5,NA\n")
    with pytest.raises(ValueError, match="did you mean 'temp'"):
        read_series(f, columns=["tmep"])
    with pytest.raises(ValueError, match="missing values"):
        read_series(f, columns=["temp"])
    values, names = read_series(f, columns=["temp", "load"], missing="interpolate")
    assert names == ["temp", "load"] and values.tolist() == [[10.5, 3], [11.5, 4], [12.5, 4]]
    (tmp_path / "t.csv").write_text("day,v\nmon,1\ntue,2\n")
    with pytest.raises(ValueError, match="column 'day' holds 'mon', not a number; choose"):
        read_series(tmp_path / "t.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ValueError, match="no data rows"):
        read_series(tmp_path / "e.csv")


def test_ts_reader_variable_length_multivariate(tmp_path):
    f = tmp_path / "toy.ts"
    series = [np.arange(8.0).reshape(4, 2), np.arange(6.0).reshape(3, 2)]
    write_ts(f, series, ["b", "a"], classes=["a", "b"])
    got, labels, classes = read_labelled_series(f)
    assert classes == ["a", "b"] and labels == ["b", "a"]
    assert [g.tolist() for g in got] == [s.tolist() for s in series]


def test_scaler_round_trip_and_state():
    values = seasonal(channels=2) * [3.0, 0.1] + [50.0, -2.0]
    scaler = SeriesScaler.fit([values[:400]], columns=["a", "b"])
    z = scaler.transform(values[:400])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-9)
    np.testing.assert_allclose(scaler.inverse(scaler.transform(values)), values, atol=1e-9)
    again = SeriesScaler.from_state(scaler.state())
    np.testing.assert_array_equal(again.transform(values), scaler.transform(values))


def test_windows_need_lookback_plus_horizon():
    with pytest.raises(ValueError, match="at least lookback \\+ horizon = 10 \\+ 5 = 15"):
        ForecastWindows(np.zeros((14, 1)), lookback=10, horizon=5)
    x, y = ForecastWindows(np.arange(15.0)[:, None], lookback=10, horizon=5)[0]
    assert x[:, 0].tolist() == list(range(10)) and y[:, 0].tolist() == list(range(10, 15))


# -----------------------------------------------------------------------------
# Training and prediction
# -----------------------------------------------------------------------------


def test_forecaster_beats_seasonal_naive_and_its_checkpoint_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    values = seasonal(n=700, period=12)
    scaler = SeriesScaler.fit([values[:560]])
    z = scaler.transform(values)
    train, test = (ForecastWindows(part, lookback=24, horizon=6) for part in (z[:560], z[560 - 24:]))
    model = Transformer(input_dim=1, output_dim=1, head="forecast", horizon=6, revin=True, patch_len=4,
                        block_size=6, d_model=32, n_heads=4, n_layers=2)
    trainer = TransformerTrainer(model, learning_rate=3e-3, batch_size=32, warmup_iters=10, out_dir=str(tmp_path),
                                 input_scaler=scaler)
    trainer.train(train, epochs=4)
    pred = trainer.predict(test).numpy()
    x, y = (np.stack([np.asarray(w[i]) for w in (test[j] for j in range(len(test)))]) for i in (0, 1))
    naive = x[:, -12:][:, :6]                      # the same steps one season earlier
    assert ((pred - y) ** 2).mean() < 0.8 * ((naive - y) ** 2).mean()
    loaded, loaded_scaler = load_model(tmp_path / "last.pt")
    np.testing.assert_array_equal(loaded_scaler.mean, scaler.mean)
    batch = ForecastTask().collate([test[i] for i in range(8)])
    torch.testing.assert_close(loaded(batch["input"]), model.eval()(batch["input"]), rtol=0, atol=0)


def test_forecast_command_line_end_to_end(tmp_path):
    values = seasonal(n=400, period=12)
    lines = ["time,level,other"] + [f"{i},{v:.5f},x{i}" for i, v in enumerate(values[:, 0])]
    (tmp_path / "s.csv").write_text("\n".join(lines) + "\n")
    common = ["--training.progress=false", "--training.plot=false", f"--training.out_dir={tmp_path / 'out'}"]
    r = run("train.py", "--task", "forecast", "--data.path=s.csv", "--data.columns=level", "--horizon", "6",
            "--lookback", "24", "--model.patch_len=4", "--model.revin=true", "--model.d_model=32",
            "--model.n_layers=1", "--model.n_heads=4", "--epochs", "1", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / "out" / "best.pt"
    r = run("generate.py", "--checkpoint", ckpt, "--input", "s.csv", "--horizon", "10", "--holdout", "8",
            "--plot", "fc.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert rows[0] == "step,level,level_true" and len(rows) == 11
    assert [len(row.split(",")) for row in rows[1:]] == [3] * 8 + [2] * 2     # the truth ends with the input
    assert int(rows[1].split(",")[0]) == 400 - 8 + 1
    assert (tmp_path / "fc.png").stat().st_size > 10_000

    np.save(tmp_path / "two.npy", np.zeros((50, 2)))
    short = tmp_path / "short.csv"
    short.write_text("level\n" + "1\n" * 10)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for args, message in [(["--input", "two.npy"], "2 channels per step; the model was trained on input_dim=1"),
                          (["--input", "short.csv"], "10 steps; the model forecasts from the last lookback=24"),
                          (["--input", "empty.csv"], "holds no data rows"),
                          (["--input", "s.csv", "--horizon", "0"], "need horizon >= 1"),
                          (["--input", "s.csv", "--temperature", "0.5", "--save_attention", "a.png"],
                           "a forecast model of time series prints a forecast; it does not use --temperature, "
                           "--save_attention"),
                          ([], "--input FILE")]:
        r = run("generate.py", "--checkpoint", ckpt, *args, cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    for args, message in [(["--data.path=short.csv", "--data.columns=level"], "at least lookback + horizon"),
                          (["--data.path=s.csv", "--data.columns=other"], "column 'other' holds 'x0', not a number"),
                          (["--data.path=s.csv", "--data.columns=levle"], "did you mean 'level'")]:
        r = run("train.py", "--task", "forecast", *args, "--horizon", "6", "--lookback", "24", *common, cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_time_shift_moves_training_series_by_epoch_and_keeps_their_length():
    from series import SeriesItems, shifted
    x = torch.arange(6.0)[:, None]
    assert shifted(x, 2).flatten().tolist() == [0, 0, 0, 1, 2, 3]
    assert shifted(x, -2).flatten().tolist() == [2, 3, 4, 5, 5, 5] and shifted(x, 0) is x
    series = [np.sin(np.arange(40) / 3)[:, None] + i for i in range(20)]
    items = SeriesItems(series, list(range(20)), SeriesScaler.fit(series), time_shift=4, seed=1)
    plain = SeriesItems(series, list(range(20)), SeriesScaler.fit(series))
    first = [items[i][0] for i in range(20)]
    assert all(torch.equal(a, items[i][0]) for i, a in enumerate(first))       # one epoch: the same draws
    moved = [a for i, a in enumerate(first) if not torch.equal(a, plain[i][0])]
    assert len(moved) >= 10 and all(a.shape == (40, 1) for a in first)
    assert all(any(torch.equal(a, shifted(plain[i][0], k)) for k in range(-4, 5)) for i, a in enumerate(first))
    items.set_epoch(1)
    assert any(not torch.equal(a, items[i][0]) for i, a in enumerate(first))    # a new epoch: new draws


def test_a_two_channel_forecaster_logs_attention_and_resumes(tmp_path):
    values = seasonal(n=200, period=12, channels=2)
    (tmp_path / "two.csv").write_text("a,b\n" + "".join(f"{x:.5f},{y:.5f}\n" for x, y in values))
    common = ["--task", "forecast", "--data.path=two.csv", "--horizon", "4", "--lookback", "24", "--model.d_model=16",
              "--model.n_layers=1", "--model.n_heads=2", "--training.eval_interval=2",
              "--training.progress=false", "--training.plot=false", f"--training.out_dir={tmp_path / 'out'}"]
    r = run("train.py", *common, "--training.max_iters=2", "--training.log_attention=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("train.py", "--resume", "--training.max_iters=4", f"--training.out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row["event"] == "eval"]
    assert [row["step"] for row in evals] == [2, 4] and any("attn_entropy/L0/H1" in row for row in rows)
    here = [a.replace("two.csv", str(tmp_path / "two.csv")) for a in common]
    with pytest.raises(SystemExit, match="^error: data.time_shift: not used by training.task=forecast$"):
        train_mod.main([*here, "--data.time_shift=2"])
    with pytest.raises(SystemExit, match=r"^error: model.output_dim=3 \(the data makes it 2\): leave it to the data$"):
        train_mod.main([*here, "--model.output_dim=3"])


def test_series_classification_command_line(tmp_path):
    rng = np.random.default_rng(0)
    def make(n):
        labels = rng.integers(0, 2, n)
        series = [np.stack([y * np.sin(np.arange(m) / 2), np.ones(m)], 1) + 0.1 * rng.standard_normal((m, 2))
                  for y, m in zip(labels, rng.integers(20, 31, n))]
        return series, [["flat", "wavy"][y] for y in labels]
    write_ts(tmp_path / "train.ts", *make(60), classes=["flat", "wavy"])
    test_series, test_labels = make(20)
    write_ts(tmp_path / "test.ts", test_series, test_labels, classes=["flat", "wavy"])
    r = run("train.py", "--task", "classification", "--data.path=train.ts", "--data.val_path=test.ts",
            "--model.causal=false", "--model.pooling=mean", "--model.patch_len=2", "--data.time_shift=2", "--model.d_model=32",
            "--model.n_layers=1", "--model.n_heads=4", "--epochs", "15", "--training.batch_size=16",
            "--training.progress=false", "--training.plot=false", f"--training.out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("generate.py", "--checkpoint", tmp_path / "out" / "best.pt", "--input", "test.ts", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.strip().splitlines()]
    assert rows[0] == ["label", "flat", "wavy"] and len(rows) == 21
    assert all(math.isclose(float(a) + float(b), 1, abs_tol=2e-4) for _, a, b in rows[1:])
    assert np.mean([row[0] == y for row, y in zip(rows[1:], test_labels)]) >= 0.8
    r = run("generate.py", "--checkpoint", tmp_path / "out" / "best.pt", "--input", "test.ts", "--plot", "p.png",
            cwd=tmp_path)
    assert r.returncode == 1 and "--plot: for a forecaster; this model is a classification model" in r.stderr
    r = run("train.py", "--task", "classification", "--data.path=train.ts", "--data.val_path=test.ts",
            "--data.val_fraction=0.3", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        "error: data.val_fraction (data.val_path is the validation split): not used by training.task=classification")
    write_ts(tmp_path / "odd.ts", test_series[:2], ["flat", "round"], classes=["flat", "round"])
    r = run("generate.py", "--checkpoint", tmp_path / "out" / "best.pt", "--input", "odd.ts", cwd=tmp_path)
    assert r.returncode == 1 and "label 'round', which training never saw (flat, wavy)" in r.stderr


def test_built_in_series_names(tmp_path):
    from series import resolve_path
    with pytest.raises(FileNotFoundError, match="statsmodels:co2"):
        resolve_path("statsmodels:co3")
    if importlib.util.find_spec("statsmodels") is not None:     # the calendar is an index, not a channel
        assert read_series("statsmodels:co2", missing="interpolate")[1] == ["co2"]
        names = read_series("statsmodels:macrodata")[1]
        assert names[:2] == ["realgdp", "realcons"] and len(names) == 12
        assert read_series("statsmodels:macrodata", columns=["year", "infl"])[1] == ["year", "infl"]
    if importlib.util.find_spec("aeon") is None:
        pytest.skip("aeon is not installed (requirements-extras.txt)")
    assert resolve_path("aeon:GunPoint_TEST").name == "GunPoint_TEST.ts"
    with pytest.raises(FileNotFoundError, match="did you mean 'aeon:GunPoint'"):
        resolve_path("aeon:GunPiont")
    series, labels, classes = read_labelled_series("aeon:JapaneseVowels")
    assert len(series) == 270 and classes == [str(i) for i in range(1, 10)]
    assert {s.shape[1] for s in series} == {12} and len({len(s) for s in series}) > 5


def test_series_regression_from_npz_and_unlabelled_prediction(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24)).cumsum(1) * 0.3
    y = x.mean(1)
    np.savez(tmp_path / "r.npz", x=x, y=y)
    np.savez(tmp_path / "new.npz", x=x[:40])              # no targets: only predictions
    r = run("train.py", "--task", "regression", "--data.path=r.npz", "--model.causal=false", "--model.pooling=mean",
            "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=4", "--epochs", "20",
            "--training.progress=false", "--training.plot=false", f"--training.out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("generate.py", "--checkpoint", tmp_path / "out" / "best.pt", "--input", "new.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert rows[0] == "output_0" and len(rows) == 41
    assert np.corrcoef([float(v) for v in rows[1:]], y[:40])[0, 1] > 0.9


def test_label_smoothing_is_the_smoothed_cross_entropy_and_refused_where_it_means_nothing():
    torch.manual_seed(0)
    model = Transformer(input_dim=2, head="classification", num_classes=3, causal=False, pooling="mean",
                        d_model=16, n_heads=2, n_layers=1, block_size=8)
    items = [(torch.randn(8, 2), i % 3) for i in range(6)]
    trainer = TransformerTrainer(model, label_smoothing=0.2)
    batch = trainer.task.collate(items)
    logp = torch.log_softmax(model(batch["input"], attention_mask=batch["attention_mask"]), -1)
    expected = -(0.8 * logp.gather(1, batch["target"][:, None]).squeeze(1) + 0.2 * logp.mean(1)).mean()
    torch.testing.assert_close(trainer.task.loss(model, batch), expected)
    fc = Transformer(input_dim=1, output_dim=1, head="forecast", horizon=2, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match="the forecast task's loss is not one"):
        TransformerTrainer(fc, label_smoothing=0.1)


def test_review_cases_of_series_runs(tmp_path):
    """Options a run would ignore, mixed kinds, unlabelled and numeric labels, flatten pooling,
    a forecast head that would see its targets, and a quantized series checkpoint."""
    with pytest.raises(ValueError, match="needs causal=True"):
        TransformerConfig(input_dim=1, output_dim=1, head="forecast", horizon=3, pooling="none", causal=False)
    torch.manual_seed(0)
    flat = Transformer(input_dim=2, head="classification", num_classes=2, causal=False, pooling="flatten",
                       d_model=16, n_heads=2, n_layers=1, block_size=10).eval()
    x, mask = torch.randn(2, 10, 2), torch.arange(10)[None] < torch.tensor([[10], [4]])
    torch.testing.assert_close(flat(x, attention_mask=mask)[1], flat(x[1:, :4])[0], rtol=0, atol=1e-5)

    f = tmp_path / "u.ts"
    f.write_text("@problemName u\n@univariate false\n@data\n1,2,3:4,5,6\n7,8,9:1,2,3\n")
    series, labels, _ = read_labelled_series(f, unlabelled=True)
    assert [s.shape for s in series] == [(3, 2), (3, 2)] and labels == [None, None]
    (tmp_path / "bom.csv").write_text("\ufeffdate,v\n1,2\n2,3\n", encoding="utf-8")
    assert read_series(tmp_path / "bom.csv", columns=["v"])[0].tolist() == [[2], [3]]

    rng = np.random.default_rng(0)
    y = np.arange(120) % 11
    x = rng.standard_normal((120, 12)) * 0.1 + y[:, None]
    np.savez(tmp_path / "c.npz", x=x, y=y)
    np.save(tmp_path / "s.npy", seasonal(n=300))
    common = ["--model.d_model=16", "--model.n_layers=1", "--model.n_heads=2", "--training.progress=false",
              "--training.plot=false"]
    r = run("train.py", "--task", "classification", "--data.path=c.npz", "--model.causal=false", "--epochs", "1",
            *common, f"--training.out_dir={tmp_path / 'clf'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from utils import load_checkpoint
    assert load_checkpoint(tmp_path / "clf" / "best.pt")["task"]["labels"] == [str(i) for i in range(11)]
    for args, message in [
            (["--task", "classification", "--data.path=c.npz", "--horizon", "3"], "model.horizon: not used by"),
            (["--task", "classification", "--data.path=c.npz", "--data.columns=a"], "not a CSV file"),
            (["--task", "forecast", "--data.path=s.npy", "--horizon", "3", "--data.val_path=c.npz"],
             "data.val_path: not used by training.task=forecast"),
            (["--task", "forecast", "--data.path=c.npz", "--horizon", "3"], "holds labelled series"),
            (["--task", "forecast", "--data.path=s.npy", "--horizon", "290", "--lookback", "8"],
             "needs at least lookback + horizon"),
            (["--task", "forecast", "--data.path=s.npy", "--horizon", "3", "--lookback", "12",
              f"--init_from={tmp_path / 'lm.pt'}"], "holds a model of tokens")]:
        if "lm.pt" in args[-1] and not (tmp_path / "lm.pt").exists():
            lm = Transformer(vocab_size=20, d_model=16, n_heads=2, n_layers=1, block_size=16)
            from utils import save_model_weights_only
            from data import ByteTokenizer
            save_model_weights_only(lm, tmp_path / "lm.pt", tokenizer=ByteTokenizer())
        r = run("train.py", *args, *common, f"--training.out_dir={tmp_path / 'x'}", cwd=tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)

    r = run("train.py", "--task", "forecast", "--data.path=s.npy", "--horizon", "6", "--lookback", "24",
            "--model.patch_len=4", "--model.revin=true", "--epochs", "1", *common,
            f"--training.out_dir={tmp_path / 'fc'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("utils.py", "quantize", "--checkpoint", tmp_path / "fc" / "best.pt", "--mode", "int8", "--out", "q8.pt",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    outputs = [run("generate.py", "--checkpoint", ckpt, "--input", "s.npy", cwd=tmp_path)
               for ckpt in (tmp_path / "fc" / "best.pt", tmp_path / "q8.pt")]
    assert all(o.returncode == 0 for o in outputs), outputs[1].stderr
    full, quantized = (np.array([row.split(",") for row in o.stdout.split()[1:]], float) for o in outputs)
    assert full.shape == quantized.shape == (6, 2) and np.abs(full - quantized).max() < 0.05
