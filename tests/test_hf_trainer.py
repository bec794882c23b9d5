"""The four stages on a transformers Trainer (SFT, reward model, classifier, DPO) read our `train` section
through one mapping and share one set of rules (rlhf.stages.hf_trainer)."""

import pytest

from rlhf import config
from rlhf.errors import UserError
from rlhf.stages import classifier_stage, dpo, reward_stage, sft

TRAIN = ["--train.learning_rate", "3e-4", "--train.warmup_steps", "5", "--train.eval_steps", "4", "--train.max_steps",
         "12", "--train.weight_decay", "0.01", "--train.per_device_eval_batch_size", "3", "--seed", "7"]
STAGES = {  # config class, its TrainingArguments, the metric that picks the best checkpoint
    "sft": (config.SFTConfig, lambda cfg: sft.trl_args(cfg, "messages", True), []),
    "reward": (config.RewardConfig, lambda cfg: reward_stage.trl_args(cfg, True),
               ["--train.metric_for_best_model", "accuracy"]),
    "classifier": (config.ClassifierConfig, lambda cfg: classifier_stage.training_args(cfg, True),
                   ["--train.metric_for_best_model", "f1"]),
    "dpo": (config.DPOConfig, lambda cfg: dpo.trl_args(cfg, True), ["--train.metric_for_best_model", "accuracy"]),
}


@pytest.mark.parametrize("stage, best, greater, on_start", [
    ("sft", "eval_loss", False, True), ("reward", "eval_accuracy", True, False),
    ("classifier", "eval_f1", True, False), ("dpo", "eval_rewards/accuracies", True, True)])
def test_one_mapping_of_the_train_section(tmp_path, stage, best, greater, on_start):
    cls, to_args, own = STAGES[stage]
    cfg = config.parse(cls, [*TRAIN, *own, "--output_dir", str(tmp_path / stage)], "t")
    a = to_args(cfg)
    assert (a.learning_rate, a.max_steps, a.weight_decay, a.per_device_eval_batch_size) == (3e-4, 12, 0.01, 3)
    assert a.warmup_steps == 5 and isinstance(a.warmup_steps, int)  # a whole number of steps, not a share
    assert a.eval_steps == a.save_steps == 4  # save_steps None: every evaluation, so the best one is kept
    assert a.seed == a.data_seed == 7 and a.load_best_model_at_end
    assert a.metric_for_best_model == best and a.greater_is_better is greater
    assert a.eval_on_start is on_start  # SFT and DPO take the metrics before training inside train()
    cfg.resume = "latest"
    assert to_args(cfg).eval_on_start is False  # a resumed run does not evaluate its start again


@pytest.mark.parametrize("stage", list(STAGES))
def test_shared_rules_are_every_stages(tmp_path, stage):
    cls, _, _ = STAGES[stage]
    check = {"sft": sft.check, "reward": reward_stage.check, "classifier": classifier_stage.check, "dpo": dpo.check}
    data = ["--data.train", "x.jsonl"] if stage == "classifier" else []
    base = [*data, "--output_dir", str(tmp_path / "o"), "--train.eval_steps", "4"]
    with pytest.raises(UserError, match=r"^train.save_steps \(6\) must be a multiple of train.eval_steps \(4\)"):
        check[stage](config.parse(cls, [*base, "--train.save_steps", "6"], "t"))
    with pytest.raises(UserError, match=r"^train.early_stopping_patience needs validation data"):
        check[stage](config.parse(cls, [*base, "--train.early_stopping_patience", "2", "--data.validation_split", "0"],
                                  "t"))
    with pytest.raises(UserError, match=r"^train.max_length \(2048\) exceeds model.tiny.max_position_embeddings"):
        check[stage](config.parse(cls, [*base, "--model.name_or_path", "tiny", "--train.max_length", "2048"], "t"))
