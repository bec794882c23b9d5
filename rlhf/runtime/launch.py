"""`rlhf <stage> ... --accelerate PRESET [--num_processes N]`: relaunch this command under
`accelerate launch` with a shipped preset (configs/accelerate/PRESET.yaml) or your own accelerate
config file, so nobody has to remember the accelerate command line.

    rlhf sft --config configs/sft_tiny.yaml --accelerate zero3 --num_processes 8
    == accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 8 -m rlhf sft --config ...
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rlhf.errors import UserError

PRESETS = ("single", "ddp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "two_node")
# Options that belong to the launcher, not to the stage (value-taking).
LAUNCH_OPTIONS = ("--accelerate", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                  "--main_process_port")
LAUNCHED_ENV = "RLHF_LAUNCHED"  # set in the children: they run the stage, they do not relaunch
ERROR_DIR_ENV = "RLHF_ERROR_DIR"  # the children's one-line errors, printed by the parent in place of a traceback


def preset_path(name: str) -> Path:
    """A preset name -> its file (looked up under ./configs/accelerate, then the source checkout), or a path."""
    if name in PRESETS:
        for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
            path = root / "configs" / "accelerate" / f"{name}.yaml"
            if path.exists():
                return path
        raise UserError(f"--accelerate {name}: preset file configs/accelerate/{name}.yaml not found "
                        "(run from the project checkout, or pass the path of an accelerate config file)")
    path = Path(name)
    if not path.is_file():
        raise UserError(f"--accelerate '{name}' is neither a preset ({', '.join(PRESETS)}) nor an accelerate "
                        "config file")
    return path


def split(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Launcher options (without their dashes) and the stage's own arguments."""
    launch, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in LAUNCH_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{key} expects a value")
                value, i = argv[i + 1], i + 1
            launch[key[2:]] = value
        else:
            rest.append(arg)
        i += 1
    if launch and "accelerate" not in launch:
        raise UserError(f"{', '.join('--' + k for k in launch)} only make sense with --accelerate PRESET")
    return launch, rest


def command(stage: str, launch: dict[str, str], rest: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and the extra environment for it."""
    import torch

    path = preset_path(launch["accelerate"])
    cmd = ["accelerate", "launch", "--config_file", str(path)]
    for key in LAUNCH_OPTIONS[1:]:
        if key[2:] in launch:
            cmd += [key, launch[key[2:]]]
    env = {LAUNCHED_ENV: "1"}
    preset = yaml.safe_load(path.read_text()) or {}
    if preset.get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--accelerate {launch['accelerate']} runs DeepSpeed, which is not installed in this "
                        "environment; install it with: pip install deepspeed")
    if preset.get("distributed_type") in ("MULTI_GPU", "MULTI_CPU") and not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # DDP over gloo on a CPU-only machine
    return cmd + ["-m", "rlhf", stage, *rest], env


def relaunch(stage: str, argv: list[str]) -> int | None:
    """Relaunch under accelerate when --accelerate is given (returns the exit code), else None."""
    launch, rest = split(argv)
    if not launch or os.environ.get(LAUNCHED_ENV):
        return None
    cmd, env = command(stage, launch, rest)
    print("rlhf: " + " ".join(cmd), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rlhf-errors-") as errors:
        code = _run_quiet_after_error(cmd, {**os.environ, **env, ERROR_DIR_ENV: errors}, Path(errors))
        lines = sorted({f.read_text() for f in Path(errors).iterdir()})  # every rank may report the same one
    if lines:
        print("\n".join(lines), file=sys.stderr)
        return 2
    return code


def report_error(line: str) -> bool:
    """In a process that `relaunch` started: leave the one-line error for the parent to print (True)."""
    errors = os.environ.get(ERROR_DIR_ENV)
    if not errors or not Path(errors).is_dir():
        return False
    tmp = Path(errors) / f".rank{os.environ.get('RANK', '0')}"
    tmp.write_text(line)
    os.replace(tmp, tmp.with_name(tmp.name[1:]))  # whole when the parent sees it
    return True


def _run_quiet_after_error(cmd: list[str], env: dict[str, str], errors: Path) -> int:
    """Run the launcher, passing its stderr on as it comes until a child has reported a UserError: what
    follows is torch elastic's ChildFailedError traceback for that exit code 2, which the user must not see."""
    import codecs

    decode = codecs.getincrementaldecoder("utf-8")("replace")  # a chunk may end inside a character
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) as proc:  # waits for it on the way out
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            if not any(f.name.startswith("rank") for f in errors.iterdir()):
                sys.stderr.write(decode.decode(chunk))
                sys.stderr.flush()
    return proc.returncode
