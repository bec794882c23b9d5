"""Speed peer: time TRL 1.12's experimental PPOTrainer on the same models and prompts as our PPO.

This is a standalone script. It runs under the python of a separate virtual environment that
holds trl==1.12.0 (the last TRL release with ``trl.experimental.ppo``; create it with
``rlhf/bench/peers/setup_trl_ppo.sh``), so it imports nothing from this project:

    PYTHON rlhf/bench/peers/trl_ppo_peer.py --spec spec.json --out result.json

spec.json fields (required unless a default is given):
    policy            dir of a causal LM + tokenizer (safetensors); also the reference model
    reward_model      dir of an AutoModelForSequenceClassification (num_labels=1); also loaded a
                      second time as the value model, as TRL's PPO examples do
    prompts           list of prompt token-id lists (already chat-templated and tokenized)
    batch_size        prompts per PPO iteration (per device)
    response_length   tokens generated per prompt (always exactly this many: no stop token)
    steps             PPO iterations timed
    ppo_epochs, num_mini_batches, learning_rate, temperature
    warmup_steps      iterations run before the timed ones (default 1)
    seed              (default 0)
    lora              null (default: full fine-tuning) or {"r": .., "alpha": .., "dropout": 0.0,
                      "target_modules": "all-linear"}: LoRA on the policy through TRL's peft_config
                      (the value model stays fully trained, as in TRL)
    dtype             "float32" (default) or "bfloat16": the weight dtype of every model (no autocast)

result.json: trainer, versions, steps_timed, tokens_per_second, time {generate, score, forward,
train, total} (seconds, mean per timed iteration), tokens_per_iteration, peak_memory_gb, device,
plus a few descriptive fields. On any error: {"error": "<one line>"} and exit status 1.

How the time is split. PPOTrainer.train() is one loop; it calls module-level functions of
trl.experimental.ppo.ppo_trainer, which this script replaces in that module's namespace with
timing wrappers:
    generate  batch_generation(): the policy's generate() call of the rollout
    score     get_reward(reward_model, ...): the reward-model forward
    forward   get_reward(value_model, ...) and the no-grad forward() of the reference policy
              (rollout log-probs/values)
    train     the rest of the iteration: log-probs from the generation logits, KL/GAE, the PPO
              epochs (forward with grad, backward, optimizer steps), TRL's logging and its per-iteration
              housekeeping: gc.collect() twice and empty_cache(), also reported on their own in
              "train_includes" because on small models they are a large share of the iteration
    total     wall time between the ends of consecutive iterations (TrainerCallback.on_step_end)
Responses: TRL's loop treats every token equal to the pad id as padding, so the pad token is
suppressed in sampling (generation_config.suppress_tokens) and there is no stop token: every
response is exactly response_length real tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
import traceback

TRAINER_NAME = "trl 1.12 PPOTrainer"
REQUIRED_TRL = "1.12.0"
REQUIRED_FIELDS = ("policy", "reward_model", "prompts", "batch_size", "response_length", "steps",
                   "ppo_epochs", "num_mini_batches", "learning_rate", "temperature")
DEFAULTS = {"warmup_steps": 1, "seed": 0, "lora": None, "dtype": "float32"}
BUCKETS = ("generate", "score", "forward")
DETAILS = ("gc_collect", "empty_cache")  # parts of the train bucket, reported on their own as well


class PeerError(Exception):
    """An error with a message meant for the user (no traceback needed)."""


# --------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------
def load_spec(path: str) -> dict:
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise PeerError(f"cannot read spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise PeerError(f"spec {path} must be a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in spec]
    if missing:
        raise PeerError(f"spec is missing field(s): {', '.join(missing)}")
    unknown = sorted(set(spec) - set(REQUIRED_FIELDS) - set(DEFAULTS))
    if unknown:
        raise PeerError(f"spec has unknown field(s): {', '.join(unknown)}")
    spec = {**DEFAULTS, **spec}

    for key in ("batch_size", "response_length", "steps", "ppo_epochs", "num_mini_batches"):
        if not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 1:
            raise PeerError(f"spec field {key} must be a positive integer, got {spec[key]!r}")
    if not isinstance(spec["warmup_steps"], int) or spec["warmup_steps"] < 0:
        raise PeerError(f"spec field warmup_steps must be an integer >= 0, got {spec['warmup_steps']!r}")
    if spec["batch_size"] % spec["num_mini_batches"]:
        raise PeerError(f"batch_size {spec['batch_size']} is not a multiple of num_mini_batches "
                        f"{spec['num_mini_batches']}")
    for key in ("learning_rate", "temperature"):
        if not isinstance(spec[key], (int, float)) or spec[key] <= 0:
            raise PeerError(f"spec field {key} must be a positive number, got {spec[key]!r}")
    if spec["dtype"] not in ("float32", "bfloat16"):
        raise PeerError(f"spec field dtype must be 'float32' or 'bfloat16', got {spec['dtype']!r}")
    prompts = spec["prompts"]
    if (not isinstance(prompts, list) or not prompts
            or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts)):
        raise PeerError("spec field prompts must be a non-empty list of non-empty token-id lists")
    lora = spec["lora"]
    if lora is not None:
        if not isinstance(lora, dict) or "r" not in lora:
            raise PeerError("spec field lora must be null or an object with at least 'r'")
        extra = sorted(set(lora) - {"r", "alpha", "dropout", "target_modules"})
        if extra:
            raise PeerError(f"spec field lora has unknown key(s): {', '.join(extra)}")
    for key in ("policy", "reward_model"):
        if not isinstance(spec[key], str) or not os.path.isdir(spec[key]):
            raise PeerError(f"spec field {key} must be an existing directory, got {spec[key]!r}")
    return spec


def import_trl_ppo():
    """Import TRL's PPO or raise PeerError naming the TRL release this peer needs."""
    hint = (f"this peer needs trl=={REQUIRED_TRL} (the last release with trl.experimental.ppo) in its own venv: "
            f"run rlhf/bench/peers/setup_trl_ppo.sh and use that venv's python")
    try:
        import trl
    except ImportError:
        raise PeerError(f"trl is not installed; {hint}") from None
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we know it is experimental
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as ppo_module
    except ImportError:
        raise PeerError(f"trl {trl.__version__} has no trl.experimental.ppo.PPOTrainer; {hint}") from None
    for name in ("batch_generation", "get_reward", "forward"):
        if not callable(getattr(ppo_module, name, None)):
            raise PeerError(f"trl {trl.__version__}: trl.experimental.ppo.ppo_trainer has no function {name} "
                            f"to time; {hint}")
    return trl, ppo_module, PPOConfig, PPOTrainer


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
class PhaseTimer:
    """Accumulates seconds per bucket and token counts; snapshots them at each iteration end."""

    def __init__(self, torch, pad_token_id: int, response_length: int):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.pad_token_id = pad_token_id
        self.response_length = response_length
        self.reward_model = None  # set once the trainer holds it
        self.seconds = dict.fromkeys(BUCKETS + DETAILS, 0.0)
        self.tokens = 0
        self.prompt_tokens = 0
        self.response_tokens = 0
        self.generated_lengths: set[int] = set()
        self.marks: list[tuple[float, dict, int, int, int]] = []  # (time, seconds, tokens, prompt, response)

    def now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self) -> None:
        self.marks.append((self.now(), dict(self.seconds), self.tokens, self.prompt_tokens, self.response_tokens))

    def timed(self, bucket_of, fn):
        def wrapper(*args, **kwargs):
            bucket = bucket_of(*args, **kwargs)
            if bucket is None:
                return fn(*args, **kwargs)
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[bucket] += self.now() - start
        wrapper.__wrapped__ = fn
        return wrapper

    def count_generation(self, queries, query_responses) -> None:
        context_length = queries.shape[1]
        responses = query_responses[:, context_length:]
        self.generated_lengths.add(int(responses.shape[1]))
        prompt = int((queries != self.pad_token_id).sum())
        response = int((responses != self.pad_token_id).sum())
        self.prompt_tokens += prompt
        self.response_tokens += response
        self.tokens += prompt + response

    def iterations(self) -> list[dict]:
        out = []
        for (t0, s0, k0, p0, r0), (t1, s1, k1, p1, r1) in zip(self.marks, self.marks[1:]):
            parts = {b: s1[b] - s0[b] for b in BUCKETS}
            total = t1 - t0
            parts["train"] = max(0.0, total - sum(parts.values()))
            parts["total"] = total
            out.append({"time": parts, "detail": {d: s1[d] - s0[d] for d in DETAILS}, "tokens": k1 - k0,
                        "prompt_tokens": p1 - p0, "response_tokens": r1 - r0})
        return out


