"""Estimate the GPU memory a fine-tuning setup needs, per GPU, before renting the GPUs.

    rlhf estimate-memory --model 7B --method full --zero 0 --gpus 1
    rlhf estimate-memory --model 7B --method qlora --lora_r 16 --json
    rlhf estimate-memory --model Qwen/Qwen2.5-0.5B --method lora --zero 3 --gpus 8 --offload optimizer

`--model` is a named shape (`qwen2.5-0.5b`, `llama3-8b`, ...: `rlhf.runtime.shapes`, the names
`rlhf bench speed` knows), a size (`7B`, `8b`, `0.5B`, `135M`: the shape of a typical Llama/Qwen model of
that size from the same table; a size between rows takes the nearest row's shape, with every parameter
group scaled to the size asked for, and says so), a local directory with config.json, a hub id (only
config.json is fetched; refused at once when the hub cannot be reached) or `tiny` (the built-in tiny Llama).

Parameters are counted exactly from the config: by formula for Llama, Mistral and Qwen2 (embeddings,
attention with grouped-query key/value heads, gate/up/down MLP, norms, biases, tied or untied
lm_head), and for any other architecture by building the model on the meta device (no memory) and
summing its parameters.

Assumptions (each one is also printed with the estimate). 1 GB = 1e9 bytes.

- Full fine-tuning, mixed-precision Adam: 16 bytes per parameter = bf16 weights 2 + bf16 gradients 2
  + fp32 master weights, Adam momentum and variance 4 + 4 + 4 (ZeRO, Rajbhandari et al. 2020,
  https://arxiv.org/abs/1910.02054, section 3.1).
- ZeRO-1 divides the optimizer states by the number of GPUs N, ZeRO-2 also the gradients, ZeRO-3
  also the weights (same paper, section 5). Communication buckets, the layers ZeRO-3 gathers for the
  current step and padding are not counted.
- LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): the frozen base stays bf16, 2 B/param,
  sharded only by ZeRO-3 (ZeRO-1/2 partition only what is trained). Adapters of rank r on every
  linear layer of every block (q, k, v, o, gate, up, down for Llama; peft's `all-linear`, which
  leaves out lm_head) add r * (in + out) parameters per layer, trained with 16 B/param as above and
  sharded like full fine-tuning.
- QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3): the linear weights of
  the blocks are stored as 4-bit NormalFloat, 0.5 B/param, plus the double-quantised quantisation
  constants: one fp32 absmax per 64 weights quantised to 8 bits, with one fp32 constant per 256
  of those, = 8/64 + 32/(64*256) = 0.127 bit/param. Embeddings, lm_head, norms and biases stay
  bf16 (peft's `prepare_model_for_kbit_training` would cast them to fp32; not counted). Adapters as
  for LoRA. Under ZeRO-3 the 4-bit base is sharded too.
- Activations (Korthikanti et al. 2022, https://arxiv.org/abs/2205.05198, section 4): one
  transformer layer stores s*b*h*(34 + 5*a*s/h) bytes for backward (s sequence length, b micro-batch
  per GPU, h hidden size, a attention heads; 16-bit activations, attention scores materialised, so
  FlashAttention/SDPA need less: the 5*a*s/h term goes). With full activation checkpointing only
  each layer's input is kept, 2*s*b*h bytes per layer, plus one layer's full activations while it
  is recomputed. The logits add b*s*V*4 bytes (fp32, V vocabulary size). A rough term: Llama's
  SwiGLU MLP and grouped-query attention differ from the GPT shape the formula was derived for.
- A fixed 1 GB for the CUDA context, kernels and allocator fragmentation.
- Offload (ZeRO-Offload, Ren et al. 2021, https://arxiv.org/abs/2101.06840): `optimizer` moves the
  optimizer states (sharded as above) to CPU memory (needs ZeRO 1-3); `all` also moves the weights
  (needs ZeRO-3, whose parameter offload this is). CPU memory is reported per GPU process and for
  all N processes together. Pinned staging buffers are not counted.
- GPUs are compared at their nominal 24/40/80 x 1e9 bytes: slightly conservative (an "80 GB" card
  holds 80 GiB = 85.9e9 bytes, less what the driver reserves).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

from rlhf.errors import ArgumentParser, UserError
from rlhf.runtime import shapes

GB = 1e9
GPU_SIZES_GB = (24, 40, 80)
METHODS = ("full", "lora", "qlora")
OFFLOADS = ("none", "optimizer", "all")

BF16 = 2  # bytes per bf16 weight or gradient
ADAM_STATES = 12  # fp32 master weight + Adam m + v (ZeRO paper, section 3.1)
NF4 = 0.5  # 4-bit NormalFloat (QLoRA paper)
QUANT_CONSTANT_BITS = 8 / 64 + 32 / (64 * 256)  # double quantisation: 0.127 bit/param (QLoRA paper)
OVERHEAD_BYTES = 1 * GB  # CUDA context + allocator fragmentation (a fixed guess)
LOGITS_BYTES = 4  # fp32 logits per position and vocabulary entry


# --- Model shapes ---------------------------------------------------------------------------------

# The published shapes (`SHAPES`, one row per size) live in rlhf/runtime/shapes.py, shared with `bench speed`.
SHAPES = shapes.SHAPES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([mMbBtT])\s*$")
_UNITS = {"m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(text: str) -> float | None:
    """`7B` -> 7e9, `0.5b` -> 5e8, `125M` -> 1.25e8; None when `text` is not a size."""
    match = _SIZE.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def nearest_shape(size: float) -> shapes.Shape:
    """The row closest to `size` in ratio (so 10B is nearer 8B than 13B: 1.25x vs 1.3x)."""
    return min(SHAPES, key=lambda row: abs(math.log(size / row.size)))


# --- Parameter counts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a causal LM, split by how each group is stored and trained."""

    total: int
    """All parameters (tied embeddings counted once)."""
    linear: int
    """Weights of the linear layers inside the blocks: what QLoRA quantises and LoRA adapts."""
    embeddings: int
    """Token (and position) embeddings plus the lm_head when it is not tied."""
    lora_in_out: int
    """Sum of in + out features over those linear layers: LoRA of rank r trains r times this."""

    def scaled(self, total: float) -> "ParamCounts":
        """Every group scaled by the same factor so that the total is `total`."""
        f = total / self.total
        return ParamCounts(round(total), round(self.linear * f), round(self.embeddings * f),
                           round(self.lora_in_out * f))


