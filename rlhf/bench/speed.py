"""`rlhf bench speed`: PPO throughput, and the same measurement for TRL's trainers.

    rlhf bench speed                                          # tiny Llama on a CPU
    rlhf bench speed --model qwen2.5-0.5b --batch_size 64 --prompt_length 128 --response_length 128   # GPU
    rlhf bench speed --model llama3-8b --trainers ours trl_rloo

Throughput is (prompt + response tokens) per second of a whole PPO iteration (generate, forward passes
for logprobs and values, score, update), measured after `warmup_steps` untimed iterations, with the time
split into generate / forward / score / train and the peak memory.

The models are random-initialised at the shape named by `--model` (the built-in `tiny` shape, a named
shape of rlhf/runtime/shapes.py such as `qwen2.5-0.5b` or `llama3-8b`, or any local directory / hub id
whose config.json is read): speed does not depend on the weights. The reward model is a random sequence
classifier of the same shape.
Text goes through a word-level tokenizer over the model's whole vocabulary (token i is the word `t{i}`),
built here, so any vocabulary size works offline and decoding then re-encoding a response gives back
its tokens: every trainer sees exactly `prompt_length` + `response_length` tokens per sequence.

Peers, measured in the same run with the same model shape, batch and lengths:
- `trl_rloo`: TRL's RLOOTrainer (the installed trl), `batch_size / rloo_k` prompts x `rloo_k` samples.
- `trl_ppo`: TRL 1.12's experimental PPOTrainer, run by `rlhf/bench/peers/trl_ppo_peer.py` under its own
  virtual environment (`--trl_ppo_python`; `rlhf/bench/peers/setup_trl_ppo.sh` creates one). It is a peer to
  compare with, never a dependency.
On a GPU the report adds our achieved model FLOP/s and its share of the device's peak (MFU).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from policies.config import TinyModelConfig
from rlhf.config import NonNegativeInt, PositiveInt, Seed, domain
from rlhf.errors import UserError
from rlhf.runtime import shapes

# Dense bf16 tensor-core peak, FLOP/s (vendor datasheets; SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
TRAINERS = ("ours", "ours_vllm", "trl_rloo", "trl_ppo")
Trainers = domain(lambda v: all(t in TRAINERS for t in v), f"some of {', '.join(TRAINERS)}")


def _shape(name: str) -> bool:
    return (name == "tiny" or shapes.named(name) is not None or (Path(name) / "config.json").exists()
            or name.count("/") == 1)


Shape = domain(_shape, f"`tiny`, a named shape ({', '.join(shapes.NAMES)}), a directory with config.json, or a hub id")


@dataclass
class BenchSpeedConfig:
    """PPO throughput benchmark (`rlhf bench speed`)."""

    model: Shape[str] = "tiny"
    """Model shape: `tiny` (shape below), a named shape (`qwen2.5-0.5b`, `llama3-8b`, ...: the table in
    rlhf/runtime/shapes.py, shared with `estimate-memory`), or a local directory / hub id whose config.json
    gives the shape (weights are random either way)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of `tiny`."""
    tiny_vocab_size: PositiveInt[int] = 800
    """Vocabulary size of `tiny`."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Weights and compute: `auto` is bfloat16 on a GPU, float32 on a CPU."""
    peft: Literal["lora", "full"] = "lora"
    """LoRA (policy and critic adapters on one base) or full fine-tuning, for every trainer."""
    lora_r: PositiveInt[int] = 16
    """LoRA rank."""
    batch_size: PositiveInt[int] = 16
    """Responses per PPO iteration (RLOO: batch_size / rloo_k prompts x rloo_k samples)."""
    prompt_length: PositiveInt[int] = 64
    """Prompt tokens per sequence."""
    response_length: PositiveInt[int] = 64
    """Response tokens per sequence (no stop token: every response is this long)."""
    steps: PositiveInt[int] = 3
    """Timed iterations."""
    warmup_steps: NonNegativeInt[int] = 1
    """Untimed iterations first (allocation, kernel selection)."""
    ppo_epochs: PositiveInt[int] = 1
    """PPO epochs per rollout batch (ours and TRL PPO)."""
    num_mini_batches: PositiveInt[int] = 1
    """Mini-batches per epoch (ours and TRL PPO)."""
    rloo_k: PositiveInt[int] = 2
    """RLOO samples per prompt."""
    logprobs_from_generation: Union[Literal["auto"], bool] = "auto"
    """Ours: `ppo.logprobs_from_generation` (`auto`: recorded during generation, no policy forward pass, in
    float32 with the HF engine, as TRL 1.12's PPO does; `false`: the policy pass of earlier releases)."""
    cpu_threads: PositiveInt[Optional[int]] = None
    """Intra-op threads of our run on a CPU (None: the cores this process may use)."""
    trainers: Trainers[list[str]] = field(default_factory=lambda: list(TRAINERS))
    """Which to measure, of `ours` (HF generate), `ours_vllm` (our PPO with `ppo.rollout_engine: vllm`;
    skipped without a vLLM environment), `trl_rloo`, `trl_ppo`. Each result is written when it is done."""
    vllm_python: Optional[str] = None
    """`ours_vllm`: Python of the vLLM environment (default: as `vllm.python`)."""
    trl_ppo_python: Optional[str] = None
    """Python of the virtual environment with TRL 1.12 (default: .venv-trl-ppo/bin/python if it exists)."""
    output_dir: str = "runs/bench_speed"
    """Where the models, result.json and result.md go."""
    seed: Seed[int] = 0
    """Seed of the random weights and prompts."""


