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

With `eval.prompts` and `eval.reward.spec` (the true objective), the trained policy and the one DPO started
from answer the same held-out prompts, as `rlhf eval policy` does: the true metric before and after DPO,
sampled and greedy, goes to metrics.json (`heldout`) and the pipeline's report, as PPO's held-out evaluation does.

Writes to output_dir the same layout as `rlhf sft`: the adapter (or full model) and tokenizer, loadable as a
policy (`rlhf generate --model OUT`, `rlhf eval policy --policy OUT`); `checkpoint-N/`; `rlhf_config.yaml`;
`metrics.json` (validation loss, reward accuracy and margin before/after; the held-out true metric before
and after); `base_model/` for `tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

from policies import models
from rlhf.config import DPOConfig
from rlhf.errors import UserError
from rlhf.runtime import checkpoints
from rlhf.runtime.distributed import main_process_first
from rlhf.runtime.outputs import user_run
from rlhf.stages import hf_trainer
from rlhf.stages.reward_stage import load_preference_data

PEFT_METHODS = ("full", "lora", "qlora")
# Validation metrics TRL logs (prefixed `eval_`) that metrics.json keeps before and after training.
EVAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins")
BEST_METRIC = {"loss": "eval_loss", "accuracy": "eval_rewards/accuracies"}


def check(cfg: DPOConfig) -> None:
    """Refuse option combinations that cannot work, before any loading."""
    from rlhf.validate import fits_tiny

    hf_trainer.check(cfg, "rlhf dpo", PEFT_METHODS)
    d, e = cfg.dpo, cfg.eval
    if d.loss_type == "exo_pair" and d.label_smoothing == 0:
        raise UserError("dpo.loss_type=exo_pair needs dpo.label_smoothing > 0 (EXO's epsilon; 1e-3 is typical)")
    # TRL computes log-probabilities from lm_head.weight directly: an adapter there would never train
    for name in ("target_modules", "modules_to_save"):
        if cfg.peft.method != "full" and "lm_head" in (getattr(cfg.peft, name) or []):
            raise UserError(f"peft.{name} includes lm_head, which `rlhf dpo` cannot train (TRL computes "
                            "log-probabilities from its weight directly); leave it out")
    if e.prompts is not None:
        if e.reward.spec is None:
            raise UserError("eval.prompts needs eval.reward.spec: DPO has no reward of its own to judge the held-out "
                            "answers with; give the true objective (a function, a reward model or a classifier)")
        fits_tiny(cfg.model, e.max_prompt_length + e.max_new_tokens, "eval.max_prompt_length + eval.max_new_tokens")


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
    if not (merged / "config.json").exists() or not models.stamp_matches(merged / "merged_from.json", stamp):
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


def trl_args(cfg: DPOConfig, has_eval: bool):
    """Our config -> trl.DPOConfig."""
    import trl

    d = cfg.dpo
    return hf_trainer.training_args(
        trl.DPOConfig, cfg, has_eval, BEST_METRIC[cfg.train.metric_for_best_model], eval_on_start=True,
        max_length=cfg.train.max_length, beta=d.beta, loss_type=[d.loss_type], label_smoothing=d.label_smoothing,
        disable_dropout=True, dataset_num_proc=None)


def build(cfg: DPOConfig):
    """Check the config, load data, tokenizer, policy and reference, and build the DPOTrainer (nothing trained)."""
    import trl

    from reward.models import ensure_chat_template
    check(cfg)
    out = hf_trainer.setup(cfg)
    train_pairs, val_pairs, _ = load_preference_data(cfg.data, cfg.seed)  # bad data fails before any writing
    print(f"data: {len(train_pairs)} training pairs, {len(val_pairs) if val_pairs else 0} validation pairs")
    with main_process_first():  # rank 0 writes the base (or merges the SFT adapter), the others then read it
        base = policy_base(cfg, out)
    tokenizer = models.load_tokenizer(base, cfg.model)
    if ensure_chat_template(tokenizer):  # saved with the policy, so generation renders prompts the same way
        print("chat template: plain `Role: text` (the tokenizer has none)")
    policy, reference = load_models(cfg, base)

    train_rows = conversational(train_pairs)
    val_rows = conversational(val_pairs) if val_pairs is not None else None
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=trl_args(cfg, val_rows is not None),
                             train_dataset=train_rows, eval_dataset=val_rows, processing_class=tokenizer,
                             peft_config=models.peft_config(cfg.peft, "CAUSAL_LM"), callbacks=hf_trainer.callbacks(cfg))
    hf_trainer.attach(trainer)  # plain progress lines off a terminal; TRL's token count kept across a resume
    report_dropped(len(train_rows), trainer.train_dataset, cfg.train.max_length, "training")
    if val_rows is not None:
        report_dropped(len(val_rows), trainer.eval_dataset, cfg.train.max_length, "validation")
    hf_trainer.report_trainable(trainer, cfg, "; reference: " + ("the base with the adapter disabled"
                                                                 if reference is None else "a frozen copy of the base"))
    return trainer


def heldout(cfg: DPOConfig, policy: Path, reference: str) -> dict:
    """The true metric before and after DPO: `rlhf eval policy` of the trained `policy` against the one DPO
    started from (its `reference`) on eval.prompts, judged by eval.reward, sampled at eval.temperature and
    (eval.greedy) greedy. Keys as PPO's held-out evaluation logs them (eval/reward, eval/greedy/reward, ...)."""
    from rlhf.evaluation import eval_policy
    from rlhf.ppo.config import PromptDataConfig, RewardSpec

    e = cfg.eval
    judge = RewardSpec(spec=e.reward.spec, kind=e.reward.kind, label=e.reward.label, batch_size=e.reward.batch_size)
    before, after, reports = {}, {}, {}
    for prefix, temperature in [("", e.temperature)] + ([("greedy/", 0.0)] if e.greedy else []):
        r = eval_policy.evaluate(eval_policy.EvalPolicyConfig(
            policy=str(policy), reference=reference, reward=judge,
            prompts=PromptDataConfig(train=e.prompts, format=e.format, max_samples=e.max_prompts),
            max_new_tokens=e.max_new_tokens, temperature=temperature, max_prompt_length=e.max_prompt_length,
            seed=cfg.seed, samples_per_prompt=e.samples_per_prompt,
            allow_pickle_weights=cfg.model.allow_pickle_weights))
        reports[prefix or "sampled/"] = r
        for side, m in (("reference", before), ("policy", after)):
            m.update({f"eval/{prefix}reward": r[f"reward_{side}"], f"eval/{prefix}length": r[f"length_{side}"],
                      f"eval/{prefix}eos_rate": r[f"eos_rate_{side}"]})
        if not prefix:  # KL to the starting policy on the sampled answers (0 for the starting policy itself)
            before["eval/kl"], after["eval/kl"] = 0.0, r["kl_policy_reference"]
    shown = reports.get("greedy/", reports["sampled/"])
    return {"eval_reward": e.reward.spec, "prompts": e.prompts, "n_prompts": shown["n_prompts"],
            "reference": reference, "before": before, "after": after,
            "win_rate": reports["sampled/"]["win_rate"], "samples_mode": "greedy" if e.greedy else "sampled",
            "samples": shown["samples"]}


def main(cfg: DPOConfig) -> dict:
    with user_run(cfg.output_dir):  # a refused run leaves no output directory behind
        return _run(cfg)


def _run(cfg: DPOConfig) -> dict:
    out = Path(cfg.output_dir)
    resume_from = checkpoints.resolve_resume(cfg.resume, out)
    trainer = build(cfg)
    run, metrics = hf_trainer.start(cfg, trainer)
    metrics["train_pairs"] = len(trainer.train_dataset)
    has_eval = trainer.eval_dataset is not None
    result = hf_trainer.train(trainer, resume_from)  # tensors only are read from the checkpoint
    history = trainer.state.log_history  # restored from the checkpoint on resume: the whole run's
    start = next((h for h in history if "eval_loss" in h and h.get("step") == 0), None)
    if start is not None:  # eval_on_start: policy == reference, so every implicit reward is 0 (accuracy 0, margin 0)
        metrics.update({f"eval_{k}_before": start[f"eval_{k}"] for k in EVAL_METRICS})
    train_loss = hf_trainer.run_mean(history)
    metrics["train_loss"] = train_loss if train_loss is not None else result.training_loss
    metrics["global_step"] = trainer.state.global_step
    if has_eval:
        final = trainer.evaluate()  # the best checkpoint, reloaded
        metrics.update({f"eval_{k}": final[f"eval_{k}"] for k in EVAL_METRICS})
        metrics["best_checkpoint"] = trainer.state.best_model_checkpoint

    def evaluate_saved(tmp: Path) -> None:  # the policy as saved (before it is published), on the main process
        if cfg.eval.prompts is not None:
            reference = policy_base(cfg, out)  # written by build: found again, not rebuilt
            metrics["heldout"] = {**heldout(cfg, tmp, reference), "policy": str(out)}

    if hf_trainer.publish(trainer, out, metrics, evaluate_saved):
        val = (f"validation reward accuracy {metrics['eval_rewards/accuracies_before']:.3f} -> "
               f"{metrics['eval_rewards/accuracies']:.3f}, margin {metrics['eval_rewards/margins']:.3f}, "
               f"loss {metrics['eval_loss_before']:.4f} -> {metrics['eval_loss']:.4f}; "
               if "eval_loss_before" in metrics else "")
        h = metrics.get("heldout")
        true = "".join(f"held-out {name} {h['before'][key]:.3f} -> {h['after'][key]:.3f} ({h['eval_reward']}); "
                       for name, key in (("reward", "eval/reward"), ("greedy reward", "eval/greedy/reward"))
                       if h and key in h["before"])
        print(f"dpo done: {val}{true}saved to {out}")
    hf_trainer.finish(run)
    return metrics
