"""One `ppo_update` checked number for number against a plain loop written here: a tiny shared-LoRA
ActorCritic, a fixed rollout, one epoch of two mini-batches of two micro-batches each. The reference
spells out what the update is: the epoch's seeded order, each mini-batch's token-mean losses (clipped
policy loss, clipped value loss, and in the second case the loss-side KL and the entropy bonus) written
as loops over tokens, each micro-batch weighted by its share of the mini-batch's tokens, the policy's and
the critic's gradients clipped separately, AdamW with the linear schedule. The updated parameters and
the logged statistics must agree to 1e-6."""

import copy

import pytest
import torch

from rlhf.ppo.config import PPOHyperparameters, batch_sizes
from rlhf.ppo.rollout import Rollout, response_logprobs
from rlhf.ppo.update import build_optimizer, ppo_update

B, P, A = 8, 3, 5
T = 0.7


def tiny_actor_critic():
    from peft import LoraConfig

    from policies.actor_critic import build_shared_lora
    from policies.config import TinyModelConfig
    from policies.tiny import build_model, load_tokenizer

    base = build_model(TinyModelConfig(), load_tokenizer(), seed=0)
    ac = build_shared_lora(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():
        ac.value_head.summary.weight.normal_(0, 0.1)
    return ac


def fixed_rollout(ac) -> Rollout:
    """Random prompts and responses (variable lengths), the model's own logprobs and values plus noise (so
    the ratio moves off 1 and both clips bite), random advantages and returns."""
    from rlhf.generation.prompts import position_ids

    g = torch.Generator().manual_seed(7)
    query = torch.randint(10, 200, (B, P), generator=g)
    query_mask = torch.ones(B, P, dtype=torch.long)
    query_mask[0, 0] = query_mask[3, :2] = 0  # left padding
    responses = torch.randint(10, 200, (B, A), generator=g)
    lengths = torch.tensor([5, 1, 3, 5, 2, 4, 5, 3])
    response_mask = torch.arange(A)[None, :] < lengths[:, None]  # (B, A)
    responses = responses.masked_fill(~response_mask, 0)
    ids, mask = torch.cat([query, responses], 1), torch.cat([query_mask, response_mask.long()], 1)
    with torch.no_grad():
        logits, values = ac(ids, mask, position_ids(mask), logits_to_keep=A + 1)
        logprobs = response_logprobs(logits, responses, T)
        ref_logprobs, _ = ac(ids, mask, position_ids(mask), reference=True, logits_to_keep=A + 1)
        ref_logprobs = response_logprobs(ref_logprobs, responses, T)
    noise = lambda scale: torch.randn(B, A, generator=g) * scale  # noqa: E731
    zeros = torch.zeros(B)
    return Rollout(prompts=[None] * B, texts=[""] * B, query_ids=query, query_mask=query_mask, responses=responses,
                   response_mask=response_mask, action_mask=response_mask, contains_eos=torch.ones(B, dtype=torch.bool),
                   logprobs=logprobs + noise(0.3), ref_logprobs=ref_logprobs + noise(0.2),
                   values=values[:, P - 1:-1].float() + noise(0.5), entropy=None, raw_scores=zeros,
                   nan_scores=zeros.bool(), scores=zeros, kl=torch.zeros(B, A), turn_rewards=torch.zeros(B, A), rewards=torch.zeros(B, A),
                   advantages=noise(1.0), returns=noise(1.0), engine_logprob_diff=None)


def token_mean(values, mask):
    """Mean of values[b][t] over the (b, t) with mask[b][t], as a loop."""
    total, n = 0.0, 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                total, n = total + values[b][t], n + 1
    return total / n


def reference_update(ac, r: Rollout, p: PPOHyperparameters, seed: int):
    """The update as a plain loop; returns the statistics ppo_update logs."""
    from rlhf.generation.prompts import position_ids

    groups = ac.parameter_groups()
    opt = torch.optim.AdamW([{"params": groups["policy"], "lr": p.learning_rate},
                             {"params": groups["critic"], "lr": p.learning_rate}],
                            weight_decay=p.weight_decay, eps=1e-5)
    total_steps, done = p.steps * p.ppo_epochs * p.num_mini_batches, 0
    ids = torch.cat([r.query_ids, r.responses], 1)
    mask = torch.cat([r.query_mask, r.response_mask.long()], 1)
    pos = position_ids(mask)
    mini, micro = B // p.num_mini_batches, B // p.num_mini_batches // p.gradient_accumulation_steps
    logged = {}
    gen = torch.Generator().manual_seed(seed)
    ac.train()
    for _ in range(p.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for start in range(0, B, mini):
            rows = order[start:start + mini]
            mb_tokens = int(r.response_mask[rows].sum())
            opt.zero_grad()
            for m0 in range(0, mini, micro):
                i = rows[m0:m0 + micro]
                m = r.response_mask[i]
                logits, values = ac(ids[i], mask[i], pos[i], logits_to_keep=A + 1)
                logp = torch.log_softmax(logits[:, :-1].float() / T, -1)  # (b, A, V)
                new_lp = logp.gather(-1, r.responses[i][..., None])[..., 0]
                new_v = values[:, P - 1:-1].float()
                pg, vf, kl, ent, clipped_pg, clipped_vf, ratios, sq = [], [], [], [], [], [], [], []
                for b in range(len(i)):
                    row = [[], [], [], [], [], [], [], []]
                    for t in range(A):
                        ratio = torch.exp(new_lp[b, t] - r.logprobs[i][b, t])
                        adv = r.advantages[i][b, t]
                        lo, hi = -adv * ratio, -adv * ratio.clamp(1 - p.cliprange, 1 + p.cliprange)
                        v, v_old, ret = new_v[b, t], r.values[i][b, t], r.returns[i][b, t]
                        v_clip = v_old + (v - v_old).clamp(-p.cliprange_value, p.cliprange_value)
                        d = r.ref_logprobs[i][b, t] - new_lp[b, t]
                        probs = logp[b, t].exp()
                        for k, x in enumerate((torch.max(lo, hi), 0.5 * torch.max((v - ret) ** 2, (v_clip - ret) ** 2),
                                               torch.exp(d) - 1 - d, -(probs * logp[b, t]).sum(), float(hi > lo),
                                               float((v_clip - ret) ** 2 > (v - ret) ** 2), ratio.detach(),
                                               0.5 * (new_lp[b, t] - r.logprobs[i][b, t]).detach() ** 2)):
                            row[k].append(x)
                    for lst, vals in zip((pg, vf, kl, ent, clipped_pg, clipped_vf, ratios, sq), row):
                        lst.append(vals)
                pg_loss, vf_loss, kl_loss, entropy = (token_mean(x, m) for x in (pg, vf, kl, ent))
                loss = pg_loss + p.vf_coef * vf_loss
                if p.kl_penalty == "loss":
                    loss = loss + p.kl_coef * kl_loss
                loss = loss - p.entropy_coef * entropy
                (loss * int(m.sum()) / mb_tokens).backward()  # this micro-batch's share of the mini-batch's tokens
                stats = {"loss/policy": pg_loss, "policy/clipfrac": token_mean(clipped_pg, m),
                         "policy/approxkl": token_mean(sq, m), "policy/ratio": token_mean(ratios, m),
                         "loss/value": vf_loss, "val/clipfrac": token_mean(clipped_vf, m)}
                if p.kl_penalty == "loss":
                    stats["loss/kl"] = kl_loss
                for k, v in stats.items():
                    logged.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else v)
            for name, clip in (("policy", p.max_grad_norm), ("critic", p.critic_max_grad_norm)):
                norm = torch.nn.utils.clip_grad_norm_(groups[name], clip)
                logged.setdefault("policy/grad_norm" if name == "policy" else "val/grad_norm", []).append(float(norm))
            for group in opt.param_groups:  # transformers' linear schedule, no warm-up
                group["lr"] = p.learning_rate * (total_steps - done) / total_steps
            opt.step()
            done += 1
    ac.eval()
    return {k: sum(v) / len(v) for k, v in logged.items()}


@pytest.mark.parametrize("extra", [{}, {"kl_penalty": "loss", "kl_estimator": "k3", "kl_coef": 0.3,
                                        "entropy_coef": 0.05, "weight_decay": 0.1}],
                         ids=["gae", "kl_in_loss_and_entropy"])
def test_ppo_update_equals_the_plain_loop(extra):
    from accelerate import Accelerator

    p = PPOHyperparameters(steps=1, per_device_rollout_batch_size=B, num_mini_batches=2, gradient_accumulation_steps=2,
                           ppo_epochs=1, learning_rate=1e-3, temperature=T, cliprange=0.2, cliprange_value=0.2,
                           vf_coef=0.5, max_grad_norm=0.5, critic_max_grad_norm=0.3, **extra)
    ac = tiny_actor_critic()
    r = fixed_rollout(ac)
    reference = copy.deepcopy(ac)
    before = {k: v.detach().clone() for k, v in ac.state_dict().items()}

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=p.gradient_accumulation_steps)
    sizes = batch_sizes(p, accelerator.num_processes)
    optimizer, scheduler = build_optimizer(ac, p, sizes, accelerator)
    model, optimizer = accelerator.prepare(ac, optimizer)
    stats = ppo_update(accelerator, model, optimizer, scheduler, r, p, sizes, torch.Generator().manual_seed(11),
                       kl_coef=p.kl_coef)
    expected = reference_update(reference, r, p, seed=11)

    assert set(stats) == set(expected)
    for k in expected:
        assert stats[k] == pytest.approx(expected[k], abs=1e-6, rel=1e-6), k
    assert 0 < expected["policy/clipfrac"] < 1 and 0 < expected["val/clipfrac"] < 1  # both clips bit
    ours, theirs = accelerator.unwrap_model(model).state_dict(), reference.state_dict()
    moved = 0
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, atol=1e-6, rtol=0, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(v, before[k]))
    assert moved > 0 and all(torch.equal(theirs[k], before[k]) for k in theirs if "lora_" not in k
                             and not k.startswith("value_head."))  # the base is frozen
