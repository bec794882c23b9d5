"""Direct preference optimisation (`rlhf dpo`), on trl.DPOTrainer: the policy learns from preference
pairs directly, with no reward model and no sampling (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

    rlhf dpo --config configs/dpo_tiny.yaml --peft.method lora --output_dir runs/dpo

The loss is -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]) for
`dpo.loss_type: sigmoid`; the other TRL variants (IPO, hinge, robust, ...) by name. The implicit reward of a
reply is beta * (log pi - log ref); TRL logs its accuracy (chosen above rejected) and mean margin on the
validation pairs as rewards/accuracies and rewards/margins.

The reference: under LoRA/QLoRA, the policy with its adapter disabled (the base it started from, no second
copy in memory); under full fine-tuning, a frozen copy of the starting model. A starting model that is a LoRA
adapter directory (an SFT output) is merged into its base first (`policy_base/`), so that merged model is
both the reference and what the new adapter trains on.

Writes to output_dir the same layout as `rlhf sft`: the adapter (or full model) and tokenizer, loadable as a
policy (`rlhf generate --model OUT`, `rlhf eval policy --policy OUT`); `checkpoint-N/`; `rlhf_config.yaml`;
`metrics.json` (validation loss, reward accuracy and margin before/after); `base_model/` for `tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from policies import models
from rlhf import config
from rlhf.config import DPO_LOSS_TYPES, DPOConfig
from rlhf.errors import UserError
from rlhf.runtime import checkpoints, tracking
from rlhf.runtime.distributed import barrier, ddp_backend, init_processes, main_process_first
from rlhf.runtime.outputs import user_run
from rlhf.stages.reward_stage import load_preference_data

PEFT_METHODS = ("full", "lora", "qlora")
# Validation metrics TRL logs (prefixed `eval_`) that metrics.json keeps before and after training.
EVAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins")
BEST_METRIC = {"loss": "eval_loss", "accuracy": "eval_rewards/accuracies"}


def check(cfg: DPOConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    from rlhf.validate import validate

    validate(cfg)  # every field's domain first (also for configs built in Python, not parsed)
    t, d = cfg.train, cfg.dpo
    if cfg.peft.method not in PEFT_METHODS:
        raise UserError(f"peft.method={cfg.peft.method} is not supported by `rlhf dpo`; use one of "
                        f"{', '.join(PEFT_METHODS)}")
    if d.loss_type not in DPO_LOSS_TYPES:
        raise UserError(f"dpo.loss_type: unknown loss '{d.loss_type}'; trl.DPOTrainer accepts "
                        f"{', '.join(DPO_LOSS_TYPES)}")
    if d.loss_type == "exo_pair" and d.label_smoothing == 0:
        raise UserError("dpo.loss_type=exo_pair needs dpo.label_smoothing > 0 (EXO's epsilon; 1e-3 is typical)")
    # TRL computes log-probabilities from lm_head.weight directly: an adapter there would never train
    for name in ("target_modules", "modules_to_save"):
        if cfg.peft.method != "full" and "lm_head" in (getattr(cfg.peft, name) or []):
            raise UserError(f"peft.{name} includes lm_head, which `rlhf dpo` cannot train (TRL computes "
                            "log-probabilities from its weight directly); leave it out")
    if cfg.peft.method == "qlora" and cfg.model.dtype == "float16" and not torch.cuda.is_available():
        raise UserError("model.dtype=float16 with peft.method=qlora needs a GPU; use float32 or auto on CPU")
    save_steps = t.save_steps or t.eval_steps
    if save_steps % t.eval_steps:
        raise UserError(f"train.save_steps ({save_steps}) must be a multiple of train.eval_steps "
                        f"({t.eval_steps}) so the best checkpoint can be kept")
    has_eval = cfg.data.validation is not None or cfg.data.validation_split > 0
    if t.early_stopping_patience is not None and not has_eval:
        raise UserError("train.early_stopping_patience needs validation data: set data.validation or "
                        "data.validation_split > 0")


# ---------------------------------------------------------------------------------------------
# Data


def conversational(pairs):
    """Canonical pairs (prompt messages, chosen/rejected text) -> TRL's conversational preference rows,
    each reply one assistant turn, so TRL renders them with the policy's chat template exactly as
    `rlhf generate` renders a prompt (`add_generation_prompt`) and the reply that follows it."""
    def row(pair):
        return {"prompt": pair["prompt"], "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                "rejected": [{"role": "assistant", "content": pair["rejected"]}]}

    return pairs.map(row, remove_columns=[c for c in pairs.column_names if c != "prompt"])


def report_dropped(before: int, rows, max_length: int, name: str) -> None:
    """TRL drops a pair whose prompt alone fills max_length (no reply token would be left): say how many."""
    dropped = before - len(rows)
    if dropped == before:
        raise UserError(f"every {name} pair's prompt fills train.max_length={max_length} tokens, so no reply "
                        "token is left to learn from; raise train.max_length")
    if dropped:
        print(f"{name}: {dropped} of {before} pairs dropped: their prompt alone fills train.max_length={max_length}")
    long = sum(len(p) + max(len(c), len(r)) > max_length
               for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]))
    if long:
        print(f"{name}: {long} of {len(rows)} pairs exceed train.max_length={max_length} tokens; "
              "the end of their replies is cut")


# ---------------------------------------------------------------------------------------------
# Models


def policy_base(cfg: DPOConfig, out: Path) -> str:
    """What the policy starts from, as a path or hub id: the built-in tiny model written to
    out/base_model, or an SFT adapter merged into its base once in out/policy_base (so the reference is
    the SFT policy and the saved adapter names a base that loads from anywhere)."""
    from rlhf.stages.merge import merge

    path = models.materialize(cfg.model, out / "base_model", cfg.seed)
    if not Path(path).is_dir():
        return path  # a hub id
    path = Path(path).resolve()
    if not (path / "adapter_config.json").exists():
        return str(path)
    merged = out / "policy_base"
    stamp = {"merged_from": str(path), "adapter_mtime": (path / "adapter_config.json").stat().st_mtime}
    if not (merged / "config.json").exists() or not (merged / "merged_from.json").exists() \
            or json.loads((merged / "merged_from.json").read_text()) != stamp:
        import shutil

        shutil.rmtree(merged, ignore_errors=True)
        merge(str(path), str(merged), allow_pickle_weights=cfg.model.allow_pickle_weights)
        (merged / "merged_from.json").write_text(json.dumps(stamp))
    return str(merged.resolve())


def load_models(cfg: DPOConfig, base: str):
    """(policy, reference or None). Under LoRA/QLoRA the reference is None: TRL disables the adapter."""
    if cfg.peft.method != "full":
        return models.load_causal_lm(base, cfg.model, cfg.peft.method), None
    # Our loader, not TRL's copy-by-path: it refuses pickled weights and honours model.revision. The trained
    # copy holds float32 master weights when the compute dtype is half (see policies.models.master_dtype).
    policy = models.load_causal_lm(base, cfg.model, "full", master_weights=True)
    reference = models.load_causal_lm(base, cfg.model, "full").eval().requires_grad_(False)
    return policy, reference


# ---------------------------------------------------------------------------------------------
# Trainer


def trl_args(cfg: DPOConfig, has_eval: bool, bf16: bool):
    """Our config -> trl.DPOConfig."""
    import trl

    t, d = cfg.train, cfg.dpo
    eval_kwargs = {}
    if has_eval:
        # The validation metrics before training come from inside train() (eval_on_start) rather than an
        # evaluate() call before it, as in `rlhf sft` (under ZeRO-3 that call breaks the train() after it).
        eval_kwargs = dict(eval_strategy="steps", eval_steps=t.eval_steps, load_best_model_at_end=True,
                           metric_for_best_model=BEST_METRIC[t.metric_for_best_model],
                           greater_is_better=t.metric_for_best_model != "loss", eval_on_start=cfg.resume is None)
    return trl.DPOConfig(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps < 1 else int(t.warmup_steps), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, max_length=t.max_length, gradient_checkpointing=t.gradient_checkpointing,
        bf16=bf16, logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps or t.eval_steps,
        save_total_limit=t.save_total_limit, beta=d.beta, loss_type=[d.loss_type],
        label_smoothing=d.label_smoothing, disable_dropout=True,
        report_to=["wandb"] if cfg.tracking.report_to == "wandb" else [], run_name=cfg.tracking.run_name,
        dataset_num_proc=None, ddp_backend=ddp_backend(), **eval_kwargs,
    )


def build(cfg: DPOConfig):
    """Check the config, load data, tokenizer, policy and reference, and build the DPOTrainer (nothing trained)."""
    import transformers
    import trl

    from reward.models import ensure_chat_template

    check(cfg)
    init_processes()  # before TrainingArguments: gloo on CPU, and a mis-launch refused
    out = Path(cfg.output_dir)
    transformers.set_seed(cfg.seed)
    train_pairs, val_pairs, _ = load_preference_data(cfg.data, cfg.seed)  # bad data fails before any writing
    print(f"data: {len(train_pairs)} training pairs, {len(val_pairs) if val_pairs else 0} validation pairs")
    with main_process_first():  # rank 0 writes the base (or merges the SFT adapter), the others then read it
        base = policy_base(cfg, out)
    tokenizer = models.load_tokenizer(base, cfg.model)
    if ensure_chat_template(tokenizer):  # saved with the policy, so generation renders prompts the same way
        print("chat template: plain `Role: text` (the tokenizer has none)")
    policy, reference = load_models(cfg, base)

    bf16 = cfg.train.bf16 if cfg.train.bf16 is not None else models.torch_dtype(cfg.model) == torch.bfloat16
    callbacks = []
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(transformers.EarlyStoppingCallback(cfg.train.early_stopping_patience,
                                                            cfg.train.early_stopping_threshold))
    train_rows = conversational(train_pairs)
    val_rows = conversational(val_pairs) if val_pairs is not None else None
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=trl_args(cfg, val_rows is not None, bf16),
                             train_dataset=train_rows, eval_dataset=val_rows, processing_class=tokenizer,
                             peft_config=models.peft_config(cfg.peft, "CAUSAL_LM"), callbacks=callbacks)
    report_dropped(len(train_rows), trainer.train_dataset, cfg.train.max_length, "training")
    if val_rows is not None:
        report_dropped(len(val_rows), trainer.eval_dataset, cfg.train.max_length, "validation")
    trainable, total = models.count_parameters(trainer.model)
    print(f"peft.method={cfg.peft.method}: trainable parameters {trainable:,} of {total:,} "
          f"({100 * trainable / total:.4f}%); reference: "
          f"{'the base with the adapter disabled' if reference is None else 'a frozen copy of the base'}")
    return trainer


def run_mean(history: list[dict], key: str = "loss") -> float | None:
    """Mean of a per-step training metric over the whole run, from the Trainer's log (each logged value
    covers the steps since the one before). A resumed run restores the log, so this is the straight run's."""
    logged = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    if not logged:
        return None
    steps = [b - a for a, b in zip([0] + [s for s, _ in logged[:-1]], [s for s, _ in logged])]
    return sum(n * v for n, (_, v) in zip(steps, logged)) / max(sum(steps), 1)


