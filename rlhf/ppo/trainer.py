"""Stage 3: PPO for language models (`rlhf ppo`). The LLM is the agent, each generated token an
action, the episode ends at the stop token; the reward model scores the whole response, a per-token
KL penalty keeps the policy near the reference, a value head estimates returns (GAE).

    rlhf ppo --config configs/ppo_tiny.yaml
    accelerate launch --config_file ... -m rlhf ppo --config ...

Why our own loop: TRL deleted its PPOTrainer (huggingface/trl#7020), OpenRLHF needs Ray + vLLM and
cannot sync LoRA, DeepSpeed-Chat has no resume. This file reads top to bottom like cleanrl's
`ppo.py`; the math lives in `rlhf/ppo/core.py` (torch only, tested against loop references), the
models in `policies/actor_critic.py`. One iteration ("step"):

  1. rollout: sample responses to a batch of prompts, truncate after the stop token
  2. forward: logprobs of policy and reference, values of the critic
  3. score: the reward model (normalised, clipped, missing-EOS penalty)
  4. KL reward: -kl_coef * KL per token, score added at the last response token
  5. advantages (`ppo.advantage_estimator`): GAE with the critic's values (whitened), or critic-free:
     RLOO / GRPO (a baseline from the other responses to the same prompt), REINFORCE++ (returns to go,
     whitened over the global batch)
  6. update: ppo_epochs x mini-batches x gradient accumulation of the clipped policy loss (+ value loss)

Shapes: B rollout batch, P prompt tokens, A response tokens, T = P + A, V vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rlhf import config
from rlhf.errors import UserError
from rlhf.evaluation.heldout import HeldOutEval
from rlhf.ppo import core
from rlhf.runtime import checkpoints, tracking
from rlhf.runtime.outputs import user_run

STATE_FILE = "ppo_state.json"  # written last into a checkpoint: its presence marks it complete


from rlhf.ppo.config import (  # noqa: F401
    BatchSizes,
    PPOConfig,
    PPOHyperparameters,
    PromptDataConfig,
    RewardSpec,
    batch_sizes,
    check,
    check_stop_token,
    uses_critic,
)

# ---------------------------------------------------------------------------------------------
# prompts


def load_prompts(cfg: PromptDataConfig) -> list[list[dict]]:
    """Prompts as message lists ending with a user turn."""
    from rlhf.data import preference_data
    from rlhf.data.sources import load_rows, rename_columns

    fmt = cfg.format
    # data.column_map is {column: name}; the preference formats read {field: column}
    pair_map = {field: column for column, field in cfg.column_map.items()} or None
    if fmt not in ("auto", "messages", "prompt"):  # a preference format: take its pairs' prompts
        pairs, _ = preference_data.load_pairs(cfg.train, format=fmt, column_map=pair_map, split=cfg.split)
        prompts = [p["prompt"] for p in pairs]
    else:
        ds = rename_columns(load_rows(cfg.train, split=cfg.split), cfg.column_map, cfg.train)
        cols = ds.column_names
        if fmt == "auto":
            fmt = "messages" if "messages" in cols else "prompt" if "prompt" in cols and not (
                {"chosen", "rejected"} <= set(cols) or "response_0" in cols) else "pairs"
        if fmt == "pairs":
            pairs, _ = preference_data.load_pairs(cfg.train, column_map=pair_map, split=cfg.split)
            prompts = [p["prompt"] for p in pairs]
        elif fmt not in cols:
            raise UserError(f"{cfg.train}: no '{fmt}' column for data.format={cfg.format}; columns: {cols}")
        else:
            prompts = [_as_prompt(row[fmt], f"{cfg.train} row {i + 1}") for i, row in enumerate(ds)]
    seen, unique = set(), []
    for p in prompts:  # preference data repeats prompts; roll out each once per epoch
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if len(unique) < len(prompts):
        print(f"{cfg.train}: {len(prompts) - len(unique)} duplicate prompt(s) collapsed, {len(unique)} distinct "
              "(use ppo.samples_per_prompt to sample a prompt several times)")
    if cfg.max_samples is not None:
        unique = unique[:cfg.max_samples]
    if not unique:
        raise UserError(f"{cfg.train}: no prompts")
    return unique


def _as_prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        turns = [{"role": m["role"], "content": m["content"]} for m in value]
        while turns and turns[-1]["role"] == "assistant":  # a conversation: prompt = up to the last user turn
            turns.pop()
        if turns:
            return turns
    raise UserError(f"{where}: expected a prompt as text or a list of {{role, content}} messages with a user turn")


def encode_prompts(tokenizer, prompts: list[list[dict]], max_len: int) -> list[list[int]]:
    """Chat-template each prompt (with the assistant header) and keep its last `max_len` tokens."""
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append(list(ids)[-max_len:])
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P)), padded on the left so every prompt ends where generation starts."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# models


@contextmanager
def unpartitioned(accelerator):
    """Load models whole even when the launch turns ZeRO-3 init on (`zero3_init_flag`): merging an
    adapter, or scoring with a frozen reward model, needs full weights. (accelerate's own
    `zero3_init_context_manager(enable=False)` leaves transformers' stage-3 config in place.)"""
    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(plugin, "dschf", None) is not None:
            set_hf_deepspeed_config(plugin.dschf)


def build_models(cfg: PPOConfig, is_main: bool, accelerator=None, reward_given: bool = False):
    """Tokenizer and ActorCritic for cfg.peft.method; the SFT adapter (if the policy is one) is merged first.
    In full mode the trainable policy and critic load in float32 when the compute dtype is bf16/fp16
    (master weights: an AdamW step on bf16 weights rounds most small updates away) and run under
    autocast; the frozen reference stays in the compute dtype. `reward_given`: the reward is an object
    passed to `main`, so `critic_init: auto` does not look for a reward model at reward.spec."""
    from policies import actor_critic, models
    from rlhf.runtime.distributed import main_process_first

    out = Path(cfg.output_dir)
    with main_process_first():  # the built-in tiny base is written once, by rank 0, before others read it
        path = models.materialize(cfg.model, out / "base_model", cfg.seed)
    if Path(path).is_dir():  # absolute, so the exported adapter names a base that loads from anywhere
        path = str(Path(path).resolve())
    if (Path(path) / "adapter_config.json").exists():
        with unpartitioned(accelerator):
            path = _merged_policy_base(path, out / "policy_base", is_main, cfg.model.allow_pickle_weights)
    tokenizer = models.load_tokenizer(path, cfg.model)
    torch.manual_seed(cfg.seed)  # same value head / adapter init on every process
    rm_info = _critic_source(cfg, path, is_main, reward_given)
    from_reward = rm_info is not None
    if cfg.peft.method == "full":
        # DeepSpeed's bf16 optimizer keeps its own float32 master copy: the weights may stay in bf16 there
        master = accelerator is None or accelerator.state.deepspeed_plugin is None
        policy = models.load_causal_lm(path, cfg.model, "full", master_weights=master)
        reference = models.load_causal_lm(path, cfg.model, "full")
        critic = None if not uses_critic(cfg.ppo) else (
            _load_reward_body(cfg.reward.spec, policy.dtype) if from_reward
            else models.load_causal_lm(path, cfg.model, "full", master_weights=master))
        ac = actor_critic.build_full(policy, critic, reference)
    else:
        base = models.load_causal_lm(path, cfg.model, cfg.peft.method)
        critic_lora = _reward_lora_config(cfg.reward.spec) if from_reward else None
        ac = actor_critic.build_shared_lora(base, models.peft_config(cfg.peft, "CAUSAL_LM"), critic_lora,
                                            critic=uses_critic(cfg.ppo))
    if from_reward:
        _init_critic_from_reward(ac, cfg.reward.spec, rm_info)
    return tokenizer, ac, path


def _critic_source(cfg: PPOConfig, policy_path: str, is_main: bool, reward_given: bool) -> dict | None:
    """The reward model's info when the critic starts from it, else None (critic from the policy, or none)."""
    if not uses_critic(cfg.ppo) or cfg.ppo.critic_init == "policy" or (
            cfg.ppo.critic_init == "auto" and reward_given):
        return None
    if cfg.ppo.critic_init == "reward":
        return _reward_model_info(cfg.reward.spec, cfg.peft.method, policy_path)
    try:
        info = _reward_model_info(cfg.reward.spec, cfg.peft.method, policy_path)
    except UserError as e:
        if is_main:
            print(f"ppo.critic_init=auto: the critic starts from the policy; the reward model does not fit ({e})")
        return None
    if is_main:
        print(f"ppo.critic_init=auto: the critic starts from the reward model {cfg.reward.spec}")
    return info


def _reward_model_info(spec: str, method: str, policy_path: str) -> dict:
    from reward.models import read_info

    info = read_info(spec) if Path(spec).is_dir() else None
    if info is None or info["kind"] != "preference":
        raise UserError(f"ppo.critic_init=reward needs reward.spec to be a reward-model directory "
                        f"(`rlhf reward` output); '{spec}' is not")
    if method == "full" and info.get("adapter"):
        raise UserError(f"ppo.critic_init=reward with peft.method=full needs a fully fine-tuned reward model; "
                        f"'{spec}' is a LoRA adapter (use peft.method=lora, or train the reward model fully)")
    if method != "full":
        if not info.get("adapter"):
            raise UserError(f"ppo.critic_init=reward with peft.method={method} needs a LoRA reward model on the "
                            f"policy's base; '{spec}' is a full model (use peft.method=full)")
        if str(Path(info["base_model"]).resolve()) != str(Path(policy_path).resolve()):
            raise UserError(f"ppo.critic_init=reward: the reward model's base '{info['base_model']}' is not the "
                            f"policy's base '{policy_path}', so its adapter cannot become the critic adapter")
    return info


def _reward_lora_config(spec: str):
    """The reward model's LoRA shape, for a causal-LM critic adapter (its dropout off)."""
    import peft

    rm = peft.PeftConfig.from_pretrained(spec)
    return peft.LoraConfig(task_type="CAUSAL_LM", r=rm.r, lora_alpha=rm.lora_alpha, lora_dropout=0.0,
                           target_modules=rm.target_modules, use_rslora=rm.use_rslora, use_dora=rm.use_dora)


def _load_reward_body(spec: str, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(spec, use_safetensors=True, dtype=dtype,
                                                              trust_remote_code=False)


def _init_critic_from_reward(ac, spec: str, info: dict) -> None:
    """Copy the reward model's adapter (LoRA layout) and score head into the critic."""
    from safetensors.torch import load_file

    if ac.shared:
        import peft

        weights = load_file(Path(spec) / "adapter_model.safetensors")
        score = weights.pop(next(k for k in weights if k.endswith("score.weight")))
        lora = {k: v for k, v in weights.items() if "lora_" in k}
        result = peft.set_peft_model_state_dict(ac.policy, lora, adapter_name="critic")
        missing = [k for k in result.unexpected_keys if "lora_" in k]
        if missing:
            raise UserError(f"ppo.critic_init=reward: {len(missing)} reward-model adapter weights have no place in "
                            f"the critic adapter (e.g. {missing[0]})")
    else:
        score = load_file(next(Path(spec).glob("*.safetensors")))
        score = score[next(k for k in score if k.endswith("score.weight"))]
    if score.shape != ac.value_head.summary.weight.shape:
        raise UserError(f"ppo.critic_init=reward: the reward model's score head {tuple(score.shape)} does not fit "
                        f"the value head {tuple(ac.value_head.summary.weight.shape)} (different hidden size)")
    with torch.no_grad():
        ac.value_head.summary.weight.copy_(score)
        ac.value_head.summary.bias.zero_()


def _merged_policy_base(adapter_dir: str, out: Path, is_main: bool, allow_pickle_weights: bool) -> str:
    """An SFT adapter becomes the PPO starting point by merging it into its base once (on disk, so
    QLoRA can load the merged weights in 4 bits and the saved PPO adapter names a real base)."""
    from policies.models import refuse_pickle_weights_with_base
    from rlhf.runtime.distributed import barrier
    from rlhf.stages.merge import merge

    refuse_pickle_weights_with_base(adapter_dir, allow_pickle_weights)  # every rank: main alone would hang
    if is_main and not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        merge(adapter_dir, str(out), allow_pickle_weights=allow_pickle_weights, option="model.allow_pickle_weights")
    barrier()  # torch's: accelerate's waits for nobody in a CPU DDP launch
    return str(out.resolve())


# ---------------------------------------------------------------------------------------------
# rollout


@dataclass
class Rollout:
    """One iteration's experience on this process."""

    prompts: list  # B message lists
    query_ids: torch.Tensor  # (B, P) left-padded
    query_mask: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, A) padded after the stop token
    response_mask: torch.Tensor  # (B, A) bool, the stop token included
    logprobs: torch.Tensor  # (B, A)
    ref_logprobs: torch.Tensor  # (B, A)
    values: Optional[torch.Tensor]  # (B, A); None without a critic
    scores: torch.Tensor  # (B,) after normalisation, clipping and EOS penalty
    raw_scores: torch.Tensor  # (B,) as the reward returned them
    kl: torch.Tensor  # (B, A) per-token KL estimate (0 outside the mask)
    rewards: torch.Tensor = None  # (B, A)
    advantages: torch.Tensor = None  # (B, A)
    returns: torch.Tensor = None  # (B, A); the value target (gae only)

    @property
    def sequences(self):
        """(input_ids (B, T), attention_mask (B, T), position_ids (B, T)) of prompt + response."""
        ids = torch.cat([self.query_ids, self.responses], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask.long()], dim=1)
        return ids, mask, position_ids(mask)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, as `generate` uses with left padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(logits: torch.Tensor, responses: torch.Tensor, temperature: float):
    """logits (B, A + 1, V) of the last A + 1 positions (the model called with logits_to_keep=A + 1)
    -> logprobs of the response tokens (B, A) at the sampling temperature (divided after the upcast)."""
    return core.logprobs_from_logits(logits[:, :-1], responses, temperature)


