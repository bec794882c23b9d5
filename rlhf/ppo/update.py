"""PPO's update: the optimizer and its schedule, and `ppo_update`, the clipped policy (+ value) loss over
ppo_epochs x mini-batches x micro-batches of one rollout. The losses are in rlhf/ppo/core.py."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from rlhf.ppo import core
from rlhf.ppo.config import BatchSizes, PPOHyperparameters
from rlhf.ppo.rollout import Rollout, engine_agreement, response_logprobs


def build_optimizer(ac, p: PPOHyperparameters, sizes: BatchSizes, accelerator):
    """AdamW with the policy's and the critic's learning rates, the scheduler over every optimizer step,
    and (under DeepSpeed) the engine's batch sizes and clipping."""
    import transformers

    groups = ac.parameter_groups()  # {"policy": [...], "critic": [...]}, trainable only
    critic_lr = p.learning_rate if p.critic_learning_rate is None else p.critic_learning_rate
    param_groups = [{"params": groups["policy"], "lr": p.learning_rate}]
    if ac.has_critic:
        param_groups.append({"params": groups["critic"], "lr": critic_lr})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=p.weight_decay, eps=1e-5)
    warmup = int(p.warmup_steps * sizes.optimizer_steps) if p.warmup_steps < 1 else int(p.warmup_steps)
    scheduler = transformers.get_scheduler(p.lr_scheduler_type, optimizer, warmup, sizes.optimizer_steps)
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = sizes.micro_batch
        ds["gradient_accumulation_steps"] = p.gradient_accumulation_steps
        ds["gradient_clipping"] = p.max_grad_norm
        if p.critic_max_grad_norm not in (None, p.max_grad_norm) and accelerator.is_main_process:
            warnings.warn("under DeepSpeed the engine clips all gradients together at ppo.max_grad_norm; "
                          "ppo.critic_max_grad_norm is not applied")
    return optimizer, scheduler


def ppo_update(accelerator, model, optimizer, scheduler, r: Rollout, cfg: PPOHyperparameters, sizes: BatchSizes,
               generator: torch.Generator, kl_coef: float = 0.0, max_logprob_diff: Optional[float] = None,
               step: int = 0) -> dict[str, float]:
    """ppo_epochs x mini-batches x micro-batches of clipped policy + value loss (no value loss without a
    critic; + kl_coef x the KL to the reference with `kl_penalty: loss`): a token-level mean over the
    action tokens (`r.action_mask`) of the mini-batch of all processes. Each micro-batch's loss is weighted by its share of those tokens, so
    gradient accumulation and the number of processes give the same update as one big batch (a process
    with longer responses weighs more; DDP and DeepSpeed average gradients over processes, hence x world).
    The policy's and the critic's gradients are clipped separately (`max_grad_norm`, `critic_max_grad_norm`).
    `max_logprob_diff`: the rollout's logprobs came from generation; the first mini-batch, whose forwards
    all run before the first optimizer step, checks them against its own (`rollout/logprob_diff`, `_max`)
    and stops the run above this mean gap, before any weight changes."""
    ids, mask, pos = r.sequences
    P = r.query_ids.shape[1]
    unwrapped = accelerator.unwrap_model(model)
    groups = {k: v for k, v in unwrapped.parameter_groups().items() if v}
    clip = {"policy": cfg.max_grad_norm,
            "critic": cfg.max_grad_norm if cfg.critic_max_grad_norm is None else cfg.critic_max_grad_norm}
    deepspeed = accelerator.state.deepspeed_plugin is not None  # its engine clips (gradient_clipping)
    stats: dict[str, list[torch.Tensor]] = {}
    checks: list[tuple[float, float]] = []  # (mean, max) |generation - forward| logprob per micro-batch
    model.train()
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(sizes.local_rollout, generator=generator)
        for start in range(0, sizes.local_rollout, sizes.local_mini_batch):
            mb = order[start:start + sizes.local_mini_batch]
            mb_tokens = r.action_mask[mb].sum()
            if sizes.world > 1:
                mb_tokens = accelerator.reduce(mb_tokens, "sum")
            for m0 in range(0, sizes.local_mini_batch, sizes.micro_batch):
                i = mb[m0:m0 + sizes.micro_batch]
                rmask = r.action_mask[i]  # the policy's actions: environment tokens get no loss
                with accelerator.accumulate(model):
                    logits, values = model(ids[i], mask[i], pos[i], logits_to_keep=r.responses.shape[1] + 1)
                    new_lp = response_logprobs(logits, r.responses[i], cfg.temperature)
                    if max_logprob_diff is not None and epoch == 0 and start == 0:  # no step taken yet
                        checks.append(engine_agreement(r.logprobs[i], new_lp.detach(), rmask, accelerator, step,
                                                       max_logprob_diff, "the HF engine (recorded as it sampled)"))
                    pg_loss, pg = core.policy_loss(new_lp, r.logprobs[i], r.advantages[i], rmask, cfg.cliprange)
                    step_stats = {"loss/policy": pg_loss, "policy/clipfrac": pg["clipfrac"],
                                  "policy/approxkl": pg["approx_kl"], "policy/ratio": pg["ratio_mean"]}
                    loss = pg_loss
                    if unwrapped.has_critic:
                        new_values = values[:, P - 1:-1].float()
                        vf_loss, vf = core.value_loss(new_values, r.values[i], r.returns[i], rmask,
                                                      cfg.cliprange_value)
                        loss = loss + cfg.vf_coef * vf_loss
                        step_stats.update({"loss/value": vf_loss, "val/clipfrac": vf["clipfrac"]})
                    if cfg.kl_penalty == "loss":  # GRPO's KL term, with gradient through the current policy
                        kl_loss = core.masked_mean(core.kl_estimate(new_lp, r.ref_logprobs[i], cfg.kl_estimator),
                                                   rmask)
                        loss = loss + kl_coef * kl_loss
                        step_stats["loss/kl"] = kl_loss
                    if cfg.entropy_coef:  # the bonus only: the entropy metric is measured once, in the rollout
                        entropy = core.masked_mean(core.entropy_from_logits(logits[:, :-1], cfg.temperature), rmask)
                        loss = loss - cfg.entropy_coef * entropy
                    # accelerate divides by gradient_accumulation_steps; re-weight by token share instead.
                    weight = core.token_share_weight(rmask.sum(), mb_tokens, cfg.gradient_accumulation_steps,
                                                     sizes.world)
                    accelerator.backward(loss * weight)
                    if accelerator.sync_gradients and not deepspeed:
                        for name, params in groups.items():
                            if clip[name]:
                                norm = accelerator.clip_grad_norm_(params, clip[name])
                                stats.setdefault(f"{'policy' if name == 'policy' else 'val'}/grad_norm",
                                                 []).append(norm.detach())
                    optimizer.step()
                    if accelerator.sync_gradients:  # not prepared by accelerate, which would step it
                        scheduler.step()            # once per process
                    optimizer.zero_grad()
                for k, v in step_stats.items():
                    stats.setdefault(k, []).append(v.detach().float())
    model.eval()
    # one device-to-host copy for the whole update, not one per statistic per micro-batch
    names = list(stats)
    means = torch.stack([torch.stack(stats[k]).float().mean() for k in names]).tolist()
    out = dict(zip(names, means))
    if checks:  # already over every process (engine_agreement gathers)
        out["rollout/logprob_diff"] = sum(c[0] for c in checks) / len(checks)
        out["rollout/logprob_diff_max"] = max(c[1] for c in checks)
    return out
