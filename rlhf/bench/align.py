"""`rlhf bench align`: does RLHF improve what the preferences ask for? Measured against a known gold reward.

    rlhf bench align                      # 3 seeds, tiny model, CPU, a few minutes per seed
    rlhf bench align --seeds 0 --ppo_steps 40 --output_dir runs/bench_small

The task is the synthetic instruction corpus of `rlhf.data.synthetic`, whose correct answers are known, so
every response has a gold reward (`synthetic.gold_score`: 1 - edit distance to the right answer,
relative). For each seed:

1. SFT: the built-in tiny Llama learns the corpus (full fine-tuning).
2. Labels: for each of `pair_prompts` prompts the SFT policy samples two replies; a simulated labeller
   prefers one with Bradley–Terry probability sigmoid(bt_beta * gold difference). The best accuracy any
   reward model can reach on these labels (Bayes) is therefore known exactly.
3. Reward model: trained on those labels (started from the SFT model, as InstructGPT); its accuracy on held-out
   pairs is reported next to the Bayes accuracy of the same pairs.
4. The methods (`--methods`), each from the same SFT model with the same prompts and budget: our trainer
   with each advantage estimator (`ppo` with its GAE critic; critic-free `grpo`, `rloo`, `reinforce_pp`)
   optimising the reward model; `dpo` on the reward model's training pairs (no reward model);
   `trl_rloo`, TRL's RLOOTrainer; `best_of_n`, SFT samples ranked by the reward model (gold reward against
   the analytic KL log n - (n - 1) / n). Every `eval_every` iterations (DPO: at as many checkpoints) the
   policy is sampled on held-out prompts: its gold reward, the proxy (reward-model) score and its KL to
   the SFT policy. Each method's wall time and peak memory are recorded.

Over-optimisation (Gao et al. 2022) shows as the proxy score still rising while the gold reward falls.
The report (report.md, report.json, plots/*.png) gives per-seed numbers and means over seeds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from policies.config import ModelConfig, PeftConfig, TinyModelConfig
from rlhf.bench import align_math as bm
from rlhf.config import NonNegative, Positive, PositiveInt, Unit, domain
from rlhf.data import synthetic
from rlhf.errors import UserError
from rlhf.generation.engine import GenerationResult, decode
from rlhf.generation.hf_engine import HFEngine
from rlhf.generation.prompts import encode_prompts
from rlhf.generation.sampling import Sampling

ONLINE = {"ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}  # method -> estimator
GROUP = ("grpo", "rloo", "trl_rloo")  # sample group_size responses per prompt
METHODS = (*ONLINE, "dpo", "best_of_n", "trl_rloo")
LABELS = {"ppo": "PPO (ours, GAE critic)", "grpo": "GRPO (ours)", "rloo": "RLOO (ours)",
          "reinforce_pp": "REINFORCE++ (ours)", "dpo": "DPO (ours, TRL DPOTrainer)", "trl_rloo": "TRL RLOOTrainer",
          "best_of_n": "best-of-n"}
Seeds = domain(lambda v: len(v) >= 1 and all(0 <= s < 2 ** 32 for s in v), "at least one seed, each in [0, 2**32)")
Families = domain(lambda v: len(v) >= 1 and all(f in synthetic.FAMILIES for f in v),
                  f"some of {', '.join(synthetic.FAMILIES)}")
Methods = domain(lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(m in METHODS for m in v),
                 f"some of {', '.join(METHODS)}, each once")
TestFraction = domain(lambda v: 0 < v < 0.8, "a fraction in (0, 0.8)")
PowerOfTwo = domain(lambda v: v >= 1 and not v & (v - 1), "a power of two")



@dataclass
class BenchAlignConfig:
    """Gold-reward alignment benchmark (`rlhf bench align`)."""

    output_dir: str = "runs/bench_align"
    """Each seed's stages go to output_dir/seed_N; report.md, report.json and plots/ to output_dir."""
    seeds: Seeds[list[int]] = field(default_factory=lambda: [0, 1, 2])
    """One full run (SFT, labels, reward model, PPO, best-of-n, RLOO) per seed; headline numbers are means."""
    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(hidden_size=128, intermediate_size=256))
    """Shape of the tiny random-init Llama that is fine-tuned."""
    sft_rows: PositiveInt[int] = 4000
    """Synthetic conversations in the SFT corpus."""
    sft_steps: PositiveInt[int] = 400
    """SFT optimizer steps (batch 32)."""
    families: Families[list[str]] = field(default_factory=lambda: list(synthetic.QUICKSTART["families"]))
    """Task families of the corpus (`rlhf.data.synthetic.FAMILIES`); by default the quickstart's four."""
    chatty: Unit[float] = 0.6
    """Share of demonstrations that add an unasked remark to a right answer (reverse, capital tasks),
    which the gold reward (edit distance to the exact answer) penalises: room for RLHF above SFT."""
    pair_prompts: PositiveInt[int] = 3000
    """Prompts the SFT policy answers twice for preference labels (pairs with identical replies are dropped)."""
    bt_beta: Positive[float] = 8.0
    """Bradley–Terry inverse temperature of the simulated labeller: P(a > b) = sigmoid(bt_beta * (gold_a - gold_b)).
    Larger: less label noise, higher Bayes accuracy."""
    rm_steps: PositiveInt[int] = 400
    """Reward-model optimizer steps (batch 16)."""
    rm_peft: Literal["full", "lora"] = "full"
    """Reward model: full fine-tuning of the SFT model (better on this tiny model) or LoRA r=16."""
    rm_learning_rate: NonNegative[float] = 1e-3
    """Reward-model learning rate."""
    rm_test_fraction: TestFraction[float] = 0.2
    """Pairs held out to measure reward-model accuracy (another 10% pick the best checkpoint)."""
    methods: Methods[list[str]] = field(default_factory=lambda: list(METHODS))
    """What is compared on the same SFT model, prompts and budget: `ppo` (ours, GAE critic), `grpo`, `rloo`,
    `reinforce_pp` (ours, critic-free: `ppo.advantage_estimator`), `dpo` (ours, on the reward model's
    pairs), `best_of_n` (SFT samples ranked by the reward model), `trl_rloo` (TRL's RLOOTrainer)."""
    ppo_steps: PositiveInt[int] = 60
    """Iterations of every online method (ppo, grpo, rloo, reinforce_pp, trl_rloo)."""
    rollout_batch: PositiveInt[int] = 32
    """Responses sampled per iteration by every online method (group methods: rollout_batch / group_size
    prompts x group_size); also DPO's pairs per step."""
    group_size: PositiveInt[int] = 4
    """Responses per prompt of the group methods (grpo, rloo, trl_rloo): their baseline's group."""
    learning_rate: NonNegative[float] = 1e-3
    """LoRA learning rate of the online methods."""
    ppo_epochs: PositiveInt[int] = 1
    """Passes of our trainer over each rollout batch (every estimator). 1 pass of 1 mini-batch: as many
    optimizer steps as TRL RLOO, one per batch. (4 x 2, PPO's usual, at this learning rate moves the
    policy 8 times as far per batch: measured, it over-optimises the reward model on some seeds.)"""
    num_mini_batches: PositiveInt[int] = 1
    """Optimizer steps per pass of our trainer."""
    kl_coef: NonNegative[float] = 0.05
    """KL penalty coefficient of the online methods (TRL RLOO's beta). Small values let over-optimisation show."""
    dpo_steps: PositiveInt[int] = 120
    """DPO optimizer steps (batch rollout_batch pairs)."""
    dpo_beta: Positive[float] = 0.5
    """DPO's beta (its implicit KL strength). Measured at dpo_learning_rate 5e-4: 0.1 ran to a KL of 2-39
    nats and lost gold reward; 0.5 stays within 0.1 nats."""
    dpo_learning_rate: NonNegative[float] = 5e-4
    """DPO's LoRA learning rate."""
    eval_every: PositiveInt[int] = 10
    """Evaluate the policy (gold reward, proxy score, KL to SFT) every N iterations."""
    eval_prompts: PositiveInt[int] = 128
    """Held-out prompts for every evaluation and for best-of-n."""
    best_of_n: PowerOfTwo[int] = 16
    """Largest n of best-of-n (a power of two); n = 1, 2, 4, ... up to it."""
    max_new_tokens: PositiveInt[int] = 16
    """Longest response."""
    temperature: Positive[float] = 1.0
    """Sampling temperature of every policy, in training and evaluation (> 0: PPO trains on samples)."""
    rollout_engine: Literal["hf", "vllm"] = "hf"
    """What samples our PPO's rollouts (`ppo.rollout_engine`): the outcome should not depend on it."""


