"""Typed configuration of the models that act (documented once; rendered by `rlhf <stage> --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from policies.domains import Fraction, PositiveInt, attention_implementation, domain

PeftMethod = Literal["full", "lora", "qlora", "prefix_tuning", "prompt_tuning", "ia3", "ln_tuning"]
PEFT_METHODS: tuple[str, ...] = PeftMethod.__args__
AttentionImplementation = domain(attention_implementation, "an attention implementation transformers knows (eager, "
                                 "sdpa, flash_attention_2, ...) or a hub kernel owner/name")


@dataclass
class TinyModelConfig:
    """Shape of the built-in random-init Llama used when `model.name_or_path` is `tiny`."""

    hidden_size: PositiveInt[int] = 64
    """Width of the residual stream."""
    num_hidden_layers: PositiveInt[int] = 2
    """Number of decoder blocks."""
    num_attention_heads: PositiveInt[int] = 4
    """Attention heads per block."""
    num_key_value_heads: PositiveInt[int] = 2
    """Key/value heads (grouped-query attention when fewer than attention heads)."""
    intermediate_size: PositiveInt[int] = 128
    """Width of the MLP."""
    max_position_embeddings: PositiveInt[int] = 1024
    """Longest sequence the model accepts."""


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = "tiny"
    """A Hugging Face hub id, a local directory (model + tokenizer + chat template), or `tiny` for
    the built-in random-init Llama with the shipped tokenizer (no download)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the built-in tiny model (only read when name_or_path is `tiny`)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype: `auto` is bfloat16 on a GPU that supports it, float32 otherwise."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust its author."""
    allow_pickle_weights: bool = False
    """Load weights stored as pickles (`pytorch_model.bin`, `adapter_model.bin`) when a directory has no
    safetensors (this model, an adapter's base, and in PPO the reward model). Unpickling can run code:
    only for files you trust."""
    pad_token: Optional[str] = None
    """Token to use for padding when the tokenizer has none (must differ from EOS)."""
    attn_implementation: AttentionImplementation[Optional[str]] = None
    """Attention kernel (`eager`, `sdpa`, `flash_attention_2`); None lets transformers choose."""


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: which method and its knobs."""

    method: PeftMethod = "lora"
    """`full` trains every weight; `lora`; `qlora` (LoRA on a 4-bit NF4 base with double
    quantisation); `prefix_tuning`; `prompt_tuning`; `ia3`; `ln_tuning` (only the norm layers)."""
    r: PositiveInt[int] = 16
    """LoRA rank."""
    lora_alpha: PositiveInt[int] = 32
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    lora_dropout: Fraction[float] = 0.05
    """Dropout on the LoRA input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt. None: all linear layers for LoRA/QLoRA, peft's per-architecture
    defaults for IA3 and LN tuning."""
    use_dora: bool = False
    """LoRA: weight-decomposed low-rank adaptation (DoRA, Liu et al. 2024)."""
    use_rslora: bool = False
    """LoRA: rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023)."""
    num_virtual_tokens: PositiveInt[int] = 16
    """Prefix and prompt tuning: number of virtual tokens."""
    prompt_tuning_init_text: Optional[str] = None
    """Prompt tuning: initialise the virtual tokens from this text (random when None)."""
    modules_to_save: Optional[list[str]] = None
    """Extra modules trained fully and saved with the adapter (e.g. `lm_head`)."""
