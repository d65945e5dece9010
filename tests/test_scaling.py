"""Training that scales: precision, torch.compile, gradient checkpointing, DDP and FSDP
(2 CPU processes under torchrun with gloo, against 1 process with the same global batch)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import train as train_mod
from model import Transformer
from train import TrainConfig, wrap_distributed
from utils import load_checkpoint, model_from_checkpoint, read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = ("--training.max_iters=10", "--training.eval_interval=5", "--training.log_interval=1")


def train_rows(out_dir) -> dict:
    """{step: (train loss, grad norm)}; a step logged twice keeps its latest row."""
    return {r["step"]: (r["train_loss"], r["grad_norm"]) for r in read_jsonl(Path(out_dir) / "log.jsonl")
            if r["event"] == "train"}


# --- precision --------------------------------------------------------------------------------------

def test_bf16_autocast_trains_on_cpu_close_to_fp32(run_config, tmp_path):
    fp32 = train_mod.train(run_config(*SHORT, out_dir=tmp_path / "fp32"))
    bf16 = train_mod.train(run_config(*SHORT, "--training.precision=bf16", out_dir=tmp_path / "bf16"))
    assert bf16["step"] == 10
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], rel=0.02)
    assert bf16["final_val_loss"] != fp32["final_val_loss"]            # it did run in bf16
    ckpt = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())   # the weights stay float32


def test_impossible_precisions_are_clear_errors(run_config, monkeypatch):
    with pytest.raises(ValueError, match=r"precision=fp16 needs CUDA or MPS; on CPU use bf16 or fp32"):
        train_mod.train(run_config("--training.precision=fp16"))
    with pytest.raises(ValueError, match=r"training\.precision='fp8'; valid: fp32, bf16, fp16"):
        run_config("--training.precision=fp8")
    monkeypatch.setattr(train_mod, "rank_and_world", lambda: (0, 2))       # as if under torchrun
    model = Transformer(vocab_size=40, d_model=32, n_heads=4, n_layers=2, block_size=16)
    with pytest.raises(ValueError, match=r"distributed=fsdp does not support precision=fp16; use bf16"):
        wrap_distributed(model, TrainConfig(distributed="fsdp", precision="fp16"), "cuda")


# --- torch.compile ------------------------------------------------------------------------------------

def test_compile_failing_at_its_first_call_falls_back_to_eager(run_config, tmp_path, monkeypatch, capsys):
    """torch.compile itself never fails: the compiler runs, and fails, when the model is first called."""
    args = (*SHORT, "--model.dropout=0.1")
    eager = train_mod.train(run_config(*args, out_dir=tmp_path / "eager"))

    def compile_that_fails_when_called(module, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", compile_that_fails_when_called)
    fallback = train_mod.train(run_config(*args, "--training.compile=true", out_dir=tmp_path / "fallback"))
    assert "warning: torch.compile failed (RuntimeError: InductorError: no working C++ compiler); training " \
           "without it" in capsys.readouterr().err
    # the trial call left no trace: same random streams, no stray gradients
    assert fallback["final_val_loss"] == eager["final_val_loss"]
    assert train_rows(tmp_path / "fallback") == train_rows(tmp_path / "eager")


def test_compiled_training_matches_eager(run_config, tmp_path, monkeypatch):
    """The real torch.compile path with dynamo's "eager" backend: graph capture of the whole
    model and training loop, without the minute an inductor C++ build takes on a small CPU."""
    eager = train_mod.train(run_config(*SHORT, out_dir=tmp_path / "eager"))
    real_compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or real_compile(m, backend="eager"))
    torch._dynamo.reset()
    result = train_mod.train(run_config(*SHORT, "--training.compile=true", out_dir=tmp_path / "compiled"))
    assert len(compiled) == 1 and isinstance(compiled[0], Transformer)
    assert result["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-5)
    assert not any(k.startswith("_orig_mod.") for k in load_checkpoint(tmp_path / "compiled" / "last.pt")["model"])


# --- gradient checkpointing -----------------------------------------------------------------------------

def test_gradient_checkpointing_trains_the_same_run(run_config, tmp_path):
    args = (*SHORT, "--model.dropout=0.1")      # the recomputation must draw the same dropout masks
    plain = train_mod.train(run_config(*args, out_dir=tmp_path / "plain"))
    ckpt = train_mod.train(run_config(*args, "--training.gradient_checkpointing=true", out_dir=tmp_path / "ckpt"))
    assert ckpt["final_val_loss"] == plain["final_val_loss"]
    assert train_rows(tmp_path / "ckpt") == train_rows(tmp_path / "plain")     # bit for bit on CPU


# --- DDP and FSDP: 2 processes (torchrun, gloo) against 1 ------------------------------------------------

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build")


def torchrun(*args, timeout=300):
    """train.py as 2 CPU processes; each uses one thread, as the in-process runs do."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           "train.py", "--config", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_curve(a, b):
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step


