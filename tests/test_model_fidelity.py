"""PPO on real models trains what it thinks it trains: half-precision full fine-tuning steps float32
master weights, and train mode is deterministic once dropout is disabled (including the attention
dropout Llama/Qwen2 apply from a float, not from an nn.Dropout)."""

import pytest
import torch
from torch import nn

from policies import tiny
from policies.actor_critic import DROPOUT_MODULES, disable_dropout, model_configs
from policies.config import ModelConfig, TinyModelConfig
from policies.models import load_causal_lm, master_dtype

STEPS, LR = 10, 1e-5


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> str:
    """The tiny Llama saved in bf16 safetensors, like a real checkpoint."""
    out = tmp_path_factory.mktemp("tiny_bf16")
    tiny.build_model(TinyModelConfig(), tiny.load_tokenizer()).to(torch.bfloat16).save_pretrained(out)
    return str(out)


def token_batch(vocab: int) -> torch.Tensor:  # (B, T)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (4, 32), generator=gen)


def fraction_changed_by_adamw(model: nn.Module, ids: torch.Tensor) -> float:
    """Fraction of weight elements that differ after STEPS AdamW steps of next-token loss under bf16 autocast."""
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits  # (B, T, V)
        loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = sum((p.detach() != b).sum().item() for p, b in zip(model.parameters(), before))
    return changed / sum(b.numel() for b in before)


def test_master_weights_load_float32_and_every_weight_moves(bf16_dir):
    """Measured: 99.96% of elements change with float32 masters, 11.6% when AdamW steps the bf16
    weights directly (norm weights ~1.0 never change: lr 1e-5 is far under bf16's spacing there)."""
    cfg = ModelConfig(name_or_path=bf16_dir, dtype="bfloat16")
    master = load_causal_lm(bf16_dir, cfg, "full", master_weights=True)
    assert {p.dtype for p in master.parameters()} == {torch.float32}
    half = load_causal_lm(bf16_dir, cfg, "full")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    ids = token_batch(master.config.vocab_size)

    # Same math before training: autocast over float32 masters computes in bf16 like the bf16 model.
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_logits = master.eval()(input_ids=ids).logits  # (B, T, V)
        half_logits = half.eval()(input_ids=ids).logits
    assert autocast_logits.dtype == torch.bfloat16
    assert torch.allclose(autocast_logits.float(), half_logits.float(), atol=2e-2)  # measured max 0.004

    assert fraction_changed_by_adamw(master, ids) > 0.95
    assert fraction_changed_by_adamw(half, ids) < 0.3


@pytest.mark.parametrize("dtype, deepspeed, method, expected", [
    ("bfloat16", False, "full", torch.float32),
    ("float16", False, "full", torch.float32),
    ("float32", False, "full", torch.float32),
    # DeepSpeed's bf16/fp16 optimizer keeps its own float32 copy of the half module weights.
    ("bfloat16", True, "full", torch.bfloat16),
    # LoRA trains float32 adapters (peft upcasts them) over a frozen half base.
    ("bfloat16", False, "lora", torch.bfloat16),
])
def test_master_dtype(dtype, deepspeed, method, expected):
    assert master_dtype(ModelConfig(dtype=dtype), deepspeed, method) == expected


def test_master_weights_leave_peft_bases_in_half(bf16_dir):
    cfg = ModelConfig(name_or_path=bf16_dir, dtype="bfloat16")
    base = load_causal_lm(bf16_dir, cfg, "lora", master_weights=True)
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}


def tiny_with_dropout(arch: str, rate: float = 0.5) -> nn.Module:
    """A random-init model in train mode whose config asks for attention dropout (as some hub configs do)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=rate)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_cls(config).train()


def two_forwards_differ(model: nn.Module) -> float:
    """Max |difference| of the logits of two train-mode forwards of the same batch."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))  # (B, T)
    with torch.no_grad():
        return (model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_disable_dropout_makes_config_attention_dropout_deterministic(arch):
    model = tiny_with_dropout(arch)
    assert not any(isinstance(m, DROPOUT_MODULES) for m in model.modules())  # the old fix had nothing to zero
    assert two_forwards_differ(model) > 1e-2  # the bug: train-mode attention dropout from the config float
    disable_dropout(model)
    assert model.training and two_forwards_differ(model) == 0.0
    assert model.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)


def test_disable_dropout_through_peft_and_on_lora_dropout_modules():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_with_dropout("llama"), LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear"))
    model.train()
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    assert two_forwards_differ(model) > 1e-2
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, DROPOUT_MODULES))
    assert model.get_base_model().config.attention_dropout == 0.0
    assert two_forwards_differ(model) == 0.0


def test_disable_dropout_reaches_nested_sub_configs():
    from transformers import LlamaConfig, LlavaConfig

    holder = nn.Module()
    holder.config = LlavaConfig(text_config=LlamaConfig(attention_dropout=0.5).to_dict(),
                                vision_config={"model_type": "clip_vision_model", "attention_dropout": 0.25})
    assert {type(c).__name__ for c in model_configs(holder)} == {"LlavaConfig", "LlamaConfig", "CLIPVisionConfig"}
    disable_dropout(holder)
    assert holder.config.text_config.attention_dropout == 0.0
    assert holder.config.vision_config.attention_dropout == 0.0
