"""The docs stay true to the code: every command in README.md and docs/*.md parses with the parser its
subcommand uses (nothing is run), and is either marked as needing a GPU or the hub, or named in `RUN_BY`
with the test that runs it at tiny size; every config field, repository path and relative link the docs
mention exists; the README's two set-up commands are the ones CI runs. The convention is described in
docs/README.md.

A command is a line (or an `&&`-joined part of one) in a fenced code block that starts with `rlhf `,
`python -m rlhf` or `accelerate launch`, after `\\` continuations are joined, `#` comments dropped and
leading `NAME=value` environment settings set aside. A block is marked by `<!-- needs: gpu -->`,
`<!-- needs: hub -->` or `<!-- needs: gpu, hub -->` on the line just before it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib.util
import io
import re
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = {"gpu", "hub"}
README_MAX_LINES = 220
# Repository roots a path in the docs may start with (anything else, e.g. runs/ or ../shared/, is not ours).
REPO_ROOTS = ("rlhf/", "policies/", "reward/", "configs/", "tests/", "docs/", ".ci/")


@dataclass(frozen=True)
class Run:
    """Where a test runs a documented command at tiny size, and what in the test's source shows it.

    `evidence`: strings the test (its function and the fixtures and helpers it reaches in its module,
    conftest.py or the test modules it imports from) must contain; the basename of the command's
    `--config FILE` is added to them unless `same_config` is False, which says that the test runs the
    command's subcommand and options on its own tiny settings instead of that config file."""

    test: str  # "tests/test_x.py::test_name", or ".ci/run" for what CI runs itself
    evidence: tuple[str, ...] = ()
    same_config: bool = True


