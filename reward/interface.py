"""One reward interface for reward models, classifiers and Python functions.

    from reward import load_reward

    rm = load_reward("runs/reward_tiny")                          # a trained reward model
    tox = load_reward("runs/classifier_jigsaw", label="not_toxic")  # a classifier: P(label)
    fn = load_reward("reward.examples:exact_answer")              # a function module:function
    scores = rm.score(prompts, responses, normalize=True)         # (B,) float32 on the CPU

`prompts` are conversations, each a list of {"role", "content"} messages ending with a user turn
(a plain string is taken as one user message); `responses` are the assistant replies. A model
reward formats `prompt + [{"role": "assistant", "content": response}]` with ITS OWN tokenizer and
chat template (the policy may use another), exactly as in its training (`reward.models.encode`),
and scores in batches. A classifier classifies the response text alone, as it was trained on text.

`normalize=True` returns (score - mean) / std with the mean and std measured on a reference set
when the model was trained (stored in its `reward_info.json`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Literal, Protocol, Union

import torch

from policies.models import creating_command, looks_local, read_json
from reward import models
from reward.errors import RewardError

Messages = list[dict]
KINDS = ("auto", "preference", "classifier", "function")
OUTPUTS = ("probability", "logit")
_FUNCTION_SPEC = re.compile(r"^(?P<target>[^:]+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


class Reward(Protocol):
    """Anything that scores replies: reward models, classifiers, functions."""

    kind: str  # "preference", "classifier" or "function"
    normalization: tuple[float, float] | None  # (mean, std) that normalize=True uses; None: it is refused

    def score(self, prompts: list[Messages], responses: list[str], normalize: bool = False) -> torch.Tensor:
        """Scores (B,) float32 on the CPU of B (prompt, response) pairs; higher is better."""
        ...


def _as_batch(prompts, responses) -> tuple[list[Messages], list[str]]:
    if isinstance(prompts, (str, dict)) or isinstance(responses, (str, dict)):
        raise RewardError("score(prompts, responses): expected two lists, one item per sample")
    try:
        prompts, responses = list(prompts), list(responses)
    except TypeError:
        raise RewardError("score(prompts, responses): expected two lists, one item per sample") from None
    if len(prompts) != len(responses):
        raise RewardError(f"score(prompts, responses): {len(prompts)} prompts but {len(responses)} responses")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        if not isinstance(p, (list, tuple)) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                       for m in p):
            raise RewardError(f"score: prompt {i} is not a list of {{role, content}} messages")
        out.append(list(p))
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise RewardError(f"score: response {i} is a {type(r).__name__}, expected a string")
    return out, list(responses)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelScorer:
    """A sequence classifier and its tokenizer: token id lists -> logits (B, C), batched. The base of
    the two model rewards."""

    def __init__(self, model, tokenizer, max_length: int | None, batch_size: int, device):
        if batch_size < 1:
            raise RewardError(f"batch_size expects a positive integer, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.device = torch.device(device) if device is not None else _default_device()

    @torch.no_grad()
    def logits(self, seqs: list[list[int]]) -> torch.Tensor:
        """(B, C) float32 logits of token id lists, batched by length (less padding), in input order."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.empty(len(seqs), self.model.config.num_labels, dtype=torch.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask = models.pad_batch([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[idx] = logits.float().cpu()
        return out


class PreferenceReward(ModelScorer):
    """A reward model (one output): the score of prompt + response in its chat template."""

    kind = "preference"

    def __init__(self, model, tokenizer, max_length: int | None = None,
                 normalization: tuple[float, float] | None = None, batch_size: int = 16, device=None):
        super().__init__(model, tokenizer, max_length, batch_size, device)
        self.normalization = normalization

    def score(self, prompts: list[Messages], responses: list[str], normalize: bool = False) -> torch.Tensor:
        prompts, responses = _as_batch(prompts, responses)
        if normalize and self.normalization is None:
            raise RewardError("normalize=True: this reward model has no normalisation statistics "
                              f"({models.INFO_FILE} without 'normalization')")
        if not responses:
            return torch.empty(0)
        seqs = [models.encode(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)]
        scores = self.logits(seqs)[:, 0]
        if normalize:
            mean, std = self.normalization
            scores = (scores - mean) / std
        return scores


