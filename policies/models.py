"""Load the tokenizer and causal LM named by a `ModelConfig`, and wrap it for a PEFT method.

Loading happens only in these functions (nothing touches the network at import). Weights load as
safetensors; remote code runs only when `model.trust_remote_code` is set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

import torch

from policies import tiny
from policies.config import ModelConfig, PeftConfig

TINY = "tiny"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded because of what the user named (the CLI exits 2)."""


def read_json(path: str | os.PathLike, error: type[Exception] = ModelLoadError, *, object_only: bool = True):
    """The JSON in a file of a user's folder (adapter_config.json, config.json, reward_info.json, a
    checkpoint's state): malformed JSON, bytes that are not text, or (with `object_only`) anything but an
    object is `error` naming the file and, for malformed JSON, the line and column, in one line."""
    try:
        data = json.loads(Path(path).read_bytes())  # bytes: json detects UTF-8/16/32 itself
    except json.JSONDecodeError as e:
        raise error(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a JSON text file (byte {e.start} is not UTF-8)") from None
    if object_only and not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


_JSON_CHECKED: set[tuple[str, int, int]] = set()  # (file, mtime_ns, size): a model folder is read several times


def check_json_files(name_or_path: str | os.PathLike, error: type[Exception] = ModelLoadError) -> None:
    """Every *.json file directly in a local model/adapter folder parses (see `read_json`): transformers and
    peft read them later with messages that name neither the file nor the place, or with a traceback."""
    folder = Path(os.path.expanduser(str(name_or_path)))
    if not folder.is_dir():
        return
    for f in sorted(folder.glob("*.json")):
        if not f.is_file():
            continue
        stat = f.stat()
        key = (str(f.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _JSON_CHECKED:
            read_json(f, error, object_only=False)
            _JSON_CHECKED.add(key)


def stamp_matches(path: Path, stamp: dict) -> bool:
    """Whether the JSON stamp of a cached folder (a merged base, the tiny model) says it was made from
    `stamp`; a missing or unreadable stamp means it must be made again."""
    try:
        return json.loads(path.read_bytes()) == stamp
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False


def materialize(cfg: ModelConfig, out_dir: str | Path, seed: int = 0) -> str:
    """Return a path or hub id transformers can load. The built-in `tiny` model is written to
    `out_dir` first (as safetensors + tokenizer), so adapters trained on it name a real base path."""
    if cfg.name_or_path != TINY:
        return cfg.name_or_path
    out_dir = Path(out_dir).resolve()
    spec = {"tiny": vars(cfg.tiny), "seed": seed}
    spec_file = out_dir / "tiny_spec.json"
    if not stamp_matches(spec_file, spec):
        tiny.save_tiny(cfg.tiny, out_dir, seed)
        spec_file.write_text(json.dumps(spec))
    return str(out_dir)


def _safetensors_index_ok(index: Path) -> bool:
    """True when a model.safetensors.index.json names only .safetensors shards that exist beside it."""
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{index}: malformed index (expected JSON with a weight_map of shard names)") from None
    return bool(shards) and all(isinstance(s, str) and s.endswith(".safetensors") and (index.parent / s).is_file()
                                for s in shards)


def pickles_read(path: Path) -> list[str]:
    """The pickle files a load of directory `path` would read, as the loaders choose them: peft reads
    adapter_model.safetensors, else adapter_model.bin; transformers reads model.safetensors or the shards
    of model.safetensors.index.json, else pytorch_model.bin or its shards (pytorch_model-*.bin). Only
    those names count: a stray `decoy.safetensors` is read by nobody and does not make a pickle beside
    it safe, and a checkpoint's optimizer.pt is not model weights."""
    found: set[str] = set()
    is_adapter = (path / "adapter_config.json").is_file()
    if is_adapter and not (path / "adapter_model.safetensors").is_file() and (path / "adapter_model.bin").is_file():
        found.add("adapter_model.bin")
    if not is_adapter or (path / "config.json").is_file():
        index = path / "model.safetensors.index.json"
        if not ((path / "model.safetensors").is_file() or (index.is_file() and _safetensors_index_ok(index))):
            found |= {f.name for f in path.glob("pytorch_model*.bin")}
    return sorted(found)


def refuse_pickle_weights(name_or_path: str, allow: bool, option: str = "model.allow_pickle_weights") -> None:
    """A local model or adapter directory whose weights the loader would read from pickles is refused
    unless `allow`: unpickling a file can run code (safetensors cannot). Hub ids are loaded with
    use_safetensors=True. `option` is the opt-in as the user writes it: a config field, or a
    command-line flag (`--...`)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if allow or not path.is_dir():
        return
    pickles = pickles_read(path)
    if pickles:
        opt_in = f"pass {option}" if option.startswith("--") else f"set {option}: true"
        raise ModelLoadError(f"'{name_or_path}' holds its weights only as pickles ({', '.join(pickles[:3])}), and "
                             f"loading a pickle can run code; convert them to safetensors, or {opt_in} "
                             "if you trust where they came from")


# What loading a model can raise because of what the user named: a missing or malformed file (OSError,
# ValueError, custom code refused), a pickle torch's weights-only unpickler refused (allow_pickle_weights),
# or a package an option needs that is not installed (ImportError; the known ones are named by `require`).
LOAD_ERRORS = (OSError, ValueError, pickle.UnpicklingError, ImportError)

# Packages an option needs beyond the default install (or in it, but possibly removed), and how to install each.
INSTALL_COMMANDS = {"bitsandbytes": "pip install bitsandbytes",
                    "flash_attn": "pip install flash-attn --no-build-isolation (needs a CUDA GPU)"}


def require(module: str, option: str) -> None:
    """One line naming the install command when the package `option` needs is missing, before transformers
    fails on it with a traceback."""
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{option} needs the package {module}, which is not installed in this environment; "
                             f"install it with: {INSTALL_COMMANDS[module]}")


def require_attention(cfg: ModelConfig) -> None:
    """model.attn_implementation flash_attention_2 needs the flash-attn package."""
    if cfg.attn_implementation == "flash_attention_2":
        require("flash_attn", "model.attn_implementation: flash_attention_2")


def load_failure(e: Exception) -> str:
    """One line saying why a load failed (`e` one of LOAD_ERRORS). torch's refusal of a pickle is a
    paragraph that suggests weights_only=False; only what it refused is kept."""
    if isinstance(e, pickle.UnpicklingError):
        noise = ("Weights only load failed", "Please file an issue", "Check the documentation")
        why = [line.strip().rstrip(".") for line in str(e).splitlines() if line.strip() and not line.startswith(noise)]
        detail = f" ({'; '.join(why)})" if why else ""
        return f"torch's weights-only loader refused a pickle weights file{detail}: it holds more than plain tensors"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def refuse_pickle_weights_with_base(path: str, allow: bool, option: str = "model.allow_pickle_weights") -> None:
    """`refuse_pickle_weights` for a model directory, and for a peft adapter directory also for the base
    its adapter_config.json names (loading the adapter loads that base too)."""
    refuse_pickle_weights(path, allow, option)
    adapter_cfg = Path(os.path.expanduser(str(path))) / "adapter_config.json"
    if adapter_cfg.is_file():
        base = read_json(adapter_cfg).get("base_model_name_or_path")
        if base:
            refuse_pickle_weights(base, allow, option)


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id. A hub id is `owner/name`: exactly one '/', no leading `.`, `/` or `~`,
    and no backslash. So a local path is one that starts with `.`, `/` or `~`, has a backslash or more
    than one '/', or whose first component is `runs` (where this project writes) or an existing local
    directory (`models/llama` next to a `models/` folder). A missing local path is refused at once: asking
    the hub for it only fails after its retries (~50 s offline). `owner/name` with neither is a hub id."""
    first = name_or_path.split("/", 1)[0]
    return (name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1
            or ("/" in name_or_path and (first == "runs" or os.path.isdir(first))))


STAGE_COMMANDS = {"sft": "rlhf sft --config configs/sft_tiny.yaml", "reward": "rlhf reward --config configs/reward_tiny.yaml",
                  "classifier": "rlhf classifier --config configs/classifier_tiny.yaml",
                  "ppo": "rlhf ppo --config configs/ppo_tiny.yaml", "policy": "rlhf ppo --config configs/ppo_tiny.yaml"}


def creating_command(path: str) -> str:
    """'; create it with: COMMAND' for a path that looks like one of our stages' outputs (the last
    component naming a stage wins: runs/quickstart/ppo/policy is PPO's), else ''. Under a quickstart
    or pipeline folder, the pipeline writes it."""
    parts = [p.lower() for p in Path(path).parts]
    stage = next((s for part in reversed(parts) for s in STAGE_COMMANDS if s in part), None)
    if any("quickstart" in p or "pipeline" in p for p in parts) and stage not in (None, "classifier"):
        return "; create it with: rlhf pipeline --config configs/quickstart.yaml"
    return f"; create it with: {STAGE_COMMANDS[stage]}" if stage else ""


def _check_exists(name_or_path: str) -> None:
    """A model path that looks local (see `looks_local`) and is missing: one line, no hub lookup. A local
    folder's JSON files are read once here, so a malformed one is named with its line and column."""
    if looks_local(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        hint = creating_command(name_or_path) or " (a local path; a hub id is owner/name)"
        raise ModelLoadError(f"{name_or_path} does not exist{hint}")
    check_json_files(name_or_path)


def load_tokenizer(name_or_path: str, cfg: ModelConfig):
    """Tokenizer with a PAD distinct from EOS (padding must never hide the stop token)."""
    from transformers import AutoTokenizer

    _check_exists(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name_or_path '{name_or_path}': could not load a tokenizer "
                             f"({str(e).splitlines()[0]})") from None
    if cfg.pad_token is not None:
        if cfg.pad_token not in tok.get_vocab():
            raise ModelLoadError(f"model.pad_token '{cfg.pad_token}' is not in the vocabulary of '{name_or_path}'")
        tok.pad_token = cfg.pad_token
    if tok.pad_token is None:
        raise ModelLoadError(f"tokenizer of '{name_or_path}' has no PAD token; set model.pad_token to an "
                             "unused token of its vocabulary (one that is not EOS)")
    if tok.pad_token_id == tok.eos_token_id:
        raise ModelLoadError(f"tokenizer of '{name_or_path}' uses '{tok.eos_token}' as both PAD and EOS, so "
                             "padding would mask the stop token; set model.pad_token to a different token")
    return tok


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype `model.dtype` names: the compute dtype, and the weight dtype of frozen models."""
    if cfg.dtype == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    return getattr(torch, cfg.dtype)


def compute_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype matmuls run in (under autocast when the trainable weights are float32 masters)."""
    return torch_dtype(cfg)


HALF_DTYPES = (torch.bfloat16, torch.float16)


def master_dtype(cfg: ModelConfig, deepspeed: bool = False, method: str = "full") -> torch.dtype:
    """The dtype to load weights that are fully fine-tuned in: float32 when the compute dtype is half.

    An optimizer stepping bf16 weights rounds most updates away: a step of lr 1e-5 on a weight of
    ~0.02 is ~5e-4 of it, under half of bf16's spacing 2^-8 (measured: after 10 AdamW steps only 15%
    of a model's bf16 weights had changed at all; all of them in float32). So the trainable copy is
    float32 and the forward runs under autocast in `compute_dtype` (same matmul precision).
    DeepSpeed's bf16/fp16 optimizers keep their own float32 master copy and step that, so under
    DeepSpeed the module weights stay in the half dtype. PEFT methods train small adapters that peft
    already creates in float32 over a frozen half base, so they keep the half dtype too."""
    dtype = torch_dtype(cfg)
    if method == "full" and not deepspeed and dtype in HALF_DTYPES:
        return torch.float32
    return dtype


def quantization_config(cfg: ModelConfig):
    """4-bit NF4 with double quantisation (QLoRA, Dettmers et al. 2023)."""
    from transformers import BitsAndBytesConfig

    require("bitsandbytes", "peft.method qlora (4-bit weights)")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(cfg))


def load_causal_lm(name_or_path: str, cfg: ModelConfig, method: str = "full", *, master_weights: bool = False):
    """The causal LM, quantised to 4 bits when `method` is `qlora`. With `master_weights`, a model that
    is fully fine-tuned in a half dtype loads in float32 (see `master_dtype`); the caller then runs
    its forward under autocast in `compute_dtype(cfg)`. Frozen models (reference) leave it off."""
    from transformers import AutoModelForCausalLM

    _check_exists(name_or_path)
    refuse_pickle_weights(name_or_path, cfg.allow_pickle_weights)
    dtype = master_dtype(cfg, deepspeed=False, method=method) if master_weights else torch_dtype(cfg)
    kwargs = dict(revision=cfg.revision, dtype=dtype,
                  use_safetensors=None if cfg.allow_pickle_weights else True)
    if cfg.attn_implementation:
        require_attention(cfg)
        kwargs["attn_implementation"] = cfg.attn_implementation
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except LOAD_ERRORS as e:
        raise ModelLoadError(f"model.name_or_path '{name_or_path}': could not load a causal LM with "
                             f"safetensors weights ({load_failure(e)})") from None


def peft_config(cfg: PeftConfig, task_type: str = "CAUSAL_LM", tokenizer_name: str | None = None):
    """The peft config object for `cfg.method` (None for full fine-tuning)."""
    import peft

    if cfg.method == "full":
        return None
    if cfg.method in ("lora", "qlora"):
        return peft.LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, target_modules=cfg.target_modules or "all-linear",
                               use_dora=cfg.use_dora, use_rslora=cfg.use_rslora,
                               modules_to_save=cfg.modules_to_save)
    if cfg.method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prompt_tuning":
        if cfg.prompt_tuning_init_text:
            return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens,
                                           prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                           prompt_tuning_init_text=cfg.prompt_tuning_init_text,
                                           tokenizer_name_or_path=tokenizer_name)
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "ia3":
        return peft.IA3Config(task_type=task_type, target_modules=cfg.target_modules,
                              feedforward_modules=[] if cfg.target_modules else None,
                              modules_to_save=cfg.modules_to_save)
    if cfg.method == "ln_tuning":
        return peft.LNTuningConfig(task_type=task_type, target_modules=cfg.target_modules,
                                   modules_to_save=cfg.modules_to_save)
    raise ValueError(f"unknown peft.method {cfg.method!r}")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights are counted as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:  # bnb Params4bit store two values per byte
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
