"""Stage 2: reward-model training (`rlhf reward`), on trl.RewardTrainer.

    rlhf reward --config configs/reward_tiny.yaml --peft.method qlora --output_dir runs/reward

A reward model is a sequence classifier with one output, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected [- margin]) (Ouyang et al. 2022, Eq. 1;
margin as in Llama 2), optionally with reward centring. LoRA and QLoRA train the adapter and the
score head (peft task type SEQ_CLS keeps the head in modules_to_save); full trains everything.

Writes to output_dir: the adapter with its score head (or the full model) and the tokenizer with its
chat template; `reward_info.json` (kind, base model, max_length, normalisation mean/std of the scores
on a reference set) so `reward.load_reward(output_dir)` scores exactly as trained; `checkpoint-N/`;
`rlhf_config.yaml`; `metrics.json` (validation accuracy before/after, ...); `base_model/` for `tiny`
or when model.name_or_path is a LoRA adapter directory (an SFT output), merged into its base first.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from policies import models
from reward import interface
from reward import metrics as reward_metrics
from reward import models as reward_models
from reward.errors import RewardError
from rlhf import config
from rlhf.config import PairFormatOptions, PreferenceDataConfig, RewardConfig
from rlhf.data.preference_data import FORMATS, load_pairs
from rlhf.data.sources import hold_out
from rlhf.errors import UserError
from rlhf.runtime import checkpoints, tracking
from rlhf.runtime.distributed import barrier, ddp_backend, init_processes, main_process_first
from rlhf.runtime.outputs import user_run


def check(cfg: RewardConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    from rlhf.validate import validate

    validate(cfg)  # every field's domain first (also for configs built in Python, not parsed)
    t = cfg.train
    if cfg.peft.method not in reward_models.PEFT_METHODS:
        raise UserError(f"peft.method={cfg.peft.method} is not supported by `rlhf reward`; use one of "
                        f"{', '.join(reward_models.PEFT_METHODS)}")
    if cfg.peft.method == "qlora" and cfg.model.dtype == "float16" and not torch.cuda.is_available():
        raise UserError("model.dtype=float16 with peft.method=qlora needs a GPU; use float32 or auto on CPU")
    save_steps = t.save_steps or t.eval_steps
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "eval_steps", "logging_steps", "max_length"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} expects a positive integer, got {getattr(t, name)}")
    if save_steps % t.eval_steps:
        raise UserError(f"train.save_steps ({save_steps}) must be a multiple of train.eval_steps "
                        f"({t.eval_steps}) so the best checkpoint can be kept")
    if cfg.data.max_samples is not None and cfg.data.max_samples < 1:
        raise UserError(f"data.max_samples expects a positive integer or null, got {cfg.data.max_samples}")
    has_eval = cfg.data.validation is not None or cfg.data.validation_split > 0
    if t.early_stopping_patience is not None and not has_eval:
        raise UserError("train.early_stopping_patience needs validation data: set data.validation or "
                        "data.validation_split > 0")
    if cfg.reward.normalize_on == "validation" and not has_eval:
        raise UserError("reward.normalize_on=validation needs validation data: set data.validation, "
                        "data.validation_split > 0, or reward.normalize_on=train")
    if cfg.reward.normalize_samples < 2:
        raise UserError(f"reward.normalize_samples expects at least 2, got {cfg.reward.normalize_samples}")
    if cfg.reward.center_rewards_coefficient is not None and cfg.reward.center_rewards_coefficient < 0:
        raise UserError(f"reward.center_rewards_coefficient expects a number >= 0, got "
                        f"{cfg.reward.center_rewards_coefficient}")


# ---------------------------------------------------------------------------------------------
# Data


def format_options(options: PairFormatOptions, fmt: str) -> dict:
    """The options `fmt` reads. For `auto` only the options changed from their defaults are passed,
    so setting one that the detected format does not read is an error naming both."""
    if fmt == "auto":
        defaults = PairFormatOptions()
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                if getattr(options, f.name) != getattr(defaults, f.name)}
    accepted = FORMATS[fmt].options
    return {name: getattr(options, name) for name in accepted
            if hasattr(options, name) and not (name == "pairing" and options.pairing is None)}


def load_preference_split(source: str, data: PreferenceDataConfig, max_samples: int | None = None):
    """(pairs Dataset, SkipReport) of one source, read as `data` says."""
    fmt = None if data.format == "auto" else data.format
    pairs, report = load_pairs(source, format=fmt, column_map=data.column_map or None, split=data.split,
                               max_length_chars=data.max_length_chars, **format_options(data.options, data.format))
    if max_samples is not None:
        pairs = pairs.select(range(min(max_samples, len(pairs))))
    return pairs, report


def load_preference_data(data: PreferenceDataConfig, seed: int):
    """(train pairs, validation pairs or None, train SkipReport)."""
    train, report = load_preference_split(data.train, data, data.max_samples)
    print(f"data: {report.summary()}")
    if data.validation is not None:
        validation, vreport = load_preference_split(data.validation, data)
        print(f"validation data: {vreport.summary()}")
        return train, validation, report
    train, validation = hold_out(train, data.validation_split, seed, rows="pairs")
    return train, validation, report


def check_margins(pairs, name: str) -> None:
    """reward.use_margin needs margins; pairs without one use 0 (said once)."""
    known = sum(m is not None for m in pairs["margin"])
    if known == 0:
        raise UserError(f"reward.use_margin is set but the {name} pairs carry no margin (this format has none); "
                        "unset reward.use_margin")
    if known < len(pairs):
        print(f"{name}: {len(pairs) - known} of {len(pairs)} pairs have no margin; they use 0")


def tokenize_pairs(pairs, tokenizer, max_length: int, use_margin: bool, margin_scale: float, name: str):
    """Pairs -> rows of chosen_ids, rejected_ids (+ margin), encoded exactly as scoring encodes them."""
    def encode(row):
        out = {"chosen_ids": reward_models.encode(tokenizer, row["prompt"], row["chosen"], max_length),
               "rejected_ids": reward_models.encode(tokenizer, row["prompt"], row["rejected"], max_length)}
        if use_margin:
            out["margin"] = margin_scale * (row["margin"] if row["margin"] is not None else 0.0)
        return out

    drop = [c for c in pairs.column_names if c != "margin" or not use_margin]
    rows = pairs.map(encode, remove_columns=drop, desc=f"Tokenizing {name} pairs")
    # a sequence exactly max_length long may have been cut: count them for the user
    cut = sum(max(len(c), len(r)) >= max_length for c, r in zip(rows["chosen_ids"], rows["rejected_ids"]))
    if cut:
        print(f"{name}: {cut} of {len(rows)} pairs reach train.max_length={max_length} tokens; "
              "the start of their prompt is cut")
    if len(rows) and all(c == r for c, r in zip(rows["chosen_ids"], rows["rejected_ids"])):
        raise UserError(f"{name}: after cutting to train.max_length={max_length} tokens the chosen and rejected "
                        "sequence of every pair are identical: nothing to learn; raise train.max_length")
    return rows


# ---------------------------------------------------------------------------------------------
# Trainer


def trl_args(cfg: RewardConfig, has_eval: bool, bf16: bool):
    """Our config -> trl.RewardConfig."""
    import trl

    t = cfg.train
    eval_kwargs = {}
    if has_eval:
        eval_kwargs = dict(eval_strategy="steps", eval_steps=t.eval_steps, load_best_model_at_end=True,
                           metric_for_best_model=f"eval_{t.metric_for_best_model}",
                           greater_is_better=t.metric_for_best_model != "loss")
    return trl.RewardConfig(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps < 1 else int(t.warmup_steps), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, max_length=None,  # cut (not dropped) by tokenize_pairs
        gradient_checkpointing=t.gradient_checkpointing, bf16=bf16, logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps or t.eval_steps, save_total_limit=t.save_total_limit,
        center_rewards_coefficient=cfg.reward.center_rewards_coefficient,
        report_to=["wandb"] if cfg.tracking.report_to == "wandb" else [], run_name=cfg.tracking.run_name,
        disable_dropout=True, ddp_backend=ddp_backend(), **eval_kwargs,
    )


def build(cfg: RewardConfig):
    """Check the config, load data, tokenizer and model, and build the RewardTrainer (nothing trained).
    Returns (trainer, {"train": pairs, "validation": pairs or None}) (canonical pairs, before tokenising)."""
    import transformers
    import trl

    check(cfg)
    init_processes()  # before TrainingArguments: gloo on CPU, and a mis-launch refused
    out = Path(cfg.output_dir)
    transformers.set_seed(cfg.seed)
    train_pairs, val_pairs, _ = load_preference_data(cfg.data, cfg.seed)  # bad data fails before any writing
    print(f"data: {len(train_pairs)} training pairs, {len(val_pairs) if val_pairs else 0} validation pairs")
    if cfg.reward.use_margin:
        check_margins(train_pairs, "training")
    with main_process_first():  # rank 0 writes the base, the others then read it
        base = models.materialize(cfg.model, out / "base_model", cfg.seed)
        base = reward_models.merged_base(base, out / "base_model", cfg.model)  # an SFT adapter: merged first
    tokenizer = models.load_tokenizer(base, cfg.model)
    try:
        if reward_models.ensure_chat_template(tokenizer, cfg.reward.chat_template):
            print(f"chat template: {cfg.reward.chat_template or 'plain `Role: text` (the tokenizer has none)'}")
        model = reward_models.load_sequence_classifier(base, cfg.model, 1, tokenizer.pad_token_id, cfg.peft.method)
        model = reward_models.wrap_peft(model, cfg.peft, cfg.train.gradient_checkpointing)
    except RewardError as e:
        raise UserError(str(e)) from None

    t = cfg.train
    train_rows = tokenize_pairs(train_pairs, tokenizer, t.max_length, cfg.reward.use_margin,
                                cfg.reward.margin_scale, "training")
    val_rows = None
    if val_pairs is not None:
        val_rows = tokenize_pairs(val_pairs, tokenizer, t.max_length, cfg.reward.use_margin,
                                  cfg.reward.margin_scale, "validation")
    bf16 = t.bf16 if t.bf16 is not None else models.torch_dtype(cfg.model) == torch.bfloat16
    callbacks = []
    if t.early_stopping_patience is not None:
        callbacks.append(transformers.EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    trainer = trl.RewardTrainer(model=model, args=trl_args(cfg, val_rows is not None, bf16),
                                train_dataset=train_rows, eval_dataset=val_rows, processing_class=tokenizer,
                                callbacks=callbacks)
    if cfg.peft.method == "qlora":
        reward_models.head_to_dtype(trainer.model, models.torch_dtype(cfg.model))
    trainable, total = models.count_parameters(trainer.model)
    print(f"peft.method={cfg.peft.method}: trainable parameters {trainable:,} of {total:,} "
          f"({100 * trainable / total:.4f}%)")
    return trainer, {"train": train_pairs, "validation": val_pairs}


def as_reward(trainer, max_length: int, batch_size: int) -> interface.PreferenceReward:
    """The model being trained behind the reward interface (same encoding as after saving)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return interface.PreferenceReward(model, trainer.processing_class, max_length, None, batch_size,
                                      next(model.parameters()).device)


