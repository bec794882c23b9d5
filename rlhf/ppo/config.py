"""PPO's configuration: the `ppo` block and the whole `rlhf ppo` config, and every batch size derived once.

Fields carry their defaults and documentation (rendered by `rlhf ppo --help`); `check()` holds the rules
that tie fields together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from policies.config import ModelConfig, PeftConfig
from rlhf.config import (
    AnyNumber,
    NonNegative,
    NonNegativeInt,
    Positive,
    PositiveInt,
    Probability,
    PromptFormat,
    SchedulerName,
    Seed,
    TrackingConfig,
    Unit,
    WarmupSteps,
)
from rlhf.envs.config import EnvConfig
from rlhf.errors import UserError
from rlhf.evaluation.heldout import EvalConfig
from rlhf.generation.vllm_engine import VLLMConfig


@dataclass
class PromptDataConfig:
    """Prompts to roll out on."""

    train: str = "builtin:quickstart_prompts"
    """Prompt source: local .jsonl/.json/.csv/.parquet, `builtin:NAME`, or a hub dataset. Rows with
    `messages` (the turns up to the last user turn are the prompt), `prompt` (text or messages), or
    any preference format of `rlhf data check` (HH-RLHF, UltraFeedback, ...: its prompts are used)."""
    format: PromptFormat = "auto"
    """`auto`, `messages`, `prompt`, or a preference format name (`hh_rlhf`, `ultrafeedback_binarized`, ...)."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Rename source columns first, {column in the file: name read}, e.g. `{question: prompt}`; for a
    preference format too, e.g. `{q: prompt, good: chosen, bad: rejected}`."""
    split: str = "train"
    """Split of a hub dataset."""
    max_samples: PositiveInt[Optional[int]] = None
    """Use only the first N prompts."""


@dataclass
class RewardSpec:
    """What scores a response: a reward-model or classifier directory, or `module:function`."""

    spec: str = "runs/reward_tiny"
    """Reward-model directory (`rlhf reward` output), classifier directory (`rlhf classifier`),
    or a Python function `module:function` / `path/file.py:function` taking (prompts, responses)."""
    kind: Literal["auto", "preference", "classifier", "function"] = "auto"
    """What `spec` is; `auto` tells from the directory's files or the `:`."""
    label: Optional[str] = None
    """Classifier rewards: the label whose probability is the reward (e.g. `not_toxic`)."""
    batch_size: PositiveInt[int] = 16
    """Responses scored per forward pass."""