LLAMA_LIKE = ("llama", "mistral", "qwen2")


def count_params(config) -> ParamCounts:
    """Exact parameter counts of `AutoModelForCausalLM.from_config(config)`: by formula for Llama,
    Mistral and Qwen2, by building the model on the meta device for other architectures."""
    if getattr(config, "model_type", None) not in LLAMA_LIKE:
        return count_params_meta(config)
    h, n_layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    # (in, out) of q, k, v, o and gate, up, down
    layers = [(h, q_out), (h, kv_out), (h, kv_out), (q_out, h), (h, inter), (h, inter), (inter, h)]
    linear = sum(i * o for i, o in layers)
    if config.model_type == "qwen2":  # q, k, v carry biases, o does not
        biases = q_out + 2 * kv_out
    else:
        biases = (q_out + 2 * kv_out + h) * bool(getattr(config, "attention_bias", False))
        biases += (2 * inter + h) * bool(getattr(config, "mlp_bias", False))
    norms = 2 * h  # RMSNorm weights before attention and before the MLP

    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return ParamCounts(
        total=n_layers * (linear + biases + norms) + h + embeddings,  # + h: the final norm
        linear=n_layers * linear,
        embeddings=embeddings,
        lora_in_out=n_layers * sum(i + o for i, o in layers),
    )