def check(cfg: BenchAlignConfig) -> None:
    """Every field's domain (one pass), then the rules between fields."""
    from rlhf.validate import validate

    validate(cfg)
    if any(m in GROUP for m in cfg.methods) and (cfg.group_size < 2 or cfg.rollout_batch % cfg.group_size):
        raise UserError(f"group_size must be at least 2 and divide rollout_batch ({cfg.rollout_batch}), "
                        f"got {cfg.group_size}")
    if cfg.rollout_batch % cfg.num_mini_batches:
        raise UserError(f"rollout_batch ({cfg.rollout_batch}) must be divisible by num_mini_batches "
                        f"({cfg.num_mini_batches})")


# ---------------------------------------------------------------------------------------------
# evaluation of a policy against the gold reward


class Evaluator:
    """Samples a policy on the held-out prompts; gold reward, proxy score, KL to the SFT policy."""

    def __init__(self, cfg: BenchAlignConfig, reference, prompts: list, proxy, seed: int):
        self.cfg = cfg
        self.reference = reference  # the SFT policy
        self.prompts, self.proxy, self.seed = prompts, proxy, seed

    @torch.no_grad()
    def __call__(self, policy, tokenizer) -> dict:
        from rlhf.evaluation.eval_policy import sequence_logprob

        was_training = policy.training
        policy.eval()
        kl = []
        # seeded in a fork of the RNG: the evaluation does not reset the training run's sampling
        gen = generate(policy, tokenizer, self.prompts, self.cfg, 64, self.seed)
        texts = decode(tokenizer, gen)
        for b in gen.chunks(64):  # (b, P), (b, A)
            args = (b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask, self.cfg.temperature)
            kl += (sequence_logprob(policy, *args) - sequence_logprob(self.reference, *args)).tolist()
        policy.train(was_training)
        gold = synthetic.gold_reward(self.prompts, texts)
        gold_mean, gold_se = bm.mean_and_se(gold)
        proxy = self.proxy.score(self.prompts, texts, normalize=True).float()
        return {"gold": gold_mean, "gold_se": gold_se, "proxy": proxy.mean().item(), "kl": sum(kl) / len(kl),
                "exact": gold.count(1.0) / len(gold),
                "sample": texts[0]}


