"""Classifier fine-tuning (`rlhf classifier`), on transformers.Trainer: a sequence classifier that
can then serve as a reward (e.g. the probability that a reply is not toxic).

    rlhf classifier --config configs/classifier_tiny.yaml --data.train jigsaw.csv

Single-label (binary or multi-class: one label column of integers or names, softmax and
cross-entropy) or multi-label (several 0/1 columns, e.g. Jigsaw's toxic/obscene/insult/...,
a sigmoid and binary cross-entropy per label). LoRA/QLoRA train the adapter and the classification
head (peft task type SEQ_CLS), full trains everything. Train/validation/test come from
data.validation/data.test or are held out of data.train (shuffled first). The test split is
scored at the end: precision, recall, F1, ROC-AUC per label and macro-averaged, next to a
majority-class baseline.

Writes to output_dir: the adapter with its head (or full model), the tokenizer, `reward_info.json`
(labels, problem type, max_length, normalisation statistics of each label's probability and logit
on the validation texts), `metrics.json`, `checkpoint-N/`, `rlhf_config.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from policies import models
from reward import interface
from reward import metrics as reward_metrics
from reward import models as reward_models
from reward.errors import RewardError
from rlhf.config import ClassifierConfig, ClassifierDataConfig
from rlhf.data.sources import load_rows
from rlhf.errors import UserError
from rlhf.runtime import checkpoints
from rlhf.runtime.distributed import main_process_first
from rlhf.runtime.outputs import user_run
from rlhf.stages import hf_trainer

METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc")


def check(cfg: ClassifierConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    d = cfg.data
    if d.train is None:
        raise UserError("data.train is required: a file (or hub dataset) of labelled text")
    hf_trainer.check(cfg, "rlhf classifier", reward_models.PEFT_METHODS)
    if not d.label_columns:
        raise UserError("data.label_columns expects at least one column name")
    if len(d.label_columns) > 1 and d.multi_label is False:
        raise UserError(f"data.multi_label=false needs one label column; got {len(d.label_columns)} "
                        f"({', '.join(d.label_columns)})")
    if d.label_names is not None and (len(d.label_columns) > 1 or d.multi_label):
        raise UserError("data.label_names names the classes of a single label column; with several 0/1 "
                        "columns the column names are the labels")
    held_out = (d.validation_split if d.validation is None else 0) + (d.test_split if d.test is None else 0)
    if held_out >= 1:
        raise UserError(f"data.validation_split + data.test_split = {held_out} leaves no training rows")
    if d.test is None and d.test_split == 0:
        raise UserError("no test data: set data.test or data.test_split > 0 (the final metrics are measured on it)")
    if cfg.train.metric_for_best_model != "loss" and not hf_trainer.has_validation(d):
        raise UserError("train.metric_for_best_model needs validation data: set data.validation or "
                        "data.validation_split > 0")


# ---------------------------------------------------------------------------------------------
# Data


def read_labelled(source: str, d: ClassifierDataConfig):
    """Rows of `source` with the text and label columns checked to exist and the text to be text."""
    ds = load_rows(source, split=d.split)
    missing = [c for c in [d.text_column, *d.label_columns] if c not in ds.column_names]
    if missing:
        raise UserError(f"{source}: column(s) {', '.join(missing)} not found (data.text_column / "
                        f"data.label_columns); columns found: {', '.join(ds.column_names)}")
    for i, text in enumerate(ds[d.text_column]):
        if not isinstance(text, str):
            raise UserError(f"{source} row {i + 1}: '{d.text_column}' expects text, got {type(text).__name__}")
    return ds


def class_names(ds, d: ClassifierDataConfig, source: str) -> list[str]:
    """Names of the classes of a single label column: data.label_names, or the values found (numbers
    in numeric order, names in alphabetical order)."""
    values = ds[d.label_columns[0]]
    if d.label_names is not None:
        return list(d.label_names)
    kinds = {type(v) for v in values}
    if kinds <= {int} or kinds <= {str}:
        return [str(v) for v in sorted(set(values))]
    raise UserError(f"{source}: label column '{d.label_columns[0]}' expects integers or names, found "
                    f"{', '.join(sorted(k.__name__ for k in kinds))}")


def label_targets(ds, d: ClassifierDataConfig, names: list[str], multi_label: bool, source: str) -> list:
    """Per row: a class index (single-label) or a 0/1 float per label (multi-label)."""
    if multi_label:
        targets = []
        for i, row in enumerate(zip(*(ds[c] for c in d.label_columns))):
            bad = [(c, v) for c, v in zip(d.label_columns, row) if v not in (0, 1) or v is None]
            if bad:
                raise UserError(f"{source} row {i + 1}: label column '{bad[0][0]}' expects 0 or 1, got {bad[0][1]!r}")
            targets.append([float(v) for v in row])
        return targets
    targets = []
    for i, v in enumerate(ds[d.label_columns[0]]):
        if isinstance(v, int) and not isinstance(v, bool) and d.label_names is not None and 0 <= v < len(names):
            targets.append(v)
        elif str(v) in names and not isinstance(v, bool):
            targets.append(names.index(str(v)))
        else:
            raise UserError(f"{source} row {i + 1}: label {v!r} in '{d.label_columns[0]}' is not one of the "
                            f"classes {', '.join(names)} (set data.label_names to name integer classes 0..C-1)")
    return targets


def load_classifier_data(d: ClassifierDataConfig, seed: int):
    """(splits {train, validation or None, test}: Datasets of text + labels, label names, multi_label)."""
    import datasets

    multi_label = d.multi_label if d.multi_label is not None else len(d.label_columns) > 1

    def labelled(source: str, names: list[str]):
        ds = read_labelled(source, d)  # checked in file order, so errors name the file's rows
        return datasets.Dataset.from_dict({"text": ds[d.text_column],
                                           "labels": label_targets(ds, d, names, multi_label, source)})

    raw = read_labelled(d.train, d)
    names = list(d.label_columns) if multi_label else class_names(raw, d, d.train)
    if not multi_label and len(names) < 2:
        raise UserError(f"{d.train}: label column '{d.label_columns[0]}' has one class ({names[0]}); "
                        "a classifier needs at least two")
    train = labelled(d.train, names).shuffle(seed=seed)  # sources are often sorted by class (Jigsaw is)
    if d.max_samples is not None:
        train = train.select(range(min(d.max_samples, len(train))))
    splits = {"validation": None}
    n, held = len(train), 0
    for name, source, frac in (("test", d.test, d.test_split), ("validation", d.validation, d.validation_split)):
        if source is not None:
            splits[name] = labelled(source, names)
        elif frac > 0:
            size = max(1, round(n * frac))
            if held + size >= n:
                raise UserError(f"{d.train}: {n} rows are too few for data.validation_split and data.test_split")
            splits[name] = train.select(range(n - held - size, n - held))  # from the end of the shuffled rows
            held += size
    splits["train"] = train.select(range(n - held))
    return splits, names, multi_label


def tokenize(ds, tokenizer, max_length: int, name: str):
    rows = ds.map(lambda row: {"input_ids": reward_models.encode_text(tokenizer, row["text"], max_length)},
                  remove_columns=["text"], desc=f"Tokenizing {name} texts")
    cut = sum(len(ids) >= max_length for ids in rows["input_ids"])
    if cut:
        print(f"{name}: {cut} of {len(rows)} texts reach train.max_length={max_length} tokens; their end is cut")
    return rows


# ---------------------------------------------------------------------------------------------
# Trainer


def compute_metrics_fn(names: list[str], multi_label: bool, threshold: float):
    def compute_metrics(eval_pred):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        m = reward_metrics.classification_metrics(torch.as_tensor(logits), torch.as_tensor(labels), names,
                                                  multi_label, threshold)
        return {k: (m[k] if m[k] is not None else float("nan")) for k in METRICS}
    return compute_metrics


def training_args(cfg: ClassifierConfig, has_eval: bool):
    from transformers import TrainingArguments

    return hf_trainer.training_args(TrainingArguments, cfg, has_eval, f"eval_{cfg.train.metric_for_best_model}",
                                    remove_unused_columns=False)


def build(cfg: ClassifierConfig):
    """Check the config, load data, tokenizer and model, and build the Trainer (nothing trained).
    Returns (trainer, splits (text + labels), label names, multi_label)."""
    import transformers

    check(cfg)
    out = hf_trainer.setup(cfg)
    splits, names, multi_label = load_classifier_data(cfg.data, cfg.seed)
    if cfg.reward_label is not None and cfg.reward_label not in names and cfg.reward_label[4:] not in names:
        raise UserError(f"reward_label '{cfg.reward_label}' is not a label; expected one of {', '.join(names)} "
                        "or not_NAME")
    sizes = ", ".join(f"{len(ds)} {name}" for name, ds in splits.items() if ds is not None)
    print(f"data: {sizes} rows; {'multi-label' if multi_label else 'single-label'}, labels: {', '.join(names)}")
    with main_process_first():  # rank 0 writes the base, the others then read it
        base = models.materialize(cfg.model, out / "base_model", cfg.seed)
        base = reward_models.merged_base(base, out / "base_model", cfg.model)  # an SFT adapter: merged first
    tokenizer = models.load_tokenizer(base, cfg.model)
    problem = "multi_label_classification" if multi_label else "single_label_classification"
    try:
        model = reward_models.load_sequence_classifier(
            base, cfg.model, len(names), tokenizer.pad_token_id, cfg.peft.method, problem_type=problem,
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
        model = reward_models.wrap_peft(model, cfg.peft, cfg.train.gradient_checkpointing)
    except RewardError as e:
        raise UserError(str(e)) from None

    t = cfg.train
    train_rows = tokenize(splits["train"], tokenizer, t.max_length, "training")
    val_rows = tokenize(splits["validation"], tokenizer, t.max_length, "validation") if splits["validation"] else None
    trainer = transformers.Trainer(
        model=model, args=training_args(cfg, val_rows is not None), train_dataset=train_rows,
        eval_dataset=val_rows, processing_class=tokenizer,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_fn(names, multi_label, t.threshold), callbacks=hf_trainer.callbacks(cfg))
    hf_trainer.attach(trainer)  # plain progress lines off a terminal; TRL's token count kept across a resume
    hf_trainer.report_trainable(trainer, cfg)
    return trainer, splits, names, multi_label


def predict_logits(trainer, texts: list[str], max_length: int) -> torch.Tensor:
    """Logits (N, C) of `texts`, through the same encoding and batching as the reward interface."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    scorer = interface.ModelScorer(model, trainer.processing_class, max_length,
                                   trainer.args.per_device_eval_batch_size, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        return scorer.logits([reward_models.encode_text(scorer.tokenizer, t, max_length) for t in texts])
    finally:
        model.train(was_training)