def sampling_config(temperature: float, top_p: float, max_new_tokens: int, stop_id, pad_id):
    """A GenerationConfig built only from our options (temperature 0: greedy). Nothing of the model's
    own `generation_config.json` may reach sampling: a `repetition_penalty` or `top_k` an instruct
    model ships would change the distribution sampled from, but not the one the trainer scores, and the
    KL and the ratio would be off-policy (measured: a 1.3 penalty moved logprobs by 2e-3)."""
    from transformers import GenerationConfig

    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    return GenerationConfig(**sample, max_new_tokens=max_new_tokens, eos_token_id=stop_id, pad_token_id=pad_id,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True)


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
    the trainer does. Memory: one (B, V) row per decoding step, not the (B, A, V) of `output_scores`."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # (B, V) log-probs of the step whose token is not yet known
        self.logprobs: list[torch.Tensor] = []  # A x (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:  # the token sampled at the previous step is now the last input
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.logprobs.append(self.pending.gather(-1, tokens[:, None])[:, 0])
        self.pending = None

    def finish(self, responses: torch.Tensor) -> torch.Tensor:
        """(B, A) logprobs of `responses` (B, A), the tokens generate returned."""
        if self.pending is not None:
            self._take(responses[:, len(self.logprobs)])
        return torch.stack(self.logprobs, 1)


