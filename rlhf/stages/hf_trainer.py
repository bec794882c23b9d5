"""What the four stages on a transformers Trainer share (SFT, reward model, classifier, DPO): the rules
between their fields, our `train` section as TrainingArguments, and the run around `trainer.train`
(resolved config saved, tracking, the final model published whole). Each stage keeps only its own: data,
models, the Trainer class and its own arguments, and what it measures.

    check(cfg)                        domains (one pass), then the rules every Trainer stage shares
    training_args(trl.SFTConfig, ...) TrainingArguments from cfg.train (+ the stage's own arguments)
    attach(trainer)                   our progress bars; TRL's token count kept across a resume
    run, metrics = start(cfg, trainer)
    result = train(trainer, resume_from)
    publish(trainer, out, metrics)    model, tokenizer, metrics.json appear whole in output_dir
    finish(run)

What `attach` adds to a Trainer:
- Progress as `rlhf.runtime.progress` draws it (plain lines off a terminal), in place of transformers'
  ProgressCallback.
- TRL's token count across a resume. TRL's trainers count the training tokens they have seen (the log's
  `num_tokens` and `eval_num_tokens`) in `trainer._total_train_tokens`, which no checkpoint holds, so a
  resumed run counted from 0 again while everything else continued. The count is written into each
  checkpoint's trainer_state.json (under `stateful_callbacks`, which transformers saves as it finds it) and
  read back from there when training resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import ProgressCallback, TrainerCallback
from transformers.trainer_utils import has_length

from policies import models
from rlhf import config
from rlhf.errors import UserError
from rlhf.runtime import checkpoints, tracking
from rlhf.runtime.distributed import barrier, ddp_backend, init_processes
from rlhf.runtime.progress import Progress, interactive

TOKENS_KEY = "rlhf_total_train_tokens"  # our entry in trainer_state.json's stateful_callbacks


class TrainerProgress(ProgressCallback):
    """transformers' ProgressCallback with `Progress` bars; evaluation bars only on a terminal (off it, the
    evaluation's result is logged as a line anyway)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed run's bar starts where its checkpoint was
            self.training_bar = Progress(total=state.max_steps, initial=state.global_step, desc="train",
                                         dynamic_ncols=True)
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader) and interactive():
            if self.prediction_bar is None:
                self.prediction_bar = Progress(total=len(eval_dataloader), leave=self.training_bar is None,
                                               desc="eval", dynamic_ncols=True)
            self.prediction_bar.update(1)


class TokenCount(TrainerCallback):
    """Keeps a TRL trainer's `_total_train_tokens` in the trainer state (see the module's docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # state is the checkpoint's on a resume (loaded before this call), a new one otherwise
        saved = state.stateful_callbacks.get(TOKENS_KEY)
        if saved is None and state.global_step > 0:  # a checkpoint written before the count was kept
            saved = next((row["num_tokens"] for row in reversed(state.log_history) if "num_tokens" in row), 0)
        if saved is not None:
            self.trainer._total_train_tokens = int(saved)

    def on_step_end(self, args, state, control, **kwargs):
        # before the step's log, evaluation and checkpoint (which writes trainer_state.json)
        state.stateful_callbacks[TOKENS_KEY] = self.trainer._total_train_tokens


def attach(trainer) -> None:
    """Our progress bars, and for TRL's trainers (SFT, reward, DPO) the token count kept across resumes."""
    if trainer.pop_callback(ProgressCallback) is not None:  # absent with disable_tqdm (PrinterCallback instead)
        trainer.add_callback(TrainerProgress())
    if "_total_train_tokens" in vars(trainer):  # TRL's trainers; transformers' own (the classifier) counts none
        trainer.add_callback(TokenCount(trainer))


def has_validation(data: Any) -> bool:
    """Validation data is given, or a share of the training data is held out for it."""
    return data.validation is not None or data.validation_split > 0


def check(cfg: Any, command: str, peft_methods: tuple[str, ...] | None = None) -> None:
    """Every field's domain (one pass, also for configs built in Python), then the rules between fields
    that every Trainer stage shares. `peft_methods`: the methods the stage supports (None: all)."""
    from rlhf.validate import fits_tiny, validate

    validate(cfg)
    t = cfg.train
    fits_tiny(cfg.model, t.max_length, "train.max_length")
    if peft_methods is not None and cfg.peft.method not in peft_methods:
        raise UserError(f"peft.method={cfg.peft.method} is not supported by `{command}`; use one of "
                        f"{', '.join(peft_methods)}")
    if cfg.peft.method == "qlora" and cfg.model.dtype == "float16" and not torch.cuda.is_available():
        raise UserError("model.dtype=float16 with peft.method=qlora needs a GPU; use float32 or auto on CPU")
    save_steps = t.save_steps or t.eval_steps
    if save_steps % t.eval_steps:
        raise UserError(f"train.save_steps ({save_steps}) must be a multiple of train.eval_steps "
                        f"({t.eval_steps}) so the best checkpoint can be kept")
    if t.early_stopping_patience is not None and not has_validation(cfg.data):
        raise UserError("train.early_stopping_patience needs validation data: set data.validation or "
                        "data.validation_split > 0")


