"""Reward-model training on the tiny model: which parameters move, held-out accuracy, save/reload,
margin and centring in the loss, resume, bad configs."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO, real_file

from reward import load_reward
from rlhf import config
from rlhf.data.synthetic import WORDS
from rlhf.errors import UserError
from rlhf.stages import reward_stage


def easy_pairs(path: Path, n: int = 240, seed: int = 0) -> Path:
    """Correct replies against the word left as it was (an easy, learnable preference), with margins."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        question, answer = rng.choice([(f"Write {w} in capital letters.", w.upper()),
                                       (f"Reverse the word {w}.", w[::-1])])
        prompt = ([{"role": "system", "content": "Answer briefly."}] if rng.random() < 0.3 else []) + \
            [{"role": "user", "content": question}]
        rows.append({"prompt": prompt, "chosen": answer, "rejected": w, "margin": rng.choice([0.5, 1.0])})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reward_config(tmp_path, *args: str):
    base = ["--config", str(REPO / "configs" / "reward_tiny.yaml"), "--output_dir", str(tmp_path / "out"),
            "--train.max_steps", "4", "--train.eval_steps", "2", "--train.logging_steps", "1",
            "--train.per_device_train_batch_size", "8", "--data.max_samples", "64", "--train.max_length", "64",
            "--model.name_or_path", "tiny"]
    for flag, value in (("--peft.method", "lora"), ("--train.learning_rate", "3e-3")):
        if flag not in args:  # these tests train LoRA reward models on the tiny base unless they say otherwise
            base += [flag, value]
    return config.parse(config.RewardConfig, base + list(args), "rlhf reward")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_training_moves_adapter_and_score_head_only_and_reloads_identically(tmp_path, method):
    cfg = reward_config(tmp_path, "--peft.method", method, "--train.learning_rate", "1e-2",
                        "--data.train", str(easy_pairs(tmp_path / "easy.jsonl")))
    trainer, pairs = reward_stage.build(cfg)
    before = snapshot(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".score." in f".{n}"}
    assert head, "the score head must be trainable"
    if method != "full":
        assert all("lora_" in n or n in head for n in trainable)
        assert all("modules_to_save" in n for n in head)  # saved with the adapter
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed <= trainable  # the (4-bit) base did not move
    assert head <= changed
    if method != "full":
        assert {n for n in trainable if "lora_B" in n} <= changed

    reward = reward_stage.as_reward(trainer, cfg.train.max_length, 8)
    val = pairs["validation"]
    expected = reward_stage.score_pairs(reward, val)
    reward_stage.save(trainer, cfg, {"mean": 1.0, "std": 2.0, "n": 2}, {})
    out = Path(cfg.output_dir)
    info = json.loads((out / "reward_info.json").read_text())
    assert info["kind"] == "preference" and info["adapter"] == (method != "full")
    assert info["quantized"] == (method == "qlora") and info["max_length"] == 64
    assert (out / ("adapter_model.safetensors" if method != "full" else "model.safetensors")).exists()
    assert (out / "chat_template.jinja").exists() and (out / "tokenizer.json").exists()
    reloaded = load_reward(str(out), batch_size=5)
    got = reloaded.score(val["prompt"], val["chosen"]), reloaded.score(val["prompt"], val["rejected"])
    # QLoRA: the base is re-quantised identically, but TRL trained the adapter in bf16 and it reloads in fp32
    tol = 2e-3 if method == "qlora" else 1e-5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    torch.testing.assert_close(reloaded.score(val["prompt"], val["chosen"], normalize=True), (got[0] - 1.0) / 2.0)