@dataclass
class PPOHyperparameters:
    """The algorithm's knobs (names as in the papers and TRL)."""

    steps: PositiveInt[int] = 100
    """PPO iterations (rollout + update)."""
    per_device_rollout_batch_size: PositiveInt[int] = 16
    """Responses rolled out per process per iteration (prompts x samples_per_prompt)."""
    samples_per_prompt: PositiveInt[int] = 1
    """Responses sampled per prompt in a rollout batch (each prompt repeated in a row): a dataset with
    few distinct prompts still fills a batch, and a prompt's responses are compared with each other."""
    num_mini_batches: PositiveInt[int] = 1
    """Mini-batches the rollout batch is split into for each PPO epoch (one optimizer step each)."""
    gradient_accumulation_steps: PositiveInt[int] = 1
    """Micro-batches per mini-batch (memory knob; the update is the same, up to float rounding)."""
    ppo_epochs: PositiveInt[int] = 4
    """Passes over each rollout batch."""
    learning_rate: NonNegative[float] = 1e-5
    """Peak learning rate of the policy."""
    critic_learning_rate: NonNegative[Optional[float]] = None
    """Peak learning rate of the critic (adapter or model, and value head); None: `learning_rate`. A fresh
    critic's gradients are much larger than the policy's: its own rate and clip keep them from setting
    the policy's step (OpenRLHF's `critic_learning_rate`)."""
    lr_scheduler_type: SchedulerName[str] = "linear"
    """transformers scheduler name over all optimizer steps (`linear`, `cosine`, `constant`, ...)."""
    warmup_steps: WarmupSteps[float] = 0
    """Warm-up optimizer steps, or a fraction in [0, 1) of all of them."""
    max_grad_norm: NonNegative[float] = 1.0
    """Gradient clipping norm of the policy's parameters (0: no clipping). Under DeepSpeed the engine
    clips the norm of all gradients together at this value."""
    critic_max_grad_norm: NonNegative[Optional[float]] = None
    """Gradient clipping norm of the critic's parameters, clipped separately (None: `max_grad_norm`)."""
    temperature: Positive[float] = 0.7
    """Sampling temperature; logprobs are computed at the same temperature (so > 0: PPO trains on sampled
    responses and their logprobs)."""
    top_p: Probability[float] = 1.0
    """Nucleus sampling."""
    max_new_tokens: PositiveInt[int] = 32
    """Longest response."""
    max_prompt_length: PositiveInt[int] = 256
    """Prompts are cut to their last N tokens."""
    stop_token: Optional[str] = "eos"
    """The response ends at this token (`eos`: the tokenizer's EOS); None: run to max_new_tokens."""
    kl_coef: NonNegative[float] = 0.05
    """Per-token KL penalty coefficient (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator (Schulman, "Approximating KL divergence")."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al. 2019)."""
    kl_target: Positive[float] = 6.0
    """Adaptive KL: target KL per sequence."""
    kl_horizon: PositiveInt[int] = 10000
    """Adaptive KL: horizon (in samples) of the proportional controller."""
    reward_normalization: Literal["auto", "none", "running", "model"] = "auto"
    """Normalise scores by the reward model's stored statistics (`model`, mean 0 std 1 on its reference
    responses, as in the N+ implementation details), by running statistics of this run (`running`), or
    not at all. `auto`: `model` when the reward stores statistics, else `running`. The value head and
    `cliprange_value` then work on that normalised scale."""
    reward_clip: Positive[Optional[float]] = None
    """Clip (normalised) scores to [-reward_clip, reward_clip]."""
    missing_eos_penalty: AnyNumber[Optional[float]] = 1.0
    """Subtract this from the (normalised) score of a response that never emitted the stop token (the N+
    details' EOS trick: otherwise a policy learns to ramble up to max_new_tokens); None: no penalty."""
    gamma: Unit[float] = 1.0
    """Discount."""
    lam: Unit[float] = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the rollout batch of all processes (gae and
    reinforce_pp; rloo and grpo have their group baselines)."""
    cliprange: Positive[float] = 0.2
    """Policy ratio clip."""
    cliprange_value: Positive[Optional[float]] = 0.2
    """Value clip around the rollout values (None: unclipped value loss)."""
    vf_coef: NonNegative[float] = 0.1
    """Weight of the value loss."""
    entropy_coef: NonNegative[float] = 0.0
    """Entropy bonus weight (0: none)."""
    weight_decay: NonNegative[float] = 0.0
    """AdamW weight decay."""
    logprobs_from_generation: Union[Literal["auto"], bool] = "auto"
    """Where the rollout's policy logprobs (and the `policy/entropy` metric) come from. `true`: recorded
    by the HF engine as it samples each token, so the rollout runs two forward passes (reference, critic)
    instead of three (TRL 1.12's PPO does the same); `false`: a forward pass over the sampled sequences.
    `auto`: `true` with the HF engine in float32, where incremental decoding and the full forward agree to
    about 1e-6 nats, else `false` (in bf16/fp16 they differ by about 1e-2, which would show as a first-epoch
    ratio off 1 and as noise in the KL). Taken from generation, they are checked at every update at no
    cost: the first mini-batch's training forward runs before any optimizer step, so it recomputes them
    (`rollout/logprob_diff`, `rollout/logprob_diff_max`), and a mean gap above `vllm.max_logprob_diff`
    stops the run. The vLLM engine's logprobs are always recomputed and compared."""
    forward_batch_size: PositiveInt[Optional[int]] = None
    """Sequences per no-grad forward in the rollout (None: the whole local batch)."""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """What samples the rollouts: `hf` (transformers' generate on the trained model) or `vllm` (a vLLM
    engine in its own process, settings under `vllm:`; a LoRA policy is handed to it as an adapter after
    each update, full weights are loaded into it). The trainer recomputes the logprobs either way and logs
    `rollout/logprob_diff`, the engine's disagreement with it."""
    advantage_estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = "gae"
    """How actions are credited. `gae`: PPO with a critic (value head, GAE; Schulman et al. 2015).
    Critic-free, building no critic adapter, critic model or value head: `rloo` (leave-one-out baseline
    over a prompt's responses; Ahmadian et al. 2024), `grpo` (group mean and std; Shao et al. 2024),
    `reinforce_pp` (REINFORCE++: per-token returns whitened over the global batch; Hu 2025). `rloo` and
    `grpo` need ppo.samples_per_prompt >= 2. All keep the clipped ratio over ppo_epochs."""
    grpo_std_normalization: bool = True
    """GRPO: divide each group's centred rewards by its std (the paper); false: centre only (Dr. GRPO,
    Liu et al. 2025, which finds the division favours prompts whose responses barely differ)."""
    kl_penalty: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference enters: `reward` (-kl_coef x KL per token in the reward, Ziegler et
    al. 2019; with rloo/grpo summed into the sequence reward before the baseline) or `loss` (kl_coef x
    the ppo.kl_estimator of the current policy added to the loss per token, as GRPO does with k3; needs
    k2 or k3)."""
    critic_init: Literal["auto", "policy", "reward"] = "auto"
    """Start the critic from the policy (value head random), or from the reward model (InstructGPT, N+
    details): its LoRA adapter becomes the critic adapter (same base as the policy required) or, in full
    mode, its body the critic; its score head becomes the value head. `auto`: from the reward model when
    reward.spec is one that fits (said at start-up), else from the policy."""


@dataclass
class PPOConfig:
    """PPO (`rlhf ppo`)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name_or_path="runs/sft_tiny"))
    """The initial policy: an SFT output (adapter or full model), any causal LM, or `tiny`."""
    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="lora", lora_dropout=0.0))
    """`lora`/`qlora`: policy and critic are two adapters on one shared base, the reference is the
    base with adapters off. `full`: full policy, separate critic, frozen reference copy."""
    reward: RewardSpec = field(default_factory=RewardSpec)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    ppo: PPOHyperparameters = field(default_factory=PPOHyperparameters)
    env: EnvConfig = field(default_factory=EnvConfig)
    """A multi-turn environment to act in (`env.spec` set): each rollout runs episodes from the rows of
    data.train (`reset(row, seed)`), ppo.max_new_tokens per agent turn, and the environment's rewards are
    the reward (reward.spec is not read). Empty spec: single-turn PPO on prompts, scored by reward.spec."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine, read when ppo.rollout_engine is `vllm`."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "runs/ppo"
    """Checkpoints, the final policy (and critic), metrics.jsonl, the resolved config."""
    seed: Seed[int] = 42
    """Seed of sampling, data order and initialisation."""
    resume: Optional[str] = None
    """`latest` (newest complete checkpoint in output_dir) or a checkpoint directory."""
    save_steps: PositiveInt[int] = 50
    """Checkpoint every N iterations (and at the end)."""
    save_total_limit: PositiveInt[int] = 2
    """Checkpoints kept."""
    sample_every: NonNegativeInt[int] = 10
    """Print (and log) a table of prompts and responses every N iterations (0: never)."""
    num_samples: PositiveInt[int] = 4
    """Rows in that table."""
    cpu_threads: PositiveInt[Optional[int]] = None
    """Intra-op threads per process on a CPU (None: the cores this process may use, shared between the
    local processes). Fixed rather than left to OpenMP so a run beside another job does not collapse."""


@dataclass
class BatchSizes:
    """Every batch size, derived once; inexact divisions are refused."""

    world: int
    local_rollout: int  # B per process
    global_rollout: int
    local_prompts: int  # B / samples_per_prompt distinct prompts per process
    global_prompts: int
    local_mini_batch: int
    micro_batch: int
    forward: int
    optimizer_steps: int  # over the whole run


def uses_critic(p: PPOHyperparameters) -> bool:
    """Only GAE needs a critic; the other estimators build none."""
    return p.advantage_estimator == "gae"


def batch_sizes(p: PPOHyperparameters, world: int) -> BatchSizes:
    b = p.per_device_rollout_batch_size
    if p.samples_per_prompt < 1 or b % p.samples_per_prompt:
        raise UserError(f"ppo.per_device_rollout_batch_size ({b}) must be a multiple of ppo.samples_per_prompt "
                        f"({p.samples_per_prompt}, at least 1)")
    if b % p.num_mini_batches:
        raise UserError(f"ppo.per_device_rollout_batch_size ({b}) must be divisible by ppo.num_mini_batches "
                        f"({p.num_mini_batches})")
    mini = b // p.num_mini_batches
    if mini % p.gradient_accumulation_steps:
        raise UserError(f"the mini-batch ({b} / {p.num_mini_batches} = {mini}) must be divisible by "
                        f"ppo.gradient_accumulation_steps ({p.gradient_accumulation_steps})")
    k = p.samples_per_prompt
    return BatchSizes(world=world, local_rollout=b, global_rollout=b * world, local_prompts=b // k,
                      global_prompts=b // k * world, local_mini_batch=mini,
                      micro_batch=mini // p.gradient_accumulation_steps, forward=p.forward_batch_size or b,
                      optimizer_steps=p.steps * p.ppo_epochs * p.num_mini_batches)


def check(cfg: PPOConfig) -> None:
    """Every field's domain (one pass, also for configs built in Python), then the rules between fields."""
    from rlhf.validate import fits_tiny, validate

    validate(cfg)
    p = cfg.ppo
    if cfg.env.spec:  # a turn is sampled after at most max_total_tokens - 1 tokens of episode
        fits_tiny(cfg.model, cfg.env.max_total_tokens + p.max_new_tokens, "env.max_total_tokens + ppo.max_new_tokens")
        if p.stop_token != "eos":
            raise UserError(f"ppo.stop_token={p.stop_token}: with an env, an agent turn ends at the tokenizer's EOS "
                            "(the chat template's end of turn); use `eos`")
    else:
        fits_tiny(cfg.model, p.max_prompt_length + p.max_new_tokens, "ppo.max_prompt_length + ppo.max_new_tokens")
    if cfg.peft.method not in ("lora", "qlora", "full"):
        raise UserError(f"peft.method={cfg.peft.method} is not supported by PPO; expected lora, qlora or full")
    if p.advantage_estimator in ("rloo", "grpo") and p.samples_per_prompt < 2:
        raise UserError(f"ppo.advantage_estimator={p.advantage_estimator} compares the responses to the same prompt: "
                        f"set ppo.samples_per_prompt to at least 2 (got {p.samples_per_prompt})")
    if not uses_critic(p) and p.critic_init == "reward":
        raise UserError(f"ppo.critic_init=reward: ppo.advantage_estimator={p.advantage_estimator} builds no critic; "
                        "use advantage_estimator=gae or critic_init=auto")
    if p.kl_penalty == "loss" and p.kl_estimator == "k1":
        raise UserError("ppo.kl_penalty=loss needs ppo.kl_estimator k3 (GRPO's) or k2: the gradient of the k1 "
                        "estimate is zero in expectation, so it would not hold the policy near the reference")
    if p.rollout_engine == "vllm" and p.logprobs_from_generation is True:
        raise UserError("ppo.logprobs_from_generation applies to rollout_engine hf; with vllm the trainer "
                        "recomputes the logprobs and compares the engine's (rollout/logprob_diff)")


def logprobs_from_generation(p: PPOHyperparameters, compute_dtype) -> bool:
    """What `ppo.logprobs_from_generation` resolves to (see the field) for a run computing in `compute_dtype`."""
    import torch

    if p.logprobs_from_generation != "auto":
        return bool(p.logprobs_from_generation)
    return p.rollout_engine == "hf" and compute_dtype == torch.float32
