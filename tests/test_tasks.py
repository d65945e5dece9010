"""The backbone with heads, and TransformerTrainer on every task: classification and regression
on real text (Shakespeare's plays), exact resume, LoRA on a classifier, old checkpoints."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from data import BPETokenizer, CharTokenizer, EncodedTexts, shakespeare_genres
from model import NgramEmbedding, Transformer, TransformerConfig, apply_lora, LoRAConfig, lora_state_dict
from tasks import ClassificationTask, RegressionTask, macro_f1
import train as train_mod
from train import TransformerTrainer
from utils import CHECKPOINT_FORMAT, load_checkpoint, load_model, read_jsonl, save_checkpoint
import generate
from conftest import REPO


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(**{**dict(vocab_size=40, d_model=32, n_heads=4, n_layers=2, block_size=64), **kw})


@pytest.mark.parametrize("causal,pooling,ngram_buckets", [(True, "last", 0), (True, "mean", 0), (False, "mean", 0),
                                                          (False, "cls", 0), (False, "none", 0), (False, "mean", 64),
                                                          (False, "cls", 64)])
def test_a_padded_batch_equals_its_rows_alone(causal, pooling, ngram_buckets):
    model = tiny(causal=causal, head="regression", output_dim=3, pooling=pooling,
                 ngram_buckets=ngram_buckets).double().eval()
    a, b = torch.randint(1, 40, (1, 7)), torch.randint(1, 40, (1, 4))
    for batch, mask in (                       # right padding, then left padding
            (torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)]), [[1] * 7, [1] * 4 + [0] * 3]),
            (torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)]), [[1] * 7, [0] * 3 + [1] * 4])):
        out = model(batch, attention_mask=torch.tensor(mask))
        alone = model(b)[0]
        got = out[1] if pooling != "none" else out[1][torch.tensor(mask[1], dtype=torch.bool)]
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[0], model(a)[0], rtol=0, atol=1e-12)


def test_ngram_embeddings_read_the_four_tokens_ending_at_each_position():
    emb = NgramEmbedding(4096, 8)
    x = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    y = x.clone()
    y[0, 5] = 7
    changed = (emb(x) - emb(y)).abs().amax(-1)[0] > 0
    assert changed.tolist() == [i in (5, 6, 7, 8) for i in range(12)]      # the 2-, 3- and 4-grams over position 5
    out = emb(torch.tensor([[1, 2, 3, 4, 9, 1, 2, 3, 4]]))[0]
    torch.testing.assert_close(out[3], out[8], rtol=0, atol=0)             # the same 4 tokens, the same vector
    assert not torch.equal(out[2], out[7])              # 1 2 3 at the start, 9 1 2 3 later: another 4-gram


def test_ngram_buckets_are_for_classifiers_and_regressors_of_tokens():
    with pytest.raises(ValueError, match="ngram_buckets embeds n-grams of token ids for head=classification or "
                                         "regression; this model has head=lm"):
        tiny(ngram_buckets=64)
    with pytest.raises(ValueError, match="this model has head=lm"):
        tiny(ngram_buckets=64, head="classification", num_classes=2).set_head(head="lm")
    with pytest.raises(ValueError, match="ngram_buckets must be a whole number"):
        TransformerConfig(ngram_buckets=-1)


def test_causal_false_lets_early_positions_see_later_tokens():
    x = torch.randint(0, 40, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 40
    for causal in (True, False):
        h = tiny(causal=causal).hidden_states
        changed = (h(x) - h(y)).abs().amax(-1)[0, :-1] > 1e-6
        assert changed.any() == (not causal)


def test_hidden_states_are_what_the_lm_head_reads():
    model = tiny().eval()
    x = torch.randint(0, 40, (2, 9))
    h = model.hidden_states(x)
    assert h.shape == (2, 9, 32)
    torch.testing.assert_close(model(x), model.lm_head(h))


def test_the_lm_state_dict_keys_are_unchanged():
    keys = set(tiny().state_dict())
    assert {"tok_emb.weight", "norm_f.weight", "lm_head.weight", "blocks.0.attn.wqkv.weight",
            "blocks.1.mlp.w2.weight"} <= keys and not any(k.startswith(("head.", "cls_emb")) for k in keys)


@pytest.mark.parametrize("kwargs,match", [
    (dict(head="clasification", num_classes=3), "did you mean 'classification'"),
    (dict(head="classification"), "num_classes >= 2"),
    (dict(head="regression", pooling="cls"), "pooling=cls needs causal=False"),
    (dict(pooling="avg"), "valid: last, mean, cls, flatten, none"),
])
def test_head_config_errors_are_clear(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def test_seed_002_classification_head_example_adapted():
    """Seed 002's ClassificationModel, on hidden states instead of the LM logits."""
    class ClassificationModel(torch.nn.Module):
        def __init__(self, transformer, num_classes):
            super().__init__()
            self.transformer = transformer
            self.classifier = torch.nn.Linear(transformer.config.d_model, num_classes)

        def forward(self, idx):
            features = self.transformer.hidden_states(idx)[:, -1, :]      # last token representation
            return self.classifier(features)

    out = ClassificationModel(tiny(), 5)(torch.randint(0, 40, (3, 10)))
    assert out.shape == (3, 5)


