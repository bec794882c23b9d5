"""Sampling options, declared once: `SamplingOptions` are the fields a command exposes (`rlhf generate`,
`rlhf eval policy`), `Sampling` is what every engine is handed (PPO builds it from its `ppo.*` fields, the
held-out evaluation from PPO's with its own temperature, the benchmarks from theirs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlhf.config import NonNegative, PositiveInt, Probability
from rlhf.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """What every engine means by the sampling options: temperature (0: greedy) and top_p, no top_k, no
    penalties (nothing of a model's own generation config); a response ends after `stop_id` (the stop
    token is part of it) or at `max_new_tokens` (`stop_id` None: always there)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    stop_id: Optional[int]


@dataclass
class SamplingOptions:
    """The sampling fields of a command that samples a model (its config class inherits them)."""

    max_new_tokens: PositiveInt[int] = 64
    """Longest response (a response that reaches it without the stop token counts as truncated)."""
    temperature: NonNegative[float] = 0.7
    """Sampling temperature (0: greedy)."""
    top_p: Probability[float] = 1.0
    """Nucleus sampling."""
    stop_token: Optional[str] = "eos"
    """The response ends at this token (`eos`: the tokenizer's EOS); None: run to max_new_tokens."""
    max_prompt_length: PositiveInt[int] = 256
    """Prompts are cut to their last N tokens."""

    def sampling(self, tokenizer, option: str = "--stop_token") -> Sampling:
        return Sampling(self.temperature, self.top_p, self.max_new_tokens,
                        stop_token_id(tokenizer, self.stop_token, option))


def stop_token_id(tokenizer, stop_token: Optional[str], option: str) -> Optional[int]:
    """The id of `stop_token` (`eos`: the tokenizer's EOS; None: no stop token). A token the vocabulary does
    not have would map to no token (responses would never stop, and the EOS rate would read 1.0), and one
    equal to PAD could not be told from padding: both are refused, naming `option`."""
    if stop_token is None:
        return None
    check_stop_token(stop_token, tokenizer.get_vocab(), option)
    stop_id = tokenizer.eos_token_id if stop_token == "eos" else tokenizer.convert_tokens_to_ids(stop_token)
    if stop_id is not None and stop_id == tokenizer.pad_token_id:
        raise UserError(f"{option} must differ from the PAD token")
    return stop_id


def check_stop_token(stop_token: Optional[str], vocab: dict[str, int], option: str = "ppo.stop_token") -> None:
    """`stop_token` is `eos`, None, or a token of `vocab`."""
    if stop_token not in (None, "eos") and stop_token not in vocab:
        raise UserError(f"{option} '{stop_token}' is not a token of the tokenizer's vocabulary; use `eos`, null "
                        "(None on the command line: run to max_new_tokens), or one token as the tokenizer spells it")