def install_timers(ppo_module, timer: PhaseTimer, torch) -> None:
    """Replace the module-level helpers PPOTrainer.train() calls with timing wrappers."""
    original_generation = ppo_module.batch_generation

    def batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        # No stop token, and the pad token may not be sampled: TRL masks every pad-id token as padding,
        # so a sampled pad would silently shorten a response. Every response then has exactly
        # response_length real tokens, as in the run we compare with.
        generation_config = generation_config.__class__.from_dict(generation_config.to_dict())
        generation_config.suppress_tokens = sorted(set(generation_config.suppress_tokens or []) | {pad_token_id})
        query_responses, logits = original_generation(
            model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config)
        timer.count_generation(queries, query_responses)
        return query_responses, logits

    ppo_module.batch_generation = timer.timed(lambda *a, **k: "generate", batch_generation)

    def reward_bucket(model, *args, **kwargs):
        return "score" if model is timer.reward_model else "forward"

    ppo_module.get_reward = timer.timed(reward_bucket, ppo_module.get_reward)

    def forward_bucket(*args, **kwargs):
        # The rollout's reference forward runs under no_grad; the PPO epochs' forward (with grad) is train.
        return None if torch.is_grad_enabled() else "forward"

    ppo_module.forward = timer.timed(forward_bucket, ppo_module.forward)

    # Housekeeping the loop does every iteration (gc.collect() twice, empty_cache() several times): it stays in
    # the train bucket but is also reported on its own, since on small models it is a large share of train.
    ppo_module.empty_cache = timer.timed(lambda *a, **k: "empty_cache", ppo_module.empty_cache)
    if hasattr(ppo_module, "gc"):
        ppo_module.gc = _TimedGC(ppo_module.gc, timer.timed(lambda *a, **k: "gc_collect", ppo_module.gc.collect))


