"""TRL's RLOOTrainer as a peer baseline for the benchmarks (`rlhf bench align`, `rlhf bench speed`).

RLOO (REINFORCE Leave-One-Out; Kool et al. 2019, Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740)
samples k responses per prompt and uses, as each response's baseline, the mean reward of the other
k - 1: no value model, no GAE. TRL subtracts `beta` x the sequence KL to the reference from the
reward and takes one REINFORCE step with these advantages per generation batch. It is not our
training path (that is `rlhf/ppo/trainer.py`); it runs here only so our PPO is compared with a maintained
peer given the same models, reward function, prompts and budget.

Budget: our PPO generates `steps * rollout_batch` responses. The caller makes RLOO generate as many,
`steps * prompts_per_step * num_generations`, e.g. rollout 32 -> 16 prompts x 2 samples, same steps.

One RLOO step here is one generation batch (`prompts_per_step * num_generations` responses) and one
optimizer step. In TRL 1.16 the generation batch is `per_device_train_batch_size * processes *
steps_per_generation` and `steps_per_generation` defaults to `gradient_accumulation_steps`, so we set
per_device_train_batch_size = batch / gradient_accumulation_steps (micro-batches of one buffered
generation) and num_iterations = 1 (no reuse of a batch: the update is on-policy, as in the paper).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from policies import models
from policies.config import ModelConfig, PeftConfig
from rlhf.ppo.metrics import peak_memory_gb


@dataclass
class RLOOSettings:
    """What the benchmarks set; everything else keeps TRL's defaults or our PPO's (see `rloo_args`)."""

    steps: int
    """Iterations: one generation batch and one optimizer step each."""
    prompts_per_step: int
    """Distinct prompts per iteration."""
    num_generations: int = 2
    """k samples per prompt (the leave-one-out baseline needs k >= 2)."""
    learning_rate: float = 1e-5
    """Peak learning rate (linear decay to 0 over `steps`, as our PPO's default)."""
    beta: float = 0.05
    """KL coefficient to the reference (the initial policy)."""
    max_new_tokens: int = 32
    """Longest response."""
    min_new_tokens: int = 0
    """Shortest response (EOS suppressed before); the speed bench sets it to max_new_tokens so every
    response has the same length."""
    temperature: float = 1.0
    """Sampling temperature (logprobs are taken at the same temperature)."""
    peft: str = "lora"
    """`lora` (all linear layers, dropout 0; the reference is the base with the adapter off) or `full`."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (memory knob; the generation batch and update stay the same)."""
    seed: int = 0
    """Seed of the adapter init, the data order and sampling."""
    eval_every: int = 0
    """Call `on_eval` every N steps (and at the end); 0: only at the end."""


def check(s: RLOOSettings, num_prompts: int) -> None:
    """Refuse settings that cannot give one generation batch per optimizer step, before any loading."""
    if s.steps < 1 or s.prompts_per_step < 1 or s.gradient_accumulation_steps < 1:
        raise ValueError(f"steps, prompts_per_step and gradient_accumulation_steps must be positive, got {s}")
    if s.num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 for the leave-one-out baseline, got {s.num_generations}")
    if s.peft not in ("lora", "full"):
        raise ValueError(f"peft must be 'lora' or 'full', got {s.peft!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("run_rloo is a single-process benchmark peer; launch it without accelerate/torchrun")
    batch = s.prompts_per_step * s.num_generations
    if batch % s.gradient_accumulation_steps:
        raise ValueError(f"prompts_per_step * num_generations ({s.prompts_per_step} x {s.num_generations} = {batch}) "
                         f"must be divisible by gradient_accumulation_steps ({s.gradient_accumulation_steps})")
    if num_prompts < s.prompts_per_step:
        raise ValueError(f"{num_prompts} prompts, fewer than prompts_per_step ({s.prompts_per_step})")


def rloo_args(s: RLOOSettings, output_dir: str, bf16: bool):
    """Our settings -> trl.RLOOConfig, with one generation batch per optimizer step (see module docstring)."""
    import trl

    return trl.RLOOConfig(
        output_dir=output_dir, seed=s.seed, max_steps=s.steps,
        per_device_train_batch_size=s.prompts_per_step * s.num_generations // s.gradient_accumulation_steps,
        gradient_accumulation_steps=s.gradient_accumulation_steps, num_iterations=1,
        num_generations=s.num_generations, max_completion_length=s.max_new_tokens, temperature=s.temperature,
        generation_kwargs={"min_new_tokens": s.min_new_tokens} if s.min_new_tokens else None,
        learning_rate=s.learning_rate, beta=s.beta,
        adam_epsilon=1e-5,  # as our PPO's AdamW
        # TRL turns (gradient) checkpointing on by default; our PPO does not, so throughput compares.
        activation_checkpointing=False,  # transformers 5's name; `gradient_checkpointing` mirrors it
        disable_dropout=True, bf16=bf16,
        logging_steps=1, save_strategy="no", report_to="none",
    )


@dataclass
class _Meter:
    """What the benchmarks read besides TRL's logs: time split and volume."""

    total: float = 0.0  # optimizer steps only: no setup, logging or on_eval
    generate: float = 0.0
    score: float = 0.0
    tokens: int = 0
    responses: int = 0
    evals: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # per optimizer step: {generate, score, train, total}


def _reward_func(reward_fn, meter: _Meter):
    """Our `reward_fn(prompts, responses)` in TRL's calling convention: with conversational prompts
    TRL passes each completion as `[{"role": "assistant", "content": text}]` (special tokens skipped)."""

    def reward(prompts, completions, **_):
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = torch.as_tensor(reward_fn(prompts, texts), dtype=torch.float32).flatten().tolist()
        meter.score += time.perf_counter() - t0
        return scores

    return reward  # TRL names its metric after the function: rewards/reward/mean


def _timed_generation(trainer, meter: _Meter) -> None:
    """Time the trainer's one sampling call per generation batch, and count what it processed.
    `_generate_single_turn` takes the tokenized prompts and returns the completions cut after EOS;
    wrapping it on the instance leaves TRL's code as it is (tokenizing and logging stay outside)."""
    inner = trainer._generate_single_turn

    def generate(prompt_ids, *args, **kwargs):
        t0 = time.perf_counter()
        completion_ids = inner(prompt_ids, *args, **kwargs)
        meter.generate += time.perf_counter() - t0
        meter.tokens += sum(map(len, prompt_ids)) + sum(map(len, completion_ids))
        meter.responses += len(completion_ids)
        return completion_ids

    trainer._generate_single_turn = generate


def _step_callback(meter: _Meter, on_eval, tokenizer, every: int):
    """A TrainerCallback that times each optimizer step (from its start to after the optimizer update,
    as our PPO's time/step) and then hands the in-memory policy to `on_eval` after the chosen steps."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.generate0, self.score0 = time.perf_counter(), meter.generate, meter.score

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the optimizer step is asynchronous on a GPU
            dt = time.perf_counter() - self.t0
            meter.total += dt
            gen, score = meter.generate - self.generate0, meter.score - self.score0
            meter.steps.append({"generate": gen, "score": score, "train": dt - gen - score, "total": dt})
            step = state.global_step
            if on_eval is None or not (step == state.max_steps or (every and step % every == 0)):
                return
            model.eval()
            with torch.no_grad():
                meter.evals.append({"step": step, **(on_eval(step, model, tokenizer) or {})})
            model.train()

    return StepCallback()


def _base_model_path(policy_path: str, output_dir: Path) -> str:
    """A peft adapter directory (an SFT output) is merged into its base once, like our PPO does."""
    if not (Path(policy_path) / "adapter_config.json").exists():
        return policy_path
    from rlhf.stages.merge import merge

    merged = output_dir / "merged_policy"
    if not (merged / "config.json").exists():
        merge(policy_path, str(merged))
    return str(merged.resolve())


def run_rloo(policy_path: str, reward_fn, prompts: list[list[dict]], output_dir: str, s: RLOOSettings,
             on_eval=None) -> dict:
    """Train `policy_path` with TRL's RLOOTrainer on `prompts` (message lists) scored by
    `reward_fn(prompts, responses) -> list[float] | Tensor`. `on_eval(step, model, tokenizer) -> dict`
    runs every `s.eval_every` steps and at the end, its time left out of the time split (which covers
    the optimizer steps only, not loading, set-up or logging).
    Returns history (TRL's per-step logs, also in output_dir/metrics.jsonl), evals, time {generate,
    score, train, total} in seconds (and per step in step_times), tokens (prompt + response, unpadded: TRL's `num_tokens`), responses,
    peak_memory_gb (CUDA peak of this run; on CPU the process's peak RSS) and final_model (in memory)."""
    import datasets
    import trl

    check(s, len(prompts))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = _base_model_path(policy_path, out)
    model_cfg = ModelConfig(name_or_path=path)
    tokenizer = models.load_tokenizer(path, model_cfg)  # refuses PAD == EOS
    model = models.load_causal_lm(path, model_cfg)  # the dtype our PPO uses: bf16 on a GPU that has it
    args = rloo_args(s, str(out), bf16=model.dtype == torch.bfloat16)
    lora = PeftConfig(method="lora", r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0)
    meter = _Meter()
    trainer = trl.RLOOTrainer(
        model=model, reward_funcs=_reward_func(reward_fn, meter), args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),  # conversational: TRL applies the template
        processing_class=tokenizer, peft_config=models.peft_config(lora) if s.peft == "lora" else None,
        callbacks=[_step_callback(meter, on_eval, tokenizer, s.eval_every)],
    )
    _timed_generation(trainer, meter)
    trainer.train()
    history = [dict(h) for h in trainer.state.log_history if "reward" in h]  # drops the end-of-run summary
    with open(out / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)
    return {
        "history": history,
        "evals": meter.evals,
        "time": {"generate": meter.generate, "score": meter.score,
                 # train: the no-grad policy/reference logprob forwards, backward and optimizer steps
                 "train": meter.total - meter.generate - meter.score, "total": meter.total},
        "step_times": meter.steps,
        "tokens": meter.tokens,
        "responses": meter.responses,
        "peak_memory_gb": peak_memory_gb(),
        "final_model": trainer.model,
    }