# Every command in an unmarked code block -> the test that runs it. The tests run each at tiny size
# (fewer steps, samples, seeds); options that only change a size or an output folder are not looked for.
_CLI_RM = "tests/test_reward_cli.py::test_reward_then_eval_reward_from_the_command_line"
_MERGE = "tests/test_cli.py::test_merge_gives_adapter_logits"
_VLLM_PPO = "tests/test_vllm.py::test_ppo_with_vllm_matches_the_hf_engine_reward_trend"
_ALIGN_ALL = "tests/test_bench.py::test_bench_align_every_method"
_ALIGN_MINI = "tests/test_bench.py::test_bench_align_miniature"
_LOOPBACK = "tests/test_distributed_stages.py::test_two_node_shaped_launch_on_loopback"
_MEMORY = "tests/test_memory.py::test_cli_7b_qlora_and_full_in_a_subprocess"
_AGENTS = "tests/test_bench_agents.py::test_the_table_has_every_method_and_seed"
RUN_BY: dict[str, Run] = {
    # README: set-up and stage by stage
    "rlhf pipeline --config configs/quickstart.yaml":
        Run("tests/test_pipeline.py::test_quickstart_pipeline_end_to_end", ('"pipeline"',)),
    "python -m rlhf.generation.vllm_env": Run(".ci/run"),
    # docs/agents.md
    "rlhf pipeline --config configs/agent_quickstart.yaml":
        Run("tests/test_ppo_envs.py::test_agent_quickstart_pipeline_at_tiny_size", ('"pipeline"',)),
    "rlhf generate --model runs/agent_quickstart/ppo/policy --env.spec rlhf.envs.calculator:Calculator "
    "--prompts.train builtin:calc_eval --max_new_tokens 12 --env.max_turns 3 --env.max_total_tokens 96 "
    "--output episodes.jsonl":
        Run("tests/test_generate.py::test_episodes_are_written_whole_as_the_environment_and_sampled_ids_made_them",
            ('"generate"', '"--env.spec"', '"--prompts.train"', '"--env.max_turns"', '"--env.max_total_tokens"')),
    "rlhf eval policy --policy runs/agent_quickstart/ppo/policy --reference runs/agent_quickstart/sft --env.spec "
    "rlhf.envs.calculator:Calculator --prompts.train builtin:calc_eval --prompts.max_samples 128 --max_new_tokens 12 "
    "--env.max_turns 3 --env.max_total_tokens 96":
        Run("tests/test_eval_policy.py::test_episodes_of_both_models_and_their_metrics",
            ('"eval", "policy"', '"--env.spec"', '"--prompts.train"', '"--env.max_turns"')),
    "rlhf sft --config configs/sft_tiny.yaml": Run("tests/test_cli.py::test_quickstart_end_to_end", ('"sft"',)),
    "rlhf reward --config configs/reward_tiny.yaml": Run(_CLI_RM, ('"reward"',)),
    # its reward model swapped for the exact-answer function (the config's own tip); PPO against a trained
    # reward model runs in test_quickstart_pipeline_end_to_end
    "rlhf ppo --config configs/ppo_tiny.yaml":
        Run("tests/test_heldout.py::test_ppo_tiny_function_reward_tip_works_as_written", ("ppo.main",)),
    "rlhf dpo --config configs/dpo_tiny.yaml":
        Run("tests/test_dpo.py::test_validation_reward_accuracy_rises_and_layout", ("dpo.main",)),
    # docs/stages.md
    "rlhf sft --config configs/sft_tiny.yaml --peft.method lora --train.learning_rate 1e-4 --output_dir runs/x":
        Run(_MERGE, ('"--peft.method", "lora"', '"--train.learning_rate"')),
    "rlhf sft --help": Run("tests/test_config.py::test_help_documents_every_field", ('["--help"]', "SFTConfig")),
    "rlhf sft --config configs/sft_tiny.yaml --peft.method lora --output_dir runs/sft_x":
        Run(_MERGE, ('"--peft.method", "lora"',)),
    "rlhf merge runs/sft_x runs/sft_x_merged": Run(_MERGE, ('["merge", str(adapter), str(merged)]',)),
    "rlhf pipeline --config configs/quickstart.yaml --stages sft dpo":
        Run("tests/test_dpo.py::test_pipeline_sft_then_dpo", ('"--stages", "sft", "dpo"',)),
    "rlhf generate --model runs/dpo_tiny --prompts.train builtin:quickstart_eval_prompts":
        Run("tests/test_dpo.py::test_output_reloads_as_a_policy",
            ("GenerateConfig", '"--prompts.train", "builtin:quickstart_eval_prompts"', "dpo_tiny.yaml")),
    "rlhf eval policy --policy runs/quickstart/dpo --reference runs/quickstart/sft --reward.spec "
    "reward.examples:exact_answer --prompts.train builtin:quickstart_eval_prompts --prompts.max_samples 128 "
    "--temperature 0":
        Run("tests/test_dpo.py::test_quickstart_dpo_raises_exact_answers_on_held_out_prompts",
            ("EvalPolicyConfig", '"--reward.spec", "reward.examples:exact_answer"', '"--prompts.max_samples", "128"',
             '"--temperature", "0"', "quickstart.yaml")),
    # docs/reward-models.md
    "rlhf data check ../shared/data/real/hh_rlhf_helpful_base_test_first1000.jsonl":
        Run("tests/test_reward_cli.py::test_data_check_on_real_samples",
            ('"data", "check"', "hh_rlhf_helpful_base_test_first1000.jsonl")),
    "rlhf eval reward --model runs/reward_tiny --data builtin:quickstart_prefs":
        Run(_CLI_RM, ('"eval", "reward"', '"--data", "builtin:quickstart_prefs"', "reward_tiny.yaml")),
    "rlhf classifier --config configs/classifier_tiny.yaml":
        Run("tests/test_classifier.py::test_jigsaw_classifier_beats_majority_baseline_and_serves_as_reward",
            ("classifier_stage.main",)),
    # docs/ppo.md
    "rlhf ppo --config configs/ppo_tiny.yaml --reward.spec reward.examples:exact_answer "
    "--ppo.reward_normalization none":
        Run("tests/test_heldout.py::test_ppo_tiny_function_reward_tip_works_as_written", ('"--reward.spec"',)),
    "rlhf ppo --config configs/ppo_tiny.yaml --ppo.advantage_estimator grpo --ppo.samples_per_prompt 4 "
    "--ppo.kl_penalty loss --ppo.kl_estimator k3 --output_dir runs/grpo_tiny":
        Run("tests/test_estimators.py::test_kl_in_the_loss_holds_the_policy_near_the_reference",
            ('"grpo"', '"--ppo.kl_penalty", "loss"', '"--ppo.kl_estimator", "k3"', "samples_per_prompt"),
            same_config=False),
    "rlhf ppo --config configs/ppo_tiny.yaml --ppo.advantage_estimator grpo --ppo.samples_per_prompt 4 "
    "--eval.prompts builtin:quickstart_eval_prompts --eval.reward.spec reward.examples:exact_answer":
        Run("tests/test_estimators.py::test_critic_free_runs_with_held_out_eval_and_logprobs_from_generation",
            ('"grpo"', '"--eval.prompts", "builtin:quickstart_eval_prompts"',
             '"--eval.reward.spec", "reward.examples:exact_answer"'), same_config=False),
    # the whole pipeline at the quickstart's size (with gae); GRPO's own runs are in tests/test_estimators.py
    "rlhf pipeline --config configs/quickstart.yaml --stages ppo --ppo.ppo.advantage_estimator grpo "
    "--ppo.ppo.samples_per_prompt 4":
        Run("tests/test_pipeline.py::test_quickstart_pipeline_end_to_end", ('"pipeline"',)),
    # docs/rollout-engines.md
    "rlhf sft --config configs/sft_tiny.yaml --model.tiny.hidden_size 128 --output_dir runs/sft_tiny_128":
        Run(_VLLM_PPO, ('"--model.tiny.hidden_size", "128"', "SFTConfig")),
    "rlhf ppo --config configs/ppo_tiny.yaml --model.name_or_path runs/sft_tiny_128 --ppo.rollout_engine vllm":
        Run(_VLLM_PPO, ('"--ppo.rollout_engine", engine', '("hf", "vllm")', "sft128"), same_config=False),
    # docs/evaluation.md
    "rlhf eval policy --policy runs/quickstart/ppo/policy --reference runs/quickstart/sft --reward.spec "
    "reward.examples:exact_answer --prompts.train builtin:quickstart_eval_prompts":
        Run("tests/test_eval_policy.py::test_policy_against_itself", ('"eval", "policy"', '"--reward.spec"')),
    "rlhf generate --model runs/quickstart/ppo/policy --prompts.train builtin:quickstart_eval_prompts "
    "--samples_per_prompt 4 --output samples.jsonl --reward.spec reward.examples:exact_answer":
        Run("tests/test_generate.py::test_greedy_rows_match_direct_generate",
            ('"generate"', '"--samples_per_prompt"', '"--reward.spec"', '"--output"')),
    "rlhf bench align": Run(_ALIGN_ALL, ("bench_align.main", "methods")),
    "rlhf bench align --seeds 7 8 --bt_beta 20 --kl_coef 0.2 --ppo_steps 100 --output_dir runs/my_bench":
        Run(_ALIGN_MINI, ("bench_align.main", '"--seeds"', '"--ppo_steps"')),
    "rlhf bench align --methods ppo grpo dpo best_of_n --seeds 0":
        Run(_ALIGN_ALL, ("bench_align.main", '"--methods"', '"grpo"', '"dpo"', '"best_of_n"')),
    # the vLLM engine in PPO's loop at tiny size; bench align hands --rollout_engine to that loop
    "rlhf bench align --methods ppo best_of_n --ppo_epochs 4 --num_mini_batches 2 --rollout_engine vllm":
        Run(_VLLM_PPO, ('"--ppo.rollout_engine", engine', '("hf", "vllm")'), same_config=False),
    "rlhf bench align --seeds 0 --kl_coef 0 --learning_rate 3e-3 --methods ppo --ppo_epochs 4 "
    "--num_mini_batches 2 --output_dir runs/bench_overopt":
        Run(_ALIGN_MINI, ("bench_align.main", '"--methods", "ppo"', '"--seeds", "0"')),
    "rlhf bench speed": Run("tests/test_bench.py::test_bench_speed_miniature", ("bench_speed.main",)),
    # docs/agents.md: the agent benchmark
    "rlhf bench agents": Run(_AGENTS, ("bench_agents.main", "agent_quickstart.yaml")),
    "rlhf bench agents --task guess_number --seeds 0 1 --ppo_steps 40":
        Run("tests/test_bench_agents.py::test_guess_number_task_runs",
            ("bench_agents.main", "agent_guess.yaml", '"--seeds"', '"--ppo_steps"')),
    "rlhf bench agents --seeds 1 2 3 --output_dir runs/bench_agents_calc":
        Run(_AGENTS, ("bench_agents.main", "agent_quickstart.yaml", '"--seeds"')),
    # docs/scale-out.md
    "rlhf sft --config configs/sft_tiny.yaml --peft.method lora --accelerate zero3 --num_processes 2":
        Run("tests/test_distributed_stages.py::test_two_processes_equal_one",
            ('("sft", "zero3", "lora")', '"--accelerate", preset, "--num_processes"', "num_processes=2")),
    "rlhf sft --config configs/sft_tiny.yaml --peft.method lora --accelerate two_node --num_processes 2 "
    "--machine_rank 0 --main_process_ip 127.0.0.1":
        Run(_LOOPBACK, ("two_node.yaml", '"--main_process_ip", "127.0.0.1"', '"--machine_rank"', '"lora"')),
    "rlhf sft --config configs/sft_tiny.yaml --peft.method lora --accelerate two_node --num_processes 2 "
    "--machine_rank 1 --main_process_ip 127.0.0.1":
        Run(_LOOPBACK, ("two_node.yaml", '"--main_process_ip", "127.0.0.1"', '"--machine_rank"', '"lora"')),
    "rlhf estimate-memory --model 7B --method full --zero 0 --gpus 1":
        Run(_MEMORY, ('"estimate-memory"', '"--model", "7B", "--method", "full"')),
    "rlhf estimate-memory --model 7B --method qlora --zero 0 --gpus 1":
        Run(_MEMORY, ('"estimate-memory"', '"--model", "7B", "--method", "qlora", "--zero", "0", "--gpus", "1"')),
}


