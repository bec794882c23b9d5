"""The published model shapes that commands know by name, declared once: `rlhf estimate-memory --model
llama3-8b` and `rlhf bench speed --model llama3-8b` mean the same shape. And a model config read from
the hub that fails at once, with one line, when the hub cannot be reached (huggingface_hub would
otherwise retry for about 25 s).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from rlhf.errors import UserError


@dataclass(frozen=True)
class Shape:
    """A published model's shape (from its config.json). Rope settings and context length are left at
    transformers' defaults: neither memory nor speed at a given sequence length depends on them."""

    key: str  # the name commands accept, e.g. `qwen2.5-0.5b`
    size: float  # nominal parameter count the row answers for in `estimate-memory --model 7B`
    name: str  # the model whose shape this is
    model_type: str  # `llama` or `qwen2` (Qwen2 adds q/k/v biases)
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool

    def config(self):
        """The transformers config of this shape (an object only: nothing is downloaded)."""
        from transformers import LlamaConfig, Qwen2Config

        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[self.model_type]
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("key", "size", "name", "model_type"):
            fields.pop(key)
        return cls(**fields)


SHAPES = (
    Shape("smollm2-135m", 135e6, "SmolLM2-135M", "llama", 576, 30, 1536, 9, 3, 49152, True),
    Shape("qwen2.5-0.5b", 0.5e9, "Qwen2.5-0.5B", "qwen2", 896, 24, 4864, 14, 2, 151936, True),
    Shape("llama3.2-1b", 1e9, "Llama-3.2-1B", "llama", 2048, 16, 8192, 32, 8, 128256, True),
    Shape("qwen2.5-1.5b", 1.5e9, "Qwen2.5-1.5B", "qwen2", 1536, 28, 8960, 12, 2, 151936, True),
    Shape("llama3.2-3b", 3e9, "Llama-3.2-3B", "llama", 3072, 28, 8192, 24, 8, 128256, True),
    Shape("llama2-7b", 7e9, "Llama-2-7b", "llama", 4096, 32, 11008, 32, 32, 32000, False),
    Shape("llama3-8b", 8e9, "Llama-3.1-8B", "llama", 4096, 32, 14336, 32, 8, 128256, False),  # = Llama-3-8B's
    Shape("llama2-13b", 13e9, "Llama-2-13b", "llama", 5120, 40, 13824, 40, 40, 32000, False),
    Shape("qwen2.5-14b", 14e9, "Qwen2.5-14B", "qwen2", 5120, 48, 13824, 40, 8, 152064, False),
    Shape("qwen2.5-32b", 32e9, "Qwen2.5-32B", "qwen2", 5120, 64, 27648, 40, 8, 152064, False),
    Shape("llama3.1-70b", 70e9, "Llama-3.1-70B", "llama", 8192, 80, 28672, 64, 8, 128256, False),
    Shape("llama3.1-405b", 405e9, "Llama-3.1-405B", "llama", 16384, 126, 53248, 128, 8, 128256, False),
)
NAMES = tuple(s.key for s in SHAPES)


def named(name: str) -> Optional[Shape]:
    """The shape called `name` (its key, or the published model's name without the organisation, in any
    case: `llama3-8b`, `Llama-3.1-8B`), else None."""
    lowered = name.strip().lower()
    return next((s for s in SHAPES if lowered in (s.key, s.name.lower())), None)


def hub_config(name: str, option: str, hint: str = ""):
    """The config.json of hub model `name`: from the local cache, else from the hub when it can be
    reached. Refused in one line, at once, when it is not cached and the hub is off (HF_HUB_OFFLINE) or
    unreachable. `hint` ends every refusal (what else the option takes)."""
    from huggingface_hub import is_offline_mode
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError):
        pass  # not in the cache
    known = f"a named shape ({', '.join(NAMES)})"
    if is_offline_mode():
        raise UserError(f"{option} '{name}' is not {known}, a local directory with config.json, or a hub "
                        f"model in the local cache, and HF_HUB_OFFLINE is set{hint}")
    endpoint = hub_endpoint()
    reason = unreachable(endpoint)
    if reason is not None:
        raise UserError(f"{option} '{name}' is not {known} or a local directory with config.json, is not in "
                        f"the local hub cache, and the hub ({endpoint}) cannot be reached: {reason}{hint}")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{option} '{name}': could not load its config from the Hugging Face hub "
                        f"({str(e).splitlines()[0]}){hint}") from None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def unreachable(endpoint: str, timeout: float = 3.0) -> Optional[str]:
    """Why `endpoint` cannot be reached (its name does not resolve, nothing answers within `timeout`
    seconds), or None when a connection opens. Through a proxy the proxy decides: None."""
    if any(os.environ.get(k) for k in PROXY_VARIABLES):
        return None
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as e:  # socket.gaierror (no such name), timeout, refused
        return str(e) or type(e).__name__
