"""Typed run configuration: YAML file + command-line overrides -> dataclasses.

    rlhf sft --config configs/sft_tiny.yaml --peft.method lora --train.learning_rate 1e-4

The YAML is checked here against the dataclasses (unknown keys and wrong types are errors naming the
file, line, key and what was expected); the result becomes the defaults of a tyro parser, which reads
the `--section.field value` overrides and renders `--help` from the field docstrings. Each field's domain is
part of its type (`eval_steps: PositiveInt[int] = 50`, `policies/domains.py`, re-exported here), shown in
`--help` after the default and checked for the whole config by `rlhf.validate.validate` once it is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from policies.config import ModelConfig, PeftConfig
from policies.domains import (  # noqa: F401  (re-exported: every config module declares domains from here)
    AnyNumber,
    Domain,
    Fraction,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Probability,
    Seed,
    Unit,
    domain,
)
from rlhf.errors import UserError

C = TypeVar("C")


def _scheduler_name(name: str) -> bool:
    from transformers import SchedulerType

    return name in [s.value for s in SchedulerType]


SchedulerName = domain(_scheduler_name, "a transformers scheduler name (linear, cosine, constant, "
                                        "constant_with_warmup, polynomial, ...)")
# < 1: a share of the optimizer steps; from 1: a number of steps (2.5 steps would be cut to 2 silently)
WarmupSteps = domain(lambda v: v >= 0 and (v < 1 or float(v).is_integer()),
                     "a fraction in [0, 1) or a whole number of steps")
TrainSteps = domain(lambda v: v == -1 or v >= 1, "-1 (train for num_train_epochs) or a positive integer")


@dataclass
class DataConfig:
    """Where the training data comes from and what shape it has."""

    train: str = "builtin:quickstart_sft"
    """Training data: a local .jsonl/.json/.csv/.parquet file, `builtin:NAME` (shipped), or a hub
    dataset `owner/name` (`owner/name:config` for a configuration)."""
    validation: Optional[str] = None
    """Validation data (same forms as `train`). None: hold out `validation_split` of `train`."""
    validation_split: Fraction[float] = 0.1
    """Fraction of `train` held out for validation when `validation` is None (0 disables evaluation)."""
    split: str = "train"
    """Split to read from a hub dataset."""
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text", "oasst"] = "auto"
    """Row format: `messages` (chat turns), `prompt_completion`, `alpaca` (instruction/input/output),
    `text` (plain language modelling), `oasst` (OpenAssistant message trees); `auto` detects it from
    the columns."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Rename source columns to the format's names, e.g. `{question: prompt, answer: completion}`."""
    max_samples: PositiveInt[Optional[int]] = None
    """Use only the first N training rows (for quick experiments)."""


