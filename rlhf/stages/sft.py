"""Stage 1: supervised fine-tuning (`rlhf sft`), on trl.SFTTrainer.

    rlhf sft --config configs/sft_tiny.yaml --peft.method lora --output_dir runs/sft

Writes to output_dir: the adapter (or full model) and tokenizer, loadable with plain
transformers/peft; `checkpoint-N/` folders; `rlhf_config.yaml` (the resolved config);
`metrics.json` (validation loss before and after); `base_model/` when the base is the built-in tiny one.
"""

from __future__ import annotations

from pathlib import Path

from policies import models
from rlhf.config import SFTConfig
from rlhf.data.sft_data import load_sft_data
from rlhf.errors import UserError
from rlhf.runtime import checkpoints
from rlhf.runtime.distributed import main_process_first
from rlhf.runtime.outputs import user_run
from rlhf.stages import hf_trainer


def check(cfg: SFTConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    hf_trainer.check(cfg, "rlhf sft")
    if cfg.peft.method in ("prefix_tuning", "prompt_tuning") and cfg.train.packing:
        raise UserError(f"train.packing cannot be combined with peft.method={cfg.peft.method}: the virtual "
                        "tokens are prepended to each row, not to each packed sequence")


def trl_args(cfg: SFTConfig, fmt: str, has_eval: bool):
    """Our config -> trl.SFTConfig (the TrainingArguments SFTTrainer reads)."""
    import trl

    t = cfg.train
    return hf_trainer.training_args(
        trl.SFTConfig, cfg, has_eval, eval_on_start=True,
        include_num_input_tokens_seen=True,  # kept in the trainer state, so a resumed run counts on from there
        max_length=t.max_length, packing=t.packing,
        assistant_only_loss=t.completion_only_loss and fmt in ("messages", "oasst"),
        completion_only_loss=t.completion_only_loss if fmt in ("prompt_completion", "alpaca") else None,
        dataset_num_proc=None)


def build(cfg: SFTConfig):
    """Check the config, load model, tokenizer and data, and build the SFTTrainer (nothing trained yet)."""
    import trl

    check(cfg)
    out = hf_trainer.setup(cfg)
    train_ds, eval_ds, fmt = load_sft_data(cfg.data, cfg.seed)  # first: bad data fails before any writing
    print(f"data: {len(train_ds)} training rows, {len(eval_ds) if eval_ds else 0} validation rows, format {fmt}")
    with main_process_first():  # rank 0 writes the base, the others then read it
        base = models.materialize(cfg.model, out / "base_model", cfg.seed)
    tokenizer = models.load_tokenizer(base, cfg.model)
    model = models.load_causal_lm(base, cfg.model, cfg.peft.method)
    trainer = trl.SFTTrainer(model=model, args=trl_args(cfg, fmt, eval_ds is not None), train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer,
                             peft_config=models.peft_config(cfg.peft, "CAUSAL_LM", base),
                             callbacks=hf_trainer.callbacks(cfg))
    hf_trainer.attach(trainer)  # plain progress lines off a terminal; TRL's token count kept across a resume
    # TRL drops rows whose loss mask is empty (the completion cut away by max_length): none may be left
    for name, ds in (("training", trainer.train_dataset), ("validation", trainer.eval_dataset)):
        if ds is not None and len(ds) == 0:
            raise UserError(f"no {name} rows left after tokenizing: every row's completion lies beyond "
                            f"train.max_length={cfg.train.max_length} tokens; raise train.max_length")
    hf_trainer.report_trainable(trainer, cfg)
    return trainer, fmt


def main(cfg: SFTConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: SFTConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer, fmt = build(cfg)
    run, metrics = hf_trainer.start(cfg, trainer)
    metrics["format"] = fmt
    has_eval = trainer.eval_dataset is not None
    result = hf_trainer.train(trainer, resume_from)  # tensors only are read from the checkpoint
    history = trainer.state.log_history  # restored from the checkpoint on resume: the whole run's, not this part's
    if has_eval:  # eval_on_start: logged at step 0
        metrics["eval_loss_before"] = next(h["eval_loss"] for h in history if "eval_loss" in h)
    train_loss = hf_trainer.run_mean(history)
    metrics["train_loss"] = train_loss if train_loss is not None else result.training_loss
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    metrics["global_step"] = trainer.state.global_step
    if has_eval:
        metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]  # the best checkpoint, reloaded
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint

    if hf_trainer.publish(trainer, out, metrics):
        loss = (f"validation loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss_after']:.4f}; "
                if "eval_loss_before" in metrics else "")
        print(f"sft done: {loss}saved to {out}")
    hf_trainer.finish(run)
    return metrics