def count_params_meta(config) -> ParamCounts:
    """Counts for any architecture transformers can build: instantiate on the meta device (shapes
    only, no memory) and sort the parameters by the module that owns them."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--model: transformers cannot build a causal LM from this config "
                        f"({str(e).splitlines()[0]}); pass a size like 7B instead") from None
    output = model.get_output_embeddings()
    seen: set[int] = set()
    total = linear = embeddings = lora_in_out = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights are one parameter
                continue
            seen.add(id(p))
            total += p.numel()
            if module is output or isinstance(module, nn.Embedding):
                embeddings += p.numel()
            elif isinstance(module, (nn.Linear, Conv1D)) and name == "weight":
                linear += p.numel()
                lora_in_out += sum(p.shape)
    return ParamCounts(total, linear, embeddings, lora_in_out)


# --- Which model ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """What `--model` resolved to: parameter counts and the shape the activation term needs."""

    name: str
    description: str
    params: ParamCounts
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    notes: tuple[str, ...] = ()


def spec_from_config(name: str, description: str, config, notes: tuple[str, ...] = ()) -> ModelSpec:
    params = count_params(config)
    text = config.get_text_config()
    shape = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(text, key, None)
        if not isinstance(value, int):
            raise UserError(f"--model '{name}': its config has no integer `{key}` (needed for the "
                            "activation estimate); pass a size like 7B instead")
        shape[key] = value
    return ModelSpec(name, description, params, notes=notes, **shape)


def resolve_model(name: str) -> ModelSpec:
    """`tiny`, a named shape (`llama3-8b`, rlhf/runtime/shapes.py), a size like `7B`, a local directory
    with config.json, or a hub id (config only)."""
    if name == "tiny":
        return _tiny_spec()
    shape = shapes.named(name)
    if shape is not None:
        return spec_from_config(name, f"{shape.name} shape", shape.config())
    size = parse_size(name)
    if size is not None:
        return _size_spec(name, size)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"--model '{name}' is a directory without config.json")
        return spec_from_config(name, f"config.json in {name}", _load_config(name, path, "the directory"))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"--model '{name}' does not exist (expected a size like 7B, a local directory "
                        "with config.json, a hub id like Qwen/Qwen2.5-0.5B, or tiny)")
    return spec_from_config(name, f"hub config of {name}",
                            shapes.hub_config(name, "--model", hint="; pass a size like 7B instead"))


def _load_config(name: str, path: str, where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model '{name}': could not load its config from {where} "
                        f"({str(e).splitlines()[0]}); pass a size like 7B instead (or a local "
                        "directory with config.json)") from None


def _size_spec(name: str, size: float) -> ModelSpec:
    lo, hi = SHAPES[0].size / 2, SHAPES[-1].size * 2
    if not lo <= size <= hi:
        raise UserError(f"--model {name}: sizes from {_count(lo)} to {_count(hi)} parameters are known; "
                        "for others pass a local directory with config.json")
    row = nearest_shape(size)
    spec = spec_from_config(name, f"{row.name} shape", row.config())
    if math.isclose(size, row.size):
        return spec
    note = (f"{name} is not a row of the shape table: took the nearest, {row.name} "
            f"({_count(spec.params.total)} parameters), for the activation shape and scaled every "
            f"parameter group to {_count(size)}")
    return dataclasses.replace(spec, description=f"{row.name} shape scaled", params=spec.params.scaled(size),
                               notes=(note,))


def _tiny_spec() -> ModelSpec:
    from transformers import LlamaConfig

    from policies.config import TinyModelConfig
    from policies.tiny import load_tokenizer

    shape = TinyModelConfig()
    config = LlamaConfig(vocab_size=len(load_tokenizer()), hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads,
                         num_key_value_heads=shape.num_key_value_heads, tie_word_embeddings=False)
    return spec_from_config("tiny", "built-in tiny Llama", config)


# --- Memory terms ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One component of the memory: bytes on each GPU, bytes in CPU memory per GPU process."""

    gpu: float
    cpu: float
    detail: str


def model_state_bytes(params: ParamCounts, method: str, zero: int, gpus: int, lora_r: int = 16,
                      offload: str = "none") -> dict[str, Term]:
    """Weights, gradients and optimizer states per GPU (see the module docstring for the sources)."""
    check_setup(method, zero, gpus, lora_r, offload)
    shard_weights, shard_grads, shard_optim = (gpus if zero >= k else 1 for k in (3, 2, 1))

    def split(k: int) -> str:
        return f" / {k} GPUs" if k > 1 else ""

    if method == "full":
        n, n_text = params.total, _count(params.total)
        weights = BF16 * n / shard_weights
        weights_detail = f"bf16, 2 B/param x {n_text}{split(shard_weights)}"
    else:
        n = lora_r * params.lora_in_out  # trainable adapter parameters
        n_text = f"{_count(n)} adapter params"
        if method == "lora":
            base = BF16 * params.total
            base_detail = "frozen base bf16, 2 B/param"
        else:
            base = params.linear * (NF4 + QUANT_CONSTANT_BITS / 8) + BF16 * (params.total - params.linear)
            base_detail = (f"frozen base: {_count(params.linear)} linear params in NF4 "
                           f"(0.5 B + {QUANT_CONSTANT_BITS:.3f} bit constants) + "
                           f"{_count(params.total - params.linear)} embeddings/lm_head/norms in bf16")
        weights = (base + BF16 * n) / shard_weights
        weights_detail = f"{base_detail} = {base / GB:.2f} GB, + bf16 adapters {BF16 * n / GB:.2f} GB"
        if shard_weights > 1:
            weights_detail = f"({weights_detail}){split(shard_weights)}"

    terms = {
        "weights": Term(weights, 0.0, weights_detail),
        "gradients": Term(BF16 * n / shard_grads, 0.0, f"bf16, 2 B/param x {n_text}{split(shard_grads)}"),
        "optimizer": Term(ADAM_STATES * n / shard_optim, 0.0,
                          f"fp32 master + Adam m + v, 12 B/param x {n_text}{split(shard_optim)}"),
    }
    moved = {"none": (), "optimizer": ("optimizer",), "all": ("optimizer", "weights")}[offload]
    for key in moved:
        t = terms[key]
        terms[key] = Term(0.0, t.gpu, f"offloaded to CPU: {t.detail}")
    return terms