class _TimedGC:
    """Stands in for the gc module inside trl's ppo_trainer only, with a timed collect()."""

    def __init__(self, gc_module, collect):
        self._gc = gc_module
        self.collect = collect

    def __getattr__(self, name):
        return getattr(self._gc, name)


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------
def peak_memory_gb(torch) -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "ru_maxrss (process RSS)"


def versions(trl) -> dict:
    import accelerate
    import torch
    import transformers
    out = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
           "accelerate": accelerate.__version__, "python": platform.python_version()}
    try:
        import peft
        out["peft"] = peft.__version__
    except ImportError:
        out["peft"] = None
    return out


def run(spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="trl-ppo-peer-") as out_dir:  # the trainer's output_dir; nothing kept
        return _run(spec, out_dir)


def _run(spec: dict, out_dir: str) -> dict:
    trl, ppo_module, PPOConfig, PPOTrainer = import_trl_ppo()
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )

    set_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        raise PeerError(f"the tokenizer in {spec['policy']} has no pad token (TRL's PPO masks by pad id)")
    tokenizer.padding_side = "left"  # generation needs left-padded prompts

    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype, trust_remote_code=False)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=dtype,
                                                                      trust_remote_code=False)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=dtype,
                                                                      trust_remote_code=False)
    for m in (reward_model, value_model):
        if m.config.pad_token_id is None:
            m.config.pad_token_id = tokenizer.pad_token_id

    peft_config = None
    ref_model = None
    if spec["lora"] is None:
        ref_model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype, trust_remote_code=False)
    else:
        try:
            from peft import LoraConfig
        except ImportError:
            raise PeerError("lora needs peft in the peer venv (rlhf/bench/peers/setup_trl_ppo.sh installs it)") from None
        lora = spec["lora"]
        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora.get("alpha", 2 * lora["r"]),
                                 lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")

    batch_size = spec["batch_size"]
    iterations = spec["warmup_steps"] + spec["steps"]
    prompts = list(spec["prompts"])
    while len(prompts) < batch_size:  # the trainer's dataloader drops incomplete batches
        prompts += spec["prompts"][: batch_size - len(prompts)]
    dataset = Dataset.from_dict({"input_ids": prompts})

    config = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
        seed=spec["seed"], learning_rate=float(spec["learning_rate"]),
        # one PPO iteration = one rollout of batch_size prompts, split into num_mini_batches minibatches, one
        # optimizer step per minibatch (no gradient accumulation), for ppo_epochs epochs
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        num_mini_batches=spec["num_mini_batches"], num_ppo_epochs=spec["ppo_epochs"],
        local_rollout_forward_batch_size=batch_size,  # one generate() call per iteration
        total_episodes=iterations * batch_size,
        response_length=spec["response_length"], temperature=float(spec["temperature"]),
        stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        num_sample_generations=0,
        # weights are already in the requested dtype; no autocast, no gradient checkpointing
        bf16=False, fp16=False, gradient_checkpointing=False,
    )

    timer = PhaseTimer(torch, tokenizer.pad_token_id, spec["response_length"])

    class IterationMarks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timer.mark()

        def on_step_end(self, args, state, control, **kwargs):
            timer.mark()

    install_timers(ppo_module, timer, torch)
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=ref_model, reward_model=reward_model,
        value_model=value_model, train_dataset=dataset, eval_dataset=dataset, peft_config=peft_config,
        callbacks=[IterationMarks()],
    )
    timer.reward_model = trainer.reward_model
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {name: sum(p.numel() for p in module.parameters() if p.requires_grad)
                 for name, module in (("policy", wrapper.policy), ("value", wrapper.value_model))}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    per_iteration = timer.iterations()
    if len(per_iteration) != iterations:
        raise PeerError(f"expected {iterations} PPO iterations, the trainer ran {len(per_iteration)}")
    if timer.generated_lengths != {spec["response_length"]}:
        raise PeerError(f"responses were {sorted(timer.generated_lengths)} tokens long, "
                        f"not exactly response_length={spec['response_length']}")
    timed = per_iteration[spec["warmup_steps"]:]
    n = len(timed)
    mean_time = {k: sum(it["time"][k] for it in timed) / n for k in (*BUCKETS, "train", "total")}
    mean_detail = {k: sum(it["detail"][k] for it in timed) / n for k in DETAILS}
    tokens = sum(it["tokens"] for it in timed) / n
    peak, peak_kind = peak_memory_gb(torch)
    device = str(trainer.accelerator.device)
    if torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name()})"
    return {
        "trainer": TRAINER_NAME,
        "versions": versions(trl),
        "steps_timed": n,
        "warmup_steps": spec["warmup_steps"],
        "tokens_per_second": tokens / mean_time["total"] if mean_time["total"] > 0 else math.inf,
        "time": mean_time,
        "train_includes": mean_detail,
        "tokens_per_iteration": tokens,
        "prompt_tokens_per_iteration": sum(it["prompt_tokens"] for it in timed) / n,
        "response_tokens_per_iteration": sum(it["response_tokens"] for it in timed) / n,
        "iterations": [it["time"] for it in per_iteration],
        "peak_memory_gb": peak,
        "peak_memory_kind": peak_kind,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "dtype": spec["dtype"],
        "lora": spec["lora"],
        "trainable_parameters": trainable,
        "reference": "policy with adapters disabled" if getattr(trainer, "is_peft_model", False) else "separate copy",
        "batch_size": batch_size,
        "response_length": spec["response_length"],
        "ppo_epochs": spec["ppo_epochs"],
        "num_mini_batches": spec["num_mini_batches"],
    }


def write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def one_line(e: BaseException) -> str:
    msg = str(e) if isinstance(e, PeerError) else f"{type(e).__name__}: {e}"
    return " ".join(msg.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="spec JSON file")
    parser.add_argument("--out", required=True, help="result JSON file to write")
    args = parser.parse_args(argv)
    try:
        result = run(load_spec(args.spec))
    except Exception as e:  # noqa: BLE001 - every failure becomes {"error": ...}
        if not isinstance(e, PeerError):
            traceback.print_exc()
        message = one_line(e)
        print(f"trl_ppo_peer: error: {message}", file=sys.stderr)
        write_json(args.out, {"trainer": TRAINER_NAME, "error": message})
        return 1
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
