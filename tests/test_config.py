"""config.load_config / parse_overrides / coerce, and the TrainConfig / SampleConfig checks."""
import dataclasses
import math
import re
from pathlib import Path
from typing import Optional

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import generate
import train
from data import DataConfig
from generate import SampleConfig
from model import TransformerConfig
from train import TrainConfig
from config import coerce, load_config, parse_overrides, saved_config

S = train.SECTIONS
REPO = Path(__file__).resolve().parents[1]


def cfg_of(*argv, **kw):
    return load_config(None, list(argv), sections=S, **kw)


# --- the two option forms and typed values -------------------------------------------

def test_equals_and_space_forms_give_the_same_config():
    a = cfg_of("--model.n_layers=3", "--training.learning_rate=3e-4", "--data.tokenizer=byte")
    b = cfg_of("--model.n_layers", "3", "--training.learning_rate", "3e-4", "--data.tokenizer", "byte")
    assert a == b
    assert a["model"].n_layers == 3 and type(a["model"].n_layers) is int
    assert a["training"].learning_rate == 3e-4 and type(a["training"].learning_rate) is float
    assert a["data"].tokenizer == "byte"


def test_parse_overrides_returns_raw_values_by_section():
    assert parse_overrides(["--model.n_layers=3", "--training.progress", "--data.path", "x y.txt",
                            "--training.compile", "false"], sections=S) == {
        "model": {"n_layers": "3"}, "training": {"progress": "true", "compile": "false"},
        "data": {"path": "x y.txt"}}