@torch.no_grad()
def sample(model, query_ids, query_mask, gen_config, with_logprobs: bool = False):
    """Responses (B, A <= max_new_tokens) sampled with `gen_config` only; with `with_logprobs`, also the
    logprobs (B, A) of the sampled tokens at the sampling temperature (untruncated by top_p, as the
    trainer computes them)."""
    from transformers import LogitsProcessorList

    recorder = TokenLogprobRecorder(gen_config.temperature if gen_config.do_sample else 1.0)
    with own_generation_config(model, gen_config):
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config,
                             logits_processor=LogitsProcessorList([recorder] if with_logprobs else []))
    responses = out[:, query_ids.shape[1]:]
    return (responses, recorder.finish(responses)) if with_logprobs else responses


def generate(model, query_ids, query_mask, p: PPOHyperparameters, stop_id, pad_id, with_logprobs: bool = False):
    """PPO's rollout sampling: responses (B, A <= max_new_tokens) (and their logprobs (B, A))."""
    return sample(model, query_ids, query_mask,
                  sampling_config(p.temperature, p.top_p, p.max_new_tokens, stop_id, pad_id), with_logprobs)


@torch.no_grad()
def forward_rollout(ac, ids, mask, pos, responses, prompt_len, temperature, chunk, entropy: bool = False,
                    policy: bool = True):
    """Policy and reference logprobs and critic values (each (B, A); values None without a critic),
    `chunk` rows at a time, and with `entropy` the policy's entropy per token (B, A) (else None): measured
    here, once per rollout, rather than in every training forward, where it would cost a softmax over
    (B, A, V) per micro-batch. `policy=False`: the policy's logprobs came from generation; no policy pass
    (logprobs and entropy None)."""
    lp, ref_lp, vals, ent = [], [], [], []
    for i in range(0, ids.shape[0], chunk):
        s = slice(i, i + chunk)
        keep = responses.shape[1] + 1
        logits, values = ac(ids[s], mask[s], pos[s], logits_to_keep=keep, values_only=not policy)
        if policy:
            lp.append(response_logprobs(logits, responses[s], temperature))
        if entropy and policy:
            ent.append(core.entropy_from_logits(logits[:, :-1], temperature))
        if values is not None:  # None: a critic-free model
            vals.append(values[:, prompt_len - 1:-1].float())
        del logits
        ref_logits, _ = ac(ids[s], mask[s], pos[s], reference=True, logits_to_keep=keep)
        ref_lp.append(response_logprobs(ref_logits, responses[s], temperature))
    return ((torch.cat(lp) if policy else None), torch.cat(ref_lp), (torch.cat(vals) if vals else None),
            (torch.cat(ent) if ent else None))