@needs_gloo
def test_ddp_on_2_processes_matches_1_process_with_the_same_global_batch(run_config, tmp_path):
    # 1 process: 8 sequences per micro-batch; 2 ranks: 4 each. Accumulating 2 micro-batches
    # exercises no_sync.
    args = (*SHORT, "--training.grad_accum_steps=2")
    single = train_mod.train(run_config(*args, "--training.batch_size=8", out_dir=tmp_path / "single"))
    proc = torchrun(tmp_path / "single" / "config.yaml", f"--training.out_dir={tmp_path / 'ddp'}",
                    "--training.batch_size=4")
    assert "device cpu x 2 (ddp)" in proc.stdout and proc.stdout.count("final_val_loss") == 1   # rank 0 speaks
    assert_same_curve(train_rows(tmp_path / "ddp"), train_rows(tmp_path / "single"))
    rows = read_jsonl(tmp_path / "ddp" / "log.jsonl")
    assert [r["world_size"] for r in rows if r["event"] == "start"] == [2]        # one writer
    evals = {r["step"]: r["val_loss"] for r in rows if r["event"] == "eval"}
    single_evals = {r["step"]: r["val_loss"] for r in read_jsonl(tmp_path / "single" / "log.jsonl")
                    if r["event"] == "eval"}
    assert evals.keys() == single_evals.keys() == {5, 10}
    assert list(evals.values()) == pytest.approx(list(single_evals.values()), rel=1e-5)
    assert rows[-1]["final_val_loss"] == pytest.approx(single["final_val_loss"], rel=1e-5)
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert not any(k.startswith("module.") for k in ckpt["model"])          # the plain model's keys
    assert len(ckpt["rng"]["ranks"]) == 2                                  # each rank's dropout stream


@needs_gloo
def test_fsdp_resumes_a_1_process_checkpoint_and_continues_its_curve(run_config, tmp_path):
    """1 process trains 10 steps; from its last.pt, 1 process and 2 FSDP ranks (with gradient
    checkpointing and accumulation) both train to step 20 and must agree. The FSDP run writes
    a plain checkpoint."""
    args = (*SHORT, "--training.grad_accum_steps=2", "--training.batch_size=8")
    train_mod.train(run_config(*args, out_dir=tmp_path / "single"))
    shutil.copytree(tmp_path / "single", tmp_path / "fsdp")
    more = run_config(*args, "--training.max_iters=20", out_dir=tmp_path / "single")
    train_mod.train(more, resume_from=load_checkpoint(tmp_path / "single" / "last.pt"))
    proc = torchrun(tmp_path / "single" / "config.yaml", f"--training.out_dir={tmp_path / 'fsdp'}", "--resume",
                    "--training.max_iters=20", "--training.batch_size=4", "--training.distributed=fsdp",
                    "--training.gradient_checkpointing=true")
    assert "device cpu x 2 (fsdp)" in proc.stdout and proc.stdout.count("resuming from step 10") == 1
    assert_same_curve(train_rows(tmp_path / "fsdp"), train_rows(tmp_path / "single"))
    single, sharded = load_checkpoint(tmp_path / "single" / "last.pt"), load_checkpoint(tmp_path / "fsdp" / "last.pt")
    assert sharded["step"] == 20 and sharded["model"].keys() == single["model"].keys()
    for name, tensor in sharded["model"].items():             # full tensors, not DTensor shards
        assert type(tensor) is torch.Tensor and tensor.shape == single["model"][name].shape
        assert torch.allclose(tensor, single["model"][name], rtol=1e-4, atol=1e-6), name
    for state, ref in zip(sharded["optimizer"]["state"].values(), single["optimizer"]["state"].values()):
        assert state["exp_avg"].shape == ref["exp_avg"].shape
    model_from_checkpoint(sharded)                            # generate.py can load it


CLASSIFIER_RUN = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from model import Transformer
from train import TransformerTrainer, rank_and_world
g = torch.Generator().manual_seed(1)
items = [(torch.randint(1, 20, (int(n),), generator=g), 0) for n in torch.randint(3, 12, (64,), generator=g)]
items = [(x, int(x[0]) % 3) for x, _ in items]     # learnable: the class is the first token mod 3
torch.manual_seed(0)
model = Transformer(vocab_size=20, d_model=16, n_heads=2, n_layers=1, block_size=16, dropout=0.0,
                    head="classification", num_classes=3, pooling="mean")