def test_macro_f1_against_hand_computed():
    pred, target = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 2, 0])
    f1 = [2 * 1 / (2 + 1 + 1), 2 * 1 / (2 + 0 + 1), 2 * 2 / (4 + 1 + 0)]   # per class: 2TP/(2TP+FP+FN)
    assert macro_f1(pred, target, 3) == pytest.approx(np.mean(f1))


@pytest.fixture(scope="module")
def genres():
    """Shakespeare passages by genre (real labelled text), a random split of a small sample,
    in a BPE learned from the training passages (words make genre learnable in seconds)."""
    split = shakespeare_genres(chars=256)
    items = split["train"] + split["test"]
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(items))[:2400]
    items = [items[i] for i in pick]
    tok = BPETokenizer.train([t for t, _ in items[:2000]], vocab_size=1024)
    return EncodedTexts(items[:2000], tok), EncodedTexts(items[2000:], tok), tok, split["labels"]


def test_a_classifier_trained_through_the_trainer_beats_the_majority_class(genres):
    train, test, tok, labels = genres
    model = tiny(vocab_size=tok.vocab_size, block_size=256, d_model=64, causal=False, head="classification",
                 num_classes=3, pooling="mean")
    trainer = TransformerTrainer(model, task=ClassificationTask(3, labels=labels), learning_rate=3e-3,
                                 batch_size=32, warmup_iters=10)
    history = trainer.train(train, epochs=2, val_dataset=test)
    assert [h["epoch"] for h in history] == [1.0, 2.0]                       # one evaluation per epoch
    metrics = trainer.evaluate(test)
    majority = np.bincount([y for _, y in train.pairs], minlength=3).argmax()
    majority_acc = np.mean([y == majority for _, y in test.pairs])
    assert metrics["accuracy"] > majority_acc + 0.05, (metrics, majority_acc)
    probs = trainer.predict(test)
    assert probs.shape == (len(test), 3) and torch.allclose(probs.sum(1), torch.ones(len(test)))
    acc = (probs.argmax(1) == torch.tensor([y for _, y in test.pairs])).double().mean().item()
    assert acc == pytest.approx(metrics["accuracy"])


