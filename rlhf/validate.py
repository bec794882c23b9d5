"""Every config field's domain, stated once, and one pass that checks a whole config before a stage writes
anything. A value the trainer would only discover late (an `eval_steps` of 0 dividing by zero, a NaN
learning rate, an unknown scheduler) or would silently reinterpret (a negative `max_samples`, a zero
`forward_batch_size`) is a one-line UserError naming the field.

Domains are keyed by field name: the same name means the same thing in every section (`learning_rate`
of SFT, the reward model and PPO). `None` is always accepted where the field's type allows it (it means
"the default" there). Every float must be finite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from rlhf.errors import UserError

Check = tuple[Callable[[Any], bool], str]  # (test, what was expected)

POSITIVE_INT: Check = (lambda v: v >= 1, "a positive integer")
NON_NEGATIVE: Check = (lambda v: v >= 0, "a number >= 0")
POSITIVE: Check = (lambda v: v > 0, "a number > 0")
UNIT: Check = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
PROBABILITY: Check = (lambda v: 0 < v <= 1, "a number in (0, 1]")
SPLIT: Check = (lambda v: 0 <= v < 1, "a fraction in [0, 1)")

DOMAINS: dict[str, Check] = {
    **dict.fromkeys([
        "batch_size", "buckets", "calibration_bins", "eval_steps", "every", "forward_batch_size",
        "gradient_accumulation_steps", "hacking_window", "hidden_size", "intermediate_size", "kl_horizon",
        "logging_steps", "lora_alpha", "max_length", "max_length_chars", "max_new_tokens", "max_position_embeddings",
        "max_prompt_length", "max_prompts", "max_samples", "normalize_samples", "num_attention_heads",
        "num_hidden_layers", "num_key_value_heads", "num_mini_batches", "num_samples", "num_virtual_tokens",
        "per_device_eval_batch_size", "per_device_rollout_batch_size", "per_device_train_batch_size", "ppo_epochs",
        "r", "samples_per_prompt", "save_steps", "save_total_limit", "steps", "cpu_threads",
        "early_stopping_patience"], POSITIVE_INT),
    **dict.fromkeys([
        "sample_every", "seed", "warmup_steps", "weight_decay", "entropy_coef", "vf_coef", "kl_coef", "max_grad_norm",
        "critic_max_grad_norm", "early_stopping_threshold", "center_rewards_coefficient", "learning_rate",
        "critic_learning_rate"], NON_NEGATIVE),
    **dict.fromkeys(["num_train_epochs", "kl_target", "cliprange", "cliprange_value", "reward_clip", "margin_scale"],
                    POSITIVE),
    "temperature": NON_NEGATIVE,  # 0: greedy where sampling is optional (PPO's own check asks for > 0)
    "top_p": PROBABILITY,
    "gamma": UNIT,
    "lam": UNIT,
    "threshold": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lora_dropout": SPLIT,
    "validation_split": SPLIT,
    "test_split": SPLIT,
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (train for num_train_epochs) or a positive integer"),
    "beta": POSITIVE,  # DPO: beta = 0 would drop the reference from the loss (and divide by zero in IPO)
    # robust DPO: a label-flip probability of 0.5 or more makes the loss prefer the rejected reply
    "label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
}


def _scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of the dataclass `cfg` (and its sections) against its domain."""
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, name + ".")
            continue
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
        if f.name == "lr_scheduler_type" and value not in _scheduler_names():
            raise UserError(f"{name}: unknown scheduler '{value}'; expected one of {', '.join(_scheduler_names())}")
        check = DOMAINS.get(f.name)
        if check is not None and isinstance(value, (int, float)) and not check[0](value):
            raise UserError(f"{name} must be {check[1]}, got {value}")


def domain_of(name: str) -> str | None:
    """What `name` accepts, in words (for docs and tests)."""
    check = DOMAINS.get(name)
    return check[1] if check else None

