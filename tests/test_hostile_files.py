"""Every entry point that reads a checkpoint, fed every kind of bad file: a pickle that would run
code, a truncated checkpoint, random bytes, an empty file, a directory, another program's
torch.save, and an adapter whose base is hostile. Each gets one line, a non-zero exit, no
traceback, and no code from the file runs."""
import os
import shutil
from pathlib import Path

import pytest
import torch

import generate
import train as train_mod
import utils
from conftest import make_run_config


class RunsCode:
    """Unpickling this would create a directory: weights_only=True must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A trained base checkpoint, a LoRA adapter on it, and the text they trained on."""
    root = tmp_path_factory.mktemp("good")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    base = train_mod.train(make_run_config(root, "--training.max_iters=10", "--training.eval_interval=10",
                                           data=text, out_dir=root / "base"))
    adapter = train_mod.train(make_run_config(root, "--training.max_iters=10", "--training.eval_interval=10",
                                              f"--training.init_from={Path(base['out_dir']) / 'best.pt'}",
                                              "--lora.r=2", data=text, out_dir=root / "lora"))
    return Path(base["out_dir"]) / "best.pt", Path(adapter["out_dir"]) / "best.pt", text


def make_bad(kind: str, tmp_path: Path, good) -> Path:
    base, adapter, _ = good
    path = tmp_path / "bad.pt"
    if kind == "runs code":
        torch.save({"format": "mini-transformer", "model": RunsCode(str(tmp_path / "pwned"))}, path)
    elif kind == "truncated":
        path.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "another program's":
        torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, path)
    elif kind == "adapter with a hostile base":
        hostile = tmp_path / "hostile_base.pt"
        torch.save({"format": "mini-transformer", "model": RunsCode(str(tmp_path / "pwned"))}, hostile)
        ckpt = utils.load_checkpoint(adapter)
        ckpt["lora"]["base"] = {"path": str(hostile), "sha256": utils.file_sha256(hostile)}
        utils.save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return path


def entry_points(bad: Path, tmp_path: Path, good) -> dict:
    """(module, argv) of every command that reads a checkpoint, with `bad` where it reads one."""
    base, _, text = good
    tiny = ["--model.n_layers=2", "--model.d_model=32", "--model.n_heads=4", "--model.block_size=16",
            "--training.max_iters=2", "--training.progress=false", "--training.plot=false", "--device", "cpu"]
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / "last.pt").symlink_to(bad)
    return {
        "generate.py --checkpoint": (generate, ["--checkpoint", bad, "--max_new_tokens", "3"]),
        "generate.py --lora": (generate, ["--checkpoint", base, "--lora", bad, "--max_new_tokens", "3"]),
        "generate.py --draft_checkpoint": (generate, ["--checkpoint", base, "--draft_checkpoint", bad,
                                                      "--max_new_tokens", "3"]),
        "train.py --init_from": (train_mod, ["--data", text, "--init_from", bad, *tiny,
                                             f"--training.out_dir={tmp_path / 'ft'}"]),
        "train.py --resume": (train_mod, ["--resume", *tiny, f"--training.out_dir={resume_dir}"]),
        "utils.py quantize": (utils, ["quantize", "--checkpoint", bad, "--mode", "int8", "--out", tmp_path / "q.pt"]),
        "utils.py merge-lora": (utils, ["merge-lora", "--lora", bad, "--out", tmp_path / "m.pt"]),
        "utils.py export": (utils, ["export", "--checkpoint", bad, "--format", "hf", "--out", tmp_path / "hf"]),
    }


KINDS = ["runs code", "truncated", "random bytes", "empty", "directory", "another program's",
         "adapter with a hostile base"]
ENTRY_POINTS = ["generate.py --checkpoint", "generate.py --lora", "generate.py --draft_checkpoint",
                "train.py --init_from", "train.py --resume", "utils.py quantize", "utils.py merge-lora",
                "utils.py export"]


REASONS = {"runs code": "makedirs); refused, since loading them could run code",
           "truncated": "is not a loadable checkpoint", "random bytes": "is not a loadable checkpoint",
           "empty": "is empty, not a checkpoint", "directory": "is a directory, not a checkpoint",
           "another program's": "is not a Mini Transformer checkpoint",
           "adapter with a hostile base": ""}      # refused where the adapter is read, or where its base is


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_bad_checkpoint_is_one_line_and_runs_nothing(entry, kind, good, tmp_path, capsys):
    bad = make_bad(kind, tmp_path, good)
    module, argv = entry_points(bad, tmp_path, good)[entry]
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    message = str(e.value.code)
    assert e.value.code not in (0, None) and message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()                  # nothing in the file ran
    assert REASONS[kind] in message, message
    shutil.rmtree(tmp_path / "resume", ignore_errors=True)