def test_per_position_regression_learns_a_property_of_real_text(genres):
    """Target at every token: how many characters it spans (padding never counts); the trained
    model beats predicting the mean."""
    train, test, tok, _ = genres

    def lengths(ds):
        items = [ds[i][0] for i in range(len(ds))]
        return [(ids, torch.tensor([[len(tok.decode([t]))] for t in ids.tolist()], dtype=torch.float32))
                for ids in items]
    train_r, test_r = lengths(train), lengths(test)
    model = tiny(vocab_size=tok.vocab_size, block_size=256, head="regression", pooling="none")
    trainer = TransformerTrainer(model, task=RegressionTask(), learning_rate=1e-2, batch_size=32, warmup_iters=10)
    trainer.train(train_r, epochs=3)
    values = torch.cat([y for _, y in train_r])
    baseline = torch.cat([y for _, y in test_r]).sub(values.mean()).pow(2).mean().item()
    got = trainer.evaluate(test_r)
    assert got["mse"] < 0.5 * baseline and got["mae"] < math.sqrt(baseline)
    assert trainer.predict(test_r[:3])[0].shape == (len(test_r[0][0]), 1)


def test_an_epoch_run_resumed_from_last_pt_ends_as_the_straight_run(genres, tmp_path, monkeypatch):
    train, test, tok, _ = genres
    small = EncodedTexts(train.pairs[:256], tok)

    def run(out, resume=None):
        model = tiny(vocab_size=tok.vocab_size, block_size=256, head="classification", num_classes=3, dropout=0.1)
        trainer = TransformerTrainer(model, learning_rate=3e-3, batch_size=32, out_dir=str(out), eval_interval=3)
        if resume:
            trainer.resume(resume)
        return trainer.train(small, epochs=2, val_dataset=test), trainer
    straight, _ = run(tmp_path / "a")
    real_save = train_mod.save_checkpoint

    def interrupt_at_9(path, payload):                 # killed mid-epoch 2, after writing step 9
        real_save(path, payload)
        if payload["step"] == 9:
            raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "save_checkpoint", interrupt_at_9)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed, trainer = run(tmp_path / "b", resume=tmp_path / "b" / "last.pt")
    assert resumed[-1] == straight[-1] and trainer.step == 16


def test_a_classifier_checkpoint_loads_with_its_head_and_labels(genres, tmp_path):
    train, test, tok, labels = genres
    model = tiny(vocab_size=tok.vocab_size, block_size=256, head="classification", num_classes=3)
    trainer = TransformerTrainer(model, task=ClassificationTask(3, labels=labels), batch_size=64,
                                 out_dir=str(tmp_path), tokenizer=tok)
    trainer.train(EncodedTexts(train.pairs[:128], tok), epochs=1, val_dataset=test)
    loaded, tokenizer = load_model(tmp_path / "best.pt")
    ids = torch.tensor([tokenizer.encode("To be, or not to be")])
    torch.testing.assert_close(loaded(ids), model.eval()(ids))
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["kind"] == "transformer" and ckpt["task"]["labels"] == labels


def test_a_version_1_checkpoint_still_loads(tmp_path):
    model = tiny()
    tok = CharTokenizer.train(["abcdefghijklmnopqrstuvwxyz .,;:!?'ABCDE"])
    path = tmp_path / "v1.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "model": model.state_dict(),
                "model_config": {k: v for k, v in model.config.to_dict().items()
                                 if k not in ("causal", "head", "num_classes", "output_dim", "pooling")},
                "tokenizer": tok.state()}, path)
    loaded, _ = load_model(path)
    x = torch.randint(0, 40, (1, 6))
    torch.testing.assert_close(loaded(x), model.eval()(x))
    save_checkpoint(tmp_path / "v2.pt", {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                         "tokenizer": tok.state()})
    assert torch.load(tmp_path / "v2.pt", weights_only=True)["version"] == 2


def test_lora_on_a_classifier_trains_the_new_head_too():
    model = tiny(head="classification", num_classes=4).eval()
    x = torch.randint(0, 40, (2, 5))
    before = model(x)
    trainable = apply_lora(model, LoRAConfig(r=2, targets=["q", "v"]))
    head = sum(p.numel() for p in model.head.parameters())
    assert all(p.requires_grad for p in model.head.parameters()) and trainable > head
    assert not model.tok_emb.weight.requires_grad
    assert {"head.proj.weight", "head.proj.bias"} <= set(lora_state_dict(model))
    torch.testing.assert_close(model(x), before)                  # a fresh adapter changes nothing


