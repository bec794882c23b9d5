"""SFT training on the tiny model: masking, every PEFT method, resume, early stopping, W&B offline."""

import glob
import json
import re
import shutil

import pytest
import torch
from conftest import real_file, sft_config

from rlhf.stages import sft


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def labelled_text(trainer, index=0) -> str:
    """Decode the tokens of one training row that carry the loss (label != -100)."""
    batch = trainer.data_collator([trainer.train_dataset[index]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    return trainer.processing_class.decode(ids[labels != -100])


def test_assistant_only_loss_on_assistant_turns(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse cat."},
                          {"role": "assistant", "content": "tac"}, {"role": "user", "content": "Upper dog."},
                          {"role": "assistant", "content": "DOG"}]}] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, fmt = sft.build(sft_config(tmp_path, "--data.train", str(tmp_path / "d.jsonl"),
                                        "--data.validation_split", "0", "--data.max_samples", "4"))
    assert fmt == "messages"
    assert labelled_text(trainer) == "tac<|end|>DOG<|end|>"  # replies and their EOS, nothing else

    trainer, _ = sft.build(sft_config(tmp_path, "--data.train", str(tmp_path / "d.jsonl"),
                                      "--data.validation_split", "0", "--train.completion_only_loss", "false"))
    assert "Reverse cat." in labelled_text(trainer)  # loss on every token when asked


def test_completion_only_loss_on_prompt_completion(tmp_path):
    rows = [{"instruction": "Write cat in capital letters.", "input": "", "output": "CAT"}] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, fmt = sft.build(sft_config(tmp_path, "--data.train", str(tmp_path / "d.jsonl"),
                                        "--data.validation_split", "0"))
    assert fmt == "alpaca"
    assert labelled_text(trainer).strip() == "CAT<|end|>"


# method -> pattern that every trainable parameter's name matches
TRAINABLE = {
    "full": r".",
    "lora": r"lora_[AB]",
    "qlora": r"lora_[AB]",
    "prefix_tuning": r"prompt_encoder",
    "prompt_tuning": r"prompt_encoder",
    "ia3": r"ia3_l",
    "ln_tuning": r"ln_tuning_layers.*norm|norm.*ln_tuning_layers|ln_tuning_layers",
}


