"""The built-in tiny model: a random-init Llama and a byte-level BPE tokenizer shipped with the
package, so every stage runs with no download.

The tokenizer lives in `policies/assets/tiny_tokenizer/` (rebuilt by `python -m rlhf.data.assets_build`).
Its chat template marks assistant replies with `{% generation %}` so TRL's assistant-only loss
works, and PAD, EOS and BOS are three distinct tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from policies.config import TinyModelConfig

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# ChatML-like; the assistant reply and its EOS sit inside the generation block, so they carry the
# loss and the model learns to stop. The newline after EOS is outside: it is never trained on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}{% generation %}{{- message['content'] + '<|end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `texts` (any text still encodes: bytes are the base)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                 additional_special_tokens=list(ROLE_TOKENS))
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 1024
    return hf


def load_tokenizer():
    """The shipped tiny tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR, trust_remote_code=False)


def build_model(cfg: TinyModelConfig, tokenizer, seed: int = 0):
    """A random-init Llama of the given shape, its special token ids taken from `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    # Seed only this initialisation, so building the model does not shift the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny(cfg: TinyModelConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model and tokenizer to `out_dir` as an ordinary transformers directory."""
    out_dir = Path(out_dir)
    tokenizer = load_tokenizer()
    model = build_model(cfg, tokenizer, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