@pytest.mark.parametrize("argv, section, key, value", [
    (["--model.n_layers=12"], "model", "n_layers", 12),
    (["--training.max_iters=2e3"], "training", "max_iters", 2000),
    (["--training.learning_rate=3e-4"], "training", "learning_rate", 3e-4),
    (["--training.learning_rate=1"], "training", "learning_rate", 1.0),
    (["--model.dropout", ".25"], "model", "dropout", 0.25),
    (["--training.progress"], "training", "progress", True),
    (["--training.progress=false"], "training", "progress", False),
    (["--training.progress", "false"], "training", "progress", False),
    (["--training.progress", "OFF"], "training", "progress", False),
    (["--training.compile", "--model.n_layers=2"], "training", "compile", True),
    (["--training.compile=yes"], "training", "compile", True),
    (["--training.max_time=null"], "training", "max_time", None),
    (["--training.max_time=90"], "training", "max_time", 90.0),
    (["--model.n_kv_heads", "null"], "model", "n_kv_heads", 8),     # None: resolved to n_heads
    (["--model.n_kv_heads=2"], "model", "n_kv_heads", 2),
    (["--data.path=~"], "data", "path", "~"),                      # a string, not YAML's null
    (["--data.path=none"], "data", "path", "none"),
    (["--data.path='null'"], "data", "path", "null"),              # quoted: the string itself
    (["--model.pos_encoding=none"], "model", "pos_encoding", "none"),
    (['--model.pos_encoding="none"'], "model", "pos_encoding", "none"),
    (["--data.path=my file.txt"], "data", "path", "my file.txt"),
    (["--model.d_ff=null"], "model", "d_ff", 704),
])
def test_typed_values(argv, section, key, value):
    got = getattr(cfg_of(*argv)[section], key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("argv, match", [
    (["--model.n_layers=abc"], r"model\.n_layers \(the command line\) expects int, got 'abc'"),
    (["--model.n_layers=2.5"], r"model\.n_layers \(the command line\) expects int, got '2\.5'"),
    (["--training.learning_rate=fast"], r"training\.learning_rate \(the command line\) expects float, got 'fast'"),
    (["--training.progress=maybe"], r"training\.progress \(the command line\) expects bool, got 'maybe'"),
    (["--model.n_layers=null"], r"model\.n_layers \(the command line\) cannot be null"),
    (["--training.max_time=None"], r"training\.max_time \(the command line\) expects float, got 'None'"),
    (["--model.n_layers"], r"option '--model\.n_layers' needs a value"),
    (["--model.n_layers", "--training.seed=1"], r"option '--model\.n_layers' needs a value"),
    (["--training.progress", "maybe"], r"unexpected argument 'maybe'"),
    (["n_layers=3"], r"unexpected argument 'n_layers=3'; options look like --section\.key=value"),
])
def test_type_errors_name_the_key_and_the_bad_value(argv, match):
    with pytest.raises(ValueError, match=match):
        cfg_of(*argv)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown option '--model\.n_layer'; did you mean 'model\.n_layers'\?"):
        cfg_of("--model.n_layer=3")
    with pytest.raises(ValueError, match=r"did you mean 'training\.learning_rate'"):
        cfg_of("--training.learning_rat=1e-3")


def test_unknown_section_and_undotted_option():
    with pytest.raises(ValueError, match=r"unknown config section 'modle' in '--modle\.n_layers'; "
                                         r"did you mean 'model'\? valid: model, data, training"):
        cfg_of("--modle.n_layers=3")
    with pytest.raises(ValueError, match=r"unknown option '--n_layers'; did you mean 'model\.n_layers'"):
        cfg_of("--n_layers=3")
    with pytest.raises(ValueError, match=r"unknown option '--dropout'; did you mean 'model\.dropout' or 'lora\.dropout'\?"):
        cfg_of("--dropout=0.1")


@pytest.mark.parametrize("argv, hint", [
    (["--seq_length=64"], "options look like --section.key=value (sections: model, data, training, lora, "
                           "quantize; --help lists the keys) or an alias: --task, --data,"),
    (["--model.max_seq_len=64"], "valid: model.vocab_size, model.block_size, "),        # the section's keys
    (["--epoch=2"], "did you mean '--epochs'?"),
    (["--training.epoch=2"], "did you mean 'training.epochs'? valid: training.task, "),
])
def test_a_name_is_suggested_only_when_it_is_close(argv, hint):
    with pytest.raises(ValueError) as e:
        cfg_of(*argv, aliases=train.ALIASES)
    message = str(e.value)
    assert hint in message and ("did you mean" in hint) == ("did you mean" in message), message


def test_a_string_value_is_never_null():
    g = load_config(None, ["--prompt", "None"], sections=generate.SECTIONS, aliases=generate.ALIASES)
    assert g["sample"].prompt == "None"
    assert load_config(None, ["--checkpoint", "null"], sections=generate.SECTIONS,
                       aliases=generate.ALIASES)["sample"].checkpoint is None       # Optional: null is None


# --- the YAML file ----------------------------------------------------------------------

def test_yaml_values_are_typed_and_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layers: 3\n  dropout: 0\ntraining:\n  learning_rate: 3e-4\n"
                    "  max_iters: 1e3\n  progress: no\n  max_time: ~\n")
    cfg = load_config(str(path), sections=S)
    assert cfg["model"].n_layers == 3 and cfg["model"].dropout == 0.0
    assert cfg["training"].learning_rate == 3e-4 and cfg["training"].max_iters == 1000
    assert cfg["training"].progress is False and cfg["training"].max_time is None


def test_yaml_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 3\n")
    with pytest.raises(ValueError, match=rf"unknown key 'model\.n_layer' in {re.escape(str(path))}; "
                                         r"did you mean 'n_layers'\? valid model keys: "):
        load_config(str(path), sections=S)


@pytest.mark.parametrize("content, match", [
    ("modle:\n  n_layers: 3\n", r"unknown section 'modle' in .*c\.yaml; did you mean 'model'"),
    ("- model\n- data\n", r"c\.yaml: expected a mapping of sections, got list"),
    ("To be\tor not: to be\n: -\n", r"c\.yaml is not a YAML config \(line 1\)"),
    ("model: 3\n", r"section 'model' in .*c\.yaml must be a mapping"),
    ("training:\n  batch_size: many\n", r"training\.batch_size \(.*c\.yaml\) expects int, got 'many'"),
    ("training:\n  batch_size: 2.5\n", r"training\.batch_size \(.*c\.yaml\) expects int, got 2\.5"),
    ("training:\n  learning_rate: true\n", r"training\.learning_rate \(.*c\.yaml\) expects float, got True"),
])
def test_yaml_errors(tmp_path, content, match):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_config(str(path), sections=S)


