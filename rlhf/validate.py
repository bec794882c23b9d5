"""Every config field's domain, stated once, and one pass that checks a whole config before a stage writes
anything. A value the trainer would only discover late (an `eval_steps` of 0 dividing by zero, a NaN
learning rate, an unknown scheduler) or would silently reinterpret (a negative `max_samples`, a zero
`forward_batch_size`) is a one-line UserError naming the field.

Domains are keyed by field name: the same name means the same thing in every section (`learning_rate`
of SFT, the reward model and PPO). `None` is always accepted where the field's type allows it (it means
"the default" there). Every float must be finite, also inside mappings (`weights`). A `Literal[...]` field
(a format, a PEFT method) accepts only its names, also for configs built in Python. `RELATIONS` are the few
checks between fields of one section (the tiny model's head counts), run after the fields' own.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Callable, Literal

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
        "early_stopping_patience", "max_model_len", "cpu_kv_cache_gb"], POSITIVE_INT),
    **dict.fromkeys([
        "sample_every", "weight_decay", "entropy_coef", "vf_coef", "kl_coef", "max_grad_norm",
        "critic_max_grad_norm", "early_stopping_threshold", "center_rewards_coefficient", "learning_rate",
        "critic_learning_rate"], NON_NEGATIVE),
    **dict.fromkeys(["num_train_epochs", "kl_target", "cliprange", "cliprange_value", "reward_clip", "margin_scale"],
                    POSITIVE),
    "temperature": NON_NEGATIVE,  # 0: greedy where sampling is optional (PPO's own check asks for > 0)
    "top_p": PROBABILITY,
    "max_turns": POSITIVE_INT,  # env: agent turns per episode
    "max_total_tokens": POSITIVE_INT,  # env: tokens per episode
    "gpu_memory_utilization": PROBABILITY,  # the vLLM engine's share of the GPU
    "max_logprob_diff": POSITIVE,
    "start_timeout": POSITIVE,
    "gamma": UNIT,
    "lam": UNIT,
    "threshold": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "lora_dropout": SPLIT,
    "validation_split": SPLIT,
    "test_split": SPLIT,
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (train for num_train_epochs) or a positive integer"),
    # numpy's and torch's generators take 32-bit seeds: a larger one fails inside set_seed
    "seed": (lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    # < 1: a share of the optimizer steps; from 1: a number of steps (2.5 steps would be cut to 2 silently)
    "warmup_steps": (lambda v: v >= 0 and (v < 1 or float(v).is_integer()),
                     "a fraction in [0, 1) or a whole number of steps"),
    "min_score_ratio": POSITIVE,
    "missing_eos_penalty": (lambda v: True, "a finite number"),  # any sign: a penalty, or a bonus for stopping
    # the benchmarks' sizes (bench_align.check states the domains of the rest of its fields)
    **dict.fromkeys(["sft_rows", "sft_steps", "pair_prompts", "rm_steps", "rollout_batch", "eval_prompts", "rloo_k", "group_size", "dpo_steps",
                     "tiny_vocab_size", "lora_r", "prompt_length", "response_length"], POSITIVE_INT),
    "bt_beta": POSITIVE,
    "rm_learning_rate": NON_NEGATIVE,
    "dpo_beta": POSITIVE,
    "dpo_learning_rate": NON_NEGATIVE,
    "beta": POSITIVE,  # DPO: beta = 0 would drop the reference from the loss (and divide by zero in IPO)
    # robust DPO: a label-flip probability of 0.5 or more makes the loss prefer the rejected reply
    "label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
}


def _scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def _attn_implementations() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def _literal_names(tp: Any) -> tuple | None:
    """The names a `Literal[...]` (or `Optional[Literal[...]]`) type accepts; None for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((typing.get_args(a) for a in typing.get_args(tp) if typing.get_origin(a) is Literal), None)
    return None


def _tiny_heads(cfg: Any, prefix: str) -> None:
    """The tiny Llama's attention shapes: heads split hidden_size, key/value heads group the heads, and
    rotary embeddings need an even head dimension (else a shape error deep in the first forward)."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"{prefix}hidden_size ({cfg.hidden_size}) must be divisible by {prefix}num_attention_heads "
                        f"({cfg.num_attention_heads})")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise UserError(f"{prefix}num_attention_heads ({cfg.num_attention_heads}) must be divisible by "
                        f"{prefix}num_key_value_heads ({cfg.num_key_value_heads})")
    if (cfg.hidden_size // cfg.num_attention_heads) % 2:
        raise UserError(f"{prefix}hidden_size / {prefix}num_attention_heads = "
                        f"{cfg.hidden_size // cfg.num_attention_heads} must be even (rotary embeddings)")


def _fits_tiny(cfg: Any, prefix: str) -> None:
    """A stage on the built-in tiny model: its sequences fit the model's positions (beyond them rotary
    embeddings extrapolate without an error, and the model is silently trained out of its range)."""
    if cfg.model.name_or_path != "tiny":
        return
    if hasattr(cfg, "train"):
        need, what = cfg.train.max_length, f"{prefix}train.max_length"
    else:
        need = cfg.ppo.max_prompt_length + cfg.ppo.max_new_tokens
        what = f"{prefix}ppo.max_prompt_length + {prefix}ppo.max_new_tokens"
    limit = cfg.model.tiny.max_position_embeddings
    if need > limit:
        raise UserError(f"{what} ({need}) exceeds {prefix}model.tiny.max_position_embeddings ({limit})")


RELATIONS: dict[str, Callable[[Any, str], None]] = {
    "TinyModelConfig": _tiny_heads,
    **dict.fromkeys(["SFTConfig", "RewardConfig", "ClassifierConfig", "PPOConfig"], _fits_tiny),
}


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every field of the dataclass `cfg` (and its sections) against its domain."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, name + ".")
            continue
        if value is None:
            continue
        names = _literal_names(hints.get(f.name))
        if names is not None and value not in names:
            raise UserError(f"{name}: unknown value {value!r}; expected one of {', '.join(map(str, names))}")
        if isinstance(value, bool):
            continue
        if isinstance(value, dict):  # a mapping's numbers (HelpSteer2 attribute weights) are finite too
            bad = [k for k, v in value.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise UserError(f"{name}.{bad[0]} must be a finite number, got {value[bad[0]]}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
        if f.name == "lr_scheduler_type" and value not in _scheduler_names():
            raise UserError(f"{name}: unknown scheduler '{value}'; expected one of {', '.join(_scheduler_names())}")
        # a hub kernel (`kernels-community/flash-attn`) is named owner/name; anything else transformers knows
        if f.name == "attn_implementation" and "/" not in value and value not in _attn_implementations():
            raise UserError(f"{name}: unknown attention implementation '{value}'; expected one of "
                            f"{', '.join(_attn_implementations())} (or a hub kernel owner/name)")
        check = DOMAINS.get(f.name)
        if check is not None and isinstance(value, (int, float)) and not check[0](value):
            raise UserError(f"{name} must be {check[1]}, got {value}")
    relation = RELATIONS.get(type(cfg).__name__)
    if relation is not None:
        relation(cfg, prefix)


def domain_of(name: str) -> str | None:
    """What `name` accepts, in words (for docs and tests)."""
    check = DOMAINS.get(name)
    return check[1] if check else None