class ClassifierReward(ModelScorer):
    """A classifier as a reward: the probability (or logit) of one label of the response text.
    `negate` scores the label's absence: 1 - p (probability), -logit (multi-label logit)."""

    kind = "classifier"

    def __init__(self, model, tokenizer, label_index: int, multi_label: bool, negate: bool = False,
                 output: str = "probability", max_length: int | None = None,
                 normalization: tuple[float, float] | None = None, batch_size: int = 16, device=None):
        super().__init__(model, tokenizer, max_length, batch_size, device)
        self.label_index, self.multi_label, self.negate, self.output = label_index, multi_label, negate, output
        self.normalization = normalization

    def score(self, prompts: list[Messages], responses: list[str], normalize: bool = False) -> torch.Tensor:
        prompts, responses = _as_batch(prompts, responses)
        if normalize and self.normalization is None:
            raise RewardError("normalize=True: this classifier has no normalisation statistics "
                              f"({models.INFO_FILE} without 'normalization')")
        if not responses:
            return torch.empty(0)
        logits = self.logits([models.encode_text(self.tokenizer, r, self.max_length) for r in responses])
        i = self.label_index
        if self.output == "logit":
            scores = -logits[:, i] if self.negate else logits[:, i]
        else:
            p = torch.sigmoid(logits[:, i]) if self.multi_label else torch.softmax(logits, -1)[:, i]
            scores = 1 - p if self.negate else p
        if normalize:
            mean, std = self.normalization
            scores = (scores - mean) / std
        return scores


class FunctionReward:
    """A Python function `fn(prompts, responses) -> list[float] | tensor`, called on the whole batch.

    What the function does wrong is a one-line RewardError naming it: raising (its exception's type and
    first line, not our traceback), returning anything but numbers, or a number of values other than one
    per response. A NaN or inf is a number: it is returned as it is, like a reward model's, for the
    caller to handle (PPO counts it as 0 with a warning and logs objective/nan_scores, and stops at a batch
    with no finite score, `refuse_all_non_finite`; evaluations refuse any with `require_finite`)."""

    kind = "function"
    normalization = None  # no reference statistics: normalize=True is refused

    def __init__(self, fn: Callable, name: str = ""):
        self.fn, self.name = fn, name or getattr(fn, "__name__", repr(fn))

    def score(self, prompts: list[Messages], responses: list[str], normalize: bool = False) -> torch.Tensor:
        prompts, responses = _as_batch(prompts, responses)
        if normalize:
            raise RewardError(f"normalize=True: reward function '{self.name}' has no normalisation statistics; "
                              "return normalised values from the function instead")
        try:
            out = self.fn(prompts, responses)
        except Exception as e:  # the user's code failed: say where, in one line, not with our traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise RewardError(f"reward function '{self.name}' raised {type(e).__name__}"
                              + (f": {first[:300]}" if first else "")) from None
        try:
            scores = torch.as_tensor(out.detach().cpu() if isinstance(out, torch.Tensor) else list(out),
                                     dtype=torch.float32).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            try:  # name what is not a number: "a list holding str ('good')"
                odd = next(v for v in out if not isinstance(v, (int, float)))
                got = f"a {type(out).__name__} holding {type(odd).__name__} ({str(odd)[:40]!r})"
            except (TypeError, StopIteration):
                got = type(out).__name__
            raise RewardError(f"reward function '{self.name}' returned {got}; expected a list of floats or a "
                              f"tensor, one per response ({len(responses)} here)") from None
        if len(scores) != len(responses):
            raise RewardError(f"reward function '{self.name}' returned {len(scores)} values for "
                              f"{len(responses)} responses; expected one per response")
        return scores


def require_finite(scores: torch.Tensor, spec: str) -> torch.Tensor:
    """`scores` if all are finite; else a RewardError: a mean, a win rate or an accuracy over a NaN
    would be silently wrong (NaN compares false: a NaN-scored answer would count as a loss)."""
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise RewardError(f"reward '{spec}' gave {bad} non-finite score(s) (NaN or inf) of {len(scores)}; "
                          "an evaluation needs a number for every response")
    return scores


def refuse_all_non_finite(scores: torch.Tensor, reward, name: str) -> None:
    """A RewardError when every score of a batch is NaN or inf: a trainer that counts a non-finite score
    as 0 (with a warning; a few are a glitch) would otherwise train on zeros and report score=nan.
    `name` is how the user named the reward (its spec)."""
    if scores.numel() and not torch.isfinite(scores).any():
        what = f"reward function '{name}'" if getattr(reward, "kind", None) == "function" else f"reward '{name}'"
        raise RewardError(f"{what} gave NaN or inf for all {scores.numel()} responses of a batch: nothing to "
                          "learn from (a few non-finite scores count as 0 with a warning; all of them stop the run)")