@pytest.mark.parametrize("method", list(TRAINABLE))
def test_each_peft_method_trains_only_its_parameters(tmp_path, method):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    lr = "3e-3" if method == "full" else "2e-2"
    trainer, _ = sft.build(sft_config(tmp_path, "--peft.method", method, "--train.learning_rate", lr,
                                      "--peft.num_virtual_tokens", "4"))
    before = snapshot(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(TRAINABLE[method], n) for n in trainable)
    if method != "full":
        assert len(trainable) < len(before)
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    # Compared before the next evaluation: on CPU bitsandbytes repacks 4-bit weights for inference.
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert trainer.evaluate()["eval_loss"] < loss_before
    assert changed <= trainable  # frozen weights (the base, the 4-bit weights) did not move
    if method == "lora" or method == "qlora":
        assert {n for n in trainable if "lora_B" in n} <= changed  # every adapter matrix learned
    else:
        assert len(changed) >= 0.9 * len(trainable)

    if method == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())

    # The saved output loads back with plain peft / transformers and gives the trained model's logits.
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    x = torch.tensor([[3, 40, 41, 42, 43]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=x).logits
        if method == "full":
            loaded = AutoModelForCausalLM.from_pretrained(out)
        elif method == "qlora":
            from policies.config import ModelConfig
            from policies.models import quantization_config

            loaded = AutoPeftModelForCausalLM.from_pretrained(out, quantization_config=quantization_config(ModelConfig()))
        else:
            loaded = AutoPeftModelForCausalLM.from_pretrained(out)
        got = loaded(input_ids=x).logits
    tol = 1e-3 if method == "qlora" else 1e-4  # bnb's CPU 4-bit kernels differ by layout at ~1e-4
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_real_alpaca_trains(tmp_path):
    trainer, fmt = sft.build(sft_config(tmp_path, "--data.train", str(real_file("alpaca_data_first1000.jsonl")),
                                        "--data.max_samples", "48", "--train.max_length", "96",
                                        "--train.max_steps", "4", "--train.learning_rate", "5e-3",
                                        "--peft.method", "full"))
    assert fmt == "alpaca"
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_real_oasst_threads_train(tmp_path):
    trainer, fmt = sft.build(sft_config(tmp_path, "--data.train", str(real_file("oasst_en_100_message_trees.jsonl")),
                                        "--data.max_samples", "40", "--train.max_length", "128",
                                        "--train.max_steps", "4", "--train.learning_rate", "5e-3",
                                        "--peft.method", "full"))
    assert fmt == "oasst"
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_main_writes_outputs_and_resume_matches_straight_run(tmp_path):
    from safetensors.torch import load_file

    straight = sft.main(sft_config(tmp_path / "a", "--train.save_steps", "3"))
    out_a = tmp_path / "a" / "out"
    assert straight["eval_loss_after"] < straight["eval_loss_before"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "rlhf_config.yaml",
                 "metrics.json", "checkpoint-3", "checkpoint-6"):
        assert (out_a / name).exists(), name
    assert not (out_a / ".final.tmp").exists()

    # Same run, "killed" after its step-3 checkpoint (step 6 lost, a half-written checkpoint left behind).
    sft.main(sft_config(tmp_path / "b", "--train.save_steps", "3"))
    out_b = tmp_path / "b" / "out"
    shutil.rmtree(out_b / "checkpoint-6")
    (out_b / "adapter_model.safetensors").unlink()
    (out_b / "checkpoint-9").mkdir()  # no trainer_state.json: incomplete, must be skipped
    resumed = sft.main(sft_config(tmp_path / "b", "--train.save_steps", "3", "--resume", "latest"))
    assert resumed["global_step"] == 6
    # the summary of a resumed run is the straight run's (not the resumed part's loss, tokens restarting at 0)
    saved = json.loads((out_b / "metrics.json").read_text())
    for key in ("train_loss", "eval_loss_before", "eval_loss_after", "num_input_tokens_seen"):
        assert saved[key] == pytest.approx(straight[key], rel=1e-5), key
    assert straight["num_input_tokens_seen"] > 0
    a, b = load_file(out_a / "adapter_model.safetensors"), load_file(out_b / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_early_stopping_keeps_best_checkpoint(tmp_path):
    # A learning rate far too high: validation loss gets worse after the first evaluation.
    m = sft.main(sft_config(tmp_path, "--peft.method", "full", "--train.learning_rate", "0.5",
                            "--train.max_steps", "30", "--train.eval_steps", "2",
                            "--train.early_stopping_patience", "2", "--train.lr_scheduler_type", "constant"))
    assert m["global_step"] < 30
    assert m["best_checkpoint"] is not None
    best = json.loads((tmp_path / "out" / m["best_checkpoint"].split("/")[-1] / "trainer_state.json").read_text())
    assert best["best_metric"] == pytest.approx(min(e["eval_loss"] for e in best["log_history"] if "eval_loss" in e)) \
        or m["eval_loss_after"] <= max(e["eval_loss"] for e in best["log_history"] if "eval_loss" in e)


def test_wandb_offline_run_holds_training_loss(tmp_path, monkeypatch, capsys):
    import wandb_log

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no login
    sft.main(sft_config(tmp_path, "--tracking.report_to", "wandb", "--tracking.project", "proj",
                        "--tracking.tags", "t1", "t2", "--tracking.group", "g"))
    out = capsys.readouterr().out
    assert "logging offline" in out and "wandb sync" in out
    [run_file] = glob.glob(str(tmp_path / "out" / "wandb" / "offline-run-*" / "run-*.wandb"))
    losses = [r["train/loss"] for r in wandb_log.history(run_file) if "train/loss" in r]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)  # logging_steps 1, 6 steps
    info = wandb_log.run_info(run_file)
    assert info.project == "proj" and list(info.tags) == ["t1", "t2"] and info.run_group == "g"
    logged = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert logged["peft"]["method"] == "lora" and logged["output_dir"] == str(tmp_path / "out")
