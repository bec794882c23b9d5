"""Sequence-scoring models: build them for training, save what scoring needs, load them to score.

A reward model is `AutoModelForSequenceClassification` with one output (the score read at the last
token of the conversation for decoder models, at [CLS] for encoders); a classifier has one output
per label. Either is trained fully or as a LoRA/QLoRA adapter whose peft task type is `SEQ_CLS`,
so the randomly initialised head is trained and saved with the adapter (peft's `modules_to_save`).

What a trained directory holds besides the weights:
- the tokenizer with its chat template (so scoring formats text exactly as training did);
- `reward_info.json` (`INFO_FILE`): kind, base model, labels, max_length and the normalisation
  statistics (mean and std of the scores on a reference set).

Text becomes token ids in exactly one place, `encode` (conversations) / `encode_text` (plain text),
used both to build training data and to score, so a later stage scores as the model was trained.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from policies import models
from policies.config import ModelConfig, PeftConfig
from reward.errors import RewardError

INFO_FILE = "reward_info.json"
INFO_VERSION = 1
HEAD_NAMES = ("score", "classifier")  # transformers' names of the sequence-classification head
PEFT_METHODS = ("full", "lora", "qlora")

# For tokenizers without a chat template (base models, BERT-style encoders). Saved with the model.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' -}}"
    "{%- endfor -%}"
)


# ---------------------------------------------------------------------------------------------
# Text -> token ids


def _cut(ids: list[int], max_length: int | None, special_ids: set[int]) -> list[int]:
    """Cut `ids` to `max_length` keeping the end, and a leading special token ([CLS], BOS): decoder
    reward models read the score at the last token, so a long prompt loses its start, never the reply's end."""
    if max_length is None or len(ids) <= max_length:
        return ids
    if ids[0] in special_ids:
        return ids[:1] + ids[len(ids) - max_length + 1:]
    return ids[len(ids) - max_length:]


def encode(tokenizer, prompt: list[dict], response: str, max_length: int | None = None) -> list[int]:
    """Token ids of the conversation `prompt + [assistant: response]` in the tokenizer's chat template.

    The tokenizer's own special tokens ([CLS]/[SEP] of an encoder) are added unless the rendered
    template already starts with its BOS. Longer than `max_length`: the start is cut (see `_cut`).
    """
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    add_special = tokenizer.bos_token is None or not text.startswith(tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=add_special, verbose=False)["input_ids"]  # cut below, no warning
    return _cut(ids, max_length, set(tokenizer.all_special_ids))