# ---------------------------------------------------------------------------------------------
# Reading the docs


@dataclass(frozen=True)
class Command:
    doc: str  # file name relative to the repository
    line: int  # line of the block's first line
    needs: frozenset[str]
    argv: tuple[str, ...]  # without leading NAME=value settings

    @property
    def text(self) -> str:
        return " ".join(self.argv)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


SHELL_BLOCKS = ("bash", "sh", "shell", "")  # a fence's language; python and yaml blocks hold no commands


def fenced_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, the marker line before it, the block's text) of each shell block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, body = i, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if lines[start][3:].strip() in SHELL_BLOCKS:
                blocks.append((start + 1, lines[start - 1] if start > 0 else "", "\n".join(body)))
        i += 1
    return blocks


def needs_of(marker_line: str, where: str) -> frozenset[str]:
    m = re.fullmatch(r"<!--\s*needs:\s*([a-z, ]+?)\s*-->", marker_line.strip())
    if not m:
        assert "needs" not in marker_line, f"{where}: malformed marker {marker_line!r}"
        return frozenset()
    needs = frozenset(n.strip() for n in m.group(1).split(","))
    assert needs <= NEEDS, f"{where}: unknown need(s) {sorted(needs - NEEDS)}; use {sorted(NEEDS)}"
    return needs