def test_easy_preference_beats_chance_on_held_out_pairs(tmp_path):
    data = easy_pairs(tmp_path / "easy.jsonl")
    m = reward_stage.main(reward_config(tmp_path, "--data.train", str(data), "--data.max_samples", "240",
                                        "--data.validation_split", "0.25", "--train.max_steps", "40",
                                        "--train.eval_steps", "20", "--train.per_device_train_batch_size", "16",
                                        "--train.learning_rate", "1e-2", "--train.warmup_steps", "0"))
    assert m["global_step"] == 40
    assert m["eval_accuracy"] >= 0.85, m  # 60 held-out pairs; chance is 0.5
    out = Path(tmp_path / "out")
    for name in ("adapter_model.safetensors", "reward_info.json", "metrics.json", "rlhf_config.yaml",
                 "checkpoint-20", "checkpoint-40", "base_model"):
        assert (out / name).exists(), name
    assert not (out / ".final.tmp").exists()
    info = json.loads((out / "reward_info.json").read_text())
    assert info["normalization"]["n"] == 120  # chosen and rejected replies of the 60 validation pairs
    assert info["base_model"] == "base_model"

    # The reloaded model orders the held-out pairs exactly as the trained one did, and its scores on the
    # reference set have the stored mean and std (so normalize=True standardises them).
    from rlhf.config import PreferenceDataConfig

    _, val, _ = reward_stage.load_preference_data(PreferenceDataConfig(train=str(data), validation_split=0.25), 42)
    reward = load_reward(str(out))
    chosen, rejected = reward.score(val["prompt"], val["chosen"]), reward.score(val["prompt"], val["rejected"])
    assert (chosen > rejected).float().mean().item() == pytest.approx(m["eval_accuracy"])
    normed = reward.score(list(val["prompt"]) * 2, list(val["chosen"]) + list(val["rejected"]), normalize=True)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normed.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)


def test_margin_and_centring_enter_the_loss(tmp_path):
    cfg = reward_config(tmp_path, "--data.train", str(easy_pairs(tmp_path / "easy.jsonl")),
                        "--reward.use_margin", "true", "--reward.margin_scale", "2.0",
                        "--reward.center_rewards_coefficient", "0.1")
    trainer, pairs = reward_stage.build(cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch["margin"].tolist()) <= {1.0, 2.0}  # 0.5 and 1.0, scaled by 2
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    rc, rr = rewards.chunk(2)
    expected = -torch.nn.functional.logsigmoid(rc - rr - batch["margin"]).mean() + 0.1 * ((rc + rr) ** 2).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

    plain, _ = reward_stage.build(reward_config(tmp_path / "b", "--data.train", str(tmp_path / "easy.jsonl")))
    assert "margin" not in next(iter(plain.get_train_dataloader()))


