"""PPO's checkpoints (written atomically, resumed bit for bit) and the exported policy and critic."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from rlhf.runtime import checkpoints

STATE_FILE = "ppo_state.json"  # written last into a checkpoint: its presence marks it complete


def resume(accelerator, resume_from: Optional[str], scheduler, kl_ctl, moments, env_pool=None) -> tuple[int, list[dict]]:
    """(step, metrics history) of the checkpoint `resume_from` after loading its model, optimizer, RNG,
    scheduler, KL-controller, reward-statistics and (with an env) episode-seed states; (0, []) without one."""
    if resume_from is None:
        return 0, []
    with checkpoints.tensor_only_loads(resume_from):  # DeepSpeed's own torch.load: tensors only
        accelerator.load_state(resume_from)
    checkpoints.load_rng_state(resume_from, accelerator.process_index)
    state = json.loads((Path(resume_from) / STATE_FILE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    moments.load_state_dict(state["reward_moments"])
    if env_pool is not None:
        from rlhf.errors import UserError

        if state.get("env") is None:
            raise UserError(f"{resume_from} is a checkpoint of a run without env; it cannot resume with env.spec set")
        per_rank = state["env"] if isinstance(state["env"], list) else [state["env"]]  # one process: one state
        if len(per_rank) != accelerator.num_processes:
            raise UserError(f"{resume_from} holds the episode seed streams of {len(per_rank)} process(es); resume it "
                            f"with {len(per_rank)}, not {accelerator.num_processes}")
        env_pool.load_state_dict(per_rank[accelerator.process_index])
    accelerator.print(f"resumed from {resume_from} at step {state['step']}")
    return state["step"], state["history"]


def save(accelerator, out: Path, step: int, history: list[dict], scheduler, kl_ctl, moments, limit: int,
         env_pool=None) -> None:
    """checkpoint-{step}: everything `resume` reads back (with an env, each process's episode seed stream
    position, by rank: environments keep nothing across episodes, see rlhf.envs.interface)."""
    from rlhf.runtime.distributed import all_ranks

    env = all_ranks(env_pool.state_dict()) if env_pool is not None else None  # every rank takes part
    save_checkpoint(accelerator, out, step, {"step": step, "history": history, "kl_ctl": kl_ctl.state_dict(),
                                             "scheduler": scheduler.state_dict(),
                                             "reward_moments": moments.state_dict(), "env": env}, limit)


def save_checkpoint(accelerator, out: Path, step: int, state: dict, limit: int) -> None:
    """Write checkpoint-{step} atomically: everything goes to a temporary folder that is renamed
    once complete (ppo_state.json, written last, marks it complete). Everything but the weights and the
    optimizer state (safetensors, and a torch.save of tensors that resume checks) is JSON: the scheduler,
    KL controller, reward statistics and step (the data position is a function of the step)."""
    from rlhf.runtime.distributed import barrier  # torch's: accelerate's waits for nobody in a CPU DDP launch

    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before any rank writes its RNG state into it
    barrier()
    accelerator.save_state(str(tmp))
    checkpoints.save_rng_state(tmp, accelerator.process_index)  # JSON + safetensors, not accelerate's pickle
    barrier()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints.complete_checkpoints(out, STATE_FILE)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def export_models(accelerator, ac_wrapped, tokenizer, out: Path, base_path: str) -> None:
    """The trained policy (adapter or full model, + tokenizer) in out/policy, the critic (if any) in
    out/critic: ordinary directories that peft/transformers load."""
    state = accelerator.get_state_dict(ac_wrapped)  # gathers ZeRO-3 shards
    if not accelerator.is_main_process:
        return
    ac = accelerator.unwrap_model(ac_wrapped)
    sub = lambda prefix: {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # noqa: E731
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    exported = ("policy", "critic") if ac.has_critic else ("policy",)
    if ac.shared:
        for d in exported:
            ac.policy.save_pretrained(tmp / d, selected_adapters=[d], state_dict=sub("policy."))
        for d in exported:  # peft nests non-default adapters in a sub-folder; flatten it
            nested = tmp / d / d
            if nested.exists():
                for f in nested.iterdir():
                    os.replace(f, tmp / d / f.name)
                nested.rmdir()
            cfg_file = tmp / d / "adapter_config.json"
            adapter_cfg = json.loads(cfg_file.read_text())
            adapter_cfg["base_model_name_or_path"] = base_path
            cfg_file.write_text(json.dumps(adapter_cfg, indent=2))
    else:
        ac.policy.save_pretrained(tmp / "policy", state_dict=sub("policy."), safe_serialization=True)
        if ac.has_critic:
            ac.critic.save_pretrained(tmp / "critic", state_dict=sub("critic."), safe_serialization=True)
    if ac.has_critic:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sub("value_head.").items()},
                  tmp / "critic" / "value_head.safetensors")
    tokenizer.save_pretrained(tmp / "policy")
    checkpoints.publish_dir(tmp, out)


