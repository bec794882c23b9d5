#!/usr/bin/env bash
# The GPU check in one command: `pytest -m gpu`, `rlhf bench speed` at the qwen2.5-0.5b shape (LoRA and full)
# and the llama3-8b shape (LoRA) for ours and TRL's RLOO (and TRL 1.12's PPO, whose wheel is carried), the
# peak memory beside `rlhf estimate-memory`, and one table: tokens/s, phase split, peak memory, MFU.
# Written for one H100 in at most 8 minutes (GPU_CHECK_SECONDS, default 470: each step has its own time limit
# inside what is left after the install; the table prints whatever finished). Steps and table: benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh --prepare   # HERE, once: download the wheels the GPU machine lacks into .whl/
#                                            #   (trl, peft, datasets, deepspeed's pure-Python sdist, tyro, ...;
#                                            #   the versions installed here; under 60 MiB, listed with sizes)
#   bash benchmarks/gpu_check.sh --dry       # HERE, on a CPU: the same steps at tiny shapes (GPU_CHECK_DRY=1 too)
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#
# Through the device tool (the GPU machine has no internet and no trl/peft/deepspeed/datasets; .whl/ is
# ignored by git, so it must be carried):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
# The table comes back in the output and in $OUT/gpu_check.md, with $OUT/results.json and $OUT/logs.txt.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
cd "$REPO"
T0=$(date +%s)

mode=check
for arg in "$@"; do
    case "$arg" in
        --prepare) mode=prepare ;;
        --dry) export GPU_CHECK_DRY=1 ;;
        *) echo "gpu_check.sh: unknown option '$arg' (expected --prepare or --dry)" >&2; exit 2 ;;
    esac
done

if [ "$mode" = prepare ]; then
    exec "$PYTHON" benchmarks/gpu_check.py --prepare
fi

export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "${GPU_CHECK_DRY:-0}" != 1 ]; then
    # The carried wheels, installed apart from the image's packages (which they shadow on PYTHONPATH).
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu_check.sh: no wheels in .whl/: run 'bash benchmarks/gpu_check.sh --prepare' here and carry [\".whl\"]" >&2
        exit 2
    fi
    SITE=/tmp/gpu_check_site
    start=$(date +%s)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 1; }
    if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1; then  # pure Python: its ops build on first use
        DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
            --target "$SITE" .whl/deepspeed-*.tar.gz || echo "gpu_check.sh: deepspeed did not install (ZeRO tests will skip)" >&2
    fi
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ls .whl/trl112/*.whl >/dev/null 2>&1; then  # TRL 1.12 (the last with PPOTrainer): a peer, on a path of its own
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu_check_trl112 .whl/trl112/*.whl
        printf '#!/bin/sh\nPYTHONPATH=/tmp/gpu_check_trl112:%s exec %s "$@"\n' "$SITE" "$(command -v "$PYTHON")" \
            > /tmp/gpu_check_trl112/python
        chmod +x /tmp/gpu_check_trl112/python
        export GPU_CHECK_TRL_PPO_PYTHON=/tmp/gpu_check_trl112/python
    fi
    echo "installed the carried wheels in $(( $(date +%s) - start )) s"
    BUDGET=$(( ${GPU_CHECK_SECONDS:-470} - ($(date +%s) - T0) ))  # 8 minutes in all, less a margin to print
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    BUDGET=300
fi
exec "$PYTHON" benchmarks/gpu_check.py --budget_s "$BUDGET"