def check(cfg: BenchSpeedConfig) -> None:
    """Every field's domain (one pass), then the rules between fields."""
    from rlhf.validate import validate

    validate(cfg)
    if "trl_rloo" in cfg.trainers and (cfg.rloo_k < 2 or cfg.batch_size % cfg.rloo_k):
        raise UserError(f"rloo_k must be >= 2 and divide batch_size ({cfg.batch_size}), got {cfg.rloo_k}")
    if cfg.batch_size % cfg.num_mini_batches:
        raise UserError(f"num_mini_batches ({cfg.num_mini_batches}) must divide batch_size ({cfg.batch_size})")


# ---------------------------------------------------------------------------------------------
# models and data of the requested shape


def model_config(cfg: BenchSpeedConfig):
    """A transformers config of the requested shape."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.model == "tiny":
        t = cfg.tiny
        return LlamaConfig(hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
                           num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                           intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
                           vocab_size=cfg.tiny_vocab_size)
    shape = shapes.named(cfg.model)
    if shape is not None:
        return shape.config()
    if (Path(cfg.model) / "config.json").exists():
        try:
            return AutoConfig.from_pretrained(cfg.model, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise UserError(f"model: could not read a config for '{cfg.model}' ({str(e).splitlines()[0]})") from None
    return shapes.hub_config(cfg.model, "model")


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer over `vocab_size` ids: <pad>, <bos>, <eos>, then the words t3 ... t{V-1}.
    Its chat template concatenates the turns' text, so a prompt of P words is P tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def build(cfg: BenchSpeedConfig, out: Path) -> dict:
    """Write the random policy (causal LM) and reward model (sequence classifier) with the word tokenizer;
    return their paths, the prompts and the parameter count."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    mc = model_config(cfg)
    # No EOS in the model's generation config: with no stop token every response runs to response_length.
    mc.pad_token_id, mc.bos_token_id, mc.eos_token_id = 0, 1, None
    dtype = _dtype(cfg)
    tok = word_tokenizer(mc.vocab_size)
    paths = {"policy": out / "models" / "policy", "reward": out / "models" / "reward"}
    spec = json.dumps({"config": mc.to_dict(), "seed": cfg.seed, "dtype": str(dtype)}, sort_keys=True, default=str)
    n_params = None
    for name, cls in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        marker = paths[name] / "bench_spec.json"
        if marker.exists() and marker.read_text() == spec:  # already written by an earlier run
            continue
        torch.manual_seed(cfg.seed)
        c = mc.__class__.from_dict({**mc.to_dict(), "num_labels": 1}) if name == "reward" else mc
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = cls.from_config(c, dtype=dtype)
        if name == "policy":
            n_params = sum(p.numel() for p in model.parameters())
        if name == "policy":  # a sampled PAD would be masked out as padding: keep every response full length
            model.generation_config.suppress_tokens = [mc.pad_token_id]
        model.save_pretrained(paths[name], safe_serialization=True)
        tok.save_pretrained(paths[name])
        marker.write_text(spec)
        del model
    if n_params is None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(mc).parameters())
    g = torch.Generator().manual_seed(cfg.seed)
    n_prompts = cfg.batch_size * (cfg.warmup_steps + cfg.steps)
    ids = torch.randint(3, mc.vocab_size, (n_prompts, cfg.prompt_length), generator=g)
    return {"policy": str(paths["policy"]), "reward": str(paths["reward"]), "prompt_ids": ids.tolist(),
            "n_params": n_params, "config": mc}


