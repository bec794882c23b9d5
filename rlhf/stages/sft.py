"""Stage 1: supervised fine-tuning (`rlhf sft`), on trl.SFTTrainer.

    rlhf sft --config configs/sft_tiny.yaml --peft.method lora --output_dir runs/sft

Writes to output_dir: the adapter (or full model) and tokenizer, loadable with plain
transformers/peft; `checkpoint-N/` folders; `rlhf_config.yaml` (the resolved config);
`metrics.json` (validation loss before and after); `base_model/` when the base is the built-in tiny one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from policies import models
from rlhf import config
from rlhf.config import SFTConfig
from rlhf.data.sft_data import load_sft_data
from rlhf.errors import UserError
from rlhf.runtime import checkpoints, tracking
from rlhf.runtime.distributed import barrier, ddp_backend, init_processes, main_process_first
from rlhf.runtime.outputs import user_run


def check(cfg: SFTConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    from rlhf.validate import validate

    validate(cfg)  # every field's domain first (also for configs built in Python, not parsed)
    t = cfg.train
    if cfg.peft.method in ("prefix_tuning", "prompt_tuning") and t.packing:
        raise UserError(f"train.packing cannot be combined with peft.method={cfg.peft.method}: the virtual "
                        "tokens are prepended to each row, not to each packed sequence")
    if cfg.peft.method == "qlora" and cfg.model.dtype == "float16" and not torch.cuda.is_available():
        raise UserError("model.dtype=float16 with peft.method=qlora needs a GPU; use float32 or auto on CPU")
    save_steps = t.save_steps or t.eval_steps
    if save_steps % t.eval_steps:
        raise UserError(f"train.save_steps ({save_steps}) must be a multiple of train.eval_steps "
                        f"({t.eval_steps}) so the best checkpoint can be kept")
    if t.early_stopping_patience is not None and cfg.data.validation is None and cfg.data.validation_split <= 0:
        raise UserError("train.early_stopping_patience needs validation data: set data.validation or "
                        "data.validation_split > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "eval_steps", "logging_steps"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name} expects a positive integer, got {getattr(t, name)}")


def trl_args(cfg: SFTConfig, fmt: str, has_eval: bool, bf16: bool):
    """Our config -> trl.SFTConfig (the TrainingArguments SFTTrainer reads)."""
    import trl

    t = cfg.train
    eval_kwargs = {}
    if has_eval:
        # The loss before training is taken inside train() (eval_on_start), not by an evaluate() call
        # before it: under DeepSpeed ZeRO-3 that call builds an inference engine and train() then fails.
        eval_kwargs = dict(eval_strategy="steps", eval_steps=t.eval_steps, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss", greater_is_better=False,
                           eval_on_start=cfg.resume is None)
    return trl.SFTConfig(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        include_num_input_tokens_seen=True,  # kept in the trainer state, so a resumed run counts on from there
        learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps < 1 else int(t.warmup_steps), weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        max_length=t.max_length, packing=t.packing, gradient_checkpointing=t.gradient_checkpointing,
        assistant_only_loss=t.completion_only_loss and fmt in ("messages", "oasst"),
        completion_only_loss=t.completion_only_loss if fmt in ("prompt_completion", "alpaca") else None,
        bf16=bf16, logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps or t.eval_steps,
        save_total_limit=t.save_total_limit, report_to=["wandb"] if cfg.tracking.report_to == "wandb" else [],
        run_name=cfg.tracking.run_name, dataset_num_proc=None, ddp_backend=ddp_backend(), **eval_kwargs,
    )


def build(cfg: SFTConfig):
    """Check the config, load model, tokenizer and data, and build the SFTTrainer (nothing trained yet)."""
    import transformers
    import trl

    check(cfg)
    init_processes()  # before TrainingArguments: gloo on CPU, and a mis-launch refused
    out = Path(cfg.output_dir)
    transformers.set_seed(cfg.seed)
    train_ds, eval_ds, fmt = load_sft_data(cfg.data, cfg.seed)  # first: bad data fails before any writing
    print(f"data: {len(train_ds)} training rows, {len(eval_ds) if eval_ds else 0} validation rows, format {fmt}")
    with main_process_first():  # rank 0 writes the base, the others then read it
        base = models.materialize(cfg.model, out / "base_model", cfg.seed)
    tokenizer = models.load_tokenizer(base, cfg.model)
    model = models.load_causal_lm(base, cfg.model, cfg.peft.method)

    bf16 = cfg.train.bf16 if cfg.train.bf16 is not None else models.torch_dtype(cfg.model) == torch.bfloat16
    args = trl_args(cfg, fmt, eval_ds is not None, bf16)
    callbacks = []
    if cfg.train.early_stopping_patience is not None:
        callbacks.append(transformers.EarlyStoppingCallback(cfg.train.early_stopping_patience,
                                                            cfg.train.early_stopping_threshold))
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, peft_config=models.peft_config(cfg.peft, "CAUSAL_LM", base),
                             callbacks=callbacks)
    # TRL drops rows whose loss mask is empty (the completion cut away by max_length): none may be left
    for name, ds in (("training", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        if ds is not None and len(ds) == 0:
            raise UserError(f"no {name} rows left after tokenizing: every row's completion lies beyond "
                            f"train.max_length={cfg.train.max_length} tokens; raise train.max_length")
    trainable, total = models.count_parameters(trainer.model)
    print(f"peft.method={cfg.peft.method}: trainable parameters {trainable:,} of {total:,} "
          f"({100 * trainable / total:.4f}%)")
    return trainer, fmt


def main(cfg: SFTConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer, fmt = build(cfg)
    if trainer.is_world_process_zero():
        config.save(cfg, out / "rlhf_config.yaml")
    run = tracking.start(cfg.tracking, config.to_dict(cfg), cfg.output_dir, trainer.is_world_process_zero())
    trainable, total = models.count_parameters(trainer.model)
    metrics = {"trainable_parameters": trainable, "total_parameters": total, "format": fmt}
    has_eval = trainer.eval_dataset is not None
    with checkpoints.tensor_only_loads(resume_from):  # DeepSpeed's own torch.load: tensors only
        result = trainer.train(resume_from_checkpoint=resume_from)
    history = trainer.state.log_history  # restored from the checkpoint on resume: the whole run's, not this part's
    if has_eval:  # eval_on_start: logged at step 0
        metrics["eval_loss_before"] = next(h["eval_loss"] for h in history if "eval_loss" in h)
    # The mean training loss of the whole run, from its log (result.training_loss covers only the steps
    # this process ran, so a resumed run would report another value than a straight one).
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    steps = [b - a for a, b in zip([0] + [s for s, _ in logged[:-1]], [s for s, _ in logged])]
    metrics["train_loss"] = (sum(n * loss for n, (_, loss) in zip(steps, logged)) / max(sum(steps), 1)
                             if logged else result.training_loss)
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics["global_step"] = trainer.state.global_step
    if has_eval:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]  # the best checkpoint, reloaded
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint

    tmp = out / ".final.tmp"
    trainer.save_model(str(tmp))  # on every process: under ZeRO-3 they all take part in gathering the weights
    if trainer.is_world_process_zero():  # which writes the files
        trainer.processing_class.save_pretrained(str(tmp))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        checkpoints.publish_dir(tmp, out)
        loss = (f"validation loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}; "
                if "eval_loss_before" in metrics else "")
        print(f"sft done: {loss}saved to {out}")
    barrier()  # no process ends (and tears the group down) mid-publish
    tracking.finish(run)
    return metrics