# ---------------------------------------------------------------------------------------------
# one seed


def _corpus(cfg: BenchAlignConfig) -> dict:
    """Keyword arguments of `synthetic.conversation` for this benchmark's corpus."""
    return {**synthetic.QUICKSTART, "families": tuple(cfg.families)}


def _prompts(cfg: BenchAlignConfig, n: int, seed: int) -> list[list[dict]]:
    return [row["prompt"] for row in synthetic.prompt_rows(n, seed, **_corpus(cfg))]


def _train_prompts(cfg: BenchAlignConfig, seed: int) -> list[list[dict]]:
    """The prompts PPO and RLOO both train on."""
    return _prompts(cfg, max(cfg.rollout_batch * 20, 400), 60_000 + seed)


def generate(model, tok, prompts: list, cfg: BenchAlignConfig, batch_size: int, seed: int) -> GenerationResult:
    """`model`'s responses to `prompts` at the benchmark's sampling options, stopping at EOS."""
    engine = HFEngine.for_model(model, tok.pad_token_id, batch_size=batch_size)
    sampling = Sampling(cfg.temperature, 1.0, cfg.max_new_tokens, tok.eos_token_id)
    return engine.generate(encode_prompts(tok, prompts, 256), sampling, seed=seed)


def sample_texts(model, tok, prompts: list, cfg: BenchAlignConfig, batch_size: int, seed: int) -> list[str]:
    return decode(tok, generate(model, tok, prompts, cfg, batch_size, seed))