def setup(cfg: Any) -> Path:
    """Before TrainingArguments: the process group (gloo on CPU, a mis-launch refused) and the seed."""
    import transformers

    init_processes()
    transformers.set_seed(cfg.seed)
    return Path(cfg.output_dir)


def use_bf16(cfg: Any) -> bool:
    """train.bf16, or (None) bf16 when the model computes in bfloat16."""
    return cfg.train.bf16 if cfg.train.bf16 is not None else models.torch_dtype(cfg.model) == torch.bfloat16


def training_args(args_cls: type, cfg: Any, has_eval: bool, best_metric: str = "eval_loss",
                  eval_on_start: bool = False, **stage: Any):
    """cfg.train as `args_cls` (TrainingArguments or a TRL subclass), with the stage's own arguments.
    With validation data: evaluate every eval_steps and reload the checkpoint best by `best_metric` at the end
    (lower is better for the loss, higher for the rest); `eval_on_start` also evaluates at step 0."""
    t = cfg.train
    evaluation: dict = {}
    if has_eval:
        evaluation = dict(eval_strategy="steps", eval_steps=t.eval_steps, load_best_model_at_end=True,
                          metric_for_best_model=best_metric, greater_is_better=best_metric != "eval_loss")
        if eval_on_start:
            # The metrics before training come from inside train() rather than an evaluate() call before it:
            # under DeepSpeed ZeRO-3 that call builds an inference engine and train() then fails.
            evaluation["eval_on_start"] = cfg.resume is None
    return args_cls(
        output_dir=cfg.output_dir, seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=t.learning_rate, num_train_epochs=t.num_train_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps < 1 else int(t.warmup_steps), weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, gradient_checkpointing=t.gradient_checkpointing, bf16=use_bf16(cfg),
        logging_steps=t.logging_steps, save_strategy="steps", save_steps=t.save_steps or t.eval_steps,
        save_total_limit=t.save_total_limit, report_to=["wandb"] if cfg.tracking.report_to == "wandb" else [],
        run_name=cfg.tracking.run_name, ddp_backend=ddp_backend(), **evaluation, **stage,
    )


def callbacks(cfg: Any) -> list:
    """Early stopping on the best-model metric, when train.early_stopping_patience is set."""
    import transformers

    t = cfg.train
    if t.early_stopping_patience is None:
        return []
    return [transformers.EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold)]


def report_trainable(trainer, cfg: Any, note: str = "") -> None:
    trainable, total = models.count_parameters(trainer.model)
    print(f"peft.method={cfg.peft.method}: trainable parameters {trainable:,} of {total:,} "
          f"({100 * trainable / total:.4f}%){note}")


def start(cfg: Any, trainer) -> tuple[Any, dict]:
    """Save the resolved config, start tracking; returns (run, the metrics every stage reports)."""
    if trainer.is_world_process_zero():
        config.save(cfg, Path(cfg.output_dir) / "rlhf_config.yaml")
    run = tracking.start(cfg.tracking, config.to_dict(cfg), cfg.output_dir, trainer.is_world_process_zero())
    trainable, total = models.count_parameters(trainer.model)
    return run, {"trainable_parameters": trainable, "total_parameters": total}


def train(trainer, resume_from: str | None):
    """`trainer.train`, resumed from `resume_from` (None: from the start); every torch.load of the resume,
    DeepSpeed's own included, reads tensors only (see rlhf/runtime/checkpoints.py)."""
    with checkpoints.tensor_only_loads(resume_from):
        return trainer.train(resume_from_checkpoint=resume_from)


def run_mean(history: list[dict], key: str = "loss") -> float | None:
    """Mean of a per-step training metric over the whole run, from the Trainer's log (each logged value
    covers the steps since the one before). A resumed run restores the log, so this is the straight run's
    (`train()`'s own training_loss covers only the steps this process ran)."""
    logged = [(h["step"], h[key]) for h in history if key in h and "step" in h]
    if not logged:
        return None
    steps = [b - a for a, b in zip([0] + [s for s, _ in logged[:-1]], [s for s, _ in logged])]
    return sum(n * v for n, (_, v) in zip(steps, logged)) / max(sum(steps), 1)


def publish(trainer, out: Path, metrics: dict, extra: Callable[[Path], None] | None = None) -> bool:
    """Write the final model (adapter or full) and tokenizer, then `extra(dir)` (files of the stage's own; it may
    add to `metrics`), then metrics.json, into `out`, each file appearing whole. True on the process that wrote."""
    tmp = out / ".final.tmp"
    trainer.save_model(str(tmp))  # on every process: under ZeRO-3 they all take part in gathering the weights
    if not trainer.is_world_process_zero():  # which writes the files
        return False
    trainer.processing_class.save_pretrained(str(tmp))
    if extra is not None:
        extra(tmp)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    checkpoints.publish_dir(tmp, out)
    return True


def finish(run) -> None:
    barrier()  # no process ends (and tears the group down) mid-publish
    tracking.finish(run)