def test_resume_continues_to_the_same_step(tmp_path):
    from safetensors.torch import load_file

    args = ("--train.save_steps", "2", "--train.max_steps", "4")
    reward_stage.main(reward_config(tmp_path / "a", *args))
    reward_stage.main(reward_config(tmp_path / "b", *args))
    out_b = tmp_path / "b" / "out"
    shutil.rmtree(out_b / "checkpoint-4")
    (out_b / "checkpoint-6").mkdir()  # incomplete (no trainer_state.json): skipped
    m = reward_stage.main(reward_config(tmp_path / "b", *args, "--resume", "latest"))
    assert m["global_step"] == 4
    a = load_file(tmp_path / "a" / "out" / "adapter_model.safetensors")
    b = load_file(out_b / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (("--peft.method", "prefix_tuning"), "peft.method=prefix_tuning is not supported by `rlhf reward`"),
    (("--reward.use_margin", "true"), "reward.use_margin is set but the training pairs carry no margin"),
    (("--data.validation_split", "0"), "reward.normalize_on=validation needs validation data"),
    (("--data.options.min_score_ratio", "3"), "format 'pairs' has no option min_score_ratio"),
    (("--data.format", "hh_rlhf"), "format 'hh_rlhf'|hh_rlhf"),
    (("--train.save_steps", "3"), "must be a multiple of train.eval_steps"),
    (("--data.train", "missing.jsonl"), "data file 'missing.jsonl' does not exist"),
])
def test_bad_configs_are_user_errors(tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        reward_stage.build(reward_config(tmp_path, *args))
    assert not (tmp_path / "out" / "base_model").exists()  # failed before writing anything


def test_real_hh_pairs_keep_the_reply_and_train(tmp_path):
    path = real_file("hh_rlhf_helpful_base_test_first1000.jsonl")
    trainer, pairs = reward_stage.build(reward_config(
        tmp_path, "--data.train", str(path), "--data.max_samples", "32", "--train.max_length", "96",
        "--peft.method", "full", "--train.learning_rate", "3e-3", "--train.max_steps", "6"))
    row, pair = trainer.train_dataset[0], pairs["train"][0]
    text = trainer.processing_class.decode(row["chosen_ids"])
    assert len(row["chosen_ids"]) <= 96
    assert text.endswith(pair["chosen"][-20:] + "<|end|>\n")  # a long prompt loses its start, not the reply
    before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    trainer.train()
    assert trainer.evaluate(trainer.train_dataset)["eval_loss"] < before


def test_reward_model_starts_from_an_sft_lora_adapter(tmp_path):
    """model.name_or_path may be a LoRA adapter (an SFT output): it is merged into its base first."""
    import peft
    from transformers import AutoModelForCausalLM

    from policies import models
    from policies.config import ModelConfig

    base = models.materialize(ModelConfig(), tmp_path / "sft" / "base_model", seed=1)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], init_lora_weights=False)
    lm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    lm.save_pretrained(tmp_path / "sft")
    models.load_tokenizer(base, ModelConfig()).save_pretrained(tmp_path / "sft")
    merged = lm.merge_and_unload()

    cfg = reward_config(tmp_path, "--model.name_or_path", str(tmp_path / "sft"), "--train.max_steps", "2")
    trainer, _ = reward_stage.build(cfg)
    body = trainer.model.get_base_model().model
    q = body.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(q, merged.model.layers[0].self_attn.q_proj.weight)  # the SFT update is in
    trainer.train()
    reward_stage.save(trainer, cfg, {"mean": 0.0, "std": 1.0, "n": 2}, {})
    info = json.loads((tmp_path / "out" / "reward_info.json").read_text())
    assert info["base_model"] == "base_model" and (tmp_path / "out" / "base_model" / "merged_from.json").exists()
    prompts = [[{"role": "user", "content": "Write cat in capital letters."}]]
    expected = reward_stage.as_reward(trainer, 64, 4).score(prompts, ["CAT"])
    torch.testing.assert_close(load_reward(str(tmp_path / "out")).score(prompts, ["CAT"]), expected, atol=1e-5, rtol=0)


def test_early_stopping_on_validation_accuracy(tmp_path):
    # A learning rate far too high: after the first evaluations the model stops improving.
    m = reward_stage.main(reward_config(tmp_path, "--peft.method", "full", "--train.learning_rate", "1.0",
                                        "--train.lr_scheduler_type", "constant", "--train.warmup_steps", "0",
                                        "--train.max_steps", "40", "--train.eval_steps", "1",
                                        "--train.early_stopping_patience", "2",
                                        "--train.metric_for_best_model", "accuracy"))
    assert m["global_step"] < 40
    state = json.loads((Path(m["best_checkpoint"]) / "trainer_state.json").read_text())
    accuracies = [e["eval_accuracy"] for e in state["log_history"] if "eval_accuracy" in e]
    assert state["best_metric"] == pytest.approx(max(accuracies))


def test_wandb_offline_run_holds_pairwise_accuracy(tmp_path, monkeypatch):
    import glob

    import wandb_log

    monkeypatch.setenv("WANDB_MODE", "offline")
    reward_stage.main(reward_config(tmp_path, "--tracking.report_to", "wandb", "--tracking.project", "rm-test"))
    [run_file] = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_log.history(run_file)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert len(evals) == 2 and all(0 <= r["eval/accuracy"] <= 1 and "eval/margin" in r for r in evals)
    assert len([r for r in rows if "train/loss" in r]) == 4  # logging_steps 1
    assert wandb_log.run_info(run_file).project == "rm-test"