# ---------------------------------------------------------------------------------------------
# the PPO update


def ppo_update(accelerator, model, optimizer, scheduler, r: Rollout, cfg: PPOHyperparameters, sizes: BatchSizes,
               generator: torch.Generator, kl_coef: float = 0.0) -> dict[str, float]:
    """ppo_epochs x mini-batches x micro-batches of clipped policy + value loss (no value loss without a
    critic; + kl_coef x the KL to the reference with `kl_penalty: loss`): a token-level mean over
    the mini-batch of all processes. Each micro-batch's loss is weighted by its share of those tokens, so
    gradient accumulation and the number of processes give the same update as one big batch (a process
    with longer responses weighs more; DDP and DeepSpeed average gradients over processes, hence x world).
    The policy's and the critic's gradients are clipped separately (`max_grad_norm`, `critic_max_grad_norm`)."""
    ids, mask, pos = r.sequences
    P = r.query_ids.shape[1]
    unwrapped = accelerator.unwrap_model(model)
    groups = {k: v for k, v in unwrapped.parameter_groups().items() if v}
    clip = {"policy": cfg.max_grad_norm,
            "critic": cfg.max_grad_norm if cfg.critic_max_grad_norm is None else cfg.critic_max_grad_norm}
    deepspeed = accelerator.state.deepspeed_plugin is not None  # its engine clips (gradient_clipping)
    stats: dict[str, list[torch.Tensor]] = {}
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(sizes.local_rollout, generator=generator)
        for start in range(0, sizes.local_rollout, sizes.local_mini_batch):
            mb = order[start:start + sizes.local_mini_batch]
            mb_tokens = r.response_mask[mb].sum()
            if sizes.world > 1:
                mb_tokens = accelerator.reduce(mb_tokens, "sum")
            for m0 in range(0, sizes.local_mini_batch, sizes.micro_batch):
                i = mb[m0:m0 + sizes.micro_batch]
                rmask = r.response_mask[i]
                with accelerator.accumulate(model):
                    logits, values = model(ids[i], mask[i], pos[i], logits_to_keep=r.responses.shape[1] + 1)
                    new_lp = response_logprobs(logits, r.responses[i], cfg.temperature)
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
    return dict(zip(names, means))