def normalization(logits: torch.Tensor, names: list[str], multi_label: bool) -> dict:
    """Mean and std of each label's probability and logit over reference texts (N, C)."""
    probs = torch.sigmoid(logits) if multi_label else torch.softmax(logits, -1)
    out = {"probability": {}, "logit": {}, "n": len(logits)}
    for c, name in enumerate(names):
        for key, values in (("probability", probs[:, c]), ("logit", logits[:, c])):
            s = interface.normalization_stats(values)
            out[key][name] = [s["mean"], s["std"]]
    return out


def metrics_table(rows: dict[str, dict], per_label: dict[str, dict]) -> str:
    """Plain-text table of the headline metrics (rows: model, baseline) and the model's per-label ones."""
    def fmt(x):
        return "   n/a" if x is None else f"{x:6.3f}"

    lines = [f"{'':28s} {'n':>5s} " + " ".join(f"{k:>9s}" for k in METRICS)]
    for name, m in rows.items():
        lines.append(f"{name:28s} {m['n']:5d} " + " ".join(f"{fmt(m.get(k)):>9s}" for k in METRICS))
    lines.append(f"per label ({'model'}):{'':12s} {'support':>7s} " + " ".join(f"{k:>9s}" for k in METRICS[1:]))
    for label, m in per_label.items():
        lines.append(f"  {label:26s} {m['support']:7d} " + " ".join(f"{fmt(m[k]):>9s}" for k in METRICS[1:]))
    return "\n".join(lines)