@dataclass
class OptimConfig:
    """Optimisation, evaluation and checkpointing, shared by the Trainer-based stages."""

    learning_rate: NonNegative[float] = 2e-4
    """Peak learning rate."""
    num_train_epochs: Positive[float] = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: TrainSteps[int] = -1
    """Stop after this many optimizer steps (-1: run num_train_epochs)."""
    per_device_train_batch_size: PositiveInt[int] = 8
    """Rows (sequences, pairs or examples) per device per forward pass."""
    per_device_eval_batch_size: PositiveInt[int] = 8
    """Rows per device per evaluation forward pass."""
    gradient_accumulation_steps: PositiveInt[int] = 1
    """Forward/backward passes per optimizer step."""
    lr_scheduler_type: SchedulerName[str] = "cosine"
    """transformers scheduler name (`linear`, `cosine`, `constant`, `constant_with_warmup`, ...)."""
    warmup_steps: WarmupSteps[float] = 0
    """Linear learning-rate warm-up: a number of steps, or a fraction in [0, 1) of all steps."""
    weight_decay: NonNegative[float] = 0.0
    """AdamW weight decay."""
    max_grad_norm: NonNegative[float] = 1.0
    """Gradient clipping norm."""
    max_length: PositiveInt[int] = 1024
    """Truncate tokenised sequences to this many tokens."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    bf16: Optional[bool] = None
    """bf16 mixed precision. None: on when a GPU supports it."""
    logging_steps: PositiveInt[int] = 10
    """Log metrics every N optimizer steps."""
    eval_steps: PositiveInt[int] = 50
    """Evaluate on the validation set every N steps."""
    save_steps: PositiveInt[Optional[int]] = None
    """Checkpoint every N steps (None: same as eval_steps; must be a multiple of eval_steps so the
    best checkpoint can be kept)."""
    save_total_limit: PositiveInt[int] = 2
    """Checkpoints kept on disk (the best one is always kept)."""
    early_stopping_patience: PositiveInt[Optional[int]] = None
    """Stop after this many evaluations without improvement of the validation loss (None: never)."""
    early_stopping_threshold: NonNegative[float] = 0.0
    """Smallest validation-loss decrease that counts as an improvement."""


@dataclass
class TrainConfig(OptimConfig):
    """SFT optimisation, evaluation and checkpointing."""

    packing: bool = False
    """Pack several sequences into each row (no padding; attention kept within each sequence)."""
    completion_only_loss: bool = True
    """Loss only on the completion / assistant turns (False: on every token)."""


@dataclass
class TrackingConfig:
    """Experiment tracking."""

    report_to: Literal["none", "wandb"] = "none"
    """`wandb` logs to Weights & Biases (offline without a login); `none` logs to the console only."""
    project: str = "rlhf"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (user or team); None: your default."""
    run_name: Optional[str] = None
    """W&B run name; None: the output directory's name."""
    group: Optional[str] = None
    """W&B group (e.g. one pipeline's stages)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`rlhf sft`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/sft"
    """Where the adapter (or model), tokenizer, checkpoints and resolved config are written."""
    seed: Seed[int] = 42
    """Seed for initialisation, data shuffling and dropout."""
    resume: Optional[str] = None
    """Resume training: `latest` (newest checkpoint in output_dir) or a checkpoint directory."""


# ---------------------------------------------------------------------------------------------
# YAML -> dataclass, with file:line in every error


def _yaml_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map each dotted key path in a composed YAML document to its 1-based line."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            lines[path] = key_node.start_mark.line + 1
            lines.update(_yaml_lines(value_node, path + "."))
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping: plain YAML keeps the last one, so a
    second `train:` section would silently replace the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value",
                                                        key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one section (first on line {seen[key]}); YAML "
                    "would silently keep only the last", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


# A config is a few hundred YAML values. Aliases (`*name`) share one node however often they repeat, so a
# kilobyte of nested aliases stands for billions of values ("billion laughs"); anything that walks the
# document (the line map, the dataclass conversion, a config saved as JSON) would expand them all.
MAX_YAML_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """Values in `node` with every alias expanded, computed once per distinct node (`sizes`, by id), so
    the count costs one pass over the composed document however large the expansion. None in `sizes`
    marks a node being counted: meeting it again is an alias to a node that holds it."""
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise RecursionError
        return sizes[key]
    sizes[key] = None
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_VALUES:  # stop counting: the answer is already "too many"
            break
    sizes[key] = total
    return total


def read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    if not os.path.isfile(path):
        raise UserError(f"--config '{path}' does not exist")
    from rlhf.data.sources import read_text

    text = read_text(path)
    loader = None
    try:  # compose once, bound the expanded size, then build: the same steps as yaml.load, checked between
        loader = _UniqueKeyLoader(text)  # its reader refuses unprintable characters at once
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise UserError(f"{path}: the YAML expands to more than {MAX_YAML_VALUES:,} values through its aliases "
                            "(*name); a config holds a few hundred")
        data = (loader.construct_document(node) if node is not None else None)
        lines = _yaml_lines(node) if data else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        raise UserError(f"{where}: invalid YAML ({' '.join(str(problem).split())})") from None
    except RecursionError:
        raise UserError(f"{path}: the YAML nests too deeply, or an alias (*name) refers to the value that "
                        "holds it; a config is a few levels of sections") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:  # 0 bytes, only comments or `---`: every default would run without a word
        raise UserError(f"{path}: the config file is empty; expected a mapping of config sections "
                        "(e.g. `model:`, `train:`), or leave out --config to run on the defaults")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level, got a "
                        f"{type(data).__name__} ({repr(data)[:40]})")
    return data, lines


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise TypeError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return {str(k): _coerce(v, typing.get_args(tp)[1]) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


def from_dict(cls: type[C], data: dict, where: str, lines: dict[str, int], prefix: str = "") -> C:
    """Build dataclass `cls` from `data`, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        loc = f"{where}:{lines[path]}" if path in lines else where
        shown = path if path.isprintable() else repr(path)[1:-1]  # a key with a newline stays one line
        if key not in names:
            section = f" in '{prefix[:-1]}'" if prefix else ""
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{loc}: unknown config key '{shown}'{hint} Valid keys{section}: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{loc}: '{shown}' is a section; expected a mapping of its keys")
            kwargs[key] = from_dict(tp, value, where, lines, path + ".")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except TypeError:
            raise UserError(f"{loc}: '{shown}' expects {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# command line


def _bool_flags(cls: type, prefix: str = "") -> set[str]:
    flags = set()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            flags |= _bool_flags(tp, f"{prefix}{f.name}.")
        elif tp is bool or bool in typing.get_args(tp):  # bool, Optional[bool], Union[Literal[...], bool]
            flags.add(f"--{prefix}{f.name}")
    return flags


def _split_config_flag(argv: list[str]) -> tuple[Optional[str], list[str]]:
    path, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UserError("--config expects a YAML file path")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return path, rest


def _one_line(box: str) -> str:
    """tyro's boxed error text as one line: its message and the valid values, without the frame."""
    lines = []
    for line in box.splitlines():
        line = line.strip().strip("╭╮╰╯│─┌┐└┘ ").strip()
        if line and not line.startswith("For full helptext") and set(line) - set("─━-"):
            lines.append(line)
    text = " ".join(lines[1:] if len(lines) > 1 else lines)  # the first line is the box's title
    text = text.split(" Argument helptext:")[0]
    return " ".join(text.split()) or "invalid command-line arguments (see --help)"


def parse(cls: type[C], argv: list[str], prog: str) -> C:
    """`--config FILE` then `--section.field value` overrides -> a `cls` instance."""
    import tyro

    path, rest = _split_config_flag(argv)
    default = cls()
    if path is not None:
        data, lines = read_yaml(path)
        default = from_dict(cls, data, path, lines)
    # tyro spells booleans True/False; accept the YAML spellings too.
    bools, fixed = _bool_flags(cls), []
    for i, arg in enumerate(rest):
        if i > 0 and rest[i - 1].replace("-", "_") in {b.replace("-", "_") for b in bools}:
            arg = {"true": "True", "false": "False", "yes": "True", "no": "False"}.get(arg.lower(), arg)
        fixed.append(arg)
    description = (f"{cls.__doc__.strip()}\n\nRead --config FILE (YAML) first; each --section.field VALUE "
                   "below overrides it.")
    captured = io.StringIO()  # tyro's errors come as a multi-line box: made one line below
    try:
        with contextlib.redirect_stderr(captured):
            cfg = tyro.cli(cls, default=default, args=fixed, prog=prog, description=description,
                           use_underscores=True, config=(tyro.conf.FlagConversionOff,))
    except SystemExit as e:
        if e.code in (0, None):  # --help
            sys.stderr.write(captured.getvalue())
            raise
        raise UserError(_one_line(captured.getvalue())) from None
    from rlhf.validate import validate

    validate(cfg)  # every field's domain, before the stage writes anything
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reward models and classifiers: `rlhf reward`, `rlhf classifier`, `rlhf eval reward`

PreferenceFormat = Literal["auto", "hh_rlhf", "ultrafeedback_binarized", "ultrafeedback_raw", "shp",
                           "pku_saferlhf", "oasst", "helpsteer2", "pairs"]
# Prompts (PPO, eval policy, generate, held-out eval): rows of messages or prompts, or any preference
# format (its pairs' prompts are used).
PromptFormat = Literal["auto", "messages", "prompt", "hh_rlhf", "ultrafeedback_binarized", "ultrafeedback_raw", "shp",
                       "pku_saferlhf", "oasst", "helpsteer2", "pairs"]


@dataclass
class EvalRewardSpec:
    """The judge of held-out answers: the true objective, a reward other than the one trained on."""

    spec: Optional[str] = None
    """Reward-model or classifier directory, or a Python function `module:function` /
    `path/file.py:function` taking (prompts, responses), e.g. `reward.examples:exact_answer`. None: PPO's
    training reward (which cannot reveal hacking); DPO, which has no training reward, needs one."""
    kind: Literal["auto", "preference", "classifier", "function"] = "auto"
    """What `spec` is; `auto` tells from the directory's files or the `:`."""
    label: Optional[str] = None
    """Classifier rewards: the label whose probability is the reward."""
    batch_size: PositiveInt[int] = 16
    """Responses scored per forward pass."""


@dataclass
class HeldOutConfig:
    """Held-out evaluation of a policy stage (the `eval` block of PPO and DPO): the true objective on
    prompts it never trains on, before and after training (off while `prompts` is None)."""

    prompts: Optional[str] = None
    """Held-out prompt source (same formats as PPO's data.train), never trained on. None: no evaluation."""
    format: PromptFormat = "auto"
    """Format of the prompt source, as PPO's data.format."""
    max_prompts: PositiveInt[int] = 64
    """Use the first N held-out prompts."""
    reward: EvalRewardSpec = field(default_factory=EvalRewardSpec)
    samples_per_prompt: PositiveInt[int] = 1
    """Sampled answers per held-out prompt."""
    temperature: Positive[Optional[float]] = None
    """Sampling temperature of the evaluation (None: ppo.temperature). Greedy answers: `greedy`."""
    greedy: bool = True
    """Also score greedy answers (logged as eval/greedy/...)."""


@dataclass
class PairFormatOptions:
    """Options of the preference formats; each is read only by the formats it names."""

    pairing: Optional[Literal["best_vs_rest", "all_pairs"]] = None
    """ultrafeedback_raw, helpsteer2, oasst: `best_vs_rest` pairs the best reply with each worse one,
    `all_pairs` every two replies with different scores. None: the format's default (best_vs_rest;
    all_pairs for oasst)."""
    score_field: str = "fine-grained_score"
    """ultrafeedback_raw: the completion field that ranks replies."""
    min_score_ratio: Positive[Optional[float]] = 2.0
    """shp: drop pairs whose score_ratio is below this (None keeps all)."""
    preference: Literal["helpful", "safe"] = "helpful"
    """pku_saferlhf: which label picks the chosen reply (better_response_id or safer_response_id)."""
    weights: Optional[dict[str, float]] = None
    """helpsteer2: attribute weights of the single score (None: those of Nemotron-4-340B-Reward)."""


@dataclass
class PreferenceDataConfig:
    """Preference pairs: where they come from and how they are read (see `rlhf data check`)."""

    train: str = "builtin:quickstart_prefs"
    """Training pairs: a local .jsonl/.json/.csv/.parquet file, `builtin:NAME`, or a hub dataset
    `owner/name` (`owner/name:config` for a configuration)."""
    validation: Optional[str] = None
    """Validation pairs (same forms as `train`). None: hold out `validation_split` of `train`."""
    validation_split: Fraction[float] = 0.1
    """Fraction of `train` held out for validation when `validation` is None (0 disables evaluation)."""
    split: str = "train"
    """Split to read from a hub dataset."""
    format: PreferenceFormat = "auto"
    """Source format (hh_rlhf, ultrafeedback_binarized, ultrafeedback_raw, shp, pku_saferlhf, oasst,
    helpsteer2, or pairs: prompt/chosen/rejected/margin); `auto` detects it from the columns."""
    column_map: dict[str, str] = field(default_factory=dict)
    """{field the format reads: column in the file}, e.g. `{prompt: question, chosen: good, rejected: bad}`."""
    options: PairFormatOptions = field(default_factory=PairFormatOptions)
    max_samples: PositiveInt[Optional[int]] = None
    """Use only the first N training pairs (after conversion)."""
    max_length_chars: PositiveInt[Optional[int]] = None
    """Drop pairs whose prompt plus longer reply exceed this many characters (None keeps all)."""


@dataclass
class RewardTrainConfig(OptimConfig):
    """Optimisation, evaluation and checkpointing of a reward model."""

    learning_rate: NonNegative[float] = 1e-4
    """Peak learning rate."""
    lr_scheduler_type: SchedulerName[str] = "linear"
    """transformers scheduler name (`linear`, `cosine`, `constant`, `constant_with_warmup`, ...)."""
    max_length: PositiveInt[int] = 1024
    """Tokens per sequence; longer ones lose the start of their prompt (the reply is kept whole when it fits).
    Scoring later cuts the same way."""
    early_stopping_patience: PositiveInt[Optional[int]] = None
    """Stop after this many evaluations without improvement of metric_for_best_model (None: never)."""
    early_stopping_threshold: NonNegative[float] = 0.0
    """Smallest improvement of metric_for_best_model that counts."""
    metric_for_best_model: Literal["loss", "accuracy"] = "loss"
    """Validation metric that picks the best checkpoint (kept and reloaded at the end) and drives early stopping."""


@dataclass
class RewardOptions:
    """The reward-model objective and what is saved with the model."""

    use_margin: bool = False
    """Bradley-Terry loss with the pair's margin, -log sigmoid(r_chosen - r_rejected - margin_scale * margin)
    (Llama 2, Touvron et al. 2023); pairs without a margin use 0."""
    margin_scale: Positive[float] = 1.0
    """Multiplies the data's margins (they are on each source's own scale)."""
    center_rewards_coefficient: NonNegative[Optional[float]] = None
    """Add coef * mean((r_chosen + r_rejected)^2) to the loss so rewards stay centred on 0
    (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244); 0.01 is typical. None: off."""
    normalize_on: Literal["validation", "train"] = "validation"
    """Reference set whose scores give the stored normalisation mean and std (chosen and rejected replies)."""
    normalize_samples: PositiveInt[int] = 1000
    """Pairs of the reference set scored for the normalisation statistics."""
    chat_template: Optional[str] = None
    """A Jinja chat template file for the reward model's tokenizer (saved with it). None: the
    tokenizer's own, or a plain `Role: text` template when it has none."""


@dataclass
class RewardConfig:
    """Reward-model training on preference pairs (`rlhf reward`), on trl.RewardTrainer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    reward: RewardOptions = field(default_factory=RewardOptions)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/reward"
    """Where the reward model (adapter with its score head, or full model), tokenizer, reward_info.json,
    checkpoints and resolved config are written."""
    seed: Seed[int] = 42
    """Seed for the score head's initialisation, data split and shuffling."""
    resume: Optional[str] = None
    """Resume training: `latest` (newest checkpoint in output_dir) or a checkpoint directory."""


# ---------------------------------------------------------------------------------------------
# Direct preference optimisation: `rlhf dpo`

# The loss names trl.DPOTrainer accepts (TRL 1.16, `DPOTrainer._compute_loss`); tests/test_dpo.py checks
# this list against TRL's, so a TRL upgrade that adds or drops one fails there, not in a user's run.
DPOLossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
DPO_LOSS_TYPES: tuple[str, ...] = DPOLossType.__args__
# robust DPO: a label-flip probability of 0.5 or more makes the loss prefer the rejected reply
LabelSmoothing = domain(lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")


@dataclass
class DPOTrainConfig(OptimConfig):
    """Optimisation, evaluation and checkpointing of DPO."""

    learning_rate: NonNegative[float] = 5e-6
    """Peak learning rate (DPO moves far with little: 5e-7 to 5e-6 for full fine-tuning, ~5e-5 for LoRA)."""
    lr_scheduler_type: SchedulerName[str] = "linear"
    """transformers scheduler name (`linear`, `cosine`, `constant`, `constant_with_warmup`, ...)."""
    max_length: PositiveInt[int] = 1024
    """Tokens of prompt plus reply; a longer pair loses the end of its replies, and a pair whose prompt alone
    fills it is dropped (both counted in the log)."""
    early_stopping_patience: PositiveInt[Optional[int]] = None
    """Stop after this many evaluations without improvement of metric_for_best_model (None: never)."""
    early_stopping_threshold: NonNegative[float] = 0.0
    """Smallest improvement of metric_for_best_model that counts."""
    metric_for_best_model: Literal["loss", "accuracy"] = "loss"
    """Validation metric that picks the best checkpoint (kept and reloaded at the end) and drives early
    stopping: the DPO loss, or the reward accuracy (rewards/accuracies)."""


@dataclass
class DPOOptions:
    """The DPO objective (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290)."""

    beta: Positive[float] = 0.1  # 0 would drop the reference from the loss (and divide by zero in IPO)
    """Strength of the implicit KL penalty to the reference: the implicit reward is
    beta * (log pi(y|x) - log ref(y|x)). Larger keeps the policy closer to the reference."""
    loss_type: DPOLossType = "sigmoid"
    """trl.DPOTrainer loss: `sigmoid` (DPO), `ipo` (beta is IPO's tau), `hinge` (SLiC), `robust`, `exo_pair`,
    `bco_pair`, `nca_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, `apo_down`, `discopop`,
    `sigmoid_norm`, `sft` (NLL on the chosen reply only)."""
    label_smoothing: LabelSmoothing[float] = 0.0
    """`robust`: the assumed probability that a pair's label is flipped; `exo_pair`: EXO's epsilon (needs > 0,
    1e-3 is typical). Other losses ignore it."""


@dataclass
class DPOEvalConfig(HeldOutConfig):
    """Held-out evaluation of DPO: the starting policy (the reference) and the trained one answer the same
    held-out prompts, judged by eval.reward.spec (required), as `rlhf eval policy` does; the true metric
    before and after goes to metrics.json (`heldout`) and the pipeline's report (off while `prompts` is None)."""

    temperature: Positive[float] = 1.0
    """Sampling temperature of the held-out answers (greedy answers: `greedy`)."""
    max_new_tokens: PositiveInt[int] = 64
    """Longest answer."""
    max_prompt_length: PositiveInt[int] = 256
    """Held-out prompts are cut to their last N tokens."""


@dataclass
class DPOConfig:
    """Direct preference optimisation of a policy on preference pairs (`rlhf dpo`), on trl.DPOTrainer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/dpo"
    """Where the policy (adapter or full model), tokenizer, checkpoints, metrics and resolved config are written."""
    seed: Seed[int] = 42
    """Seed for the adapter's initialisation, the data split and shuffling."""
    resume: Optional[str] = None
    """Resume training: `latest` (newest checkpoint in output_dir) or a checkpoint directory."""


@dataclass
class ClassifierDataConfig:
    """Labelled text for a classifier, and its train/validation/test splits."""

    train: Optional[str] = None
    """Labelled text: a local .jsonl/.json/.csv/.parquet file, `builtin:NAME`, or a hub dataset."""
    validation: Optional[str] = None
    """Validation data (same forms). None: hold out `validation_split` of `train`."""
    test: Optional[str] = None
    """Held-out test data for the final metrics. None: hold out `test_split` of `train`."""
    validation_split: Fraction[float] = 0.1
    """Fraction of `train` held out for validation when `validation` is None."""
    test_split: Fraction[float] = 0.1
    """Fraction of `train` held out for testing when `test` is None."""
    split: str = "train"
    """Split to read from a hub dataset."""
    text_column: str = "text"
    """Column with the text to classify."""
    label_columns: list[str] = field(default_factory=lambda: ["label"])
    """One column of class labels (binary or multi-class: integers or names), or several 0/1
    columns, one per label (multi-label, e.g. Jigsaw's toxic, obscene, insult, ...)."""
    multi_label: Optional[bool] = None
    """Independent labels (sigmoid per label) or one class per text (softmax). None: multi-label
    when there are several label_columns."""
    label_names: Optional[list[str]] = None
    """Names of the classes of a single integer label column (0, 1, ...), e.g. [not_offensive, offensive].
    None: the values found, as text."""
    max_samples: PositiveInt[Optional[int]] = None
    """Use only the first N rows of `train` (before splitting)."""


OpenUnit = domain(lambda v: 0 < v < 1, "a number in (0, 1)")


@dataclass
class ClassifierTrainConfig(RewardTrainConfig):
    """Optimisation, evaluation and checkpointing of a classifier."""

    max_length: PositiveInt[int] = 512
    """Tokens per text; longer texts are cut at the end (scoring cuts the same way)."""
    metric_for_best_model: Literal["loss", "f1", "roc_auc", "accuracy"] = "loss"
    """Validation metric that picks the best checkpoint and drives early stopping (f1 and roc_auc are macro averages)."""
    threshold: OpenUnit[float] = 0.5
    """Multi-label: a label is predicted when its probability is at least this."""


@dataclass
class ClassifierConfig:
    """Sequence-classifier fine-tuning (`rlhf classifier`), usable afterwards as a reward."""

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/classifier"
    """Where the classifier (adapter with its head, or full model), tokenizer, reward_info.json,
    metrics.json, checkpoints and resolved config are written."""
    seed: Seed[int] = 42
    """Seed for the head's initialisation, the data splits and shuffling."""
    resume: Optional[str] = None
    """Resume training: `latest` (newest checkpoint in output_dir) or a checkpoint directory."""
    reward_label: Optional[str] = None
    """Label whose probability is the reward when the classifier is loaded with no label
    (`load_reward(dir)`): a label name, or not_NAME for its absence (e.g. not_toxic)."""


@dataclass
class EvalRewardConfig:
    """Evaluate a reward model on preference pairs (`rlhf eval reward`): accuracy, accuracy by margin
    bucket, calibration and the score distribution, as a table and JSON."""

    model: str = ""
    """Reward model directory (from `rlhf reward`), or a transformers reward model directory or hub id."""
    data: str = ""
    """Preference pairs: a local file, `builtin:NAME` or a hub dataset (see `rlhf data check`)."""
    format: PreferenceFormat = "auto"
    """Source format; `auto` detects it from the columns."""
    column_map: dict[str, str] = field(default_factory=dict)
    """{field the format reads: column in the file}."""
    options: PairFormatOptions = field(default_factory=PairFormatOptions)
    split: str = "train"
    """Split to read from a hub dataset."""
    max_samples: PositiveInt[Optional[int]] = None
    """Evaluate only the first N pairs."""
    max_length_chars: PositiveInt[Optional[int]] = None
    """Drop pairs whose prompt plus longer reply exceed this many characters."""
    batch_size: PositiveInt[int] = 16
    """Sequences scored per forward pass."""
    max_length: PositiveInt[Optional[int]] = None
    """Tokens kept per sequence (None: the length the model was trained with)."""
    buckets: PositiveInt[int] = 4
    """Margin buckets (quantiles) for accuracy by margin."""
    calibration_bins: PositiveInt[int] = 10
    """Confidence bins of the expected calibration error."""
    output: Optional[str] = None
    """JSON report path. None: `eval_reward_<data name>.json` in the model directory (not written for a hub id)."""
    device: Optional[str] = None
    """`cpu`, `cuda`, `cuda:1`, ... None: the GPU when there is one."""
    allow_pickle_weights: bool = False
    """Load a model directory whose weights are only pickles (.bin). Unpickling can run code."""
