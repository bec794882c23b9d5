"""Classifier fine-tuning (rlhf/stages/classifier_stage.py): data and labels, which parameters move,
Jigsaw against a majority baseline, and the trained classifier as a reward."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, real_file

from reward import load_reward
from reward import metrics as m
from rlhf import config
from rlhf.config import ClassifierDataConfig
from rlhf.errors import UserError
from rlhf.stages import classifier_stage

JIGSAW = "jigsaw_toxic_comment_train_balanced_subsample2000.csv"
JIGSAW_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def classifier_config(tmp_path, *args: str):
    base = ["--config", str(REPO / "configs" / "classifier_tiny.yaml"), "--output_dir", str(tmp_path / "out"),
            "--train.max_steps", "4", "--train.eval_steps", "2", "--train.logging_steps", "1",
            "--train.max_length", "64", "--train.per_device_train_batch_size", "8"]
    return config.parse(config.ClassifierConfig, base + list(args), "rlhf classifier")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n=60):
    good, bad = ["lovely", "great", "kind", "nice"], ["awful", "rude", "bad", "nasty"]
    return [{"text": f"what a {(good if i % 2 else bad)[i % 4]} day", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def test_jigsaw_labels_splits_and_label_names(tmp_path):
    path = str(real_file(JIGSAW))
    d = ClassifierDataConfig(train=path, text_column="comment_text", label_columns=JIGSAW_LABELS)
    splits, names, multi = classifier_stage.load_classifier_data(d, seed=0)
    assert multi and names == JIGSAW_LABELS
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (1600, 200, 200)
    texts = [set(splits[s]["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])  # held-out texts are not trained on
    # shuffled before splitting: the file is sorted (all-clean rows first), the test split is mixed
    assert 0.3 < sum(row[0] for row in splits["test"]["labels"]) / 200 < 0.7

    d = ClassifierDataConfig(train=path, text_column="comment_text", label_columns=["toxic"],
                             label_names=["clean", "toxic"], test_split=0.2, validation_split=0)
    splits, names, multi = classifier_stage.load_classifier_data(d, seed=0)
    assert not multi and names == ["clean", "toxic"] and splits["validation"] is None
    assert set(splits["train"]["labels"]) == {0, 1} and len(splits["test"]) == 400


def test_label_names_from_values_and_bad_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(20))
    splits, names, multi = classifier_stage.load_classifier_data(ClassifierDataConfig(train=str(path)), 0)
    assert names == ["neg", "pos"] and not multi
    assert all(("awful" in t or "rude" in t or "bad" in t or "nasty" in t) == (y == 0)
               for t, y in zip(splits["train"]["text"], splits["train"]["labels"]))

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "toxic": 1, "insult": 2},
                                               {"text": "b", "toxic": 0, "insult": 0}])
    with pytest.raises(UserError, match="row 1: label column 'insult' expects 0 or 1, got 2"):
        classifier_stage.load_classifier_data(
            ClassifierDataConfig(train=str(bad), label_columns=["toxic", "insult"]), 0)
    with pytest.raises(UserError, match="column\\(s\\) comment not found.*columns found: text, toxic, insult"):
        classifier_stage.load_classifier_data(ClassifierDataConfig(train=str(bad), text_column="comment",
                                                                   label_columns=["toxic"]), 0)
    colours = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "label": t.split()[0]} for t in
                                                 ["red sky", "blue sea", "green leaf", "red rose"] * 5])
    splits, names, multi = classifier_stage.load_classifier_data(ClassifierDataConfig(train=str(colours)), 0)
    assert names == ["blue", "green", "red"] and not multi  # multi-class: one softmax over three
    assert all(names[y] == t.split()[0] for t, y in zip(splits["train"]["text"], splits["train"]["labels"]))

    three = write_jsonl(tmp_path / "three.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(UserError, match="row 2: label 2 in 'label' is not one of the classes no, yes"):
        classifier_stage.load_classifier_data(ClassifierDataConfig(train=str(three), label_names=["no", "yes"]), 0)


@pytest.mark.parametrize("args, message", [
    (("--data.train", "None"), "data.train is required"),
    (("--data.multi_label", "false"), "data.multi_label=false needs one label column"),
    (("--peft.method", "ia3"), "peft.method=ia3 is not supported by `rlhf classifier`"),
    (("--data.test_split", "0"), "no test data"),
    (("--data.validation_split", "0.6", "--data.test_split", "0.5"), "leaves no training rows"),
    (("--reward_label", "not_polite"), "reward_label 'not_polite' is not a label"),
])
def test_bad_configs_are_user_errors(tmp_path, args, message):
    rows = [{"comment_text": "x", **{k: 0 for k in JIGSAW_LABELS}}] * 20
    data = ["--data.train", str(write_jsonl(tmp_path / "d.jsonl", rows))]
    with pytest.raises(UserError, match=message):
        classifier_stage.build(classifier_config(tmp_path, *data, *args))


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_training_moves_adapter_and_head_only_and_reloads_identically(tmp_path, method):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows())
    cfg = classifier_config(tmp_path, "--data.train", str(data), "--data.text_column", "text",
                            "--data.label_columns", "label", "--peft.method", method, "--peft.modules_to_save",
                            "None", "--train.learning_rate", "1e-2", "--reward_label", "pos")
    trainer, splits, names, multi = classifier_stage.build(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".score." in f".{n}"}
    assert head and trainer.model.config.num_labels == 2 and names == ["neg", "pos"]
    if method != "full":
        assert all("lora_" in n or n in head for n in trainable)
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert head <= changed <= trainable

    texts = splits["test"]["text"]
    logits = classifier_stage.predict_logits(trainer, texts, cfg.train.max_length)
    classifier_stage.save(trainer, cfg, names, multi, {"n": 0}, {})
    reward = load_reward(cfg.output_dir, output="logit")  # reward_label "pos"
    got = reward.score([[{"role": "user", "content": "How was it?"}]] * len(texts), texts)
    tol = 2e-3 if method == "qlora" else 1e-5  # bnb's CPU 4-bit matmul differs slightly after a fresh load
    torch.testing.assert_close(got, logits[:, 1], atol=tol, rtol=0)


def test_jigsaw_classifier_beats_majority_baseline_and_serves_as_reward(tmp_path):
    path = real_file(JIGSAW)
    metrics = classifier_stage.main(classifier_config(
        tmp_path, "--data.train", str(path), "--data.label_columns", "toxic", "--data.label_names", "clean", "toxic",
        "--peft.method", "full", "--train.learning_rate", "2e-3", "--train.max_steps", "100",
        "--train.eval_steps", "50", "--train.per_device_train_batch_size", "16", "--train.warmup_steps", "10",
        "--reward_label", "not_toxic"))
    test, baseline = metrics["test"], metrics["test_majority_baseline"]
    assert test["f1"] > baseline["f1"] + 0.2, (test, baseline)  # macro F1 of 200 held-out comments
    assert test["roc_auc"] > 0.7
    out = tmp_path / "out"
    info = json.loads((out / "reward_info.json").read_text())
    assert info["labels"] == ["clean", "toxic"] and info["reward_label"] == "not_toxic"

    # The saved classifier as a reward: P(not toxic) of the response ranks the test comments exactly as
    # the trained model did (its AUC for "toxic" is 1 - that of the reward).
    d = ClassifierDataConfig(train=str(path), text_column="comment_text", label_columns=["toxic"],
                             label_names=["clean", "toxic"])
    splits, _, _ = classifier_stage.load_classifier_data(d, seed=42)
    reward = load_reward(str(out))
    texts, labels = splits["test"]["text"], torch.tensor(splits["test"]["labels"])
    not_toxic = reward.score([[{"role": "user", "content": "Reply."}]] * len(texts), texts)
    assert ((0 <= not_toxic) & (not_toxic <= 1)).all()
    assert m.roc_auc(-not_toxic, labels) == pytest.approx(test["per_label"]["toxic"]["roc_auc"], abs=1e-6)
    assert not_toxic[labels == 0].mean() > not_toxic[labels == 1].mean()


def test_shipped_classifier_configs_parse():
    paths = sorted((REPO / "configs").glob("classifier_*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = config.parse(config.ClassifierConfig, ["--config", str(path)], "t")
        assert cfg.reward_label == "not_toxic" and len(cfg.data.label_columns) == 6