trainer = TransformerTrainer(model, batch_size=int(sys.argv[1]), learning_rate=1e-2, warmup_iters=0)
history = trainer.train(items, epochs=3, val_dataset=items[:37])
result = {"history": history, "eval": trainer.evaluate(items[:37]), "step": trainer.step}
if rank_and_world()[0] == 0:
    print(json.dumps(result))
"""


@needs_gloo
def test_ddp_trains_a_classifier_on_a_map_style_dataset_like_1_process(tmp_path):
    """TransformerTrainer on (tokens, label) pairs under torchrun: the same history as 1 process
    with the same global batch, and metrics over a validation set of 37 items (uneven over the
    ranks) equal to those of the whole set in one process (macro-F1 is not a mean of shards)."""
    import json
    script = tmp_path / "classify.py"
    script.write_text(CLASSIFIER_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *cmd: subprocess.run([sys.executable, *cmd], capture_output=True, text=True,  # noqa: E731
                                      timeout=300, env=env, cwd=tmp_path)
    single = run(str(script), "8", str(REPO))
    two = run("-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), "4", str(REPO))
    assert single.returncode == 0 and two.returncode == 0, single.stderr[-3000:] + two.stderr[-3000:]
    one, both = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (single, two))
    assert both["step"] == one["step"] == 24
    assert len(both["history"]) == len(one["history"]) == 3
    for a, b in zip(both["history"], one["history"]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert both["eval"] == pytest.approx(one["eval"], rel=1e-5, abs=1e-6)
    assert one["eval"]["accuracy"] > 0.5                       # it learned something to compare


@needs_gloo
def test_ddp_trains_an_encoder_decoder_like_1_process(tmp_path):
    """python train.py --task seq2seq under torchrun: padded pairs of every length, split over
    2 ranks, give the curve of 1 process with the same global batch (the loss is a mean over
    the global batch's target tokens, not a mean of the ranks' means)."""
    import random
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    (tmp_path / "pairs.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    single = tmp_path / "single"
    train_mod.main(["--task", "seq2seq", "--data", str(tmp_path / "pairs.tsv"), "--model.n_layers=2",
                    "--model.d_model=32", "--model.n_heads=4", "--model.block_size=16", "--model.dropout=0",
                    "--training.learning_rate=3e-3", "--training.batch_size=8", "--training.grad_accum_steps=2",
                    "--training.progress=false", "--training.plot=false", "--device", "cpu",
                    f"--training.out_dir={single}", *SHORT])
    proc = torchrun(single / "config.yaml", f"--training.out_dir={tmp_path / 'ddp'}", "--training.batch_size=4")
    assert "device cpu x 2 (ddp)" in proc.stdout
    assert_same_curve(train_rows(tmp_path / "ddp"), train_rows(single))
    evals = [{r["step"]: r["val_loss"] for r in read_jsonl(d / "log.jsonl") if r["event"] == "eval"}
             for d in (tmp_path / "ddp", single)]
    assert evals[0].keys() == {5, 10} and list(evals[0].values()) == pytest.approx(list(evals[1].values()), rel=1e-5)


@needs_gloo
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_qlora_fine_tune_on_2_processes_matches_1_process(run_config, tmp_path, distributed):
    """LoRA adapters on a frozen int8 base (QLoRA) under torchrun: the same curve as 1
    process with the same global batch, and an adapter checkpoint of only the LoRA weights."""
    train_mod.train(run_config(*SHORT, out_dir=tmp_path / "base"))
    args = (*SHORT, f"--training.init_from={tmp_path / 'base' / 'best.pt'}", "--lora.r=4", "--quantize.mode=int8")
    train_mod.train(run_config(*args, "--training.batch_size=8", out_dir=tmp_path / "single"))
    proc = torchrun(tmp_path / "single" / "config.yaml", f"--training.out_dir={tmp_path / 'two'}",
                    "--training.batch_size=4", f"--training.distributed={distributed}")
    assert f"device cpu x 2 ({distributed})" in proc.stdout
    assert_same_curve(train_rows(tmp_path / "two"), train_rows(tmp_path / "single"))
    adapter = load_checkpoint(tmp_path / "two" / "last.pt")
    assert adapter["model"] and all(".lora_" in k for k in adapter["model"])
    assert adapter["quantize"]["mode"] == "int8" and adapter["lora"]["base"]["path"] == str(tmp_path / "base" / "best.pt")