# ---------------------------------------------------------------------------------------------
# load_reward


def is_function_spec(spec: str) -> bool:
    """`module:function` or `path/to/file.py:function` (and not an existing path)."""
    return not os.path.exists(spec) and _FUNCTION_SPEC.match(spec) is not None


def import_spec(spec: str, what: str):
    """(module, name) of a `module:name` or `path/to/file.py:name` spec, the module imported; `what` names
    the thing in errors ("reward function", "environment"). The name is not looked up here."""
    m = _FUNCTION_SPEC.match(spec)
    if m is None:
        raise RewardError(f"{what} '{spec}': expected module:name or path/to/file.py:name")
    target, name = m.group("target"), m.group("name")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise RewardError(f"{what} '{spec}': file '{target}' does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_rlhf_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error in it is theirs
            raise RewardError(f"{what} '{spec}': importing {target} failed "
                              f"({type(e).__name__}: {e})") from None
    else:
        added = os.getcwd() not in sys.path
        if added:  # `rlhf` runs as a console script: make modules next to the user's files importable
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise RewardError(f"{what} '{spec}': no module named '{e.name}' (expected module:name "
                              "with the module importable, or path/to/file.py:name)") from None
        except Exception as e:
            raise RewardError(f"{what} '{spec}': importing {target} failed "
                              f"({type(e).__name__}: {e})") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    return module, name

def load_function(spec: str) -> FunctionReward:
    """Import the function named by `module:function` or `path/to/file.py:function`."""
    module, name = import_spec(spec, "reward function")
    target = spec.rsplit(":", 1)[0]
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        what = "is not callable" if fn is not None else "does not exist"
        raise RewardError(f"reward function '{spec}': '{name}' {what} in {target} "
                          f"(functions there: {', '.join(found) or 'none'})")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise RewardError(f"reward function '{spec}' must accept (prompts, responses)") from None
    except ValueError:  # builtins without a signature
        pass
    return FunctionReward(fn, spec)


def _directory_kind(spec: str, info: dict | None) -> str:
    if info is not None:
        return info["kind"]
    path = Path(spec)
    if (path / "adapter_config.json").exists():
        raise RewardError(f"'{spec}' is a LoRA adapter without {models.INFO_FILE}; pass kind='preference' or "
                          "kind='classifier', or train it with `rlhf reward` / `rlhf classifier`")
    config_file = path / "config.json"
    if path.is_dir() and not config_file.exists():
        raise RewardError(f"'{spec}' holds neither {models.INFO_FILE}, config.json nor adapter_config.json: "
                          "not a reward model or classifier directory")
    if config_file.exists():
        num_labels = len(read_json(config_file, RewardError).get("id2label") or {0: 0, 1: 1})
        return "preference" if num_labels == 1 else "classifier"
    return "preference"  # a hub id: reward models are the common case; kind= overrides


def _classifier_label(label: str | int | None, info: dict, spec: str) -> tuple[int, bool]:
    """(label index, negate) for `label`: a name, `not_NAME`, or an index."""
    labels = info["labels"]
    if label is None:
        label = info.get("reward_label")
        if label is None:
            raise RewardError(f"classifier '{spec}': choose the label whose probability is the reward with "
                              f"label=NAME, not_NAME or an index (labels: {', '.join(labels)})")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RewardError(f"classifier '{spec}': label expects a name or an index, got {label!r}")
    if isinstance(label, str) and label.isdigit() and label not in labels:
        label = int(label)  # an index given as text (a config or command-line value)
    if isinstance(label, int):
        if not 0 <= label < len(labels):
            raise RewardError(f"classifier '{spec}': label index {label} out of range (0..{len(labels) - 1})")
        return label, False
    if label in labels:
        return labels.index(label), False
    if label.startswith("not_") and label[4:] in labels:
        return labels.index(label[4:]), True
    raise RewardError(f"classifier '{spec}': unknown label '{label}'; expected one of {', '.join(labels)} "
                      "(or not_NAME, or an index)")


def _classifier_info(model, info: dict | None) -> dict:
    """reward_info of a classifier; for a plain transformers classifier, read from its config."""
    if info is not None:
        return info
    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return {"kind": "classifier", "labels": labels,
            "problem_type": config.problem_type or "single_label_classification"}


def load_reward(spec: str, *, device=None, batch_size: int = 16, label: Union[str, int, None] = None,
                kind: Literal["auto", "preference", "classifier", "function"] = "auto",
                output: Literal["probability", "logit"] = "probability", max_length: int | None = None,
                dtype: str | None = None, allow_pickle_weights: bool = False) -> Reward:
    """The reward named by `spec`.

    spec: a directory written by `rlhf reward` (reward model) or `rlhf classifier` (classifier),
    full model or LoRA adapter (its kind read from reward_info.json); a transformers sequence
    classifier directory or hub id (kind from num_labels: 1 is a reward model); or a function
    `module:function` / `path/to/file.py:function`.
    label (classifiers): the label whose probability is the reward: a name, `not_NAME` for its
    absence (1 - p), or an index; None uses the classifier's `reward_label`.
    output (classifiers): `probability` or `logit` of that label.
    max_length: tokens kept per scored sequence (None: the length it was trained with).
    dtype: weights dtype to load (`float32`, `bfloat16`, ...); None: as trained.
    allow_pickle_weights: load a directory whose weights are only pickles (.bin); unpickling can run code.
    """
    if kind not in KINDS:
        raise RewardError(f"kind expects one of {', '.join(KINDS)}, got {kind!r}")
    if output not in OUTPUTS:
        raise RewardError(f"output expects one of {', '.join(OUTPUTS)}, got {output!r}")
    if not isinstance(spec, (str, os.PathLike)):
        raise RewardError(f"reward spec expects a directory or module:function, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if kind == "function" or (kind == "auto" and is_function_spec(spec)):
        if label is not None:
            raise RewardError(f"label={label!r} applies to classifier rewards, not to function '{spec}'")
        return load_function(spec)
    if looks_local(spec) and not os.path.exists(os.path.expanduser(spec)):  # not asked of the hub (~50 s)
        raise RewardError(f"reward '{spec}' does not exist (expected a reward model or classifier directory, "
                          f"or module:function){creating_command(spec)}")
    info = models.read_info(spec) if os.path.isdir(spec) else None
    found = _directory_kind(spec, info) if kind == "auto" or info is not None else kind
    if kind != "auto" and kind != found:
        raise RewardError(f"'{spec}' is a {found} reward ({models.INFO_FILE}), not {kind}")
    if found == "preference" and label is not None:
        raise RewardError(f"label={label!r} applies to classifier rewards; '{spec}' is a reward model")
    device = torch.device(device) if device is not None else _default_device()
    model, tokenizer, info = models.load_scorer(spec, device, dtype, allow_pickle_weights)
    length = max_length if max_length is not None else (info or {}).get("max_length")
    norm = (info or {}).get("normalization")
    if found == "preference":
        if model.config.num_labels != 1:
            raise RewardError(f"'{spec}' has {model.config.num_labels} outputs; a reward model has one "
                              "(pass label= to use a classifier)")
        stats = (norm["mean"], norm["std"]) if norm else None
        return PreferenceReward(model, tokenizer, length, stats, batch_size, device)
    info = _classifier_info(model, info)
    multi_label = info.get("problem_type") == "multi_label_classification"
    index, negate = _classifier_label(label, info, spec)
    if output == "logit" and negate and not multi_label:
        raise RewardError(f"label='{label}' with output='logit' needs a multi-label classifier (the logit of "
                          "'not X' is -logit(X) only for independent labels); use output='probability'")
    stats = None
    if norm and output in norm:
        mean, std = norm[output][info["labels"][index]]
        stats = ((1 - mean) if output == "probability" else -mean, std) if negate else (mean, std)
    return ClassifierReward(model, tokenizer, index, multi_label, negate, output, length, stats, batch_size, device)


def normalization_stats(scores: torch.Tensor) -> dict:
    """{"mean", "std", "n"} of reference scores, as stored in reward_info.json (std floored at 1e-6
    so normalising a constant reward does not divide by zero)."""
    scores = scores.double()
    std = scores.std(unbiased=False).item() if len(scores) > 1 else 1.0
    return {"mean": scores.mean().item(), "std": max(std, 1e-6) if math.isfinite(std) else 1.0, "n": len(scores)}