def is_command(argv: list[str]) -> bool:
    if not argv:
        return False
    if argv[0] == "rlhf":
        return True
    if argv[0] in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        return argv[2] == "rlhf" or argv[2].startswith("rlhf.")
    return argv[:2] == ["accelerate", "launch"]


COMMAND_START = r"(^|&&)\s*([A-Z_][A-Z0-9_]*=\S*\s+)*(rlhf |python3? -m rlhf|accelerate launch)"


def commands_in(text: str, doc: str, line: int, needs: frozenset[str]) -> list[Command]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for raw in joined.splitlines():
        try:
            tokens = shlex.split(raw, comments=True)
        except ValueError as e:  # prose in a plain block (a layout tree), unless it holds a command
            assert not re.search(COMMAND_START, raw), f"{doc}:{line}: cannot split {raw!r}: {e}"
            continue
        parts, part = [], []
        for token in tokens + ["&&"]:
            if token == "&&":
                parts.append(part)
                part = []
            else:
                part.append(token)
        for argv in parts:
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                argv = argv[1:]  # an environment setting, e.g. ACCELERATE_USE_CPU=true
            if is_command(argv):
                out.append(Command(doc, line, needs, tuple(argv)))
    return out


def all_commands() -> list[Command]:
    found = []
    for path in DOCS:
        doc = str(path.relative_to(REPO))
        for line, marker, text in fenced_blocks(path):
            found += commands_in(text, doc, line, needs_of(marker, f"{doc}:{line}"))
    return found


COMMANDS = all_commands()