def encode_text(tokenizer, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of plain `text` (classifier inputs) with the tokenizer's special tokens, cut at the
    end by the tokenizer (an encoder keeps its closing [SEP])."""
    return tokenizer(text, add_special_tokens=True, truncation=max_length is not None, max_length=max_length,
                     verbose=False)["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists -> input_ids (B, T), attention_mask (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def ensure_chat_template(tokenizer, template_path: str | None = None) -> bool:
    """Give the tokenizer `template_path`'s template, or `DEFAULT_CHAT_TEMPLATE` when it has none.
    Returns True when the tokenizer's template was changed."""
    if template_path is not None:
        if not os.path.isfile(template_path):
            raise RewardError(f"chat template file '{template_path}' does not exist (expected a Jinja file)")
        tokenizer.chat_template = Path(template_path).read_text(encoding="utf-8")
        return True
    if tokenizer.chat_template is None:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Building for training


def merged_base(name_or_path: str, out_dir: str | Path, cfg: ModelConfig) -> str:
    """`name_or_path`, or, when it is a LoRA adapter directory (an SFT output, say), that adapter
    merged into its base and written once to `out_dir` with the adapter's tokenizer: a reward model
    or classifier starts from the fine-tuned weights, as InstructGPT's reward model starts from SFT."""
    path = Path(name_or_path)
    if not (path / "adapter_config.json").exists():
        return name_or_path
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    stamp = {"merged_from": str(path.resolve()),
             "adapter_mtime": (path / "adapter_config.json").stat().st_mtime}
    stamp_file = out_dir / "merged_from.json"
    if models.stamp_matches(stamp_file, stamp):
        return str(out_dir)
    models.refuse_pickle_weights_with_base(str(path), cfg.allow_pickle_weights)  # the adapter and its base
    try:
        with quiet_loading():
            model = AutoPeftModelForCausalLM.from_pretrained(
                str(path), dtype=models.torch_dtype(cfg), trust_remote_code=cfg.trust_remote_code,
                use_safetensors=None if cfg.allow_pickle_weights else True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except models.LOAD_ERRORS as e:
        raise models.ModelLoadError(f"model.name_or_path '{name_or_path}' is a peft adapter whose base could not "
                                    f"be loaded ({models.load_failure(e)})") from None
    model.merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    stamp_file.write_text(json.dumps(stamp))
    return str(out_dir)


def head_name(model) -> str:
    """Name of the classification head module of a transformers sequence classifier."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in HEAD_NAMES:
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return name
    raise RewardError(f"{type(inner).__name__} has no classification head named {' or '.join(HEAD_NAMES)}; "
                      "pick a model that transformers' AutoModelForSequenceClassification supports")


@contextlib.contextmanager
def quiet_loading():
    """No transformers warnings or progress bars while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_sequence_classifier(name_or_path: str, cfg: ModelConfig, num_labels: int, pad_token_id: int,
                             method: str = "full", **config_kwargs):
    """`AutoModelForSequenceClassification` with `num_labels` outputs and a fresh head (QLoRA: a 4-bit
    NF4 body, the head kept in full precision so it can be trained).

    `config_kwargs` go to the model config (`problem_type`, `id2label`, `label2id`).
    """
    from transformers import AutoModelForSequenceClassification

    models.refuse_pickle_weights(name_or_path, cfg.allow_pickle_weights)
    kwargs: dict[str, Any] = dict(revision=cfg.revision,
                                  dtype=models.torch_dtype(cfg), num_labels=num_labels,
                                  use_safetensors=None if cfg.allow_pickle_weights else True,
                                  **config_kwargs)
    if cfg.attn_implementation:
        models.require_attention(cfg)
        kwargs["attn_implementation"] = cfg.attn_implementation
    if method == "qlora":
        quant = models.quantization_config(cfg)
        quant.llm_int8_skip_modules = list(HEAD_NAMES)
        kwargs["quantization_config"] = quant
    models._check_exists(name_or_path)  # a missing local path: one line at once, not after hub retries
    try:
        with quiet_loading():  # "score.weight newly initialised": expected, the head is trained here
            model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except models.LOAD_ERRORS as e:
        raise models.ModelLoadError(f"model.name_or_path '{name_or_path}': could not load a sequence classifier "
                                    f"with safetensors weights ({models.load_failure(e)})") from None
    model.config.pad_token_id = pad_token_id  # the score is read at the last non-pad token
    return model


def wrap_peft(model, cfg: PeftConfig, gradient_checkpointing: bool = False):
    """Wrap `model` in a `SEQ_CLS` LoRA adapter (the head goes to modules_to_save) or leave it for
    full fine-tuning. Fails when the head would stay frozen."""
    import peft

    if cfg.method not in PEFT_METHODS:
        raise RewardError(f"peft.method={cfg.method} is not supported for reward models and classifiers; "
                          f"use one of {', '.join(PEFT_METHODS)}")
    if cfg.method == "full":
        return model
    if cfg.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model = peft.get_peft_model(model, models.peft_config(cfg, "SEQ_CLS"))
    require_trainable_head(model)
    return model


def require_trainable_head(model) -> None:
    """A LoRA reward model whose head is frozen would train its adapter against a random projection."""
    head = head_name(model)
    params = [(n, p) for n, p in model.named_parameters() if f".{head}." in f".{n}"]
    if not any(p.requires_grad for _, p in params):
        raise RewardError(f"the classification head '{head}' would be frozen: add it to peft.modules_to_save")


def head_to_dtype(model, dtype: torch.dtype) -> None:
    """Put the trainable head's weights in `dtype`. TRL stores a 4-bit model's trainable weights in
    bf16, which LoRA layers absorb (they cast their input) but a plain Linear head fed by hidden
    states in the compute dtype (float32 on a CPU) cannot."""
    head = head_name(model)
    for name, param in model.named_parameters():
        if param.requires_grad and f".{head}." in f".{name}":
            param.data = param.data.to(dtype)


# ---------------------------------------------------------------------------------------------
# reward_info.json


def base_model_entry(name_or_path: str) -> str:
    """reward_info's `base_model`: `base_model` (the folder inside the output directory) when the base
    was written there (the built-in tiny model, a merged adapter), else the name or path as given."""
    if name_or_path == models.TINY or (Path(name_or_path) / "adapter_config.json").exists():
        return "base_model"
    return str(Path(name_or_path).resolve()) if os.path.isdir(name_or_path) else name_or_path


def write_info(directory: str | Path, info: dict) -> None:
    path = Path(directory) / INFO_FILE
    path.write_text(json.dumps({"version": INFO_VERSION, **info}, indent=2))


def read_info(directory: str | Path) -> dict | None:
    path = Path(directory) / INFO_FILE
    if not path.exists():
        return None
    info = models.read_json(path, RewardError)
    if info.get("kind") not in ("preference", "classifier"):
        raise RewardError(f"{path}: expected an object with kind 'preference' or 'classifier'")
    return info


# ---------------------------------------------------------------------------------------------
# Loading a trained directory to score


def _adapter_base(directory: Path, info: dict | None) -> str:
    """The base model of an adapter directory: `base_model` of reward_info (relative to the directory
    when it is a folder inside it), else the adapter config's `base_model_name_or_path`."""
    adapter_cfg = models.read_json(directory / "adapter_config.json", RewardError)
    candidates = []
    if info and info.get("base_model"):
        candidates.append(str(directory / info["base_model"]) if not os.path.isabs(info["base_model"])
                          and (directory / info["base_model"]).is_dir() else info["base_model"])
    if adapter_cfg.get("base_model_name_or_path"):
        candidates.append(adapter_cfg["base_model_name_or_path"])
    for base in candidates:
        if os.path.isdir(base) or not base.startswith((".", "/", "~")):
            return base
    raise RewardError(f"{directory}: cannot find the adapter's base model (tried {', '.join(candidates) or 'none'}); "
                      f"set base_model in {INFO_FILE}")


def load_scorer(directory: str | Path, device: str | torch.device, dtype: str | None = None,
                allow_pickle_weights: bool = False):
    """(model in eval mode on `device`, tokenizer, info or None) of a trained reward/classifier
    directory: a full model, or a LoRA adapter saved with its head (reloaded on its base; merged
    unless the base was 4-bit)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(directory)
    models.check_json_files(directory, RewardError)  # config, tokenizer and adapter files: one line, not a traceback
    info = read_info(directory)
    quantized = bool(info and info.get("quantized"))
    cfg = ModelConfig(name_or_path=str(directory), dtype=dtype or (info or {}).get("dtype", "float32"),
                      allow_pickle_weights=allow_pickle_weights)
    models.refuse_pickle_weights(str(directory), allow_pickle_weights, "allow_pickle_weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise RewardError(f"{directory}: no tokenizer could be loaded ({str(e).splitlines()[0]}); a reward "
                          "directory holds its tokenizer") from None
    if tokenizer.pad_token is None:
        raise RewardError(f"{directory}: tokenizer has no PAD token")
    is_adapter = (directory / "adapter_config.json").exists()
    if is_adapter:
        import peft

        base = _adapter_base(directory, info)
        num_labels = len(info["labels"]) if info and info.get("labels") else 1
        extra = {}
        if info and info.get("labels"):
            extra = dict(id2label=dict(enumerate(info["labels"])),
                         label2id={n: i for i, n in enumerate(info["labels"])},
                         problem_type=info.get("problem_type"))
        model = load_sequence_classifier(base, cfg, num_labels, tokenizer.pad_token_id,
                                         "qlora" if quantized else "full", **extra)
        try:
            with quiet_loading():
                model = peft.PeftModel.from_pretrained(model, str(directory))
        except models.LOAD_ERRORS as e:
            raise RewardError(f"{directory}: could not load the adapter ({models.load_failure(e)})") from None
        if not quantized:
            model = model.merge_and_unload()
    else:
        try:
            AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
        except models.LOAD_ERRORS as e:
            if (directory / "config.json").is_file():
                raise RewardError(f"{directory}: could not load its config.json ({models.load_failure(e)})") from None
            raise RewardError(f"'{directory}' is neither a model directory (config.json) nor a LoRA adapter "
                              "directory (adapter_config.json)") from None
        try:
            with quiet_loading():
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(directory), dtype=models.torch_dtype(cfg), trust_remote_code=False,
                    use_safetensors=None if allow_pickle_weights else True)
        except models.LOAD_ERRORS as e:
            raise RewardError(f"{directory}: could not load a sequence classifier ({models.load_failure(e)})") from None
        model.config.pad_token_id = tokenizer.pad_token_id
    if not quantized:
        model.to(device)
    model.eval()
    return model, tokenizer, info