def run_sft(cfg: BenchAlignConfig, out: Path, seed: int) -> str:
    from rlhf.config import DataConfig, SFTConfig, TrainConfig
    from rlhf.stages import sft

    data = out / "data" / "sft.jsonl"
    synthetic.write_jsonl(synthetic.sft_rows(cfg.sft_rows, seed=10_000 + seed, chatty=cfg.chatty, **_corpus(cfg)), data)
    sft.main(SFTConfig(
        model=ModelConfig(name_or_path="tiny", tiny=cfg.model), peft=PeftConfig(method="full"),
        data=DataConfig(train=str(data), validation_split=0.05),
        train=TrainConfig(learning_rate=3e-3, max_steps=cfg.sft_steps, per_device_train_batch_size=32,
                          max_length=128, warmup_steps=0.05, logging_steps=25, eval_steps=max(cfg.sft_steps // 4, 1)),
        output_dir=str(out / "sft"), seed=seed))
    return str(out / "sft")


def label_pairs(cfg: BenchAlignConfig, sft, tok, out: Path, seed: int) -> dict:
    """Two samples per prompt from the SFT policy `sft`, gold-scored, labelled under Bradley–Terry
    noise; split into reward-model train / validation / test files."""
    prompts = _prompts(cfg, cfg.pair_prompts, 20_000 + seed)
    replies = [sample_texts(sft, tok, prompts, cfg, 64, 30_000 + s) for s in (seed, seed + 1)]
    keep = [i for i, (a, b) in enumerate(zip(*replies)) if a.strip() != b.strip()]
    prompts = [prompts[i] for i in keep]
    a, b = [replies[0][i] for i in keep], [replies[1][i] for i in keep]
    gold_a = torch.tensor(synthetic.gold_reward(prompts, a), dtype=torch.float64)
    gold_b = torch.tensor(synthetic.gold_reward(prompts, b), dtype=torch.float64)
    a_wins = bm.sample_bt_labels(gold_a, gold_b, cfg.bt_beta, torch.Generator().manual_seed(40_000 + seed))
    rows = [{"prompt": p, "chosen": x if w else y, "rejected": y if w else x, "margin": None,
             "gold_chosen": float(ga if w else gb), "gold_rejected": float(gb if w else ga)}
            for p, x, y, ga, gb, w in zip(prompts, a, b, gold_a, gold_b, a_wins.tolist())]
    n_test, n_val = int(len(rows) * cfg.rm_test_fraction), int(len(rows) * 0.1)
    if n_test < 20 or len(rows) - n_test - n_val < 50:
        raise UserError(f"only {len(rows)} pairs with distinct replies from {cfg.pair_prompts} prompts; "
                        "raise pair_prompts")
    splits = {"test": rows[:n_test], "validation": rows[n_test:n_test + n_val], "train": rows[n_test + n_val:]}
    for name, part in splits.items():
        synthetic.write_jsonl([{k: r[k] for k in ("prompt", "chosen", "rejected", "margin")} for r in part],
                              out / "data" / f"prefs_{name}.jsonl")
    return splits


def run_reward(cfg: BenchAlignConfig, sft_dir: str, out: Path, seed: int) -> str:
    from rlhf.config import PreferenceDataConfig, RewardConfig, RewardTrainConfig
    from rlhf.stages import reward_stage

    reward_stage.main(RewardConfig(
        model=ModelConfig(name_or_path=sft_dir), peft=PeftConfig(method=cfg.rm_peft, r=16, lora_alpha=32, lora_dropout=0.0),
        data=PreferenceDataConfig(train=str(out / "data" / "prefs_train.jsonl"), format="pairs",
                                  validation=str(out / "data" / "prefs_validation.jsonl")),
        train=RewardTrainConfig(learning_rate=cfg.rm_learning_rate, max_steps=cfg.rm_steps, warmup_steps=20, per_device_train_batch_size=16,
                                per_device_eval_batch_size=64, max_length=128, lr_scheduler_type="cosine",
                                logging_steps=50, eval_steps=max(cfg.rm_steps // 3, 1), metric_for_best_model="accuracy"),
        output_dir=str(out / "reward"), seed=seed))
    return str(out / "reward")


def reward_accuracy(proxy, test: list[dict], beta: float) -> dict:
    """Reward-model accuracy on held-out pairs against the noisy labels and against the gold order,
    next to the Bayes-optimal accuracy of the same pairs."""
    prompts = [r["prompt"] for r in test]
    sc = proxy.score(prompts, [r["chosen"] for r in test]).double()
    sr = proxy.score(prompts, [r["rejected"] for r in test]).double()
    gc = torch.tensor([r["gold_chosen"] for r in test], dtype=torch.float64)
    gr = torch.tensor([r["gold_rejected"] for r in test], dtype=torch.float64)
    agrees = (sc > sr).double() + 0.5 * (sc == sr).double()
    differ = gc != gr
    gold_order = ((sc > sr) == (gc > gr)).double()[differ]
    return {"pairs": len(test), "accuracy": agrees.mean().item(), "accuracy_se": agrees.std().item() / math.sqrt(len(test)),
            "bayes_accuracy": bm.bayes_accuracy(gc, gr, beta),
            "gold_order_accuracy": gold_order.mean().item() if len(gold_order) else float("nan")}


def best_of_n_curve(cfg: BenchAlignConfig, sft, tok, prompts: list, proxy, seed: int) -> list[dict]:
    """N = cfg.best_of_n samples per prompt from the SFT policy, then best-of-n for n = 1, 2, 4, ... N."""
    N = cfg.best_of_n
    repeated = [p for p in prompts for _ in range(N)]
    texts = sample_texts(sft, tok, repeated, cfg, 128, 50_000 + seed)
    gold = torch.tensor(synthetic.gold_reward(repeated, texts)).reshape(len(prompts), N)
    score = proxy.score(repeated, texts, normalize=True).float().reshape(len(prompts), N)
    curve, n = [], 1
    while n <= N:
        g, g_se = bm.best_of_n(score, gold, n)
        curve.append({"n": n, "kl": bm.best_of_n_kl(n), "gold": g, "gold_se": g_se,
                      "proxy": bm.best_of_n(score, score, n)[0]})
        n *= 2
    return curve


class PeakMemory:
    """Peak memory while a method runs: on CUDA the allocator's peak (reset at the start); on a CPU this
    process's resident set size, sampled every `interval` s by a background thread (the process's RSS
    includes what was loaded before the method started)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_gb = interval, 0.0

    @staticmethod
    def rss_gb() -> float:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return kb * 1024 / 1e9

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_gb = max(self.peak_gb, self.rss_gb())

    def __enter__(self) -> "PeakMemory":
        import threading

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak_gb = self.rss_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak_gb = torch.cuda.max_memory_allocated() / 1e9
            return
        self._stop.set()
        self._thread.join()
        self.peak_gb = max(self.peak_gb, self.rss_gb())


def estimator(method: str, group_size: int) -> dict:
    """The `ppo` fields that make our trainer run the online `method`: its advantage estimator, and
    `group_size` samples per prompt for the group methods (one for the others)."""
    return {"advantage_estimator": ONLINE[method], "samples_per_prompt": group_size if method in GROUP else 1}


def run_online(cfg: BenchAlignConfig, method: str, sft_dir: str, proxy, evaluator: Evaluator, out: Path,
               seed: int, prompts_file: Path) -> list[dict]:
    """Our trainer with the method's advantage estimator (`ppo.advantage_estimator`): the same prompts
    (`prompts_file`), responses per iteration, LoRA, learning rate, epochs and KL coefficient for each."""
    from rlhf import ppo

    evals = []

    def on_step(step, ac, tokenizer):
        if step % cfg.eval_every and step != cfg.ppo_steps:
            return None
        e = {"step": step, **evaluator(ac.generation_model(), tokenizer)}
        evals.append(e)
        return {f"eval/{k}": v for k, v in e.items() if isinstance(v, float)}

    ppo.main(ppo.PPOConfig(
        model=ModelConfig(name_or_path=sft_dir), peft=PeftConfig(method="lora", r=16, lora_alpha=32, lora_dropout=0.0),
        data=ppo.PromptDataConfig(train=str(prompts_file)),
        ppo=ppo.PPOHyperparameters(steps=cfg.ppo_steps, per_device_rollout_batch_size=cfg.rollout_batch,
                                   num_mini_batches=cfg.num_mini_batches, ppo_epochs=cfg.ppo_epochs,
                                   learning_rate=cfg.learning_rate,
                                   temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, kl_coef=cfg.kl_coef,
                                   reward_normalization="model",
                                   missing_eos_penalty=None,  # the setting the README's figures were measured with
                                   **estimator(method, cfg.group_size),
                                   rollout_engine=cfg.rollout_engine),
        output_dir=str(out / method), seed=seed, save_steps=cfg.ppo_steps, save_total_limit=1, sample_every=0),
        reward=proxy, on_step=on_step)
    return evals


def run_dpo(cfg: BenchAlignConfig, sft_dir: str, tok, evaluator: Evaluator, out: Path, seed: int) -> list[dict]:
    """DPO (LoRA, the SFT model as reference) on the pairs the reward model learnt from, no reward model
    involved; its checkpoints along the way are evaluated like the online methods' iterations."""
    from peft import PeftModel

    from rlhf.config import DPOConfig, DPOOptions, DPOTrainConfig, PreferenceDataConfig
    from rlhf.evaluation.eval_policy import load_lm
    from rlhf.stages import dpo

    every = max(cfg.dpo_steps // max(cfg.ppo_steps // cfg.eval_every, 1), 1)  # as many points as the online paths
    dpo.main(DPOConfig(
        model=ModelConfig(name_or_path=sft_dir), peft=PeftConfig(method="lora", r=16, lora_alpha=32, lora_dropout=0.0),
        data=PreferenceDataConfig(train=str(out / "data" / "prefs_train.jsonl"), format="pairs",
                                  validation=str(out / "data" / "prefs_validation.jsonl")),
        train=DPOTrainConfig(learning_rate=cfg.dpo_learning_rate, max_steps=cfg.dpo_steps, warmup_steps=0.1,
                             per_device_train_batch_size=cfg.rollout_batch, per_device_eval_batch_size=64,
                             max_length=128, lr_scheduler_type="cosine", logging_steps=every, eval_steps=every,
                             save_total_limit=cfg.dpo_steps),
        dpo=DPOOptions(beta=cfg.dpo_beta), output_dir=str(out / "dpo"), seed=seed))
    evals = []
    for ckpt in sorted((out / "dpo").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1])):
        policy = PeftModel.from_pretrained(load_lm(sft_dir), str(ckpt)).merge_and_unload().eval()
        evals.append({"step": int(ckpt.name.split("-")[1]), **evaluator(policy, tok)})
    return evals


def run_trl_rloo(cfg: BenchAlignConfig, sft_dir: str, proxy, evaluator: Evaluator, out: Path, seed: int,
                 prompts: list) -> list[dict]:
    from rlhf.bench import trl_rloo

    result = trl_rloo.run_rloo(
        sft_dir, lambda p, r: proxy.score(p, r, normalize=True).float(), prompts,
        str(out / "trl_rloo"),
        trl_rloo.RLOOSettings(steps=cfg.ppo_steps, prompts_per_step=cfg.rollout_batch // cfg.group_size,
                              num_generations=cfg.group_size, learning_rate=cfg.learning_rate, beta=cfg.kl_coef,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, lora_r=16,
                              lora_alpha=32, seed=seed, eval_every=cfg.eval_every),
        on_eval=lambda step, model, tok: evaluator(model, tok))
    return result["evals"]


def run_seed(cfg: BenchAlignConfig, seed: int, out: Path) -> dict:
    from transformers import AutoTokenizer

    from reward.interface import load_reward
    from rlhf.evaluation.eval_policy import load_lm

    timings = {}
    t = time.perf_counter()
    sft_dir = run_sft(cfg, out, seed)
    timings["sft"] = time.perf_counter() - t
    # labels, best-of-n, KL reference
    sft, tok = load_lm(sft_dir), AutoTokenizer.from_pretrained(sft_dir, trust_remote_code=False)
    t = time.perf_counter()
    splits = label_pairs(cfg, sft, tok, out, seed)
    rm_dir = run_reward(cfg, sft_dir, out, seed)
    timings["reward"] = time.perf_counter() - t
    proxy = load_reward(rm_dir, kind="preference", batch_size=128)
    result = {"seed": seed, "pairs": {k: len(v) for k, v in splits.items()},
              "reward_model": reward_accuracy(proxy, splits["test"], cfg.bt_beta), "methods": {}}
    eval_prompts = _prompts(cfg, cfg.eval_prompts, 70_000 + seed)
    evaluator = Evaluator(cfg, sft, eval_prompts, proxy, seed)
    result["sft"] = evaluator(sft, tok)
    train_prompts = _train_prompts(cfg, seed)  # every online method trains on these
    prompts_file = out / "data" / "ppo_prompts.jsonl"
    synthetic.write_jsonl([{"prompt": p} for p in train_prompts], prompts_file)
    for method in cfg.methods:
        print(f"\n--- bench align: seed {seed}, {method} ---")
        t = time.perf_counter()
        with PeakMemory() as memory:
            if method == "best_of_n":
                record = {"curve": best_of_n_curve(cfg, sft, tok, eval_prompts, proxy, seed)}
            elif method == "dpo":
                record = {"evals": run_dpo(cfg, sft_dir, tok, evaluator, out, seed)}
            elif method == "trl_rloo":
                record = {"evals": run_trl_rloo(cfg, sft_dir, proxy, evaluator, out, seed, train_prompts)}
            else:
                record = {"evals": run_online(cfg, method, sft_dir, proxy, evaluator, out, seed, prompts_file)}
        record.update(time_s=time.perf_counter() - t, peak_memory_gb=memory.peak_gb)
        if "evals" in record:
            record["over_optimisation"] = over_optimisation([{"step": 0, **result["sft"]}] + record["evals"])
        result["methods"][method] = record
        timings[method] = record["time_s"]
    result["timings_s"] = timings
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def over_optimisation(evals: list[dict]) -> dict:
    """Did the gold reward fall after its peak while the proxy kept rising? `evals`: the policy's path,
    starting at the SFT policy (step 0). Compared: the best gold point and the last one; `detected`
    needs the fall to exceed twice its standard error."""
    peak = max(evals, key=lambda e: e["gold"])
    last = evals[-1]
    fall, rise = peak["gold"] - last["gold"], last["proxy"] - peak["proxy"]
    se = math.hypot(peak["gold_se"], last["gold_se"])
    return {"peak_step": peak["step"], "peak_gold": peak["gold"], "peak_kl": peak["kl"], "last_gold": last["gold"],
            "gold_fall": fall, "proxy_rise": rise, "detected": bool(fall > 2 * se and rise > 0)}


# ---------------------------------------------------------------------------------------------
# report


def summarise(cfg: BenchAlignConfig, results: list[dict]) -> dict:
    """Means (± standard error over seeds) of the headline numbers, per method."""
    def over_seeds(get):
        values = [get(r) for r in results]
        mean, se = bm.mean_and_se(values)
        return {"mean": mean, "se": se, "per_seed": values}

    s = {
        "seeds": [r["seed"] for r in results],
        "rm_accuracy": over_seeds(lambda r: r["reward_model"]["accuracy"]),
        "bayes_accuracy": over_seeds(lambda r: r["reward_model"]["bayes_accuracy"]),
        "rm_gold_order_accuracy": over_seeds(lambda r: r["reward_model"]["gold_order_accuracy"]),
        "sft_gold": over_seeds(lambda r: r["sft"]["gold"]),
        "sft_proxy": over_seeds(lambda r: r["sft"]["proxy"]),
        "methods": {},
    }
    for m in cfg.methods:
        rec = lambda r, m=m: r["methods"][m]  # noqa: E731
        row = {"time_s": over_seeds(lambda r: rec(r)["time_s"]),
               "peak_memory_gb": over_seeds(lambda r: rec(r)["peak_memory_gb"])}
        if m == "best_of_n":
            row.update(final_gold=over_seeds(lambda r: rec(r)["curve"][-1]["gold"]),
                       final_kl=over_seeds(lambda r: rec(r)["curve"][-1]["kl"]),
                       final_proxy=over_seeds(lambda r: rec(r)["curve"][-1]["proxy"]))
            if "ppo" in cfg.methods:  # best-of-n at the KL PPO ended with, on the analytic KL axis
                row["gold_at_ppo_kl"] = over_seeds(
                    lambda r: _interpolate(rec(r)["curve"], r["methods"]["ppo"]["evals"][-1]["kl"]))
        else:
            row.update(final_gold=over_seeds(lambda r: rec(r)["evals"][-1]["gold"]),
                       final_kl=over_seeds(lambda r: rec(r)["evals"][-1]["kl"]),
                       final_proxy=over_seeds(lambda r: rec(r)["evals"][-1]["proxy"]),
                       peak_gold=over_seeds(lambda r: rec(r)["over_optimisation"]["peak_gold"]),
                       over_optimisation_seeds=sum(rec(r)["over_optimisation"]["detected"] for r in results))
        s["methods"][m] = row
    return s


def _interpolate(curve: list[dict], kl: float) -> float:
    """Gold reward of best-of-n at a KL, linear between the n's around it (clamped to the ends)."""
    if kl <= curve[0]["kl"]:
        return curve[0]["gold"]
    for lo, hi in zip(curve, curve[1:]):
        if kl <= hi["kl"]:
            w = (kl - lo["kl"]) / (hi["kl"] - lo["kl"])
            return lo["gold"] + w * (hi["gold"] - lo["gold"])
    return curve[-1]["gold"]


def _pm(x: dict, digits: int = 3) -> str:
    se = "" if math.isnan(x["se"]) else f" ± {x['se']:.{digits}f}"
    return f"{x['mean']:.{digits}f}{se}"


def markdown(cfg: BenchAlignConfig, s: dict, results: list[dict], plots: list[str]) -> str:
    n = len(results)
    memory = "peak GPU memory (GB)" if torch.cuda.is_available() else "peak RSS of the process (GB)"
    lines = [
        "# Alignment benchmark: gold reward of each method against its KL to the SFT policy", "",
        f"Synthetic instruction task with a known gold reward (1 − relative edit distance to the right answer); "
        f"tiny Llama ({cfg.model.num_hidden_layers} layers, width {cfg.model.hidden_size}); seeds {s['seeds']}. "
        f"Labels: Bradley–Terry with β = {cfg.bt_beta} on pairs of SFT samples. Numbers are means ± standard "
        f"error over {n} seed(s); gold and proxy are measured on {cfg.eval_prompts} held-out prompts, KL(policy ‖ SFT) "
        "in nats per response on the policy's own samples (best-of-n: the analytic bound).", "",
        "## Reward model", "",
        "| held-out pairs | RM accuracy (vs labels) | Bayes-optimal accuracy | RM accuracy vs gold order |",
        "|---|---|---|---|",
        f"| {results[0]['reward_model']['pairs']} per seed | {_pm(s['rm_accuracy'])} | {_pm(s['bayes_accuracy'])} "
        f"| {_pm(s['rm_gold_order_accuracy'])} |", "",
        "## Gold reward per method", "",
        f"| method | gold reward (end) | KL to SFT | proxy score (normalised) | best gold on its path | "
        f"wall time (s) | {memory} |", "|---|---|---|---|---|---|---|",
        f"| SFT | {_pm(s['sft_gold'])} | 0 | {_pm(s['sft_proxy'])} | | | |",
    ]
    for m in cfg.methods:
        row = s["methods"][m]
        label = f"best-of-{cfg.best_of_n}" if m == "best_of_n" else LABELS[m]
        lines.append(f"| {label} | {_pm(row['final_gold'])} | {_pm(row['final_kl'], 2)} | {_pm(row['final_proxy'])} | "
                     f"{_pm(row['peak_gold']) if 'peak_gold' in row else ''} | {_pm(row['time_s'], 0)} | "
                     f"{_pm(row['peak_memory_gb'], 2)} |")
    if "gold_at_ppo_kl" in s["methods"].get("best_of_n", {}):
        lines.append(f"| best-of-n at PPO's end KL (interpolated) | {_pm(s['methods']['best_of_n']['gold_at_ppo_kl'])} "
                     f"| {_pm(s['methods']['ppo']['final_kl'], 2)} | | | | |")
    if "best_of_n" in cfg.methods:
        curves = [r["methods"]["best_of_n"]["curve"] for r in results]
        lines += ["", "### Best-of-n (ranked by the reward model; KL = log n − (n−1)/n)", "",
                  "| n | KL | gold | proxy |", "|---|---|---|---|"]
        for i, point in enumerate(curves[0]):
            g = bm.mean_and_se([c[i]["gold"] for c in curves])
            p = bm.mean_and_se([c[i]["proxy"] for c in curves])
            lines.append(f"| {point['n']} | {point['kl']:.3f} | {g[0]:.3f} | {p[0]:.3f} |")
    paths = [m for m in cfg.methods if m != "best_of_n"]
    if paths:
        lines += ["", "## Over-optimisation", "",
                  "A method over-optimises on a seed when its gold reward fell by more than twice its standard error "
                  "after its peak while the proxy score kept rising.", "",
                  "| method | seeds | per seed: peak gold (step, KL) → last gold |", "|---|---|---|"]
        for m in paths:
            per_seed = "; ".join(
                f"{o['peak_gold']:.3f} ({o['peak_step']}, {o['peak_kl']:.2f}) → {o['last_gold']:.3f}"
                for o in (r["methods"][m]["over_optimisation"] for r in results))
            lines.append(f"| {LABELS[m]} | {s['methods'][m]['over_optimisation_seeds']} of {n} | {per_seed} |")
    lines += ["", "## Per seed", "", "| seed | RM acc | Bayes | SFT gold | " +
              " | ".join(f"{m} gold (KL)" for m in cfg.methods) + " | time (s) |",
              "|---|---|---|---|" + "---|" * len(cfg.methods) + "---|"]
    for r in results:
        cells = []
        for m in cfg.methods:
            last = r["methods"][m]["curve" if m == "best_of_n" else "evals"][-1]
            cells.append(f"{last['gold']:.3f} ({last['kl']:.2f})")
        lines.append(f"| {r['seed']} | {r['reward_model']['accuracy']:.3f} | {r['reward_model']['bayes_accuracy']:.3f} | "
                     f"{r['sft']['gold']:.3f} | " + " | ".join(cells) + f" | {sum(r['timings_s'].values()):.0f} |")
    k = cfg.group_size
    lines += ["", f"Same budget: every online method samples {cfg.ppo_steps * cfg.rollout_batch} responses "
              f"({cfg.ppo_steps} iterations of {cfg.rollout_batch}: PPO and REINFORCE++ one per prompt, GRPO, RLOO "
              f"and TRL RLOO {cfg.rollout_batch // k} prompts × {k}), LoRA r=16 on the same SFT model, learning rate "
              f"{cfg.learning_rate}, KL coefficient {cfg.kl_coef}, reward = the reward model's normalised score; ours "
              f"run {cfg.ppo_epochs} epoch(s) × {cfg.num_mini_batches} mini-batch(es) per iteration, TRL RLOO one optimizer step. DPO: {cfg.dpo_steps} steps of "
              f"{cfg.rollout_batch} of the reward model's training pairs, LoRA r=16, β = {cfg.dpo_beta}, learning rate "
              f"{cfg.dpo_learning_rate}. Wall time includes each method's evaluations; "
              + ("peak memory is the CUDA allocator's peak during the method." if torch.cuda.is_available() else
                 "peak memory is the process's resident set during the method, which includes what the benchmark "
                 "had loaded before it (the SFT policy and the reward model)."), ""]
    lines += [f"![{Path(p).stem}](plots/{Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(cfg: BenchAlignConfig, results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    colours = {m: f"C{i}" for i, m in enumerate(METHODS)}
    markers = {"best_of_n": "^--", "dpo": "D-", "trl_rloo": "s-"}
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(results):
        sft = (0.0, r["sft"]["gold"])
        for m in cfg.methods:
            points = r["methods"][m]["curve"] if m == "best_of_n" else [{"kl": 0.0, "gold": sft[1]}] + r["methods"][m]["evals"]
            ax.plot([p["kl"] for p in points], [p["gold"] for p in points], markers.get(m, "o-"), color=colours[m],
                    alpha=0.8, label=LABELS[m] if i == 0 else None)  # one legend entry per method, not per seed
    ax.set_xscale("symlog", linthresh=1.0)  # linear up to 1 nat, then logarithmic: a runaway stays on the plot
    ax.set_xlabel("KL(policy ‖ SFT), nats (linear to 1, log above)")
    ax.set_ylabel("gold reward")
    ax.set_title("Gold reward against KL (one line per seed)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "gold_vs_kl.png"))

    online = [m for m in cfg.methods if m not in ("best_of_n", "dpo")]
    if online:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(results):
            for m in online:
                ev = r["methods"][m]["evals"]
                steps = [0] + [e["step"] for e in ev]
                kw = dict(color=colours[m], alpha=0.8, label=LABELS[m] if i == 0 else None)
                axes[0].plot(steps, [r["sft"]["gold"]] + [e["gold"] for e in ev], "o-", **kw)
                axes[1].plot(steps, [r["sft"]["proxy"]] + [e["proxy"] for e in ev], "o-", **kw)
        axes[0].set_title("gold reward")
        axes[1].set_title("proxy (reward-model) score")
        for a in axes:
            a.set_xlabel("iteration")
            a.legend(fontsize=8)
        paths.append(_save(fig, out / "gold_and_proxy.png"))
    return paths


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(cfg: BenchAlignConfig) -> dict:
    check(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from rlhf import config

    config.save(cfg, out / "rlhf_config.yaml")
    results = []
    for seed in cfg.seeds:
        print(f"\n=== bench align: seed {seed} ===")
        results.append(run_seed(cfg, seed, out / f"seed_{seed}"))
    summary = summarise(cfg, results)
    plots = plot(cfg, results, out / "plots")
    report = {"summary": summary, "seeds": results, "config": config.to_dict(cfg)}
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    md = markdown(cfg, summary, results, plots)
    (out / "report.md").write_text(md)
    print("\n" + md)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}, {out / 'plots'}")
    return report