def test_missing_and_empty_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.yaml' does not exist"):
        load_config(str(tmp_path / "nope.yaml"), sections=S)
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_config(str(tmp_path / "empty.yaml"), sections=S) == cfg_of()


# --- layers: defaults < YAML < preset < command line ------------------------------------------

def test_precedence_defaults_yaml_preset_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  n_layers: 3\n  dropout: 0.2\n"
                    "training:\n  batch_size: 4\n  learning_rate: 1e-2\n")
    cfg = load_config(str(path), ["--model.n_layers=2", "--training.learning_rate=5e-3"], sections=S,
                      presets=train.PRESETS, preset="tiny")
    m, t = cfg["model"], cfg["training"]
    tiny = train.PRESETS["tiny"]["model"]
    assert tiny["d_model"] != 64 and "n_layers" in tiny and "dropout" not in tiny
    assert m.d_model == tiny["d_model"] and m.block_size == tiny["block_size"]   # preset beats YAML
    assert m.n_layers == 2                                # command line beats preset and YAML
    assert m.dropout == 0.2 and t.batch_size == 4         # YAML beats defaults
    assert t.learning_rate == 5e-3                        # command line beats YAML
    assert m.n_heads == tiny["n_heads"] and t.seed == TrainConfig().seed and m.norm == TransformerConfig().norm


def test_base_layer_is_below_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 4\n")
    base = {"training": {"batch_size": 2, "seed": 7}, "sample": {"ignored": True}}
    cfg = load_config(str(path), ["--training.max_iters=9"], sections=S, base=base)
    assert (cfg["training"].batch_size, cfg["training"].seed, cfg["training"].max_iters) == (4, 7, 9)


def test_run_preset_sets_model_and_training_and_cli_wins():
    preset = train.PRESETS["cpu-fast"]
    cfg = cfg_of(presets=train.PRESETS, preset="cpu-fast")
    for section in ("model", "training"):
        for key, value in preset[section].items():
            assert getattr(cfg[section], key) == value, (section, key)
    assert preset["training"]["max_time"] is not None and preset["training"]["learning_rate"] != 5e-4
    cfg = cfg_of("--training.max_time=null", "--training.learning_rate=5e-4", presets=train.PRESETS,
                 preset="cpu-fast")
    assert cfg["training"].max_time is None and cfg["training"].learning_rate == 5e-4
    assert cfg["training"].batch_size == preset["training"]["batch_size"]   # the rest still applies
    assert cfg["model"].d_model == preset["model"]["d_model"]


def test_a_saved_config_loads_under_todays_checks():
    """Options a run ignored when it was saved (before they were errors) go back to defaults."""
    saved = {"quantize": {"mode": "int8", "group_size": 32}, "data": {"tokenizer": "char", "vocab_size": 300},
             "lora": {"r": 0, "alpha": 8.0}, "training": {"dropout_schedule": "constant", "dropout_final": 0.1,
                                                         "max_iters": 40}}
    cfg = cfg_of(base=saved_config(saved))
    assert cfg["quantize"].mode == "int8" and cfg["training"].max_iters == 40 and cfg["lora"].r == 0
    assert saved["quantize"]["group_size"] == 32          # the checkpoint's own dict is left alone


def test_a_budget_on_the_command_line_replaces_the_presets():
    cfg = cfg_of("--training.max_iters=1", presets=train.PRESETS, preset="cpu-fast")
    assert (cfg["training"].max_iters, cfg["training"].max_time, cfg["training"].epochs) == (1, None, None)
    cfg = cfg_of("--training.epochs=2", presets=train.PRESETS, preset="cpu-fast")
    assert (cfg["training"].max_time, cfg["training"].epochs) == (None, 2.0)
    assert cfg_of("--training.max_time=null", base={"training": {"max_iters": 7}})["training"].max_iters == 7
    cfg = cfg_of("--training.learning_rate=1e-3", presets=train.PRESETS, preset="cpu-fast")
    assert cfg["training"].max_time == train.PRESETS["cpu-fast"]["training"]["max_time"]   # no budget given