def advantages(rewards: torch.Tensor, values: Optional[torch.Tensor], response_mask: torch.Tensor,
               p: PPOHyperparameters, all_reduce=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(advantages (B, A), returns (B, A) or None) of the per-token rewards (B, A) by
    `p.advantage_estimator`; the math is in ppo_core. rloo/grpo credit every token of a response with its
    sequence advantage (the sum of its rewards: score minus the KL penalty, against the group's baseline);
    gae and reinforce_pp are whitened over the global batch when `p.whiten_advantages` (for reinforce_pp
    that normalisation is its baseline)."""
    mask = response_mask.bool()
    est = p.advantage_estimator
    returns = None
    if est == "gae":
        adv, returns = core.gae(rewards, values, mask, p.gamma, p.lam)
    elif est == "reinforce_pp":
        adv = core.returns_to_go(rewards, mask, p.gamma)
    else:
        sequence = rewards.sum(-1)  # (B,): rewards are 0 outside the mask
        seq_adv = (core.rloo_advantages(sequence, p.samples_per_prompt) if est == "rloo" else
                   core.grpo_advantages(sequence, p.samples_per_prompt, p.grpo_std_normalization))
        return torch.where(mask, seq_adv[:, None], 0), None
    if p.whiten_advantages:  # over the global batch (N+ details), not each process's slice
        adv = core.masked_whiten(adv, mask, all_reduce=all_reduce)
    return adv, returns


def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds (ZeRO-3: its shards), each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        t = getattr(t, "ds_tensor", None) if getattr(t, "ds_numel", None) is not None else t
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def _reward_normalization(setting: str, reward, is_main: bool) -> str:
    """`none`, `running` or `model`: what `ppo.reward_normalization` resolves to for this reward."""
    stored = getattr(reward, "normalization", None)
    if setting == "auto":
        setting = "model" if stored is not None else "running"
        if is_main:
            print(f"ppo.reward_normalization=auto: {setting} (" + ("the reward's stored mean and std" if stored
                  else "the reward stores no statistics; running mean and std of this run") + ")")
    elif setting == "model" and stored is None:
        raise UserError("ppo.reward_normalization=model: the reward stores no normalisation statistics (a "
                        "function, or a model trained elsewhere); use `running`, `none` or `auto`")
    return setting


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(accelerator, out: Path, step: int, state: dict, limit: int) -> None:
    """Write checkpoint-{step} atomically: everything goes to a temporary folder that is renamed
    once complete (ppo_state.json, written last, marks it complete). Everything but the weights and the
    optimizer state (safetensors, and a torch.save of tensors that resume checks) is JSON: the scheduler,
    KL controller, reward statistics and step (the data position is a function of the step)."""
    from rlhf.runtime.distributed import barrier  # torch's: accelerate's waits for nobody in a CPU DDP launch

    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state into it
    barrier()
    accelerator.save_state(str(tmp))
    checkpoints.save_rng_state(tmp, accelerator.process_index)  # JSON + safetensors, not accelerate's pickle
    barrier()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints.complete_checkpoints(out, STATE_FILE)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def export_models(accelerator, ac_wrapped, tokenizer, out: Path, base_path: str) -> None:
    """The trained policy (adapter or full model, + tokenizer) in out/policy, the critic (if any) in
    out/critic: ordinary directories that peft/transformers load."""
    state = accelerator.get_state_dict(ac_wrapped)  # gathers ZeRO-3 shards
    if not accelerator.is_main_process:
        return
    ac = accelerator.unwrap_model(ac_wrapped)
    sub = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    exported = ("policy", "critic") if ac.has_critic else ("policy",)
    if ac.shared:
        for d in exported:
            ac.policy.save_pretrained(tmp / d, selected_adapters=[d], state_dict=sub("policy."))
        for d in exported:  # peft nests non-default adapters in a sub-folder; flatten it
            nested = tmp / d / d
            if nested.exists():
                for f in nested.iterdir():
                    os.replace(f, tmp / d / f.name)
                nested.rmdir()
            cfg_file = tmp / d / "adapter_config.json"
            adapter_cfg = json.loads(cfg_file.read_text())
            adapter_cfg["base_model_name_or_path"] = base_path
            cfg_file.write_text(json.dumps(adapter_cfg, indent=2))
    else:
        ac.policy.save_pretrained(tmp / "policy", state_dict=sub("policy."), safe_serialization=True)
        if ac.has_critic:
            ac.critic.save_pretrained(tmp / "critic", state_dict=sub("critic."), safe_serialization=True)
    if ac.has_critic:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sub("value_head.").items()},
                  tmp / "critic" / "value_head.safetensors")
    tokenizer.save_pretrained(tmp / "policy")
    checkpoints.publish_dir(tmp, out)


# ---------------------------------------------------------------------------------------------
# the loop


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


def main(cfg: PPOConfig, reward=None, on_step=None, save: bool = True) -> list[dict]:
    """Run PPO (see `_run`); a run refused for its input leaves no output directory it created, and a
    rollout engine it started stops with it, however it ends."""
    from contextlib import ExitStack

    with user_run(cfg.output_dir, marker=STATE_FILE), ExitStack() as cleanup:
        return _run(cfg, reward, on_step, save, cleanup)


# ---------------------------------------------------------------------------------------------
# the vLLM rollout engine (see rlhf/generation/vllm_engine.py)


def start_engine(cfg: PPOConfig, base_path: str, accelerator, out: Path):
    """This process's vLLM engine, serving the policy's base (LoRA) or its initial weights (full)."""
    from policies.models import torch_dtype
    from rlhf.generation.vllm_engine import VLLMEngine

    p = cfg.ppo
    dtype = cfg.vllm.dtype if cfg.vllm.dtype != "auto" else \
        {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype(cfg.model)]
    rank = accelerator.process_index
    return VLLMEngine(cfg.vllm, base_path, dtype=dtype, seed=cfg.seed if cfg.vllm.seed is None else cfg.vllm.seed,
                      max_model_len=cfg.vllm.max_model_len or p.max_prompt_length + p.max_new_tokens,
                      lora_rank=None if cfg.peft.method == "full" else cfg.peft.r,
                      log_path=out / ("vllm_engine.log" if accelerator.num_processes == 1 else f"vllm_engine_{rank}.log"),
                      max_num_seqs=p.per_device_rollout_batch_size, device=accelerator.device,
                      threads=torch.get_num_threads())


def sync_engine(engine, model, accelerator, version: int, weights_file: Path) -> None:
    """Hand the policy's current weights to the engine: the policy adapter alone (LoRA), or the full
    weights written once per node and loaded by every engine (full). Under ZeRO-3 they are gathered."""
    from policies.actor_critic import POLICY as POLICY_ADAPTER
    from rlhf.generation.vllm_engine import write_adapter, write_full_weights
    from rlhf.runtime.distributed import barrier

    with _generation_context(model, accelerator) as ac:
        if engine.lora_rank is not None:
            adapter = write_adapter(ac.policy, POLICY_ADAPTER, engine.adapter_root / f"v{version}")
            engine.set_adapter(str(adapter), version)
            stale = engine.adapter_root / f"v{version - 2}"  # the one before the previous: no longer served
            shutil.rmtree(stale, ignore_errors=True)
            return
        if accelerator.is_local_main_process:
            write_full_weights(ac.policy, weights_file)
    barrier()
    engine.load_weights(str(weights_file))
    barrier()  # every engine has read the file before it is overwritten


def _run(cfg: PPOConfig, reward=None, on_step=None, save: bool = True, cleanup=None) -> list[dict]:
    """Run PPO; returns the per-iteration metrics (also in output_dir/metrics.jsonl and W&B).
    `reward` overrides cfg.reward (any object with `score(prompts, responses, normalize)`).
    `on_step(step, actor_critic, tokenizer)`, if given, runs on every process after each iteration
    (the benchmarks evaluate the policy along the run with it); a dict it returns joins the metrics.
    `save=False` writes no checkpoint and no final models (the speed benchmark)."""
    import transformers

    from policies.models import torch_dtype
    from reward.interface import refuse_all_non_finite
    from rlhf.runtime.distributed import make_accelerator
    from rlhf.runtime.progress import Progress

    check(cfg)
    p, out = cfg.ppo, Path(cfg.output_dir)
    # bf16 compute runs under autocast over float32 master weights (full) or adapters (LoRA)
    accelerator = make_accelerator(p.gradient_accumulation_steps, cpu_threads=cfg.cpu_threads,
                                   mixed_precision="bf16" if torch_dtype(cfg.model) == torch.bfloat16 else "no")
    sizes = batch_sizes(p, accelerator.num_processes)
    resume_from = checkpoints.resolve_resume(cfg.resume, out, STATE_FILE)
    prompts = load_prompts(cfg.data)
    if len(prompts) < sizes.global_prompts:
        raise UserError(f"{cfg.data.train}: {len(prompts)} prompts, fewer than one rollout batch needs "
                        f"({sizes.global_prompts} = {p.per_device_rollout_batch_size} / ppo.samples_per_prompt "
                        f"{p.samples_per_prompt} x {sizes.world} processes)")
    if p.rollout_engine == "vllm":  # an engine environment that is missing: said before anything is written
        from rlhf.generation.vllm_engine import find_python

        find_python(cfg.vllm.python)
    reward_given = reward is not None
    reward_name = type(reward).__name__ if reward_given else cfg.reward.spec  # as the user named it
    if reward is None:
        from reward.interface import load_reward

        with unpartitioned(accelerator):  # a frozen scorer: whole on every process
            reward = load_reward(cfg.reward.spec, kind=cfg.reward.kind, label=cfg.reward.label,
                                 batch_size=cfg.reward.batch_size, device=accelerator.device,
                                 allow_pickle_weights=cfg.model.allow_pickle_weights)
    tokenizer, ac, base_path = build_models(cfg, accelerator.is_main_process, accelerator,
                                            reward_given=reward_given)
    stop_id = None if p.stop_token is None else (
        tokenizer.eos_token_id if p.stop_token == "eos" else tokenizer.convert_tokens_to_ids(p.stop_token))
    check_stop_token(p.stop_token, tokenizer.get_vocab())  # else "no stop token" and an EOS rate of 1.0
    if stop_id is not None and stop_id == tokenizer.pad_token_id:
        raise UserError("ppo.stop_token must differ from the PAD token")
    evaluator = None  # its prompts and judge load before anything is written: a bad one leaves nothing
    if cfg.eval.prompts is not None:
        evaluator = HeldOutEval(cfg.eval, reward, p.temperature, p.max_new_tokens, p.max_prompt_length,
                                accelerator, out)

    normalization = _reward_normalization(p.reward_normalization, reward, accelerator.is_main_process)
    groups = ac.parameter_groups()  # {"policy": [...], "critic": [...]}, trainable only
    trainable = sum(getattr(q, "ds_numel", q.numel()) for g in groups.values() for q in g)  # ZeRO-3: 0 local
    critic_lr = p.learning_rate if p.critic_learning_rate is None else p.critic_learning_rate
    param_groups = [{"params": groups["policy"], "lr": p.learning_rate}]
    if ac.has_critic:
        param_groups.append({"params": groups["critic"], "lr": critic_lr})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=p.weight_decay, eps=1e-5)
    model_bytes = _model_bytes(ac)  # parameters and buffers held by this process (no critic: less)
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
    model, optimizer = accelerator.prepare(ac, optimizer)  # the scheduler is saved as JSON (ppo_state.json)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()

    kl_ctl = (core.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else core.FixedKLController(p.kl_coef))
    moments = core.RunningMoments()
    history: list[dict] = []
    start_step = 0
    if resume_from is not None:
        with checkpoints.tensor_only_loads(resume_from):  # DeepSpeed's own torch.load: tensors only
            accelerator.load_state(resume_from)
        checkpoints.load_rng_state(resume_from, accelerator.process_index)
        state = json.loads((Path(resume_from) / STATE_FILE).read_text())
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = state["step"], state["history"]
        kl_ctl.load_state_dict(state["kl_ctl"])
        moments.load_state_dict(state["reward_moments"])
        accelerator.print(f"resumed from {resume_from} at step {start_step}")

    if accelerator.is_main_process:
        config.save(cfg, out / "rlhf_config.yaml")
        with open(out / "metrics.jsonl", "w") as f:  # a resumed run rewrites what its checkpoint knew
            f.writelines(json.dumps(m) + "\n" for m in history)
    run = tracking.start(cfg.tracking, config.to_dict(cfg), cfg.output_dir, accelerator.is_main_process)
    accelerator.print(f"ppo: peft.method={cfg.peft.method}, {len(prompts)} prompts, {sizes.world} process(es), "
                      f"rollout {sizes.global_rollout}/step, trainable parameters {trainable:,}")

    if evaluator is not None:
        evaluator.restore(history)
        if start_step == 0:  # the starting policy: the "before" of every report
            if accelerator.is_main_process:
                (out / "eval_samples.jsonl").unlink(missing_ok=True)
            m = {"step": 0, **evaluator(0, model, tokenizer, stop_id, cfg.seed)}
            history.append(m)
            _log_row(accelerator, run, out, m)
            unwrapped.eval()

    rank = accelerator.process_index
    sum_over_processes = (lambda t: accelerator.reduce(t, "sum")) if sizes.world > 1 else None  # noqa: E731
    engine = None
    if p.rollout_engine == "vllm":
        from rlhf.generation.vllm_engine import (
            Sampling,
            logprob_diff,
            node_weights_file,
            pad_responses,
            request_seeds,
        )

        engine = start_engine(cfg, base_path, accelerator, out)
        cleanup.callback(engine.close)  # also removes the engine's folder, with the weights file in it
        weights_file = node_weights_file(engine, accelerator)
        engine_sampling = Sampling(p.temperature, p.top_p, p.max_new_tokens, stop_id)
        accelerator.print(f"ppo: vLLM engine started in {engine.start_seconds:.1f} s (log: {engine.log_path})")
    eos_history: list[float] = []
    bar = Progress(range(start_step, p.steps), initial=start_step, total=p.steps, desc="ppo",
                   disable=not accelerator.is_main_process)
    for step in bar:
        t0 = time.perf_counter()
        # The data position is a function of the step: an epoch-seeded permutation, this rank's slice.
        per_epoch = len(prompts) // sizes.global_prompts
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        idx = perm[k * sizes.global_prompts + rank * sizes.local_prompts:][:sizes.local_prompts]
        batch_prompts = [prompts[i] for i in idx.tolist() for _ in range(p.samples_per_prompt)]

        # 1. rollout
        encoded = encode_prompts(tokenizer, batch_prompts, p.max_prompt_length)
        query_ids, query_mask = left_pad(encoded, tokenizer.pad_token_id)
        query_ids, query_mask = query_ids.to(accelerator.device), query_mask.to(accelerator.device)
        if engine is not None:  # the engine serves the weights of the last update (synced after it)
            engine.wake_up()
            if step == start_step:
                sync_engine(engine, model, accelerator, step, weights_file)
            tokens, token_logprobs = engine.generate(encoded, engine_sampling,
                                                     request_seeds(cfg.seed, step, rank, len(encoded)))
            engine.sleep()
            responses, engine_logprobs = pad_responses(tokens, token_logprobs, tokenizer.pad_token_id,
                                                       accelerator.device)
        else:
            with _generation_context(model, accelerator) as gen_model, accelerator.autocast():
                responses = generate(gen_model.generation_model(), query_ids, query_mask, p, stop_id,
                                     tokenizer.pad_token_id, with_logprobs=p.logprobs_from_generation)
        if p.logprobs_from_generation:
            responses, sampled_logprobs = responses
        if stop_id is not None:
            responses, response_mask = core.truncate_after_stop_token(responses, stop_id, tokenizer.pad_token_id)
        else:
            response_mask = responses != tokenizer.pad_token_id
        # every later forward runs at prompt + the longest real response, not prompt + max_new_tokens
        longest = max(int(response_mask.sum(-1).max()), 1)
        responses, response_mask = responses[:, :longest], response_mask[:, :longest]
        if p.logprobs_from_generation:
            sampled_logprobs = sampled_logprobs[:, :longest].masked_fill(~response_mask, 0.0)
        if engine is not None:
            engine_logprobs = engine_logprobs[:, :longest]
        contains_eos = (responses == stop_id).any(-1) if stop_id is not None else torch.ones_like(response_mask[:, 0])
        t_gen = time.perf_counter()

        # 2. logprobs and values of the sampled responses
        ids = torch.cat([query_ids, responses], 1)
        mask = torch.cat([query_mask, response_mask.long()], 1)
        logprobs, ref_logprobs, values, entropy = forward_rollout(
            model, ids, mask, position_ids(mask), responses, query_ids.shape[1], p.temperature, sizes.forward,
            entropy=True, policy=not p.logprobs_from_generation)
        if p.logprobs_from_generation:
            logprobs = sampled_logprobs
        engine_metrics = {}
        if engine is not None:  # is the engine serving the policy's weights?
            diff_mean, diff_max = logprob_diff(engine_logprobs, logprobs, response_mask)
            diffs = accelerator.gather(torch.tensor([[diff_mean, diff_max]], device=accelerator.device))
            engine_metrics = {"rollout/logprob_diff": diffs[:, 0].mean().item(),
                              "rollout/logprob_diff_max": diffs[:, 1].max().item()}
            if engine_metrics["rollout/logprob_diff"] > cfg.vllm.max_logprob_diff:
                from rlhf.generation.vllm_engine import EngineError

                raise EngineError(
                    f"step {step}: the vLLM engine's sampled-token logprobs differ from the policy's by "
                    f"{engine_metrics['rollout/logprob_diff']:.4g} nats on average (max "
                    f"{engine_metrics['rollout/logprob_diff_max']:.4g}), above vllm.max_logprob_diff="
                    f"{cfg.vllm.max_logprob_diff}: it is not serving the policy's weights (a stale sync, or a "
                    "dtype gap: vllm.dtype); the run stops rather than train off-policy")
        t_fwd = time.perf_counter()

        # 3. score
        texts = tokenizer.batch_decode(responses.masked_fill(~response_mask, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
        raw = torch.as_tensor(reward.score(batch_prompts, texts), dtype=torch.float32).to(accelerator.device)
        if normalization == "model":  # the stored statistics applied to the one scoring pass
            mean, std = reward.normalization
            scores = (raw - mean) / std
        else:
            scores = raw.clone()
        refuse_all_non_finite(accelerator.gather(scores), reward, reward_name)  # every process, or none, stops
        nan = ~torch.isfinite(scores)
        if nan.any():
            warnings.warn(f"step {step}: {int(nan.sum())} reward(s) are NaN/inf; they count as 0 this step")
            scores = scores.masked_fill(nan, 0.0)
        if normalization == "running":
            moments.update(accelerator.gather(scores))
            scores = (scores - moments.mean) / max(moments.std, 1e-8)
        if p.reward_clip is not None:
            scores = scores.clamp(-p.reward_clip, p.reward_clip)
        scores = core.missing_eos_penalty(scores, contains_eos, p.missing_eos_penalty)
        t_score = time.perf_counter()

        # 4-5. KL-penalised per-token rewards, GAE
        kl = core.kl_estimate(logprobs, ref_logprobs, p.kl_estimator) * response_mask
        r = Rollout(batch_prompts, query_ids, query_mask, responses, response_mask, logprobs, ref_logprobs,
                    values, scores, raw, kl)
        kl_in_reward = kl_ctl.value if p.kl_penalty == "reward" else 0.0
        r.rewards = core.per_token_rewards(scores, kl, response_mask, kl_in_reward)
        r.advantages, r.returns = advantages(r.rewards, values, response_mask, p, sum_over_processes)

        # 6. update
        train_stats = ppo_update(accelerator, model, optimizer, scheduler, r, p,
                                 sizes, torch.Generator().manual_seed(cfg.seed * 1000003 + step), kl_ctl.value)
        t_train = time.perf_counter()
        if engine is not None and step + 1 < p.steps:  # the next rollout samples from the updated policy
            engine.wake_up()
            sync_engine(engine, model, accelerator, step + 1, weights_file)
            engine.sleep()
        t_sync = time.perf_counter() if engine is not None else t_train

        # metrics (means over every process)
        seq_kl = kl.sum(-1)
        g = lambda x: accelerator.gather(x.detach().float().reshape(-1)).mean().item()  # noqa: E731
        n_tokens = accelerator.gather(mask.sum().reshape(1)).sum().item()
        metrics = {
            "step": step + 1,
            "objective/scores": g(raw),
            "objective/scores_normalized": g(scores),
            "objective/kl": g(seq_kl),
            "objective/non_score_reward": g(-kl_ctl.value * seq_kl),
            "objective/rlhf_reward": g(scores - kl_ctl.value * seq_kl),
            "objective/kl_coef": kl_ctl.value,
            "objective/nan_scores": g(nan.float()),
            **({"val/explained_variance": g(core.explained_variance(values, r.returns, response_mask)),
                "val/mean": g(core.masked_mean(values, response_mask)),
                "val/returns_mean": g(core.masked_mean(r.returns, response_mask))} if values is not None else {}),
            "policy/advantages_mean": g(core.masked_mean(r.advantages, response_mask)),
            "policy/advantages_std": g(core.masked_var(r.advantages, response_mask).sqrt()),
            "response/length": g(response_mask.sum(-1)),
            "response/eos_rate": g(contains_eos.float()),
            **({"policy/entropy": g(core.masked_mean(entropy, response_mask))} if entropy is not None else {}),
            **{k: g(torch.tensor(v)) for k, v in train_stats.items()},
            "lr": scheduler.get_last_lr()[0],
            **({"lr_critic": scheduler.get_last_lr()[1]} if ac.has_critic else {}),
            "time/generate": t_gen - t0,
            "time/forward": t_fwd - t_gen,
            "time/score": t_score - t_fwd,
            "time/train": t_train - t_score,
            **({"time/sync": t_sync - t_train} if engine is not None else {}),
            "time/step": t_sync - t0,
            "tokens_per_second": n_tokens / (t_sync - t0),
            **engine_metrics,
            "memory/peak_gb": peak_memory_gb(),
            "memory/model_gb": model_bytes / 1e9,
        }
        kl_ctl.update(metrics["objective/kl"], sizes.global_rollout)
        if evaluator is not None and evaluator.due(step + 1, p.steps):
            metrics.update(evaluator(step + 1, model, tokenizer, stop_id, cfg.seed))
            unwrapped.eval()
        if on_step is not None:
            metrics.update(on_step(step + 1, unwrapped, tokenizer) or {})
            unwrapped.eval()
        history.append(metrics)
        _warn(metrics, eos_history, step, p.max_new_tokens)
        _log_row(accelerator, run, out, metrics)
        if accelerator.is_main_process:
            bar.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                _log_samples(run, tokenizer, batch_prompts, texts, raw, cfg.num_samples, step + 1)

        if save and ((step + 1) % cfg.save_steps == 0 or step + 1 == p.steps):
            save_checkpoint(accelerator, out, step + 1,
                            {"step": step + 1, "history": history, "kl_ctl": kl_ctl.state_dict(),
                             "scheduler": scheduler.state_dict(),
                             "reward_moments": moments.state_dict()}, cfg.save_total_limit)

    if save:
        export_models(accelerator, model, tokenizer, out, base_path)
    if accelerator.is_main_process and p.steps > start_step:
        train_rows = [m for m in history if "objective/scores" in m]
        first, last = train_rows[0], train_rows[-1]
        print(f"ppo done: score {first['objective/scores']:.4f} -> {last['objective/scores']:.4f}, "
              f"KL {first['objective/kl']:.4f} -> {last['objective/kl']:.4f}" + (f"; policy in {out / 'policy'}" if save else ""))
    tracking.finish(run)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the process group: ranks exit cleanly, not in a teardown race
    return history


def _log_row(accelerator, run, out: Path, metrics: dict) -> None:
    """One row of metrics to metrics.jsonl and W&B (main process)."""
    if accelerator.is_main_process:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if run is not None:
            run.log(metrics, step=metrics["step"])


@contextmanager
def _generation_context(model, accelerator):
    """The unwrapped ActorCritic, with (under ZeRO-3) only the policy's weights gathered for generation:
    not the critic's or the reference's."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield unwrapped
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(unwrapped.policy.parameters())):
        yield unwrapped


def _warn(m: dict, eos_history: list[float], step: int, max_new_tokens: int) -> None:
    if not eos_history and m["response/eos_rate"] < 0.5:
        warnings.warn(f"step {step + 1}: only {m['response/eos_rate']:.0%} of the responses ended with the stop token "
                      f"within ppo.max_new_tokens={max_new_tokens}: the rest are cut off and scored unfinished; "
                      "raise ppo.max_new_tokens (or check ppo.stop_token)")
    if m["objective/kl"] < -0.01:
        warnings.warn(f"step {step + 1}: objective/kl is negative ({m['objective/kl']:.4f}): the k1 estimate is "
                      "only unbiased for sampled tokens; check that sampling and logprobs use the same temperature")
    eos_history.append(m["response/eos_rate"])
    if len(eos_history) > 3 and max(eos_history[:3]) > 0.5 and m["response/eos_rate"] < 0.1:
        warnings.warn(f"step {step + 1}: the EOS rate collapsed to {m['response/eos_rate']:.2f}: responses run to "
                      "max_new_tokens; consider ppo.missing_eos_penalty")
    if not math.isfinite(m["objective/scores"]):
        warnings.warn(f"step {step + 1}: the reward is NaN")


def _log_samples(run, tokenizer, prompts, texts, scores, n, step) -> None:
    rows = [(p[-1]["content"], t, float(s)) for p, t, s in zip(prompts[:n], texts[:n], scores[:n])]
    print(f"\nsamples at step {step}:")
    for prompt, text, score in rows:
        print(f"  [{score:+.3f}] {prompt[:60]!r} -> {text[:80]!r}")
    if run is not None:
        import wandb

        run.log({"samples": wandb.Table(columns=["prompt", "response", "score"], data=rows)}, step=step)