def _dtype(cfg: BenchSpeedConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.dtype)


def as_messages(prompt_ids: list[list[int]]) -> list[list[dict]]:
    return [[{"role": "user", "content": " ".join(f"t{i}" for i in ids)}] for ids in prompt_ids]


def load_reward_model(path: str, device):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward.interface import PreferenceReward

    model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return PreferenceReward(model.to(device).eval(), tokenizer, batch_size=1 << 30, device=device)


# ---------------------------------------------------------------------------------------------
# the trainers


def _summary(times: list[dict], tokens_per_iter: float, peak_gb: float) -> dict:
    mean = {k: sum(t[k] for t in times) / len(times) for k in times[0]}
    return {"steps_timed": len(times), "time": mean, "tokens_per_iteration": tokens_per_iter,
            "tokens_per_second": tokens_per_iter / mean["total"], "peak_memory_gb": peak_gb}


def iteration_flops(n_matmul: int, n_head: int, batch: int, prompt_len: int, response_len: int, epochs: int,
                    peft: str, policy_forward: bool = True) -> dict[str, float]:
    """Model FLOPs of one of our PPO iterations, by phase: 2 per weight per token for a forward pass,
    twice that for a backward pass with weight gradients (full) or once that without (LoRA: input
    gradients only). `n_matmul`: weights used in matmuls (input embeddings excluded), `n_head`: those of
    the LM head, which runs only where logits are kept: the last prompt position and the response
    (A + 1 positions) in the trainer's passes, one position per new token in generation (the critic and
    the reward model have a scalar head instead). Attention-score FLOPs are left out. Counted: generation
    (prefill + decode), policy/critic/reference forwards, the reward model's forward, and per epoch the
    policy and critic forward + backward. `policy_forward=False`: the rollout's policy logprobs come from
    generation (no policy pass in the forward phase)."""
    B, T, A = batch, prompt_len + response_len, response_len
    trunk = n_matmul - n_head
    backward = 4 if peft == "full" else 2
    lm = B * (T * trunk + (A + 1) * n_head)  # weight-token products of one policy or reference pass
    critic = B * T * trunk
    return {
        "generate": 2.0 * B * (T * trunk + A * n_head),
        "forward": 2.0 * ((lm if policy_forward else 0) + critic + lm),
        "score": 2.0 * critic,
        "train": epochs * (2.0 + backward) * (lm + critic),
    }


def matmul_params(config, n_params: int) -> tuple[int, int]:
    """(weights in matmuls, LM-head weights) of a causal LM with `n_params` parameters."""
    head = config.vocab_size * config.hidden_size
    return (n_params if config.tie_word_embeddings else n_params - head), head


def matmul_rate(config, rows: int, threads: Optional[int]) -> float:
    """FLOP/s of one float32 (rows, hidden) x (hidden, intermediate) matmul on this CPU at `threads` (None:
    as set): what the model's big matmuls can reach here, the yardstick of the report's floor line."""
    import time

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(rows, config.hidden_size)
        b = torch.randn(config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size))
        a @ b  # first call: allocation and kernel choice
        n, start = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - start < 0.5:
            a @ b
            n += 1
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


