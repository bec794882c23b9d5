"""PPO's models: the tokenizer and the ActorCritic (policy, critic, reference; see
policies/actor_critic.py), the reward, and the policy as the rollout engines see it."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf.errors import UserError
from rlhf.ppo.config import PPOConfig, uses_critic


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


def load_reward_model(cfg: PPOConfig, accelerator):
    """The reward of `cfg.reward` (a reward model, classifier or function), whole on every process."""
    from reward.interface import load_reward

    with unpartitioned(accelerator):  # a frozen scorer: whole on every process
        return load_reward(cfg.reward.spec, kind=cfg.reward.kind, label=cfg.reward.label,
                           batch_size=cfg.reward.batch_size, device=accelerator.device,
                           allow_pickle_weights=cfg.model.allow_pickle_weights)


@contextmanager
def policy_for_generation(model, accelerator):
    """The policy as an engine samples or copies it: the module `.generate` is called on (its adapter
    active), under the accelerator's autocast; under ZeRO-3 with only the policy's weights gathered, not
    the critic's or the reference's."""
    unwrapped = accelerator.unwrap_model(model)
    plugin = accelerator.state.deepspeed_plugin
    with accelerator.autocast():
        if plugin is None or plugin.zero_stage != 3:
            yield unwrapped.generation_model()
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(unwrapped.policy.parameters())):
            yield unwrapped.generation_model()


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds (ZeRO-3: its shards), each storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        t = getattr(t, "ds_tensor", None) if getattr(t, "ds_numel", None) is not None else t
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def context_length(cfg: PPOConfig) -> int:
    """The longest sequence an engine is asked to continue plus its new tokens: a prompt, or with an env
    an episode (up to env.max_total_tokens), + ppo.max_new_tokens."""
    return (cfg.env.max_total_tokens if cfg.env.spec else cfg.ppo.max_prompt_length) + cfg.ppo.max_new_tokens


def start_engine(cfg: PPOConfig, model, accelerator, tokenizer, base_path: str):
    """The rollout engine of `ppo.rollout_engine`, sampling the policy `model` (the prepared ActorCritic):
    `hf` generates with it in this process; `vllm` runs an engine of its own per process, serving the
    policy's base (LoRA, the adapter handed over after each update) or its weights (full)."""
    from functools import partial

    from rlhf.generation.hf_engine import HFEngine

    p = cfg.ppo
    open_policy = partial(policy_for_generation, model, accelerator)
    if p.rollout_engine == "hf":
        return HFEngine(open_policy, tokenizer.pad_token_id, accelerator.device,
                        record_logprobs=p.logprobs_from_generation)
    from policies.models import torch_dtype
    from rlhf.generation import vllm_backend

    dtype = cfg.vllm.dtype if cfg.vllm.dtype != "auto" else \
        {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[torch_dtype(cfg.model)]
    rank, out = accelerator.process_index, Path(cfg.output_dir)
    engine = vllm_backend.start_for_training(
        cfg.vllm, base_path, dtype=dtype,
        max_model_len=cfg.vllm.max_model_len or context_length(cfg),
        lora_rank=None if cfg.peft.method == "full" else cfg.peft.r, max_num_seqs=p.per_device_rollout_batch_size,
        log_path=out / ("vllm_engine.log" if accelerator.num_processes == 1 else f"vllm_engine_{rank}.log"),
        device=accelerator.device, engine_seed=cfg.seed if cfg.vllm.seed is None else cfg.vllm.seed,
        seed=cfg.seed, accelerator=accelerator, pad_id=tokenizer.pad_token_id, open_policy=open_policy)
    accelerator.print(f"ppo: {engine.description}")
    return engine