def test_lora_and_quantize_options_need_their_mode():
    with pytest.raises(ValueError, match=r"lora.alpha, lora.targets: LoRA is off \(lora.r=0\)"):
        cfg_of("--lora.alpha=8", "--lora.targets=q")
    assert cfg_of("--lora.r=4", "--lora.targets=q")["lora"].targets == ["q"]
    with pytest.raises(ValueError, match=r"quantize group_size=32 is an int4 option \(the mode here is int8\)"):
        cfg_of("--quantize.mode=int8", "--quantize.group_size=32")
    assert cfg_of("--quantize.mode=int4", "--quantize.group_size=32")["quantize"].group_size == 32


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'tinyy'; did you mean 'tiny'\?") as err:
        cfg_of(presets=train.PRESETS, preset="tinyy")
    for name in train.PRESETS:
        assert name in str(err.value)


def test_aliases():
    cfg = cfg_of("--data", "my.txt", "--device=cpu", aliases=train.ALIASES)
    assert cfg["data"].path == "my.txt" and cfg["training"].device == "cpu"
    assert cfg_of("--data=x.txt", aliases=train.ALIASES)["data"].path == "x.txt"
    with pytest.raises(ValueError, match=r"unknown option '--dat'; did you mean '--data'"):
        cfg_of("--dat=x.txt", aliases=train.ALIASES)
    g = load_config(None, ["--prompt", "ROMEO:", "--temperature", "0", "--stream", "--top_k=null"],
                    sections=generate.SECTIONS, aliases=generate.ALIASES)["sample"]
    assert (g.prompt, g.temperature, g.stream, g.top_k) == ("ROMEO:", 0.0, True, None)


def test_train_resolve_uses_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                           # no config.yaml here: defaults
    cfg, ckpt, _ = train.resolve(["--preset", "tiny", "--data", "x.txt", "--model.n_layers=1"])
    assert ckpt is None and cfg["data"].path == "x.txt"
    assert cfg["model"].n_layers == 1 and cfg["model"].d_model == train.PRESETS["tiny"]["model"]["d_model"]


# --- the repository's config.yaml -----------------------------------------------------------------

def _check_against_yaml(cfg, raw, sections):
    for section in sections:
        for key, value in raw[section].items():
            got = getattr(cfg[section], key)
            if value is None and key in ("n_kv_heads", "d_ff"):
                assert isinstance(got, int) and got > 0          # resolved from other keys
            else:
                assert got == value, (section, key, got, value)


def test_repo_config_yaml_loads_for_train_and_generate():
    path = REPO / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(str(path), sections=train.SECTIONS, other_sections=("sample",))
    _check_against_yaml(cfg, raw, ("model", "data", "training"))
    gcfg = load_config(str(path), sections=generate.SECTIONS)
    _check_against_yaml(gcfg, raw, ("model", "data", "training", "sample"))
    assert gcfg["sample"].prompt == "ROMEO:"
    with pytest.raises(ValueError, match="unknown section 'sample'"):
        load_config(str(path), sections=train.SECTIONS)
    # every key of every dataclass that the file mentions is spelled right
    for section, cls in generate.SECTIONS.items():
        assert set(raw[section]) <= {f.name for f in dataclasses.fields(cls)}


# --- coerce: properties -------------------------------------------------------------------------

@given(st.integers(-2**53, 2**53))
def test_coerce_int_round_trips(v):
    assert coerce(str(v), int, "k") == v
    assert coerce(f" {v}\n", int, "k") == v
    assert coerce(v, int, "k") == v


@given(st.integers(2**53 + 1, 2**64))     # e.g. a 64-bit --training.seed: exact, not via float
def test_coerce_large_int_strings_are_exact(v):
    assert coerce(str(v), int, "training.seed") == v
    assert coerce(str(-v), int, "training.seed") == -v


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_coerce_float_round_trips(f):
    got = coerce(repr(f), float, "k")
    assert got == f and math.copysign(1, got) == math.copysign(1, f)
    assert coerce(f, float, "k") == f


@given(st.sampled_from(["true", "yes", "on", "1", "false", "no", "off", "0"]),
       st.sampled_from([str.lower, str.upper, str.title]), st.sampled_from(["", " ", "\t"]))
