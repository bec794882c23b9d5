"""The one interface every sampler goes through, and the one result type it returns.

    engine.generate(encoded prompts, sampling, seed) -> GenerationResult
    engine.update_weights(version)    # serve the policy's current weights (a no-op where it samples the model itself)
    engine.close()

Engines: `HFEngine` (transformers' generate in this process, rlhf/generation/hf_engine.py) and
`VLLMBackend` (a vLLM engine in its own process, rlhf/generation/vllm_backend.py). Whatever an engine
returns is finished by `finish`: cut after the stop token, padded, trimmed to the longest response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch

from rlhf.generation.sampling import Sampling
from rlhf.ppo import core  # torch-only math: the stop-token truncation


@dataclass(frozen=True)
class GenerationResult:
    """Finished responses to a batch of prompts (B prompts, P prompt tokens, A response tokens)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) long, 1 on real tokens
    response_ids: torch.Tensor  # (B, A) padded after the stop token, A the longest response
    response_mask: torch.Tensor  # (B, A) bool, the stop token included
    stopped: torch.Tensor  # (B,) bool: the response ended with the stop token (all True without one)
    logprobs: Optional[torch.Tensor] = None  # (B, A) of the sampled tokens at the temperature, 0 off the mask
    entropy: Optional[torch.Tensor] = None  # (B, A) of each step's sampling distribution (HF, recording), 0 off the mask

    def chunks(self, size: int) -> Iterator[GenerationResult]:
        """Consecutive slices of `size` rows, each trimmed to its own widest prompt and longest response:
        the tensors a per-batch sampler would have produced."""
        for i in range(0, len(self.prompt_ids), size):
            s = slice(i, i + size)
            p0 = int((self.prompt_mask[s].sum(0) == 0).long().cumprod(0).sum())  # all-pad columns on the left
            a = max(int(self.response_mask[s].sum(-1).max()), 1)
            yield GenerationResult(self.prompt_ids[s, p0:], self.prompt_mask[s, p0:], self.response_ids[s, :a],
                                   self.response_mask[s, :a], self.stopped[s],
                                   None if self.logprobs is None else self.logprobs[s, :a],
                                   None if self.entropy is None else self.entropy[s, :a])


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: Optional[int] = None) -> GenerationResult:
        """Responses to `prompts` (token ids). `seed`: the draw is a function of it (the same seed, the same
        responses); None: the engine's own stream, which a resumed run reproduces."""

    def update_weights(self, version: int) -> None:
        """Serve the policy's current weights from now on (`version`: the number of updates so far)."""

    def close(self) -> None: ...


def finish(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
           logprobs: Optional[torch.Tensor], stop_id: Optional[int], pad_id: int,
           entropy: Optional[torch.Tensor] = None) -> GenerationResult:
    """Raw sampled tokens (B, A') -> a GenerationResult: everything after the first stop token is padding,
    and the responses are cut to the longest real one (every later forward pass runs at P + that length,
    not P + max_new_tokens)."""
    if stop_id is not None:
        responses, mask = core.truncate_after_stop_token(responses, stop_id, pad_id)
        stopped = (responses == stop_id).any(-1)
    else:
        mask = responses != pad_id
        stopped = torch.ones(len(responses), dtype=torch.bool, device=responses.device)
    longest = max(int(mask.sum(-1).max()), 1)
    responses, mask = responses[:, :longest], mask[:, :longest]
    if logprobs is not None:
        logprobs = logprobs[:, :longest].masked_fill(~mask, 0.0)
    if entropy is not None:
        entropy = entropy[:, :longest].masked_fill(~mask, 0.0)
    return GenerationResult(prompt_ids, prompt_mask, responses, mask, stopped, logprobs, entropy)


def decode(tokenizer, gen: GenerationResult) -> list[str]:
    """The responses' texts (B), without what follows the stop token and without special tokens: what a
    reward reads."""
    ids = gen.response_ids.masked_fill(~gen.response_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