def main(cfg: DPOConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: DPOConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer = build(cfg)
    if trainer.is_world_process_zero():
        config.save(cfg, out / "rlhf_config.yaml")
    run = tracking.start(cfg.tracking, config.to_dict(cfg), cfg.output_dir, trainer.is_world_process_zero())
    trainable, total = models.count_parameters(trainer.model)
    metrics: dict = {"trainable_parameters": trainable, "total_parameters": total,
                     "train_pairs": len(trainer.train_dataset)}
    has_eval = trainer.eval_dataset is not None
    with checkpoints.tensor_only_loads(resume_from):  # DeepSpeed's own torch.load: tensors only
        result = trainer.train(resume_from_checkpoint=resume_from)
    history = trainer.state.log_history  # restored from the checkpoint on resume: the whole run's
    start = next((h for h in history if "eval_loss" in h and h.get("step") == 0), None)
    if start is not None:  # eval_on_start: policy == reference, so every implicit reward is 0 (accuracy 0, margin 0)
        metrics.update({f"eval_{k}_before": start[f"eval_{k}"] for k in EVAL_METRICS})
    train_loss = run_mean(history)
    metrics["train_loss"] = train_loss if train_loss is not None else result.training_loss
    metrics["global_step"] = trainer.state.global_step
    if has_eval:
        final = trainer.evaluate()  # the best checkpoint, reloaded
        metrics.update({f"eval_{k}": final[f"eval_{k}"] for k in EVAL_METRICS})
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint

    tmp = out / ".final.tmp"
    trainer.save_model(str(tmp))  # on every process: under ZeRO-3 they all take part in gathering the weights
    if trainer.is_world_process_zero():  # which writes the files
        trainer.processing_class.save_pretrained(str(tmp))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        checkpoints.publish_dir(tmp, out)
        val = (f"validation reward accuracy {metrics['eval_rewards/accuracies_before']:.3f} -> "
               f"{metrics['eval_rewards/accuracies']:.3f}, margin {metrics['eval_rewards/margins']:.3f}, "
               f"loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}; "
               if "eval_loss_before" in metrics else "")
        print(f"dpo done: {val}saved to {out}")
    barrier()  # no process ends (and tears the group down) mid-publish
    tracking.finish(run)
    return metrics
