"""Typed run configuration: YAML file + command-line overrides -> dataclasses.

    rlhf sft --config configs/sft_tiny.yaml --peft.method lora --train.learning_rate 1e-4

The YAML is checked here against the dataclasses (unknown keys and wrong types are errors naming the
file, line, key and what was expected); the result becomes the defaults of a tyro parser, which reads
the `--section.field value` overrides and renders `--help` from the field docstrings.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from policies.config import ModelConfig, PeftConfig
from rlhf.errors import UserError

C = TypeVar("C")


@dataclass
class DataConfig:
    """Where the training data comes from and what shape it has."""

    train: str = "builtin:quickstart_sft"
    """Training data: a local .jsonl/.json/.csv/.parquet file, `builtin:NAME` (shipped), or a hub
    dataset `owner/name` (`owner/name:config` for a configuration)."""
    validation: Optional[str] = None
    """Validation data (same forms as `train`). None: hold out `validation_split` of `train`."""
    validation_split: float = 0.1
    """Fraction of `train` held out for validation when `validation` is None (0 disables evaluation)."""
    split: str = "train"
    """Split to read from a hub dataset."""
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text", "oasst"] = "auto"
    """Row format: `messages` (chat turns), `prompt_completion`, `alpaca` (instruction/input/output),
    `text` (plain language modelling), `oasst` (OpenAssistant message trees); `auto` detects it from
    the columns."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Rename source columns to the format's names, e.g. `{question: prompt, answer: completion}`."""
    max_samples: Optional[int] = None
    """Use only the first N training rows (for quick experiments)."""


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing."""

    learning_rate: float = 2e-4
    """Peak learning rate."""
    num_train_epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run num_train_epochs)."""
    per_device_train_batch_size: int = 8
    """Sequences per device per forward pass."""
    per_device_eval_batch_size: int = 8
    """Sequences per device per evaluation forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward/backward passes per optimizer step."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name (`linear`, `cosine`, `constant`, `constant_with_warmup`, ...)."""
    warmup_steps: float = 0
    """Linear learning-rate warm-up: a number of steps, or a fraction in [0, 1) of all steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_length: int = 1024
    """Truncate tokenised sequences to this many tokens."""
    packing: bool = False
    """Pack several sequences into each row (no padding; attention kept within each sequence)."""
    completion_only_loss: bool = True
    """Loss only on the completion / assistant turns (False: on every token)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    bf16: Optional[bool] = None
    """bf16 mixed precision. None: on when a GPU supports it."""
    logging_steps: int = 10
    """Log metrics every N optimizer steps."""
    eval_steps: int = 50
    """Evaluate on the validation set every N steps."""
    save_steps: Optional[int] = None
    """Checkpoint every N steps (None: same as eval_steps; must be a multiple of eval_steps so the
    best checkpoint can be kept)."""
    save_total_limit: int = 2
    """Checkpoints kept on disk (the best one is always kept)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement of the validation loss (None: never)."""
    early_stopping_threshold: float = 0.0
    """Smallest validation-loss decrease that counts as an improvement."""


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
    seed: int = 42
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


def read_yaml(path: str) -> tuple[dict, dict[str, int]]:
    if not os.path.isfile(path):
        raise UserError(f"--config '{path}' does not exist")
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        lines = _yaml_lines(yaml.compose(text)) if data else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
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
        if key not in names:
            section = f" in '{prefix[:-1]}'" if prefix else ""
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{loc}: unknown config key '{path}'{hint} Valid keys{section}: {', '.join(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{loc}: '{path}' is a section; expected a mapping of its keys")
            kwargs[key] = from_dict(tp, value, where, lines, path + ".")
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except TypeError:
            raise UserError(f"{loc}: '{path}' expects {_type_name(tp)}, got {value!r}") from None
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# command line


def _bool_flags(cls: type, prefix: str = "") -> set[str]:
    flags = set()
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            flags |= _bool_flags(tp, f"{prefix}{f.name}.")
        elif tp is bool or tp == Optional[bool]:
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
    return tyro.cli(cls, default=default, args=fixed, prog=prog, description=description,
                    use_underscores=True, config=(tyro.conf.FlagConversionOff,))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
