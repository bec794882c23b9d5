"""Stage 3: PPO for language models (`rlhf ppo`). The LLM is the agent, each generated token an
action, the episode ends at the stop token; the reward model scores the whole response, a per-token
KL penalty keeps the policy near the reference, a value head estimates returns (GAE).

    rlhf ppo --config configs/ppo_tiny.yaml
    accelerate launch --config_file ... -m rlhf ppo --config ...

Why our own loop: TRL deleted its PPOTrainer (huggingface/trl#7020), OpenRLHF needs Ray + vLLM and
cannot sync LoRA, DeepSpeed-Chat has no resume. `train` below reads as the algorithm, like cleanrl's
`ppo.py`; the package holds its parts:

  config.py      the `rlhf ppo` config and every batch size, derived once
  models.py      tokenizer, ActorCritic (policy, critic, reference), reward, the rollout engine
  rollout.py     sample -> forward passes -> score -> KL-penalised rewards -> advantages: a frozen Rollout
  update.py      the optimizer and `ppo_update` (ppo_epochs x mini-batches of the clipped objective)
  metrics.py     the metric row, its warnings, metrics.jsonl and W&B
  checkpoint.py  atomic checkpoints, bit-identical resume, the exported policy and critic
  core.py        the math (torch only, tested against loop references)

Sampling goes through rlhf/generation (one interface for the HF and vLLM engines); the held-out
evaluation is rlhf/evaluation/heldout.py. Shapes: B rollout batch, P prompt, A response tokens.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rlhf import config
from rlhf.envs.episodes import EnvPool, load_rows
from rlhf.errors import UserError
from rlhf.evaluation.heldout import HeldOutEval
from rlhf.generation.engine import Engine
from rlhf.generation.prompts import load_prompts, position_ids
from rlhf.generation.sampling import Sampling, stop_token_id
from rlhf.ppo import checkpoint, core, models, rollout
from rlhf.ppo.checkpoint import STATE_FILE
from rlhf.ppo.config import BatchSizes, PPOConfig, batch_sizes, check, logprobs_from_generation
from rlhf.ppo.metrics import Stopwatch, log_row, report, step_metrics
from rlhf.ppo.rollout import make_rollout
from rlhf.ppo.update import build_optimizer, ppo_update
from rlhf.runtime import checkpoints, tracking
from rlhf.runtime.outputs import user_run


def main(cfg: PPOConfig, reward=None, on_step=None, save: bool = True) -> list[dict]:
    """Run PPO; returns the per-iteration metrics (also in output_dir/metrics.jsonl and W&B).
    `reward` overrides cfg.reward (any object with `score(prompts, responses, normalize)`).
    `on_step(step, actor_critic, tokenizer)`, if given, runs on every process after each iteration
    (the benchmarks evaluate the policy along the run with it); a dict it returns joins the metrics.
    `save=False` writes no checkpoint and no final models (the speed benchmark). A run refused for its
    input leaves no output directory it created, and a rollout engine it started stops with it."""
    with user_run(cfg.output_dir, marker=STATE_FILE), ExitStack() as cleanup:
        return train(setup(cfg, reward, cleanup), on_step, save)


def train(s: State, on_step=None, save: bool = True) -> list[dict]:
    """The PPO loop, from `s.start_step` to `ppo.steps`."""
    from rlhf.runtime.progress import Progress

    cfg, p, acc = s.cfg, s.cfg.ppo, s.accelerator
    if s.evaluator is not None and s.start_step == 0:  # 0. the starting policy: the "before" of every report
        s.history.append(evaluate(s, 0, {"step": 0}))
        log_row(acc, s.run, Path(cfg.output_dir), s.history[-1])
    eos_history: list[float] = []
    bar = Progress(range(s.start_step, p.steps), initial=s.start_step, total=p.steps, desc="ppo",
               disable=not acc.is_main_process)
    for step in bar:
        clock = Stopwatch()
        # 1. this step's prompts, or data rows with an env (a function of the step: a resumed run continues)
        prompts = step_prompts(s, step)
        # 2. rollout: sample (responses or episodes), forward passes, score, KL-penalised rewards, advantages
        r = make_rollout(s, prompts, step, clock)
        # 3. update: ppo_epochs x mini-batches of the clipped policy (+ value) loss
        stats = ppo_update(acc, s.model, s.optimizer, s.scheduler, r, p, s.sizes,
                           torch.Generator().manual_seed(cfg.seed * 1000003 + step), s.kl_ctl.value,
                           max_logprob_diff=cfg.vllm.max_logprob_diff if r.logprobs_recorded else None,
                           step=step)
        clock.lap("time/train")
        # 4. the engine samples the updated policy from the next rollout on
        s.engine.update_weights(step + 1)
        clock.lap("time/sync")
        # 5. metrics (means over every process); the adaptive KL coefficient follows the measured KL
        metrics = step_metrics(step + 1, r, stats, s, clock)
        s.kl_ctl.update(metrics["objective/kl"], s.sizes.global_rollout)
        # 6. the held-out evaluation, and the caller's hook
        if s.evaluator is not None and s.evaluator.due(step + 1, p.steps):
            evaluate(s, step + 1, metrics)
        if on_step is not None:
            metrics.update(on_step(step + 1, acc.unwrap_model(s.model), s.tokenizer) or {})
            acc.unwrap_model(s.model).eval()
        s.history.append(metrics)
        report(s, r, metrics, eos_history)
        bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        # 7. checkpoint
        if save and ((step + 1) % cfg.save_steps == 0 or step + 1 == p.steps):
            checkpoint.save(acc, Path(cfg.output_dir), step + 1, s.history, s.scheduler, s.kl_ctl, s.moments,
                            cfg.save_total_limit, s.env_pool)
    return finish(s, save)


@dataclass
class State:
    """What set-up builds and every iteration uses."""

    cfg: PPOConfig
    accelerator: Any
    sizes: BatchSizes
    prompts: list  # every training prompt (message lists), or with an env every data row (dicts)
    tokenizer: Any
    model: Any  # the ActorCritic as accelerate prepared it
    base_path: str  # the policy's base model directory
    model_bytes: int
    optimizer: Any
    scheduler: Any
    reward: Any  # None with an env (the environment gives the rewards)
    reward_name: str  # as the user named it (its spec, or the class of a reward passed in)
    normalization: str  # what ppo.reward_normalization resolved to
    sampling: Sampling
    engine: Engine
    evaluator: Optional[HeldOutEval]
    kl_ctl: Any
    moments: core.RunningMoments
    run: Any  # the W&B run, or None
    start_step: int
    history: list  # the metric rows so far (a resumed run's included)
    sample: Callable  # step 1 of the rollout: rollout.sample_responses, or sample_episodes with an env
    env_pool: Optional[EnvPool]  # the environments and their seed stream (None: single-turn)


def setup(cfg: PPOConfig, reward=None, cleanup: ExitStack = None) -> State:
    """Check the config, build (or resume) everything the loop needs, and start the rollout engine.
    Everything the user gave is read before anything is written."""
    from policies.models import torch_dtype
    from rlhf.runtime.distributed import make_accelerator

    check(cfg)
    p, out = cfg.ppo, Path(cfg.output_dir)
    # bf16 compute runs under autocast over float32 master weights (full) or adapters (LoRA)
    accelerator = make_accelerator(p.gradient_accumulation_steps, cpu_threads=cfg.cpu_threads,
                                   mixed_precision="bf16" if torch_dtype(cfg.model) == torch.bfloat16 else "no")
    sizes = batch_sizes(p, accelerator.num_processes)
    from_generation = logprobs_from_generation(p, torch_dtype(cfg.model))
    if p.logprobs_from_generation == "auto" and accelerator.is_main_process:
        print(f"ppo.logprobs_from_generation=auto: {str(from_generation).lower()} (" +
              ("recorded as the HF engine samples; checked at every update" if from_generation else
               "recomputed by a forward pass: " + ("the vLLM engine's are compared" if p.rollout_engine == "vllm"
                                                   else "not float32")) + ")")
    cfg = replace(cfg, ppo=replace(p, logprobs_from_generation=from_generation))  # a bool from here on
    p = cfg.ppo
    resume_from = checkpoints.resolve_resume(cfg.resume, out, STATE_FILE)
    # with an env, the environment is the reward and the data rows start its episodes
    env_pool = EnvPool(cfg.env, cfg.seed, accelerator.process_index) if cfg.env.spec else None
    prompts = load_prompts(cfg.data) if env_pool is None else \
        load_rows(cfg.data.train, cfg.data.split, cfg.data.column_map, cfg.data.max_samples)
    if len(prompts) < sizes.global_prompts:
        raise UserError(f"{cfg.data.train}: {len(prompts)} prompts, fewer than one rollout batch needs "
                        f"({sizes.global_prompts} = {p.per_device_rollout_batch_size} / ppo.samples_per_prompt "
                        f"{p.samples_per_prompt} x {sizes.world} processes)")
    if p.rollout_engine == "vllm":  # an engine environment that is missing: said before anything is written
        from rlhf.generation.vllm_engine import find_python

        find_python(cfg.vllm.python)
    reward_given = reward is not None or env_pool is not None
    reward_name = type(reward).__name__ if reward is not None else cfg.env.spec or cfg.reward.spec
    reward = reward if reward_given else models.load_reward_model(cfg, accelerator)
    tokenizer, ac, base_path = models.build_models(cfg, accelerator.is_main_process, accelerator, reward_given)
    sampling = rollout.sampling(p, stop_token_id(tokenizer, p.stop_token, "ppo.stop_token"))
    evaluator = None  # its prompts and judge load before anything is written: a bad one leaves nothing
    if cfg.eval.prompts is not None:
        evaluator = HeldOutEval(cfg.eval, reward, sampling, p.max_prompt_length, tokenizer, accelerator, out,
                                env=cfg.env if env_pool is not None else None)
    # an environment's rewards are used as given (the task's own scale)
    normalization = "none" if env_pool is not None else \
        rollout.reward_normalization(p.reward_normalization, reward, accelerator.is_main_process)
    trainable = sum(getattr(q, "ds_numel", q.numel()) for g in ac.parameter_groups().values() for q in g)
    optimizer, scheduler = build_optimizer(ac, p, sizes, accelerator)
    model_bytes = models.model_bytes(ac)  # parameters and buffers held by this process (no critic: less)
    model, optimizer = accelerator.prepare(ac, optimizer)  # the scheduler is saved as JSON (ppo_state.json)
    accelerator.unwrap_model(model).eval()
    kl_ctl = (core.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else core.FixedKLController(p.kl_coef))
    moments = core.RunningMoments()
    start_step, history = checkpoint.resume(accelerator, resume_from, scheduler, kl_ctl, moments, env_pool)

    if accelerator.is_main_process:
        config.save(cfg, out / "rlhf_config.yaml")
        with open(out / "metrics.jsonl", "w") as f:  # a resumed run rewrites what its checkpoint knew
            f.writelines(json.dumps(m) + "\n" for m in history)
        if start_step == 0 and evaluator is not None:
            (out / "eval_samples.jsonl").unlink(missing_ok=True)
    run = tracking.start(cfg.tracking, config.to_dict(cfg), cfg.output_dir, accelerator.is_main_process)
    accelerator.print(f"ppo: peft.method={cfg.peft.method}, {len(prompts)} {'prompts' if env_pool is None else 'episode rows'}, "
                      f"{sizes.world} process(es), "
                      f"rollout {sizes.global_rollout}/step, trainable parameters {trainable:,}")
    engine = models.start_engine(cfg, model, accelerator, tokenizer, base_path)
    cleanup.callback(engine.close)
    engine.update_weights(start_step)
    if evaluator is not None:
        evaluator.restore(history)
    return State(cfg, accelerator, sizes, prompts, tokenizer, model, base_path, model_bytes, optimizer, scheduler,
                 reward, reward_name, normalization, sampling, engine, evaluator, kl_ctl, moments, run, start_step, history,
                 rollout.sample_episodes if env_pool is not None else rollout.sample_responses, env_pool)


def step_prompts(s: State, step: int) -> list:
    """This process's prompts of `step` (B = local rollout batch), each samples_per_prompt times in a row: an
    epoch-seeded permutation of the data, this rank's slice of the step's global batch."""
    per_epoch = len(s.prompts) // s.sizes.global_prompts
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(len(s.prompts), generator=torch.Generator().manual_seed(s.cfg.seed + epoch))
    rank = s.accelerator.process_index
    idx = perm[k * s.sizes.global_prompts + rank * s.sizes.local_prompts:][:s.sizes.local_prompts]
    return [s.prompts[i] for i in idx.tolist() for _ in range(s.cfg.ppo.samples_per_prompt)]


def evaluate(s: State, step: int, metrics: dict) -> dict:
    """`metrics` with the held-out evaluation's `eval/...` at `step` added (the sampled temperature's KL
    from a policy-and-reference pass, no critic)."""
    kl_pass = partial(policy_and_reference_logprobs, s.model, s.sizes.forward)
    metrics.update(s.evaluator(step, s.engine, kl_pass, s.cfg.seed))
    return metrics


def policy_and_reference_logprobs(model, chunk: int, gen, temperature: float):
    """(policy logprobs (B, A), reference logprobs (B, A)) of a GenerationResult's responses."""
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.response_mask.long()], 1)
    lp, ref_lp, _, _ = rollout.forward_rollout(model, ids, mask, position_ids(mask), gen.response_ids,
                                               gen.prompt_ids.shape[1], temperature, chunk, critic=False)
    return lp, ref_lp


def finish(s: State, save: bool) -> list[dict]:
    """Export the policy (and critic), say what changed, close the tracking run and the process group."""
    cfg, acc, out = s.cfg, s.accelerator, Path(s.cfg.output_dir)
    if save:
        checkpoint.export_models(acc, s.model, s.tokenizer, out, s.base_path)
    if acc.is_main_process and cfg.ppo.steps > s.start_step:
        train_rows = [m for m in s.history if "objective/scores" in m]
        first, last = train_rows[0], train_rows[-1]
        print(f"ppo done: score {first['objective/scores']:.4f} -> {last['objective/scores']:.4f}, "
              f"KL {first['objective/kl']:.4f} -> {last['objective/kl']:.4f}"
              + (f"; policy in {out / 'policy'}" if save else ""))
    tracking.finish(s.run)
    acc.wait_for_everyone()
    acc.end_training()  # destroy the process group: ranks exit cleanly, not in a teardown race
    return s.history