def test_set_head_puts_a_fresh_head_on_the_trained_backbone():
    lm = tiny().eval()
    x = torch.randint(1, 40, (2, 9))
    h = lm.hidden_states(x)
    clf = lm.set_head(head="classification", num_classes=3, pooling="mean")
    assert clf.lm_head is None and clf(x).shape == (2, 3)
    torch.testing.assert_close(clf.hidden_states(x), h)                       # the backbone is untouched
    fresh = tiny(head="classification", num_classes=3, pooling="mean")
    assert set(clf.state_dict()) == set(fresh.state_dict())                   # a classifier's checkpoint keys
    bidirectional = clf.set_head(causal=False, pooling="cls")
    assert bidirectional.hidden_states(x).shape == (2, 10, 32)                 # the [CLS] slot first
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 40
    assert (bidirectional.hidden_states(x)[:, 1] - bidirectional.hidden_states(y)[:, 1]).abs().max() > 1e-6
    back = bidirectional.set_head(head="lm", causal=True, pooling="last")
    assert back.lm_head.weight is back.tok_emb.weight                          # tied again
    with pytest.raises(ValueError, match="set_head changes only head, num_classes.*not d_model"):
        back.set_head(d_model=64)

# -----------------------------------------------------------------------------
# The command line on a labelled file: python train.py --task classification|regression
# -----------------------------------------------------------------------------

WORDS = "apple river stone cloud lamp tiger honey window garden silver".split()


def labelled_file(tmp_path, n=240, *, regression=False, header=True) -> Path:
    """Rows of random words; the target follows the first word (learnable in a few dozen steps):
    its label (classification) or its index among the first five words, or 0 (regression)."""
    rng = np.random.default_rng(0)
    lines = ["text\tlabel"] if header else []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(2, 7))]
        first = WORDS.index(words[0])
        target = f"{first if first < 5 else 0:.1f}" if regression else ("early" if first < 5 else "late")
        lines.append(" ".join(words) + "\t" + target)
    path = tmp_path / "rows.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TASK_CLI = ["--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.block_size=48",
            "--model.pooling=mean", "--training.batch_size=16", "--training.learning_rate=1e-2",
            "--training.warmup_iters=5", "--training.eval_interval=null", "--training.progress=false",
            "--training.plot=false", "--device", "cpu"]


