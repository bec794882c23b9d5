"""The `rlhf` command: one subcommand per stage or tool.

    rlhf sft --config FILE [--section.field VALUE ...]
    rlhf reward | classifier | dpo --config FILE [--section.field VALUE ...]
    rlhf eval reward --model DIR --data SOURCE
    rlhf generate --model DIR --prompts.train SOURCE [--output FILE.jsonl]
    rlhf data check SOURCE [--format F]
    rlhf bench align | agents | speed [--field VALUE ...]
    rlhf merge ADAPTER_DIR OUT_DIR
    rlhf estimate-memory --model NAME_OR_SIZE --method full|lora|qlora --zero 0-3 --gpus N

Mistakes in what the user gave (`UserError`, model loading errors, `RewardError`) print one line and exit 2.
"""

from __future__ import annotations

import sys

from rlhf.errors import UserError

USAGE = """usage: rlhf <command> [options] [--verbose]

commands:
  sft              supervised fine-tuning (full or PEFT)               rlhf sft --help
  reward           train a reward model on preference pairs            rlhf reward --help
  classifier       train a text classifier (usable as a reward)        rlhf classifier --help
  dpo              direct preference optimisation of a policy          rlhf dpo --help
  eval reward      accuracy and calibration of a reward model          rlhf eval reward --help
  eval policy      a policy against a reference, judged by a reward    rlhf eval policy --help
  generate         sample a model on prompts, write JSONL (+ reward)   rlhf generate --help
  data check       read preference data: counts, skips, examples       rlhf data check --help
  ppo              PPO (or GRPO, RLOO, REINFORCE++) against a reward   rlhf ppo --help
  pipeline         SFT -> reward model -> PPO in one command           rlhf pipeline --help
  bench align      gold-reward benchmark: PPO, GRPO, RLOO, DPO, ...    rlhf bench align --help
  bench agents     PPO, GRPO, RLOO, best-of-n in an environment        rlhf bench agents --help
  bench speed      PPO throughput and time split next to TRL           rlhf bench speed --help
  merge            merge a LoRA adapter into a full model              rlhf merge --help
  estimate-memory  memory per GPU for a fine-tuning setup              rlhf estimate-memory --help

--verbose: keep the libraries' own warnings and notices (hidden by default).
"""


def _sft(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.stages import sft

    sft.main(config.parse(config.SFTConfig, argv, "rlhf sft"))


def _ppo(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.ppo import trainer as ppo

    ppo.main(config.parse(ppo.PPOConfig, argv, "rlhf ppo"))


def _reward(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.stages import reward_stage

    reward_stage.main(config.parse(config.RewardConfig, argv, "rlhf reward"))


def _dpo(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.stages import dpo

    dpo.main(config.parse(config.DPOConfig, argv, "rlhf dpo"))


def _classifier(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.stages import classifier_stage

    classifier_stage.main(config.parse(config.ClassifierConfig, argv, "rlhf classifier"))


def _eval(argv: list[str]) -> None:
    from rlhf import config

    if not argv or argv[0] not in ("reward", "policy"):
        raise UserError("expected what to evaluate: `rlhf eval reward --model DIR --data SOURCE` or "
                        "`rlhf eval policy --policy DIR --reference DIR --reward.spec SPEC` (add --help)")
    if argv[0] == "policy":
        from rlhf.evaluation import eval_policy

        eval_policy.main(config.parse(eval_policy.EvalPolicyConfig, argv[1:], "rlhf eval policy"))
        return
    from rlhf.evaluation import eval_reward

    eval_reward.main(config.parse(config.EvalRewardConfig, argv[1:], "rlhf eval reward"))


def _generate(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.evaluation import generate

    generate.main(config.parse(generate.GenerateConfig, argv, "rlhf generate"))


def _bench(argv: list[str]) -> None:
    from rlhf import config

    if not argv or argv[0] not in ("align", "agents", "speed"):
        raise UserError("expected which benchmark: `rlhf bench align` (gold-reward alignment), `rlhf bench agents` "
                        "(the estimators in a multi-turn environment) or `rlhf bench speed` (PPO throughput next to "
                        "TRL) (add --help)")
    if argv[0] == "agents":
        from rlhf.bench import agents as bench_agents

        bench_agents.main(config.parse(bench_agents.BenchAgentsConfig, argv[1:], "rlhf bench agents"))
        return
    if argv[0] == "align":
        from rlhf.bench import align as bench_align

        bench_align.main(config.parse(bench_align.BenchAlignConfig, argv[1:], "rlhf bench align"))
        return
    from rlhf.bench import speed as bench_speed

    bench_speed.main(config.parse(bench_speed.BenchSpeedConfig, argv[1:], "rlhf bench speed"))


def _data(argv: list[str]) -> None:
    from rlhf.data import data_check

    data_check.cli(argv)


def _pipeline(argv: list[str]) -> None:
    from rlhf import config
    from rlhf.stages import pipeline

    pipeline.main(config.parse(pipeline.PipelineConfig, argv, "rlhf pipeline"))


def _merge(argv: list[str]) -> None:
    from rlhf.stages import merge

    merge.cli(argv)


def _estimate_memory(argv: list[str]) -> None:
    from rlhf.runtime import memory

    memory.cli(argv)


COMMANDS = {"sft": _sft, "reward": _reward, "classifier": _classifier, "dpo": _dpo, "eval": _eval,
            "generate": _generate, "data": _data, "ppo": _ppo, "pipeline": _pipeline, "bench": _bench,
            "merge": _merge, "estimate-memory": _estimate_memory}


def quiet_third_party() -> None:
    """Library chatter (bitsandbytes' optional-kernel notice, transformers/datasets/accelerate warnings)
    off stderr, so an error is one line and a run's log is ours; `--verbose` keeps it. Our own warnings
    (rlhf.*: EOS rate, NaN rewards, reward hacking) still print."""
    import logging
    import os
    import warnings

    for name in ("bitsandbytes", "transformers", "datasets", "accelerate", "deepspeed", "DeepSpeed", "peft", "trl",
                 "torch", "huggingface_hub", "urllib3", "filelock"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addFilter(lambda record: record.levelno >= logging.ERROR)  # kept when a library resets the level
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight loading/saving bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read lazily by transformers' own logger
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("ACCELERATE_LOG_LEVEL", "error")
    os.environ.setdefault("DS_LOG_LEVEL", "error")
    for module in ("transformers", "peft", "torch", "accelerate", "datasets", "trl", "deepspeed", "bitsandbytes"):
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--verbose" in argv:
        argv = [a for a in argv if a != "--verbose"]
    else:
        quiet_third_party()
    from rlhf.runtime import progress

    progress.plain_library_bars()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    from policies.models import ModelLoadError
    from reward.errors import RewardError

    try:
        if command not in ("merge", "estimate-memory", "data"):
            from rlhf.runtime import launch

            code = launch.relaunch(command, rest)
            if code is not None:
                return code
            from rlhf.runtime import threads

            threads.set_threads()  # every stage computes with the same thread policy
        COMMANDS[command](rest)
    except (UserError, ModelLoadError, RewardError) as e:
        progress.clear_bars()  # nothing of a bar before or around the error line
        from rlhf.runtime.launch import report_error

        line = f"rlhf {command}: error: " + " ".join(str(e).splitlines())  # always one line
        if not report_error(line):  # under --accelerate the parent prints it, not the launcher's traceback
            print(line, file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rlhf ppo --help | head`: the reader left; nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
