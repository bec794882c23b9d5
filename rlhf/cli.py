"""The `rlhf` command: one subcommand per stage or tool.

    rlhf sft --config FILE [--section.field VALUE ...]
    rlhf merge ADAPTER_DIR OUT_DIR
    rlhf estimate-memory --model NAME_OR_SIZE --method full|lora|qlora --zero 0-3 --gpus N

Mistakes in what the user gave (`UserError`, and model loading errors) print one line and exit 2.
"""

from __future__ import annotations

import sys

from rlhf.errors import UserError

USAGE = """usage: rlhf <command> [options]

commands:
  sft              supervised fine-tuning (full or PEFT)          rlhf sft --help
  ppo              PPO against a reward model, classifier or function  rlhf ppo --help
  merge            merge a LoRA adapter into a full model           rlhf merge --help
  estimate-memory  memory per GPU for a fine-tuning setup           rlhf estimate-memory --help
"""


def _sft(argv: list[str]) -> None:
    from rlhf import config, sft

    sft.main(config.parse(config.SFTConfig, argv, "rlhf sft"))


def _ppo(argv: list[str]) -> None:
    from rlhf import config, ppo

    ppo.main(config.parse(ppo.PPOConfig, argv, "rlhf ppo"))


def _merge(argv: list[str]) -> None:
    from rlhf import merge

    merge.cli(argv)


def _estimate_memory(argv: list[str]) -> None:
    from rlhf import memory

    memory.cli(argv)


COMMANDS = {"sft": _sft, "ppo": _ppo, "merge": _merge, "estimate-memory": _estimate_memory}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rlhf: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    from policies.models import ModelLoadError

    try:
        COMMANDS[command](rest)
    except (UserError, ModelLoadError) as e:
        print(f"rlhf {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
