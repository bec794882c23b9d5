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
from pathlib import Path

import torch

from policies import models
from reward import interface
from reward import metrics as reward_metrics
from reward import models as reward_models
from reward.errors import RewardError
from rlhf.config import PairFormatOptions, PreferenceDataConfig, RewardConfig
from rlhf.data.preference_data import FORMATS, load_pairs
from rlhf.data.sources import hold_out
from rlhf.errors import UserError
from rlhf.runtime import checkpoints
from rlhf.runtime.distributed import main_process_first
from rlhf.runtime.outputs import user_run
from rlhf.stages import hf_trainer


def check(cfg: RewardConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    hf_trainer.check(cfg, "rlhf reward", reward_models.PEFT_METHODS)
    if cfg.reward.normalize_on == "validation" and not hf_trainer.has_validation(cfg.data):
        raise UserError("reward.normalize_on=validation needs validation data: set data.validation, "
                        "data.validation_split > 0, or reward.normalize_on=train")


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


def trl_args(cfg: RewardConfig, has_eval: bool):
    """Our config -> trl.RewardConfig."""
    import trl

    return hf_trainer.training_args(
        trl.RewardConfig, cfg, has_eval, f"eval_{cfg.train.metric_for_best_model}",
        max_length=None,  # cut (not dropped) by tokenize_pairs
        center_rewards_coefficient=cfg.reward.center_rewards_coefficient, disable_dropout=True)


def build(cfg: RewardConfig):
    """Check the config, load data, tokenizer and model, and build the RewardTrainer (nothing trained).
    Returns (trainer, {"train": pairs, "validation": pairs or None}) (canonical pairs, before tokenising)."""
    import trl

    check(cfg)
    out = hf_trainer.setup(cfg)
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
    trainer = trl.RewardTrainer(model=model, args=trl_args(cfg, val_rows is not None), train_dataset=train_rows,
                                eval_dataset=val_rows, processing_class=tokenizer, callbacks=hf_trainer.callbacks(cfg))
    hf_trainer.attach(trainer)  # plain progress lines off a terminal; TRL's token count kept across a resume
    if cfg.peft.method == "qlora":
        reward_models.head_to_dtype(trainer.model, models.torch_dtype(cfg.model))
    hf_trainer.report_trainable(trainer, cfg)
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


def publish(trainer, cfg, kind: str, extra: dict, normalization: dict, metrics: dict) -> bool:
    """Write the model (adapter with its head, or full), tokenizer, reward_info.json and metrics.json
    to cfg.output_dir, each file appearing whole. Shared by `rlhf reward` and `rlhf classifier`."""
    def info(tmp: Path) -> None:
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

    return hf_trainer.publish(trainer, Path(cfg.output_dir), metrics, info)


def save(trainer, cfg: RewardConfig, normalization: dict, metrics: dict) -> bool:
    return publish(trainer, cfg, "preference", {}, normalization, metrics)


def main(cfg: RewardConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: RewardConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer, pairs = build(cfg)
    val_pairs = pairs["validation"]
    run, metrics = hf_trainer.start(cfg, trainer)
    reward = as_reward(trainer, cfg.train.max_length, cfg.train.per_device_eval_batch_size)
    if val_pairs is not None and resume_from is None:
        metrics["eval_accuracy_before"] = reward_metrics.pairwise_correct(*score_pairs(reward, val_pairs)).mean().item()
    result = hf_trainer.train(trainer, resume_from)  # tensors only are read from the checkpoint
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

    if save(trainer, cfg, norm, metrics):
        acc = (f"validation accuracy {metrics['eval_accuracy_before']:.3f} -> {metrics['eval_accuracy']:.3f}; "
               if "eval_accuracy_before" in metrics else
               f"validation accuracy {metrics['eval_accuracy']:.3f}; " if "eval_accuracy" in metrics else "")
        print(f"reward done: {acc}score mean {norm['mean']:.3f}, std {norm['std']:.3f} on {norm['n']} "
              f"{cfg.reward.normalize_on} replies; saved to {out}")
    hf_trainer.finish(run)
    return metrics