def score_pairs(reward: interface.PreferenceReward, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores (N,), rejected scores (N,)) of canonical pairs."""
    prompts = pairs["prompt"]
    was_training = reward.model.training
    reward.model.eval()
    try:
        return reward.score(prompts, pairs["chosen"]), reward.score(prompts, pairs["rejected"])
    finally:
        reward.model.train(was_training)


def publish(trainer, cfg, kind: str, extra: dict, normalization: dict, metrics: dict) -> None:
    """Write the model (adapter with its head, or full), tokenizer, reward_info.json and metrics.json
    to cfg.output_dir, each file appearing whole. Shared by `rlhf reward` and `rlhf classifier`."""
    out = Path(cfg.output_dir)
    tmp = out / ".final.tmp"
    trainer.save_model(str(tmp))  # on every process: under ZeRO-3 they all take part in gathering the weights
    if not trainer.is_world_process_zero():  # which writes the files
        return
    trainer.processing_class.save_pretrained(str(tmp))
    reward_models.write_info(tmp, {
        "kind": kind,
        "base_model": reward_models.base_model_entry(cfg.model.name_or_path),
        "adapter": cfg.peft.method != "full",
        "quantized": cfg.peft.method == "qlora",
        "dtype": str(models.torch_dtype(cfg.model)).removeprefix("torch."),
        "max_length": cfg.train.max_length,
        **extra,
        "normalization": normalization,
        "trained_on": cfg.data.train,
    })
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoints.publish_dir(tmp, out)


def save(trainer, cfg: RewardConfig, normalization: dict, metrics: dict) -> None:
    publish(trainer, cfg, "preference", {}, normalization, metrics)


def main(cfg: RewardConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: RewardConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer, pairs = build(cfg)
    val_pairs = pairs["validation"]
    if trainer.is_world_process_zero():
        config.save(cfg, out / "rlhf_config.yaml")
    run = tracking.start(cfg.tracking, config.to_dict(cfg), cfg.output_dir, trainer.is_world_process_zero())
    trainable, total = models.count_parameters(trainer.model)
    metrics: dict = {"trainable_parameters": trainable, "total_parameters": total}
    reward = as_reward(trainer, cfg.train.max_length, cfg.train.per_device_eval_batch_size)
    if val_pairs is not None and resume_from is None:
        metrics["eval_accuracy_before"] = reward_metrics.pairwise_correct(*score_pairs(reward, val_pairs)).mean().item()
    with checkpoints.tensor_only_loads(resume_from):  # DeepSpeed's own torch.load: tensors only
        result = trainer.train(resume_from_checkpoint=resume_from)
    metrics["train_loss"] = result.training_loss
    metrics["global_step"] = trainer.state.global_step

    reward = as_reward(trainer, cfg.train.max_length, cfg.train.per_device_eval_batch_size)  # the best model
    if val_pairs is not None:
        chosen, rejected = score_pairs(reward, val_pairs)
        val = reward_metrics.pairwise_metrics(chosen, rejected)
        metrics.update(eval_accuracy=val["accuracy"], eval_mean_margin=val["mean_margin"], eval_loss=val["loss"],
                       eval_ece=val["ece"], best_checkpoint=trainer.state.best_model_checkpoint)
    ref = pairs[cfg.reward.normalize_on]
    if ref is not val_pairs or len(ref) > cfg.reward.normalize_samples:  # else: scored just above
        chosen, rejected = score_pairs(reward, ref.select(range(min(cfg.reward.normalize_samples, len(ref)))))
    norm = {**interface.normalization_stats(torch.cat([chosen, rejected])), "reference": cfg.reward.normalize_on}
    metrics["normalization"] = norm

    save(trainer, cfg, norm, metrics)
    if trainer.is_world_process_zero():
        acc = (f"validation accuracy {metrics['eval_accuracy_before']:.3f} -> {metrics['eval_accuracy']:.3f}; "
               if "eval_accuracy_before" in metrics else
               f"validation accuracy {metrics['eval_accuracy']:.3f}; " if "eval_accuracy" in metrics else "")
        print(f"reward done: {acc}score mean {norm['mean']:.3f}, std {norm['std']:.3f} on {norm['n']} "
              f"{cfg.reward.normalize_on} replies; saved to {out}")
    barrier()  # no process ends (and tears the group down) mid-publish
    tracking.finish(run)
    return metrics