def save(trainer, cfg: ClassifierConfig, names: list[str], multi_label: bool, normalization: dict,
         metrics: dict) -> bool:
    """The classifier (adapter with its head, or full), tokenizer, reward_info.json and metrics.json."""
    from rlhf.stages.reward_stage import publish

    return publish(trainer, cfg, "classifier", {
        "labels": names,
        "problem_type": "multi_label_classification" if multi_label else "single_label_classification",
        "threshold": cfg.train.threshold,
        "reward_label": cfg.reward_label,
        "input": "response text",
    }, normalization, metrics)


def main(cfg: ClassifierConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: ClassifierConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer, splits, names, multi_label = build(cfg)
    run, metrics = hf_trainer.start(cfg, trainer)
    metrics.update(labels=names, multi_label=multi_label)
    result = hf_trainer.train(trainer, resume_from)  # tensors only are read from the checkpoint
    metrics["train_loss"] = result.training_loss
    metrics["global_step"] = trainer.state.global_step
    metrics["best_checkpoint"] = trainer.state.best_model_checkpoint

    def scored(ds, logits=None):
        logits = predict_logits(trainer, ds["text"], cfg.train.max_length) if logits is None else logits
        return reward_metrics.classification_metrics(logits, torch.tensor(ds["labels"]), names, multi_label,
                                                     cfg.train.threshold)

    test = scored(splits["test"])
    train_labels = torch.tensor(splits["train"]["labels"])
    majority = reward_metrics.majority_logits(train_labels, len(splits["test"]), len(names), multi_label)
    baseline = scored(splits["test"], majority)
    metrics["test"], metrics["test_majority_baseline"] = test, baseline
    ref = "validation" if splits["validation"] is not None else "train"
    ref_logits = predict_logits(trainer, splits[ref]["text"], cfg.train.max_length)
    if ref == "validation":
        metrics["validation"] = scored(splits["validation"], ref_logits)
    norm = {**normalization(ref_logits, names, multi_label), "reference": ref}

    if save(trainer, cfg, names, multi_label, norm, metrics):
        print(f"test set ({len(splits['test'])} texts):")
        print(metrics_table({"classifier": test, "majority-class baseline": baseline}, test["per_label"]))
        print(f"classifier done: saved to {out}")
    hf_trainer.finish(run)
    return metrics