def device_peak_flops() -> tuple[str, Optional[float]]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_ours_vllm(cfg: BenchSpeedConfig, m: dict, out: Path) -> dict:
    from rlhf.generation import vllm_engine as rollout_engine

    name = "rlhf PPO (ours, vLLM rollouts)"
    if cfg.vllm_python is None and rollout_engine.available() is None:
        return {"trainer": name, "skipped": "no vLLM environment: create one with `python -m rlhf.generation.vllm_env` "
                "(or pass --vllm_python PATH)"}
    try:
        return run_ours(cfg, m, out, engine="vllm")
    except rollout_engine.EngineError as e:  # e.g. vLLM's CPU attention refuses head_dim 16 (the tiny shape)
        return {"trainer": name, "skipped": f"failed: {e}"}


def run_ours(cfg: BenchSpeedConfig, m: dict, out: Path, engine: str = "hf") -> dict:
    from policies.config import ModelConfig, PeftConfig
    from rlhf import ppo
    from rlhf.data import synthetic
    from rlhf.generation.vllm_engine import VLLMConfig
    from rlhf.ppo.config import logprobs_from_generation

    prompts = out / "data" / "prompts.jsonl"
    synthetic.write_jsonl([{"prompt": p} for p in as_messages(m["prompt_ids"])], prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _reset_peak()
    reward = load_reward_model(m["reward"], device)
    hp = ppo.PPOHyperparameters(steps=cfg.warmup_steps + cfg.steps, per_device_rollout_batch_size=cfg.batch_size,
                                num_mini_batches=cfg.num_mini_batches, ppo_epochs=cfg.ppo_epochs, learning_rate=1e-6,
                                temperature=1.0, max_new_tokens=cfg.response_length,
                                max_prompt_length=cfg.prompt_length, stop_token=None,
                                logprobs_from_generation=cfg.logprobs_from_generation if engine == "hf" else False,
                                rollout_engine=engine)
    from_generation = logprobs_from_generation(hp, _dtype(cfg))  # as the trainer resolves it
    history = ppo.main(ppo.PPOConfig(
        model=ModelConfig(name_or_path=m["policy"], dtype=cfg.dtype),
        peft=PeftConfig(method=cfg.peft, r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0),
        data=ppo.PromptDataConfig(train=str(prompts)),
        ppo=hp,
        vllm=VLLMConfig(python=cfg.vllm_python),
        output_dir=str(out / ("ours" if engine == "hf" else "ours_vllm")), seed=cfg.seed, sample_every=0,
        cpu_threads=cfg.cpu_threads),
        reward=reward, save=False)
    timed = history[cfg.warmup_steps:]
    times = [{"generate": h["time/generate"] + h.get("time/sync", 0.0), "forward": h["time/forward"],
              "score": h["time/score"], "train": h["time/train"], "total": h["time/step"]} for h in timed]
    tokens = sum(h["tokens_per_second"] * h["time/step"] for h in timed) / len(timed)
    name = "rlhf PPO (ours)" if engine == "hf" else "rlhf PPO (ours, vLLM rollouts)"
    result = {"trainer": name, **_summary(times, tokens, max(h["memory/peak_gb"] for h in history))}
    if engine == "vllm":  # generate includes handing the weights to the engine after each update
        result["sync_seconds"] = sum(h["time/sync"] for h in timed) / len(timed)
        result["logprob_diff"] = max(h["rollout/logprob_diff"] for h in history)
    n_matmul, n_head = matmul_params(m["config"], m["n_params"])
    flops = iteration_flops(n_matmul, n_head, cfg.batch_size, cfg.prompt_length, cfg.response_length,
                            cfg.ppo_epochs, cfg.peft, not from_generation)
    result["model_flops_by_phase"] = flops
    result["model_flops_per_iteration"] = sum(flops.values())
    result["achieved_flops_per_second"] = sum(flops.values()) / result["time"]["total"]
    return result


def run_trl_rloo(cfg: BenchSpeedConfig, m: dict, out: Path) -> dict:
    from rlhf.bench import trl_rloo

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward = load_reward_model(m["reward"], device)
    steps = cfg.warmup_steps + cfg.steps
    _reset_peak()
    r = trl_rloo.run_rloo(
        m["policy"], lambda p, resp: reward.score(p, resp), as_messages(m["prompt_ids"]), str(out / "trl_rloo"),
        trl_rloo.RLOOSettings(steps=steps, prompts_per_step=cfg.batch_size // cfg.rloo_k, num_generations=cfg.rloo_k,
                              learning_rate=1e-6, max_new_tokens=cfg.response_length,
                              min_new_tokens=cfg.response_length, temperature=1.0, peft=cfg.peft,
                              lora_r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, seed=cfg.seed))
    times = r["step_times"][cfg.warmup_steps:]
    return {"trainer": "TRL RLOOTrainer " + _version("trl"),
            **_summary(times, r["tokens"] / steps, r["peak_memory_gb"])}


def run_trl_ppo(cfg: BenchSpeedConfig, m: dict, out: Path) -> dict:
    python = cfg.trl_ppo_python or (".venv-trl-ppo/bin/python" if Path(".venv-trl-ppo/bin/python").exists() else None)
    if python is None:
        return {"trainer": "TRL 1.12 PPOTrainer", "skipped": "no TRL 1.12 environment: create one with "
                "`bash rlhf/bench/peers/setup_trl_ppo.sh` (or pass --trl_ppo_python PATH)"}
    if not Path(python).exists():
        raise UserError(f"trl_ppo_python: '{python}' does not exist")
    python = os.path.abspath(python)  # the peer runs in its own folder; not resolved: a venv's python is a link
    spec = {"policy": m["policy"], "reward_model": m["reward"], "prompts": m["prompt_ids"],
            "batch_size": cfg.batch_size, "response_length": cfg.response_length, "steps": cfg.steps,
            "warmup_steps": cfg.warmup_steps, "ppo_epochs": cfg.ppo_epochs, "num_mini_batches": cfg.num_mini_batches,
            "learning_rate": 1e-6, "temperature": 1.0, "seed": cfg.seed,
            "lora": {"r": cfg.lora_r, "alpha": 2 * cfg.lora_r} if cfg.peft == "lora" else None,
            "dtype": str(_dtype(cfg)).removeprefix("torch.")}
    work = out / "trl_ppo"
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    script = Path(__file__).parent / "peers" / "trl_ppo_peer.py"
    proc = subprocess.run([python, str(script), "--spec", str(work / "spec.json"), "--out", str(work / "result.json")],
                          cwd=work, env={**os.environ, "PYTHONPATH": ""})
    result = json.loads((work / "result.json").read_text()) if (work / "result.json").exists() else {}
    if proc.returncode != 0 or "error" in result:
        return {"trainer": "TRL 1.12 PPOTrainer", "skipped": f"failed: {result.get('error', f'exit {proc.returncode}')}"}
    return result


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ---------------------------------------------------------------------------------------------
# report


def markdown(cfg: BenchSpeedConfig, r: dict) -> str:
    lines = [f"# PPO speed: {cfg.model}, {r['n_params'] / 1e6:,.1f}M parameters, {cfg.peft}", "",
             f"Device: {r['device']}; dtype {r['dtype']}; {cfg.batch_size} responses per iteration, prompt "
             f"{cfg.prompt_length} + response {cfg.response_length} tokens; {cfg.ppo_epochs} PPO epoch(s) x "
             f"{cfg.num_mini_batches} mini-batch(es); mean of {cfg.steps} iteration(s) after {cfg.warmup_steps} "
             "warm-up.", "",
             "| trainer | tokens/s | s/iteration | generate | generate share | forward | score | train | peak memory (GB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in r["results"]:
        if "skipped" in res:
            lines.append(f"| {res['trainer']} | skipped: {res['skipped']} | | | | | | | |")
            continue
        t = res["time"]
        cell = lambda k: f"{t[k]:.3f}" if k in t else "–"  # noqa: E731
        share = f"{100 * t['generate'] / t['total']:.0f}%" if "generate" in t else "–"
        lines.append(f"| {res['trainer']} | {res['tokens_per_second']:,.0f} | {t['total']:.3f} | {cell('generate')} | "
                     f"{share} | {cell('forward')} | {cell('score')} | {cell('train')} | {res['peak_memory_gb']:.2f} |")
    ours = next((x for x in r["results"] if x["trainer"] == "rlhf PPO (ours)" and "skipped" not in x), None)
    trl = next((x for x in r["results"] if "1.12 PPOTrainer" in x["trainer"] and "skipped" not in x), None)
    if ours is not None and r.get("matmul_flops_per_second"):
        rate, flops, t = r["matmul_flops_per_second"], ours["model_flops_by_phase"], ours["time"]
        floor = {k: flops[k] / rate for k in ("forward", "score", "train")}
        best = t["generate"] + sum(floor.values())
        lines += ["", f"Floor: one {r['matmul_shape']} float32 matmul runs at {rate / 1e9:.0f} GFLOP/s here. At that "
                  "rate our model FLOPs would take " + ", ".join(f"{k} {floor[k]:.3f} s (measured {t[k]:.3f})"
                                                                for k in floor) +
                  f"; with generation as measured ({t['generate']:.3f} s: HF `generate`, which TRL runs too) an "
                  f"iteration cannot take less than {best:.3f} s" +
                  (f", {trl['time']['total'] / best:.2f}x TRL 1.12 PPO's {trl['time']['total']:.3f} s." if trl else ".")]
    if ours is not None:
        lines += ["", f"Our model FLOPs per iteration: {ours['model_flops_per_iteration']:.3e}; achieved "
                  f"{ours['achieved_flops_per_second'] / 1e12:.3f} TFLOP/s" +
                  (f", {100 * ours['mfu']:.1f}% of the device's {r['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak (MFU)."
                   if ours.get("mfu") is not None else " (no peak known for this device).")]
    lines += ["", "Forward: logprobs of policy and reference and the critic's values (TRL's trainers fold these "
              "into other phases where '–'). Peak memory: GPU max allocated, or the process's max RSS on a CPU "
              "(cumulative over the run, so later trainers in one process show at least the earlier peak; the "
              "vLLM engine's own process is not counted). With vLLM rollouts, generate includes handing the "
              "updated weights to the engine."]
    return "\n".join(lines) + "\n"


def _write(out: Path, cfg: BenchSpeedConfig, report: dict) -> None:
    """result.json and result.md with the trainers measured so far."""
    write_results(out, report, markdown(cfg, report))


def write_results(out: Path, report: dict, md: str) -> None:
    """`out`/result.json and result.md, each written whole, then renamed: a reader (or a benchmark killed
    half-way) never sees half a file. The benchmarks call it as each of their runs finishes."""
    for name, text in (("result.json", json.dumps(report, indent=2, default=str)), ("result.md", md)):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(cfg: BenchSpeedConfig) -> dict:
    check(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = build(cfg, out)
    device, peak = device_peak_flops()
    report = {"model": cfg.model, "n_params": m["n_params"], "device": device, "peak_flops": peak,
              "dtype": str(_dtype(cfg)).removeprefix("torch."), "results": []}
    if device == "cpu" and _dtype(cfg) == torch.float32:  # a GPU's yardstick is its peak (MFU)
        rows = cfg.batch_size * (cfg.prompt_length + cfg.response_length) // max(cfg.num_mini_batches, 1)
        report["matmul_flops_per_second"] = matmul_rate(m["config"], rows, cfg.cpu_threads)
        report["matmul_shape"] = f"({rows} x {m['config'].hidden_size}) x ({m['config'].hidden_size} x " \
                                 f"{getattr(m['config'], 'intermediate_size', 4 * m['config'].hidden_size)})"
    runners = {"ours": run_ours, "ours_vllm": run_ours_vllm, "trl_rloo": run_trl_rloo, "trl_ppo": run_trl_ppo}
    from rlhf import config

    report["config"] = config.to_dict(cfg)
    for name in cfg.trainers:
        print(f"\n=== bench speed: {name} ===")
        try:
            res = runners[name](cfg, m, out)
        except UserError:
            raise
        except Exception as e:  # one trainer failing loses neither the others' results nor the run
            res = {"trainer": name, "skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        if name in ("ours", "ours_vllm") and "skipped" not in res:
            res["mfu"] = res["achieved_flops_per_second"] / peak if peak else None
        report["results"].append(res)
        _write(out, cfg, report)  # as soon as each trainer is done
    md = markdown(cfg, report)
    print("\n" + md)
    print(f"written: {out / 'result.json'}, {out / 'result.md'}")
    return report