def cli(module, *args):
    """Run a script's main in this process; its stdout, or SystemExit's one-line message."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            module.main([str(a) for a in args])
        except SystemExit as e:
            return str(e.code)
    return out.getvalue()


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    data = labelled_file(root)
    printed = cli(train_mod, "--config", REPO / "config.yaml", "--task", "classification", "--data", data,
                  "--epochs", 6, f"--training.out_dir={root / 'out'}", *TASK_CLI)
    return root, data, printed


def test_train_py_trains_a_classifier_on_a_labelled_file(classifier_run):
    root, data, printed = classifier_run
    final = read_jsonl(root / "out" / "log.jsonl")[-1]
    assert final["event"] == "final" and final["final_val_accuracy"] >= 0.9, printed
    assert "final validation: loss" in printed
    ckpt = load_checkpoint(root / "out" / "best.pt")
    assert ckpt["task"] == {"name": "classification", "num_classes": 2, "labels": ["early", "late"]}
    assert ckpt["model_config"]["head"] == "classification" and ckpt["config"]["training"]["task"] == "classification"


def test_generate_py_prints_labels_and_probabilities(classifier_run, tmp_path):
    root, data, _ = classifier_run
    texts = ["apple tiger lamp", "silver river", "cloud"]
    prompts = tmp_path / "texts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    printed = cli(generate, "--checkpoint", root / "out" / "best.pt", "--prompt_file", prompts).splitlines()
    assert printed[0] == "label\tearly\tlate" and len(printed) == 4
    rows = [line.split("\t") for line in printed[1:]]
    assert [r[0] for r in rows] == ["early", "late", "early"]                   # the rule it learned
    model, tok = load_model(root / "out" / "best.pt")
    probs = torch.softmax(model(torch.tensor([tok.encode(texts[1])])), -1)[0]
    assert [float(v) for v in rows[1][1:]] == pytest.approx(probs.tolist(), abs=1e-4)
    one = cli(generate, "--checkpoint", root / "out" / "best.pt", "--prompt", texts[1],
              "--save_attention", tmp_path / "attention.png").splitlines()
    assert one == [printed[0], printed[2]] and (tmp_path / "attention.png").stat().st_size > 10_000
    refused = cli(generate, "--checkpoint", root / "out" / "best.pt", "--prompt", "x", "--temperature", "0.5",
                  "--max_new_tokens", "5", "--batch_size", "4")
    assert refused == ("error: a classification model prints labels and probabilities; it does not use "
                       "--temperature, --max_new_tokens, --batch_size")


def test_an_lm_checkpoint_fine_tunes_as_a_classifier_with_lora(classifier_run, tmp_path):
    """--init_from an LM and --task classification: the LM's backbone under a new head, and with
    --lora.r an adapter that generate.py loads onto its LM base."""
    root, data, _ = classifier_run
    lm_dir, clf_dir = tmp_path / "lm", tmp_path / "clf"
    text = tmp_path / "text.txt"
    text.write_text(" ".join(l.split("\t")[0] for l in data.read_text().splitlines()[1:]) * 3)
    lm_cli = [a for a in TASK_CLI if "pooling" not in a] + ["--model.tie_weights=false"]   # as Llama bases are
    assert cli(train_mod, "--data", text, "--training.max_iters=1", *TASK_CLI) == (
        "error: model.pooling: not read by training.task=lm")
    cli(train_mod, "--data", text, "--training.max_iters=20", f"--training.out_dir={lm_dir}", *lm_cli)
    lm = load_checkpoint(lm_dir / "best.pt")
    assert cli(train_mod, "--task", "classification", "--data", data, "--init_from", lm_dir / "best.pt",
               *TASK_CLI, "--model.n_layers=2", "--data.tokenizer=byte") == (
        f"error: model.n_layers, data.tokenizer: a fine-tune keeps the architecture and tokenizer of "
        f"training.init_from={lm_dir / 'best.pt'}")
    printed = cli(train_mod, "--task", "classification", "--data", data, "--init_from", lm_dir / "best.pt",
                  "--lora.r=4", "--epochs", 6, f"--training.out_dir={clf_dir}", *TASK_CLI)
    adapter = load_checkpoint(clf_dir / "best.pt")
    assert adapter["lora"]["base"]["path"] == str((lm_dir / "best.pt").resolve()), printed
    assert {k for k in adapter["model"] if "lora_" not in k} == {"head.proj.weight", "head.proj.bias"}
    model, tok = load_model(clf_dir / "best.pt")                # finds its LM base, puts the head on
    assert model.config.head == "classification" and tok.state() == lm["tokenizer"]
    torch.testing.assert_close(model.tok_emb.weight, lm["model"]["tok_emb.weight"])   # the frozen backbone
    rows = cli(generate, "--checkpoint", clf_dir / "best.pt", "--prompt", "tiger apple").splitlines()
    assert rows[0] == "label\tearly\tlate" and rows[1].split("\t")[0] in ("early", "late")
    assert read_jsonl(clf_dir / "log.jsonl")[-1]["final_val_accuracy"] >= 0.9


def test_train_py_trains_a_regressor_and_generate_py_prints_its_values(tmp_path):
    data = labelled_file(tmp_path, regression=True, header=False)
    cli(train_mod, "--task", "regression", "--data", data, "--epochs", 8, f"--training.out_dir={tmp_path / 'out'}",
        *TASK_CLI)
    rows = read_jsonl(tmp_path / "out" / "log.jsonl")
    targets = np.array([float(l.split("\t")[1]) for l in data.read_text().splitlines()])
    assert rows[-1]["final_val_mse"] < 0.5 * targets.var()                   # beats predicting the mean
    printed = cli(generate, "--checkpoint", tmp_path / "out" / "best.pt", "--prompt", "stone apple").splitlines()
    assert printed[0] == "output_0" and abs(float(printed[1]) - 2.0) < 1.0


@pytest.mark.parametrize("lines,args,match", [
    (None, ["--data.path=null"], "training.task=classification reads data.path"),
    (["a b\tx", "c\ty\tz"], [], r"line 2: 3 tab-separated columns where 2 are expected"),
    (["a b\tx", "\ty"], [], "line 2: the text is empty"),
    (["a b\tx\ty", "c\ty\tz"], [], r"classification rows are text<TAB>label, two columns; these have 3"),
    (["a b\tx", "c d\ty"], ["--data.truncate=true", "--model.n_encoder_layers=2"],
     r"error: model.n_encoder_layers, data.truncate: not read by training.task=classification$"),
    (["a b\tx", "c d\ty"], ["--task", "lm", "--model.ngram_buckets=64"],
     r"model.ngram_buckets: not read by training.task=lm$"),
    (["a b\tx", "c d\ty"], ["--training.eval_iters=3", "--model.tie_weights=false"],
     r"model.tie_weights=false, training.eval_iters \(other tasks evaluate every validation row\): not read"),
    (["a b\tx", "c d\ty"], ["--task", "seq2seq", "--training.log_attention=true"],
     r"training.log_attention: not read by training.task=seq2seq$"),
    (["a b\tx", "c d\ty"], ["--model.num_classes=5"], r"model.num_classes=5 \(the data makes it 2\): leave it to the data"),
    (["a b\tx", "c d\ty"], ["--lora.alpha=8"], r"lora.alpha: LoRA is off \(lora.r=0\); set lora.r"),
    (["a b\tx", "c d\ty"], ["--model.vocab_size=99"], r"model.vocab_size \(the tokenizer sets it\): not read"),
    (["a b\tx", "c d\tx"], [], r"one label \('x'\); classification needs at least 2"),
    (["a b\t1.5", "c d\tmany"], ["--task", "regression"], r"row 2: regression targets are numbers, got \['many'\]"),
    (["a b\tx", "c d\ty"], ["--model.head=regression"], "model.head=regression contradicts training.task"),
    ([], [], "holds no rows"),
])
def test_labelled_file_errors_are_one_line(tmp_path, lines, args, match):
    data = tmp_path / "rows.tsv"
    data.write_text("\n".join(lines or []) + "\n" if lines else "")
    argv = ["--task", "classification", "--data", data, f"--training.out_dir={tmp_path / 'out'}", *TASK_CLI, *args]
    message = cli(train_mod, *argv)
    assert message.startswith("error: ") and "\n" not in message.strip()
    assert re.search(match, message), message


def test_fine_tuning_a_classifier_on_labels_it_never_saw_is_an_error(classifier_run, tmp_path):
    root, data, _ = classifier_run
    other = tmp_path / "other.tsv"
    other.write_text("apple river\tearly\ntiger lamp\tmiddle\n")
    message = cli(train_mod, "--task", "classification", "--data", other, "--init_from", root / "out" / "best.pt",
                  f"--training.out_dir={tmp_path / 'out'}", *TASK_CLI)
    assert message == "error: label 'middle' of {} is not one the checkpoint was trained on (early, late)".format(other)


def test_data_py_genres_writes_the_built_in_plays_as_labelled_rows(tmp_path):
    import data
    out = tmp_path / "genres.tsv"
    printed = cli(data, "genres", "--out", out)
    rows = data.read_labelled(out)
    split = shakespeare_genres()
    assert printed.strip() == f"wrote {len(rows):,} passages labelled by genre to {out}"
    assert len(rows) == len(split["train"]) + len(split["test"])
    assert {label for _, (label,) in rows} == {"comedy", "history", "tragedy"}
    assert rows[0][0] == split["train"][0][0].replace("\n", " / ")
