"""PPO on the tiny model: the reward rises, only adapters and value head move, every knob shows in
the metrics, gradient accumulation does not change the update, prompts load from every source."""

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, real_file
from rewards import DigitReward, NaNReward
from safetensors.torch import load_file

from rlhf import config, ppo
from rlhf.errors import UserError
from rlhf.generation.prompts import encode_prompts, left_pad, load_prompts, position_ids
from rlhf.ppo import config as ppo_cfg
from rlhf.ppo import models, rollout

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def sft_policy(tmp_path_factory):
    """A tiny policy that has learnt the synthetic tasks: the SFT quickstart (full SFT, ~15 s)."""
    from rlhf.stages import sft

    out = tmp_path_factory.mktemp("sft") / "policy"
    sft.main(config.parse(config.SFTConfig, ["--config", str(REPO / "configs" / "sft_tiny.yaml"),
                                             "--output_dir", str(out)],
                          "rlhf sft"))
    return str(out)


def ppo_config(tmp_path, policy, *args):
    base = ["--model.name_or_path", policy, "--data.train", "builtin:quickstart_prompts",
            "--output_dir", str(tmp_path / "ppo"), "--ppo.steps", "2", "--ppo.learning_rate", "3e-3",
            "--ppo.max_new_tokens", "8", "--ppo.per_device_rollout_batch_size", "16",
            "--ppo.num_mini_batches", "2", "--ppo.temperature", "1.0", "--sample_every", "0", "--save_steps", "1000"]
    return config.parse(ppo.PPOConfig, base + list(args), "rlhf ppo")


def test_reward_rises_while_kl_stays_bounded(tmp_path, sft_policy):
    cfg = ppo_config(tmp_path, sft_policy, "--ppo.steps", "40", "--ppo.per_device_rollout_batch_size", "32",
                     "--ppo.kl_coef", "0.02")
    h = ppo.main(cfg, reward=DigitReward())
    first = sum(m["objective/scores"] for m in h[:5]) / 5
    last = sum(m["objective/scores"] for m in h[-5:]) / 5
    # Bounds from the spread over seeds 0-9 of these settings (measured 2026-12, 2-core CPU): the mean score
    # of the first 5 steps 0.23-0.38, of the last 5 0.79-0.85 (rise 0.42-0.59); the KL of single steps spikes
    # (max 5.3-12.0: a fixed bound of 6 failed on other machines), its mean over the last 5 steps 3.6-4.7.
    assert last > first + 0.2, (first, last)  # a quarter of the bundled prompts have number answers
    kl = [m["objective/kl"] for m in h]
    assert sum(kl[-5:]) / 5 < 8.0 and max(kl) < 25.0, kl
    assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # LoRA B = 0: policy == reference at start
    # The exported policy adapter loads on its base with plain peft and is not the base any more.
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ppo"
    x = torch.tensor([[3, 40, 41, 42]])
    with torch.no_grad():
        tuned = AutoPeftModelForCausalLM.from_pretrained(out / "policy")(input_ids=x).logits
        base = AutoModelForCausalLM.from_pretrained(sft_policy)(input_ids=x).logits
    assert (tuned - base).abs().max() > 1e-3
    assert (out / "critic" / "value_head.safetensors").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))