def test_coerce_bool_strings(word, case, pad):
    assert coerce(pad + case(word) + pad, bool, "k") is (word in ("true", "yes", "on", "1"))


@pytest.mark.parametrize("value, typ, expected", [
    (3, float, 3.0), (2.0, int, 2), ("7", int, 7), ("1e3", int, 1000), (True, bool, True),
    (1, bool, True), ("null", Optional[int], None), (None, Optional[float], None), (5, str, "5"),
])
def test_coerce_yaml_natives(value, typ, expected):
    got = coerce(value, typ, "k")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, typ", [(True, int), (2.5, int), (False, float), ("2", bool),
                                         (None, int), ("", int), (" ", float), ("nan", int),
                                         ([1], int)])
def test_coerce_rejects(value, typ):
    with pytest.raises(ValueError, match="^where "):
        coerce(value, typ, "where")


@pytest.mark.parametrize("text", ["2.5e0", "1e-3", "1e400"])
def test_coerce_int_rejects_non_integral_exponent_strings(text):
    with pytest.raises(ValueError, match=rf"expects int, got '{re.escape(text)}'"):
        coerce(text, int, "training.max_iters")


@pytest.mark.parametrize("prompt", [" ", "\n"])
def test_whitespace_prompt_is_a_valid_str_value(tmp_path, prompt):
    cfg = load_config(None, ["--prompt", prompt], sections=generate.SECTIONS, aliases=generate.ALIASES)
    assert cfg["sample"].prompt == prompt
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"sample": {"prompt": prompt}}))
    assert load_config(str(path), sections=generate.SECTIONS)["sample"].prompt == prompt


# --- TrainConfig / SampleConfig validation ----------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lr_schedule="cosin"), r"training\.lr_schedule='cosin'; did you mean 'cosine'\? valid: cosine, linear, constant"),
    (dict(lr_schedule="Linear"), r"did you mean 'linear'"),
    (dict(precision="fp64"), r"training\.precision='fp64'; did you mean '.*valid: fp32, bf16, fp16"),
    (dict(batch_size=0), r"training\.batch_size=0 must be positive"),
    (dict(max_iters=-1), r"training\.max_iters=-1 must be positive"),
    (dict(eval_iters=0), r"training\.eval_iters=0 must be positive"),
    (dict(grad_accum_steps=0), r"training\.grad_accum_steps=0 must be positive"),
    (dict(max_time=0.0), r"training\.max_time=0\.0 must be positive seconds"),
    (dict(learning_rate=0.0), r"need learning_rate > 0"),
    (dict(min_lr_ratio=1.5), r"0 <= min_lr_ratio <= 1"),
    (dict(warmup_iters=-1), r"warmup_iters >= 0"),
    (dict(dropout_final=0.1), r"training\.dropout_final is where dropout_schedule=linear ends"),
])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_train_config_validation_through_the_command_line():
    with pytest.raises(ValueError, match=r"did you mean 'cosine'"):
        cfg_of("--training.lr_schedule=cosin")
    with pytest.raises(ValueError, match=r"data\.tokenizer='char2'; did you mean 'char'"):
        cfg_of("--data.tokenizer=char2")


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), r"temperature=-1\.0 must be >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan must be >= 0"),
    (dict(top_p=0.0), r"top_p=0\.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1\.5 must be in \(0, 1\]"),
    (dict(top_k=-1), r"top_k=-1 must be >= 0"),
    (dict(max_new_tokens=-1), r"max_new_tokens=-1 must be >= 0"),
    (dict(num_samples=0), r"num_samples=0 must be >= 1"),
    (dict(horizon=0), r"need horizon >= 1 \(or null: the model's own\) and holdout >= 0 \(got 0, 0\)"),
    (dict(holdout=-2), r"holdout >= 0 \(got None, -2\)"),
])
def test_sample_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleConfig(**kwargs)


def test_sample_config_accepts_the_edges():
    SampleConfig(temperature=0, top_k=0, top_p=1.0, max_new_tokens=0)
    SampleConfig(top_k=None, top_p=None)
    assert DataConfig(val_fraction=0.5).val_fraction == 0.5
