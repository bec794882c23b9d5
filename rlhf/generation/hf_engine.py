"""`HFEngine`: transformers' `generate` on a model in this process (PPO's default rollout engine, and the
engine of `rlhf generate`, `rlhf eval policy` and the benchmarks)."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Optional

import torch

from rlhf.generation.engine import GenerationResult, finish
from rlhf.generation.prompts import left_pad
from rlhf.generation.sampling import Sampling


def default_device() -> torch.device:
    """Where a command that loads its own models runs them: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HFEngine:
    """Samples with `model.generate`. `open_model()` gives the model to call it on, for the call's
    duration (PPO's: the policy with its adapter active and, under ZeRO-3, its weights gathered);
    `HFEngine.for_model` wraps a plain causal LM. `record_logprobs`: also return the sampled tokens'
    logprobs and each step's entropy, recorded as they are sampled (no second forward pass). `batch_size`: prompts per `generate`
    call (None: all at once)."""

    def __init__(self, open_model: Callable[[], AbstractContextManager], pad_id: int, device: torch.device, *,
                 record_logprobs: bool = False, batch_size: Optional[int] = None):
        self.open_model, self.pad_id, self.device = open_model, pad_id, device
        self.record_logprobs, self.batch_size = record_logprobs, batch_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, pad_id: int, batch_size: Optional[int] = None) -> HFEngine:
        return cls(lambda: nullcontext(model), pad_id, next(model.parameters()).device, batch_size=batch_size)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling, seed: Optional[int] = None) -> GenerationResult:
        """`seed`: sampled in a fork of torch's generator seeded with it (the caller's stream is left as it
        was); None: from torch's generator as it stands (a checkpoint saves it, a resume restores it)."""
        if seed is None:
            return self._generate(prompts, sampling)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self._generate(prompts, sampling)

    def _generate(self, prompts: list[list[int]], sampling: Sampling) -> GenerationResult:
        size = self.batch_size or len(prompts)
        parts = []
        for i in range(0, len(prompts), size):  # each batch padded to its own widest prompt, as sampled alone
            ids, mask = left_pad(prompts[i:i + size], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)  # (b, p)
            with self.open_model() as model:
                responses, logprobs, entropy = sample(model, ids, mask, generation_config(sampling, self.pad_id),
                                                      self.record_logprobs)
            parts.append(finish(ids, mask, responses, logprobs, sampling.stop_id, self.pad_id, entropy))
        return parts[0] if len(parts) == 1 else concatenate(parts, self.pad_id)

    def update_weights(self, version: int) -> None:
        """Nothing to do: it samples the trained model itself."""

    def close(self) -> None:
        pass


def concatenate(parts: list[GenerationResult], pad_id: int) -> GenerationResult:
    """One result from several batches' (prompts left-padded, responses right-padded to the widest)."""
    P = max(r.prompt_ids.shape[1] for r in parts)
    A = max(r.response_ids.shape[1] for r in parts)

    def widen(t: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
        return torch.nn.functional.pad(t, pad, value=value)

    cat = lambda name, width, value, left: torch.cat([widen(getattr(r, name), width, value, left)  # noqa: E731
                                                      for r in parts])
    return GenerationResult(cat("prompt_ids", P, pad_id, True), cat("prompt_mask", P, 0, True),
                            cat("response_ids", A, pad_id, False), cat("response_mask", A, False, False),
                            torch.cat([r.stopped for r in parts]),
                            None if parts[0].logprobs is None else cat("logprobs", A, 0.0, False),
                            None if parts[0].entropy is None else cat("entropy", A, 0.0, False))


def generation_config(sampling: Sampling, pad_id: int):
    """A GenerationConfig built only from `sampling` (temperature 0: greedy). Nothing of the model's own
    `generation_config.json` may reach sampling: a `repetition_penalty` or `top_k` an instruct model ships
    would change the distribution sampled from, but not the one the trainer scores, and the KL and the
    ratio would be off-policy (measured: a 1.3 penalty moved logprobs by 2e-3)."""
    from transformers import GenerationConfig

    mode = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0) \
        if sampling.temperature > 0 else dict(do_sample=False)
    return GenerationConfig(**mode, max_new_tokens=sampling.max_new_tokens, eos_token_id=sampling.stop_id,
                            pad_token_id=pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True)


@contextmanager
def own_generation_config(model, gen_config):
    """`model.generate` fills every option left unset from the model's own generation config
    (transformers 5), so that config is swapped for ours for the call, not merely overridden."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's transformer
    saved = inner.generation_config
    inner.generation_config = gen_config
    try:
        yield
    finally:
        inner.generation_config = saved


class TokenLogprobRecorder:
    """A logits processor that keeps log softmax(logits / T) of each token `generate` samples: the
    policy logprobs of a rollout without a second forward pass. transformers runs it before its own
    temperature warper, on the float32 copy of the model's logits, so it divides after the upcast as
    the trainer does. Memory: one (B, V) row per decoding step, not the (B, A, V) of `output_scores`.
    Each step's entropy (B,) comes with it (the `policy/entropy` metric, at the sampling temperature)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # (B, V) log-probs of the step whose token is not yet known
        self.logprobs: list[torch.Tensor] = []  # A x (B,)
        self.entropy: list[torch.Tensor] = []  # A x (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # the token sampled at the previous step is now the last input
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, -1)
        self.entropy.append(-(self.pending.exp() * self.pending).sum(-1))
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.logprobs.append(self.pending.gather(-1, tokens[:, None])[:, 0])
        self.pending = None

    def finish(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs (B, A) of `responses` (B, A), the tokens generate returned; entropy (B, A))."""
        if self.pending is not None:
            self._take(responses[:, len(self.logprobs)])
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy[:len(self.logprobs)], 1)


@torch.no_grad()
def sample(model, query_ids: torch.Tensor, query_mask: torch.Tensor, gen_config, with_logprobs: bool = False):
    """(responses (B, A <= max_new_tokens), their logprobs (B, A) at the sampling temperature, untruncated
    by top_p as the trainer computes them, and each step's entropy (B, A); both None without
    `with_logprobs`), sampled with `gen_config` only."""
    from transformers import LogitsProcessorList

    recorder = TokenLogprobRecorder(gen_config.temperature if gen_config.do_sample else 1.0)
    with own_generation_config(model, gen_config):
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config,
                             logits_processor=LogitsProcessorList([recorder] if with_logprobs else []))
    responses = out[:, query_ids.shape[1]:]
    if not with_logprobs:
        return responses, None, None
    return (responses, *recorder.finish(responses))