def initial_state(cfg) -> dict[str, torch.Tensor]:
    from accelerate import PartialState

    PartialState()
    _, ac, _ = models.build_models(cfg, True)
    return {k: v.detach().clone() for k, v in ac.state_dict().items()}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_only_policy_critic_and_value_head_change(tmp_path, sft_policy, method):
    cfg = ppo_config(tmp_path, sft_policy, "--peft.method", method, "--save_steps", "2")
    before = initial_state(cfg)
    ppo.main(cfg, reward=DigitReward())
    after = load_file(tmp_path / "ppo" / "checkpoint-2" / "model.safetensors")
    assert set(after) <= set(before)
    if method == "qlora":
        # bitsandbytes' CPU backend repacks 4-bit weights and re-serialises their quantisation constants
        # between train and eval passes, so packed bytes are not comparable; those weights are not
        # trainable at all (checked here), the rest (embeddings, norms, LM head) is compared.
        trainable = {n for n, p in models.build_models(cfg, True)[1].named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
        after = {k: v for k, v in after.items() if v.dtype != torch.uint8 and "absmax" not in k
                 and "quant_" not in k and before[k].shape == v.shape}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    if method in ("lora", "qlora"):
        assert changed and all(("lora_" in k) or k.startswith("value_head.") for k in changed)
        assert any("lora_B.policy" in k for k in changed) and any("lora_B.critic" in k for k in changed)
        assert {"value_head.summary.weight", "value_head.summary.bias"} <= changed
    else:
        assert not any(k.startswith("reference.") for k in changed)  # the frozen reference copy
        assert any(k.startswith("policy.") for k in changed) and any(k.startswith("critic.") for k in changed)
        assert "value_head.summary.weight" in changed


def test_gradient_accumulation_gives_the_same_update(tmp_path, sft_policy):
    one = ppo_config(tmp_path / "a", sft_policy, "--ppo.steps", "1", "--save_steps", "1")
    two = ppo_config(tmp_path / "b", sft_policy, "--ppo.steps", "1", "--save_steps", "1",
                     "--ppo.gradient_accumulation_steps", "4")
    ppo.main(one, reward=DigitReward())
    ppo.main(two, reward=DigitReward())
    a = load_file(tmp_path / "a" / "ppo" / "checkpoint-1" / "model.safetensors")
    b = load_file(tmp_path / "b" / "ppo" / "checkpoint-1" / "model.safetensors")
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
        moved += int("lora_B" in k and a[k].abs().max() > 0)
    assert moved > 0  # the update did something


def _run(tmp_path, policy, *args, reward=None):
    return ppo.main(ppo_config(tmp_path, policy, *args), reward=reward or DigitReward())


def test_kl_coef_and_kl_estimator(tmp_path, sft_policy):
    h0 = _run(tmp_path / "a", sft_policy, "--ppo.kl_coef", "0")
    assert all(m["objective/non_score_reward"] == 0 for m in h0)
    assert all(m["objective/rlhf_reward"] == pytest.approx(m["objective/scores_normalized"]) for m in h0)
    h1 = _run(tmp_path / "b", sft_policy, "--ppo.kl_coef", "0.5", "--ppo.kl_estimator", "k2")
    # k2 = (log p - log q)^2 / 2 >= 0 per token, so the penalty can only lower the reward
    assert all(m["objective/kl"] >= 0 and m["objective/non_score_reward"] <= 0 for m in h1)
    assert h1[1]["objective/non_score_reward"] == pytest.approx(-0.5 * h1[1]["objective/kl"], rel=1e-4)


def test_adaptive_kl_moves_the_coefficient(tmp_path, sft_policy):
    h = _run(tmp_path, sft_policy, "--ppo.steps", "3", "--ppo.adaptive_kl", "true", "--ppo.kl_target", "0.0001",
             "--ppo.kl_horizon", "100", "--ppo.kl_coef", "0.1", "--ppo.kl_estimator", "k3")  # k3 >= 0
    coefs = [m["objective/kl_coef"] for m in h]
    assert h[0]["objective/kl"] == pytest.approx(0, abs=1e-6) and coefs[1] < coefs[0]  # KL below target: falls
    assert h[1]["objective/kl"] > 0.0001 and coefs[2] > coefs[1]  # KL above target: rises


def test_reward_normalisation_clip_and_eos_penalty(tmp_path, sft_policy):
    h = _run(tmp_path / "a", sft_policy, "--ppo.reward_normalization", "running")
    # first batch: its own mean is subtracted; then the default missing-EOS penalty (1.0) is paid
    assert h[0]["objective/scores_normalized"] == pytest.approx(-(1 - h[0]["response/eos_rate"]), abs=1e-5)
    h = _run(tmp_path / "b", sft_policy, "--ppo.reward_clip", "0.05")
    assert all(m["objective/scores_normalized"] <= 0.05 + 1e-6 for m in h)
    assert any(m["objective/scores"] > 0.05 for m in h)
    # One token per response: most cannot end with EOS, and those pay the penalty.
    h = _run(tmp_path / "c", sft_policy, "--ppo.max_new_tokens", "1", "--ppo.missing_eos_penalty", "2.0",
             "--ppo.reward_normalization", "none")
    for m in h:
        assert m["response/eos_rate"] < 0.9 and m["response/length"] == 1
        expected = m["objective/scores"] - 2.0 * (1 - m["response/eos_rate"])
        assert m["objective/scores_normalized"] == pytest.approx(expected, abs=1e-5)


def test_sampling_knobs(tmp_path, sft_policy):
    cold = _run(tmp_path / "a", sft_policy, "--ppo.temperature", "0.3", "--ppo.max_new_tokens", "12")
    hot = _run(tmp_path / "b", sft_policy, "--ppo.temperature", "2.0", "--ppo.max_new_tokens", "12")
    assert hot[0]["policy/entropy"] > cold[0]["policy/entropy"]
    assert all(m["response/length"] <= 12 for m in cold + hot)
    assert cold[0]["response/eos_rate"] > 0.8  # a trained policy stops at the stop token
    free = _run(tmp_path / "c", sft_policy, "--ppo.stop_token", "None", "--ppo.max_new_tokens", "6",
                "--ppo.temperature", "0.3")
    assert free[0]["response/length"] > cold[0]["response/length"]  # no truncation after EOS


def test_value_clip_and_vf_coef(tmp_path, sft_policy):
    h = _run(tmp_path / "a", sft_policy, "--ppo.cliprange_value", "1e-6", "--ppo.ppo_epochs", "2")
    assert h[0]["val/clipfrac"] > 0.3
    h = _run(tmp_path / "b", sft_policy, "--ppo.cliprange_value", "None", "--ppo.ppo_epochs", "2")
    assert h[0]["val/clipfrac"] == 0
    h = _run(tmp_path / "c", sft_policy, "--ppo.cliprange", "1e-6", "--ppo.ppo_epochs", "3")
    assert h[0]["policy/clipfrac"] > 0.2


def test_nan_reward_is_reported_not_propagated(tmp_path, sft_policy):
    with pytest.warns(UserWarning, match="NaN"):
        h = _run(tmp_path, sft_policy, reward=NaNReward())
    assert h[0]["objective/nan_scores"] == 0.5  # a few NaNs: a warning; all of them: tests/test_bad_inputs.py
    assert all(torch.isfinite(torch.tensor(m["loss/policy"])) for m in h)


def test_batch_sizes_divide_exactly():
    p = ppo.PPOHyperparameters(per_device_rollout_batch_size=16, num_mini_batches=2, gradient_accumulation_steps=4,
                               steps=10, ppo_epochs=3)
    s = ppo_cfg.batch_sizes(p, world=2)
    assert (s.global_rollout, s.local_mini_batch, s.micro_batch, s.optimizer_steps) == (32, 8, 2, 60)
    with pytest.raises(UserError, match=r"divisible by ppo.num_mini_batches \(3\)"):
        ppo_cfg.batch_sizes(ppo.PPOHyperparameters(per_device_rollout_batch_size=16, num_mini_batches=3), 1)
    with pytest.raises(UserError, match=r"divisible by\s+ppo.gradient_accumulation_steps \(3\)"):
        ppo_cfg.batch_sizes(ppo.PPOHyperparameters(per_device_rollout_batch_size=16, gradient_accumulation_steps=3), 1)


def test_prompts_from_every_source(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"prompt": "plain text"}]
    (tmp_path / "m.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps(rows[1]) + "\n")
    assert load_prompts(ppo.PromptDataConfig(train=str(tmp_path / "m.jsonl"))) == [[{"role": "user", "content": "hi"}]]
    assert load_prompts(ppo.PromptDataConfig(train=str(tmp_path / "p.jsonl"))) == [
        [{"role": "user", "content": "plain text"}]]
    builtin = load_prompts(ppo.PromptDataConfig())
    assert len(builtin) > 100 and all(p[-1]["role"] == "user" for p in builtin)


def test_hh_rlhf_prompts_usable_directly():
    prompts = load_prompts(ppo.PromptDataConfig(train=str(real_file("hh_rlhf_helpful_base_test_first1000.jsonl"))))
    assert len(prompts) > 500
    assert all(p[-1]["role"] == "user" for p in prompts)
    assert any(len(p) > 1 for p in prompts)  # multi-turn context kept


def test_wandb_offline_run_holds_ppo_metrics_and_samples(tmp_path, sft_policy, monkeypatch):
    import glob

    import wandb_log

    monkeypatch.setenv("WANDB_MODE", "offline")
    _run(tmp_path, sft_policy, "--ppo.steps", "3", "--sample_every", "2", "--tracking.report_to", "wandb",
         "--tracking.project", "ppo-test")
    [run_file] = glob.glob(str(tmp_path / "ppo" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_log.history(run_file)
    logged = [r for r in rows if "objective/scores" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    for key in ("objective/kl", "policy/clipfrac", "val/explained_variance", "response/eos_rate",
                "time/generate", "tokens_per_second", "memory/peak_gb"):
        assert all(key in r for r in logged), key
    assert any(k.startswith("samples") for r in rows for k in r)  # the sample table at step 2
    info = wandb_log.run_info(run_file)
    assert info.project == "ppo-test"
    assert {i.key for i in info.config.update} >= {"ppo", "model", "reward"}


def test_advantage_and_return_knobs(tmp_path, sft_policy):
    white = _run(tmp_path / "a", sft_policy, "--ppo.steps", "1")
    assert white[0]["policy/advantages_std"] == pytest.approx(1.0, abs=0.05)
    assert abs(white[0]["policy/advantages_mean"]) < 1e-4
    raw = _run(tmp_path / "b", sft_policy, "--ppo.steps", "1", "--ppo.whiten_advantages", "false")
    assert raw[0]["policy/advantages_std"] != pytest.approx(1.0, abs=0.05)
    # Same rollout (same seed); only the discount differs: returns shrink with gamma.
    short = _run(tmp_path / "c", sft_policy, "--ppo.steps", "1", "--ppo.gamma", "0.5", "--ppo.lam", "1.0")
    full = _run(tmp_path / "d", sft_policy, "--ppo.steps", "1", "--ppo.gamma", "1.0", "--ppo.lam", "1.0")
    assert short[0]["objective/scores"] == full[0]["objective/scores"]
    assert short[0]["val/returns_mean"] != pytest.approx(full[0]["val/returns_mean"], abs=1e-4)


def test_learning_rate_schedule(tmp_path, sft_policy):
    linear = _run(tmp_path / "a", sft_policy, "--ppo.steps", "3", "--ppo.lr_scheduler_type", "linear")
    const = _run(tmp_path / "b", sft_policy, "--ppo.steps", "3", "--ppo.lr_scheduler_type", "constant")
    assert [m["lr"] for m in const] == [3e-3] * 3
    lrs = [m["lr"] for m in linear]
    assert lrs[0] < 3e-3 and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-9)


def tensor_of(directory, suffix):
    weights = {k: v for f in Path(directory).glob("*.safetensors") for k, v in load_file(f).items()}
    return next(v for k, v in weights.items() if k.endswith(suffix))


def test_critic_initialised_from_the_reward_model(tmp_path, sft_policy):
    from accelerate import PartialState

    from reward.interface import load_reward
    from rlhf.stages import reward_stage

    rm_dir = tmp_path / "rm"
    reward_stage.main(config.parse(config.RewardConfig, [
        "--config", str(REPO / "configs" / "reward_tiny.yaml"), "--model.name_or_path", sft_policy,
        "--output_dir", str(rm_dir), "--train.max_steps", "10", "--train.eval_steps", "10", "--peft.method", "lora",
        "--train.learning_rate", "3e-3"], "t"))
    cfg = ppo_config(tmp_path, sft_policy, "--reward.spec", str(rm_dir))  # critic_init: auto finds it fits
    PartialState()
    tokenizer, ac, _ = models.build_models(cfg, True)
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    expected = load_reward(str(rm_dir)).score([prompt, prompt], ["5", "7"])
    for response, want in zip(["5", "7"], expected):
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True)
        ids = torch.tensor([ids["input_ids"] if hasattr(ids, "keys") else ids])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            values = ac.values(ids, mask, position_ids(mask))
        assert values[0, -1].item() == pytest.approx(want.item(), abs=1e-4)  # critic starts as the reward model

    # auto falls back to the policy where the reward model does not fit; `reward` insists
    _, ac, _ = models.build_models(ppo_config(tmp_path, sft_policy, "--reward.spec", str(rm_dir), "--peft.method", "full"),
                                True)
    assert not torch.equal(ac.value_head.summary.weight, tensor_of(rm_dir, "score.weight"))
    with pytest.raises(UserError, match="needs a fully fine-tuned reward model"):
        models.build_models(ppo_config(tmp_path, sft_policy, "--reward.spec", str(rm_dir), "--peft.method", "full",
                                    "--ppo.critic_init", "reward"), True)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rollout_logprobs_match_a_full_forward(tmp_path, sft_policy, method):
    """forward_rollout keeps only the response positions' logits (logits_to_keep); the logprobs must be
    those of an ordinary full-sequence forward of the policy and of the reference."""
    from policies.models import load_causal_lm

    cfg = ppo_config(tmp_path, sft_policy, "--peft.method", method)
    tok, ac, path = models.build_models(cfg, True)
    ac.eval()
    prompts = load_prompts(cfg.data)[:5]
    q, qm = left_pad(encode_prompts(tok, prompts, 64), tok.pad_token_id)
    torch.manual_seed(0)
    resp = torch.randint(3, len(tok), (5, 6))
    ids, mask = torch.cat([q, resp], 1), torch.cat([qm, torch.ones_like(resp)], 1)
    pos = position_ids(mask)
    with torch.no_grad():
        for p in ac.value_head.parameters():  # not all-zero, so values are checked too
            p.add_(0.1)
        lp, ref_lp, values, _ = rollout.forward_rollout(ac, ids, mask, pos, resp, q.shape[1], 0.7, chunk=2)
        plain = load_causal_lm(path, cfg.model, "full").eval()
        full = plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, q.shape[1] - 1:-1] / 0.7
        expected = torch.log_softmax(full.float(), -1).gather(-1, resp[..., None])[..., 0]
    assert torch.allclose(ref_lp, expected, atol=1e-5)
    assert torch.allclose(lp, expected, atol=1e-5)  # a fresh LoRA (B = 0) / an untouched copy is the reference
    assert values.shape == (5, 6) and values.abs().sum() > 0
