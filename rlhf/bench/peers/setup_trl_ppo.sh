#!/usr/bin/env bash
# Create a separate virtual environment holding TRL 1.12.0, the last TRL release with
# trl.experimental.ppo.PPOTrainer, for `rlhf bench speed` to compare our PPO against.
# It is a benchmark peer only, never a dependency of this project.
#
# Usage: setup_trl_ppo.sh [VENV_DIR]     (default: ./.venv-trl-ppo)
# Environment: PYTHON=interpreter used to create the venv (default: python3)
#
# Idempotent: a venv that already holds exactly these pins (marker file written after a
# successful install and import check) is left alone. The last line printed is the path of
# the venv's python.
set -euo pipefail

VENV_DIR="${1:-.venv-trl-ppo}"
BASE_PYTHON="${PYTHON:-python3}"

# torch is pinned to the CPU wheel configured on the development machines (an unpinned torch
# pulls several GB of CUDA packages). transformers/accelerate/peft/datasets are the versions the
# main project environment uses, so the peer runs the same generate() and model code as ours;
# TRL 1.12's PPOTrainer was verified end to end with them.
PINS=(
    "torch==2.13.0"
    "trl==1.12.0"
    "transformers==5.23.0"
    "accelerate==1.15.0"
    "peft==0.21.2"
    "datasets==5.2.0"
)
MARKER_NAME=".rlhf-trl-ppo-complete"
MARKER_TEXT="${PINS[*]}"

VENV_PY="$VENV_DIR/bin/python"
MARKER="$VENV_DIR/$MARKER_NAME"

check_import() {
    "$VENV_PY" -c "import trl, trl.experimental.ppo as p; p.PPOTrainer; import peft, accelerate, transformers, torch" \
        >/dev/null 2>&1
}

if [[ -x "$VENV_PY" && -f "$MARKER" && "$(cat "$MARKER")" == "$MARKER_TEXT" ]] && check_import; then
    echo "TRL PPO peer venv already complete: $VENV_DIR" >&2
else
    if [[ ! -x "$VENV_PY" ]]; then
        echo "Creating venv $VENV_DIR with $BASE_PYTHON" >&2
        "$BASE_PYTHON" -m venv "$VENV_DIR"
    fi
    rm -f "$MARKER"
    # torch first and on its own, so the resolver never considers another torch build
    "$VENV_PY" -m pip install --quiet "${PINS[0]}"
    "$VENV_PY" -m pip install --quiet "${PINS[@]}"
    if ! check_import; then
        echo "error: trl.experimental.ppo.PPOTrainer does not import in $VENV_DIR" >&2
        exit 1
    fi
    printf '%s' "$MARKER_TEXT" > "$MARKER"
    echo "TRL PPO peer venv ready: $VENV_DIR" >&2
fi

# absolute path of the venv's python (not resolved through symlinks: that would leave the venv)
echo "$(cd "$VENV_DIR" && pwd)/bin/python"
