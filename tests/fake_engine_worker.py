"""A stand-in for rlhf/generation/vllm_worker.py that needs no vLLM, for tests/test_engine_robustness.py:
`python fake_engine_worker.py MODE [PIDS_FILE]`. It connects, frames and watches its parent with the real
worker's own functions, and answers the protocol as MODE says:

- `echo`: generate returns each prompt reversed, with logprob -1 per token; start prints the telemetry
  variables it was given to its log;
- `hang`: generate never answers (the worker stays alive);
- `die`: generate prints an error to the log and exits with code 3;
- `deaf`: never answers stop, and ignores SIGTERM (so does its child);
- `slow`: as `echo`, but connects only after 2 s.

With PIDS_FILE, start also starts a child process (in the worker's process group, as vLLM's own are) and
writes "worker_pid child_pid" there.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rlhf" / "generation"))
import vllm_worker  # noqa: E402  (the real worker's connection, framing and watchdog)

CHILD = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN) if sys.argv[1] == 'deaf' else 0; " \
        "time.sleep(600)"


def main() -> int:
    mode = sys.argv[1]
    pids_file = sys.argv[2] if len(sys.argv) > 2 else None
    vllm_worker.exit_with_parent(interval=0.2)
    if mode == "slow":
        time.sleep(2)
    conn = vllm_worker.connect()
    while True:
        msg = vllm_worker.recv(conn)
        if msg is None:
            return 0
        op = msg["op"]
        if op == "start":
            print(f"VLLM_NO_USAGE_STATS={os.environ.get('VLLM_NO_USAGE_STATS')} "
                  f"DO_NOT_TRACK={os.environ.get('DO_NOT_TRACK')}", flush=True)
            if mode == "deaf":
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if pids_file:
                child = subprocess.Popen([sys.executable, "-c", CHILD, mode])
                Path(pids_file).write_text(f"{os.getpid()} {child.pid}")
            vllm_worker.send(conn, {"ok": True})
        elif op == "generate":
            if mode == "hang":
                time.sleep(600)
            if mode == "die":
                print("RuntimeError: CUDA out of memory (fake engine)", file=sys.stderr, flush=True)
                os._exit(3)
            vllm_worker.send(conn, {"tokens": [p[::-1] for p in msg["prompts"]],
                                    "logprobs": [[-1.0] * len(p) for p in msg["prompts"]]})
        elif op == "stop":
            if mode == "deaf":
                time.sleep(600)
            vllm_worker.send(conn, {"ok": True})
            return 0
        else:
            vllm_worker.send(conn, {"error": f"unknown op {op!r}"})


if __name__ == "__main__":
    sys.exit(main())