def activation_bytes(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, vocab_size: int,
                     batch_size: int, seq_len: int, gradient_checkpointing: bool) -> dict[str, float]:
    """Korthikanti et al. 2022: activations kept for backward, per GPU, in bytes."""
    s, b, h, a = seq_len, batch_size, hidden_size, num_attention_heads
    full_layer = s * b * h * (34 + 5 * a * s / h)
    if gradient_checkpointing:
        stored, recomputed = num_hidden_layers * 2 * s * b * h, full_layer
    else:
        stored, recomputed = num_hidden_layers * full_layer, 0.0
    logits = b * s * vocab_size * LOGITS_BYTES
    return {"stored": stored, "recomputed_layer": recomputed, "logits": logits,
            "total": stored + recomputed + logits}


def check_setup(method: str, zero: int, gpus: int, lora_r: int, offload: str) -> None:
    """Combinations that do not exist fail here, naming the option."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {gpus}")
    if lora_r < 1:
        raise UserError(f"--lora_r must be at least 1, got {lora_r}")
    if offload not in OFFLOADS:
        raise UserError(f"--offload must be one of {', '.join(OFFLOADS)}, got '{offload}'")
    if offload == "optimizer" and zero == 0:
        raise UserError("--offload optimizer needs --zero 1, 2 or 3 (DeepSpeed offloads ZeRO-partitioned "
                        "optimizer states)")
    if offload == "all" and zero != 3:
        raise UserError("--offload all needs --zero 3 (parameter offload is a ZeRO-3 feature)")


def estimate(spec: ModelSpec, method: str = "full", zero: int = 0, gpus: int = 1, batch_size: int = 1,
             seq_len: int = 2048, gradient_checkpointing: bool = True, lora_r: int = 16,
             offload: str = "none") -> dict:
    """Memory per GPU (bytes) for training `spec` this way, with the assumptions as text."""
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"--batch_size and --seq_len must be at least 1, got {batch_size} and {seq_len}")
    terms = model_state_bytes(spec.params, method, zero, gpus, lora_r, offload)
    act = activation_bytes(spec.hidden_size, spec.num_hidden_layers, spec.num_attention_heads,
                           spec.vocab_size, batch_size, seq_len, gradient_checkpointing)
    if gradient_checkpointing:
        act_detail = (f"{spec.num_hidden_layers} checkpointed layer inputs {act['stored'] / GB:.2f} + one layer "
                      f"recomputed {act['recomputed_layer'] / GB:.2f} + fp32 logits {act['logits'] / GB:.2f}")
    else:
        act_detail = (f"{spec.num_hidden_layers} layers x {act['stored'] / spec.num_hidden_layers / GB:.2f} "
                      f"+ fp32 logits {act['logits'] / GB:.2f}")
    terms["activations"] = Term(act["total"], 0.0, act_detail)
    terms["overhead"] = Term(OVERHEAD_BYTES, 0.0, "CUDA context + allocator fragmentation (fixed guess)")

    gpu = {k: round(t.gpu) for k, t in terms.items()}
    cpu = {k: round(t.cpu) for k, t in terms.items() if t.cpu}
    gpu["total"] = sum(gpu.values())
    cpu["total"] = sum(cpu.values())
    trainable = spec.params.total if method == "full" else lora_r * spec.params.lora_in_out
    return {
        "model": {"name": spec.name, "description": spec.description, "parameters": spec.params.total,
                  "trainable_parameters": trainable, "linear_parameters": spec.params.linear,
                  "embedding_parameters": spec.params.embeddings, "hidden_size": spec.hidden_size,
                  "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
                  "vocab_size": spec.vocab_size, "notes": list(spec.notes)},
        "setup": {"method": method, "zero": zero, "gpus": gpus, "batch_size": batch_size, "seq_len": seq_len,
                  "gradient_checkpointing": gradient_checkpointing,
                  "lora_r": lora_r if method != "full" else None, "offload": offload},
        "unit": "bytes (the text report prints GB = 1e9 bytes)",
        "per_gpu_bytes": gpu,
        "cpu_bytes_per_gpu_process": cpu,
        "cpu_bytes_all_processes": {k: v * gpus for k, v in cpu.items()},
        "activation_bytes": {k: round(v) for k, v in act.items()},
        "details": {k: t.detail for k, t in terms.items()},
        "fits": {f"{size}GB": gpu["total"] <= size * GB for size in GPU_SIZES_GB},
        "assumptions": assumptions(method, zero, offload),
    }


def assumptions(method: str, zero: int, offload: str) -> list[str]:
    """The assumptions behind an estimate, with sources (those that apply to this setup)."""
    lines = ["GB = 1e9 bytes; GPUs compared at their nominal 24/40/80 x 1e9 bytes (conservative: an "
             "'80 GB' card holds 80 GiB = 85.9e9 bytes, less what the driver reserves)."]
    if method == "full":
        lines.append("full: mixed-precision Adam needs 16 B/param = bf16 weights 2 + bf16 gradients 2 + fp32 "
                     "master weights, momentum and variance 12 (ZeRO, Rajbhandari et al. 2020, "
                     "arXiv:1910.02054).")
    else:
        lines.append("adapters: LoRA rank r on every linear layer of each block (q,k,v,o,gate,up,down; not "
                     "lm_head), r*(in+out) params each, trained with 16 B/param (bf16 weight 2 + bf16 grad 2 "
                     "+ Adam 12, ZeRO paper arXiv:1910.02054).")
    if method == "lora":
        lines.append("lora: frozen base in bf16, 2 B/param, sharded only by ZeRO-3.")
    if method == "qlora":
        lines.append("qlora: block linear weights in NF4, 0.5 B/param + double-quantised constants 0.127 "
                     "bit/param (QLoRA, Dettmers et al. 2023, arXiv:2305.14314); embeddings, lm_head, norms "
                     "and biases stay bf16 (fp32 if upcast by prepare_model_for_kbit_training: not counted); "
                     "sharded only by ZeRO-3.")
    lines.append(f"ZeRO-{zero}: " + {
        0: "nothing sharded; every GPU holds all weights, gradients and optimizer states.",
        1: "optimizer states divided by the number of GPUs.",
        2: "optimizer states and gradients divided by the number of GPUs.",
        3: "optimizer states, gradients and weights divided by the number of GPUs.",
    }[zero] + " Communication buckets and ZeRO-3's gathered layers are not counted.")
    lines.append("activations: per layer s*b*h*(34 + 5*a*s/h) bytes without recomputation (Korthikanti et al. "
                 "2022, arXiv:2205.05198; attention scores materialised: FlashAttention/SDPA need less); with "
                 "gradient checkpointing 2*s*b*h bytes per layer kept + one layer recomputed; + fp32 logits "
                 "b*s*V*4. b is the micro-batch per GPU. Rough: derived for GPT-shaped layers.")
    lines.append("overhead: a fixed 1 GB for the CUDA context, kernels and allocator fragmentation.")
    if offload != "none":
        moved = "optimizer states" if offload == "optimizer" else "optimizer states and weights"
        lines.append(f"offload {offload}: {moved} live in CPU memory (ZeRO-Offload, Ren et al. 2021, "
                     "arXiv:2101.06840); pinned staging buffers not counted.")
    return lines


# --- Report ---------------------------------------------------------------------------------------

ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer states"),
        ("activations", "activations"), ("overhead", "overhead"))


def format_report(result: dict) -> str:
    m, s, gpu, cpu = result["model"], result["setup"], result["per_gpu_bytes"], result["cpu_bytes_per_gpu_process"]
    method = s["method"] if s["method"] == "full" else f"{s['method']} (r={s['lora_r']})"
    lines = [f"Model {m['name']} ({m['description']}: {_count(m['parameters'])} parameters, "
             f"{_count(m['trainable_parameters'])} trainable), method {method}, ZeRO-{s['zero']}, "
             f"{s['gpus']} GPU(s), batch {s['batch_size']} x seq {s['seq_len']}, gradient checkpointing "
             f"{'on' if s['gradient_checkpointing'] else 'off'}, offload {s['offload']}"]
    lines += [f"note: {n}" for n in m["notes"]]
    show_cpu = s["offload"] != "none"
    cpu_head = f"  {'CPU/process':>12}" if show_cpu else ""
    lines += ["", f"{'component':<18}{'per GPU':>10}{cpu_head}  how"]
    for key, label in ROWS:
        cpu_cell = f"  {_gb(cpu.get(key, 0.0)):>12}" if show_cpu else ""
        lines.append(f"{label:<18}{_gb(gpu[key]):>10}{cpu_cell}  {result['details'][key]}")
    cpu_cell = f"  {_gb(cpu['total']):>12}" if show_cpu else ""
    lines.append(f"{'total':<18}{_gb(gpu['total']):>10}{cpu_cell}")
    if show_cpu:
        lines.append(f"CPU memory for all {s['gpus']} GPU processes together (on their nodes): "
                     f"{_gb(result['cpu_bytes_all_processes']['total'])}")
    lines.append("fits in: " + ", ".join(f"{size} GB {'yes' if result['fits'][f'{size}GB'] else 'no'}"
                                         for size in GPU_SIZES_GB))
    biggest = max(GPU_SIZES_GB)
    if not result["fits"][f"{biggest}GB"]:
        key, label = max(ROWS, key=lambda row: gpu[row[0]])
        states = gpu["weights"] + gpu["gradients"] + gpu["optimizer"]
        lines.append(f"why not {biggest} GB: weights + gradients + optimizer states alone take {_gb(states)} "
                     f"per GPU; the largest is {label} ({_gb(gpu[key])}). Smaller: shard with --zero 1/2/3 "
                     "over more --gpus, --offload optimizer, or train adapters only (--method lora or qlora).")
    lines += ["", "assumptions:"] + [f"- {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _count(n: float) -> str:
    """6738415616 -> '6.74e9' (parameter counts as papers write them)."""
    if n == 0:
        return "0"
    exponent = math.floor(math.log10(abs(n)))
    mantissa = n / 10**exponent
    if round(mantissa, 2) >= 10:
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.2f}e{exponent}"


# --- Command line ---------------------------------------------------------------------------------

def _bool(text: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="rlhf estimate-memory", allow_abbrev=False,
                description="Memory per GPU to fine-tune a causal LM: weights, gradients, optimizer states, "
                            "activations; compared with 24/40/80 GB GPUs. The assumptions are printed with "
                            "the estimate.")
    p.add_argument("--model", required=True, metavar="NAME_OR_PATH_OR_SIZE",
                   help=f"a named shape ({', '.join(shapes.NAMES)}); a size like 7B, 8b, 0.5B, 135M (shape "
                        "of a typical Llama/Qwen model); a local directory with config.json; a hub id (only "
                        "config.json is fetched); or tiny")
    p.add_argument("--method", default="full", choices=METHODS,
                   help="full fine-tuning, LoRA on a bf16 base, or QLoRA on a 4-bit NF4 base (default: full)")
    p.add_argument("--zero", default=0, type=int, choices=(0, 1, 2, 3),
                   help="DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also weights "
                        "(default: 0)")
    p.add_argument("--gpus", default=1, type=_positive, metavar="N",
                   help="number of GPUs the ZeRO stage shards over (default: 1)")
    p.add_argument("--batch_size", default=1, type=_positive, metavar="B",
                   help="micro-batch per GPU, in sequences (default: 1)")
    p.add_argument("--seq_len", default=2048, type=_positive, metavar="L",
                   help="tokens per sequence (default: 2048)")
    p.add_argument("--gradient_checkpointing", default=True, type=_bool, metavar="true|false",
                   help="recompute activations in backward, keeping only each layer's input (default: true)")
    p.add_argument("--lora_r", default=None, type=_positive, metavar="R",
                   help="LoRA rank, for --method lora or qlora (default: 16)")
    p.add_argument("--offload", default="none", choices=OFFLOADS,
                   help="move optimizer states (ZeRO 1-3), or optimizer states and weights (ZeRO-3), to CPU "
                        "memory (default: none)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes) instead of a table")
    return p


def cli(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.lora_r is not None and args.method == "full":
        raise UserError("--lora_r applies only to --method lora or qlora")
    spec = resolve_model(args.model)
    result = estimate(spec, method=args.method, zero=args.zero, gpus=args.gpus, batch_size=args.batch_size,
                      seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing,
                      lora_r=args.lora_r or 16, offload=args.offload)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