def prose(path: Path) -> str:
    """The text outside fenced blocks (commands in blocks are checked by parsing them)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# Parsing a command as the CLI would, without running it


class Parsed(Exception):
    """Raised in place of running a stage once its arguments have parsed."""


ARGPARSE_COMMANDS = ("merge", "estimate-memory", "data")  # their own argparse parsers (rlhf/cli.py)


def parse_rlhf(args: list[str], monkeypatch) -> str:
    """Parse `rlhf ARGS` with the parser its subcommand uses; returns what parsed (for messages)."""
    from rlhf import cli, config
    from rlhf.runtime import launch

    assert args and args[0] in cli.COMMANDS, f"unknown subcommand {args[:1]}; known: {sorted(cli.COMMANDS)}"
    command, rest = args[0], args[1:]
    if command not in ARGPARSE_COMMANDS:
        launcher, rest = launch.split(rest)
        if "accelerate" in launcher:
            assert launch.preset_path(launcher["accelerate"]).is_file()
    if "--config" in rest:
        path = rest[rest.index("--config") + 1]
        assert (REPO / path).is_file() and not Path(path).is_absolute(), f"--config {path}: no such file in the repo"
    real_parse, real_argparse = config.parse, argparse.ArgumentParser.parse_args

    def parse_only(cls, argv, prog):
        raise Parsed(f"{prog}: {type(real_parse(cls, argv, prog)).__name__}")

    def argparse_only(self, argv=None, namespace=None):
        raise Parsed(f"{self.prog}: {real_argparse(self, argv, namespace)}")

    if command in ARGPARSE_COMMANDS:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", argparse_only)
    else:
        monkeypatch.setattr(config, "parse", parse_only)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            cli.COMMANDS[command](rest)
    except Parsed as done:
        return str(done)
    except SystemExit as e:
        assert e.code in (0, None) and "--help" in rest, f"exit {e.code}: {stderr.getvalue().strip()}"
        return "help"
    finally:
        monkeypatch.undo()
    raise AssertionError("the subcommand returned without parsing its arguments")


def parse_command(cmd: Command, monkeypatch) -> str:
    argv = list(cmd.argv)
    if argv[0] == "rlhf":
        return parse_rlhf(argv[1:], monkeypatch)
    if argv[0] in ("python", "python3"):
        module = argv[2]
        if module == "rlhf":
            return parse_rlhf(argv[3:], monkeypatch)
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        return module
    from accelerate.commands.launch import launch_command_parser

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args = launch_command_parser().parse_args(argv[2:])
        except SystemExit:
            raise AssertionError(f"accelerate launch options: {err.getvalue().strip()}") from None
    for option in ("config_file", "deepspeed_config_file"):
        if getattr(args, option, None):
            assert (REPO / getattr(args, option)).is_file(), f"--{option} {getattr(args, option)}: no such file"
    assert args.module and args.training_script == "rlhf", "expected `accelerate launch ... -m rlhf ...`"
    return parse_rlhf(list(args.training_script_args), monkeypatch)


@pytest.mark.parametrize("cmd", COMMANDS, ids=str)
def test_every_command_parses(cmd, monkeypatch):
    parse_command(cmd, monkeypatch)


def test_every_command_is_run_by_a_test_or_marked():
    unmarked = {c.text for c in COMMANDS if not c.needs}
    marked = {c.text for c in COMMANDS if c.needs}
    listed = set(RUN_BY)
    assert not unmarked - listed, ("commands shown without a `<!-- needs: ... -->` marker and not in RUN_BY "
                                   f"(name the test that runs each): {sorted(unmarked - listed)}")
    assert not listed - unmarked, f"RUN_BY names commands the docs no longer show unmarked: {sorted(listed - unmarked)}"
    assert not marked & listed, f"marked as needing a GPU or the hub, yet in RUN_BY: {sorted(marked & listed)}"


# ---------------------------------------------------------------------------------------------
# The tests named in RUN_BY run what they are said to


def module_definitions(path: Path) -> dict[str, str]:
    """Source of each module-level function, class and assignment, by name."""
    source = path.read_text(encoding="utf-8")
    defs = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            decorators = [ast.get_source_segment(source, d) for d in node.decorator_list]  # parametrize values
            defs[node.name] = "\n".join([*decorators, ast.get_source_segment(source, node)])
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    defs[target.id] = ast.get_source_segment(source, node)
    return defs


def imported_test_modules(path: Path) -> list[Path]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
             and (n.module == "conftest" or n.module.startswith("test_"))]
    return [REPO / "tests" / f"{name}.py" for name in names]


def reachable_source(test_file: Path, function: str) -> str:
    """The test function's source and that of every module-level name it reaches (fixtures, helpers,
    constants) in its module, conftest.py and the test modules it imports from."""
    defs = {}
    for path in [REPO / "tests" / "conftest.py", *imported_test_modules(test_file), test_file]:
        defs.update(module_definitions(path))
    assert function in defs, f"{test_file.name} has no {function}"
    seen, todo, parts = set(), [function], []
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        parts.append(defs[name])
        tree = ast.parse(defs[name])
        todo += [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
        todo += [a.arg for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for a in n.args.args]  # fixtures, by parameter name
    return "\n".join(parts)


def config_file(argv: tuple[str, ...]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv else None


@pytest.mark.parametrize("text", sorted(RUN_BY))
def test_run_by_names_a_test_that_runs_the_command(text):
    run = RUN_BY[text]
    argv = tuple(shlex.split(text))
    evidence = list(run.evidence)
    if run.test == ".ci/run":
        assert text in (REPO / ".ci" / "run").read_text(), f".ci/run does not run `{text}`"
        return
    if run.same_config and config_file(argv):
        evidence.append(Path(config_file(argv)).name)
    assert evidence, f"RUN_BY[{text!r}] gives nothing to look for in {run.test}"
    file, function = run.test.split("::")
    source = reachable_source(REPO / file, function)
    missing = [e for e in evidence if e not in source]
    assert not missing, f"{run.test} does not contain {missing}: does it still run `{text}`?"


# ---------------------------------------------------------------------------------------------
# Fields, paths and links named in the prose


def config_classes(monkeypatch) -> dict[str, type]:
    """The config class of every subcommand that reads one, found by calling the CLI up to its parser."""
    from rlhf import cli, config

    found = {}

    def record(cls, argv, prog):
        found[prog] = cls
        raise Parsed(prog)

    monkeypatch.setattr(config, "parse", record)
    for args in (["sft"], ["reward"], ["classifier"], ["dpo"], ["ppo"], ["pipeline"], ["eval", "reward"],
                 ["eval", "policy"], ["generate"], ["bench", "align"], ["bench", "agents"], ["bench", "speed"]):
        with pytest.raises(Parsed):
            cli.COMMANDS[args[0]](args[1:])
    monkeypatch.undo()
    return found


def field_paths(cls: type, prefix: str = "") -> set[str]:
    paths = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        nested = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]  # Optional[...] too
        if nested:
            paths |= {prefix + f.name}
            paths |= field_paths(nested[0], f"{prefix}{f.name}.")
        else:
            paths.add(prefix + f.name)
    return paths


def test_config_fields_named_in_the_docs_exist(monkeypatch):
    known = set().union(*(field_paths(cls) for cls in config_classes(monkeypatch).values()))
    sections = {p.split(".")[0] for p in known if "." in p}
    unknown = []
    for path in DOCS:
        for span in re.findall(r"`([^`\n]+)`", prose(path)):
            token = span.split()[0].removeprefix("--").rstrip(":,")
            field = re.fullmatch(r"[a-z_]+(\.[a-z0-9_]+)+", token) and token.split(".")[0] in sections
            if field and token not in known:
                unknown.append(f"{path.relative_to(REPO)}: `{span}`")
    assert not unknown, f"config fields the code does not have: {unknown}"


def test_repository_paths_named_in_the_docs_exist():
    missing = []
    for path in DOCS:
        text = prose(path)
        candidates = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
        candidates += [word for _, _, block in fenced_blocks(path) for word in block.split()]  # scripts, configs
        for token in candidates:
            token = token.split("#")[0].rstrip(".,:;")
            if token.startswith("../") and path.parent != REPO:  # a link out of docs/, back into the repo
                resolved = (path.parent / token).resolve()
                token = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else ""
            if not token.startswith(REPO_ROOTS):
                continue
            pattern = re.sub(r"\b[A-Z][A-Z_]+\b", "*", token)  # NAME placeholders, e.g. configs/accelerate/NAME.yaml
            if not glob.glob(str(REPO / pattern)):
                missing.append(f"{path.relative_to(REPO)}: {token}")
    assert not missing, f"paths that do not exist: {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", prose(path), flags=re.MULTILINE)}


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(path)):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


# ---------------------------------------------------------------------------------------------
# The README


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_set_up_is_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)\n```", section, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    quickstart, tests = blocks
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert quickstart.startswith(venv) and quickstart.endswith(" && rlhf pipeline --config configs/quickstart.yaml")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    assert tests == venv + ci[-1], "the README's test command and .ci/run's differ"


def test_docs_index_lists_every_page():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in sorted((REPO / "docs").glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"
            assert f"](docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
