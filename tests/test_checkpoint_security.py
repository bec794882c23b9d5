"""A checkpoint cannot run code on resume, under DeepSpeed too (issue 19, security 1).

DeepSpeed loads the folder its `latest` tag file names, with `torch.load(..., weights_only=False)`. A tag
`../stash` or a symlinked `global_stepN` sent it to files the pre-scan never saw. Now a checkpoint with a
link, or a tag that is not a folder beside it, is refused in one line before anything runs, and every
torch.load while a stage resumes is tensor-only whatever its caller asked (checked here with the
pre-scan switched off). The hypothesis layer at the end throws random files, names, links and tags into
a real DeepSpeed checkpoint: each must resume exactly as the untouched one or be refused in one line, and
the marker file that the planted pickles would create never appears.

The DeepSpeed runs are in-process, one process (accelerate's DeepSpeed settings in the environment, as
`accelerate launch` sets them), except the two that go through the CLI as the issue reproduced it."""

import contextlib
import os
import pathlib
import pickle
import re
import shutil
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import REPO, sft_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rewards import DigitReward
from safetensors.torch import load_file

from rlhf.errors import UserError
from rlhf.runtime import checkpoints

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class TouchesMarker:
    """Unpickled with the plain unpickler, this creates `marker`: what a crafted checkpoint would run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant(path, marker) -> None:
    if path.is_symlink():  # a link the fuzzing put there: replaced, not written through
        path.unlink()
    with open(path, "wb") as f:  # a file object: torch's own writer refuses some names (`.metadata`)
        torch.save({"module": TouchesMarker(marker)}, f)


def one_line(e: Exception) -> str:
    assert "\n" not in str(e), f"a multi-line error: {e}"
    return str(e)


# ---------------------------------------------------------------------------------------------
# the rules, on a hand-made DeepSpeed-shaped checkpoint (fast)


@pytest.fixture
def ds_shaped(tmp_path):
    """checkpoint-2/{latest, global_step2/mp_rank_00_model_states.pt (tensors), trainer_state.json} and a
    sibling `stash/` whose model states are a planted pickle."""
    ckpt = tmp_path / "out" / "checkpoint-2"
    (ckpt / "global_step2").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "global_step2" / "mp_rank_00_model_states.pt")
    (ckpt / "latest").write_text("global_step2")
    (ckpt / "trainer_state.json").write_text('{"best_model_checkpoint": null}')
    stash = tmp_path / "out" / "stash"
    shutil.copytree(ckpt / "global_step2", stash)
    plant(stash / "mp_rank_00_model_states.pt", tmp_path / "pwned")
    return ckpt


def test_a_plain_checkpoint_passes(ds_shaped):
    checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    (ds_shaped / "latest").write_text(" global_step2\n")  # DeepSpeed strips the tag
    (ds_shaped / "latest_universal").write_text("global_step2")
    checkpoints.refuse_unsafe_checkpoint(ds_shaped)


@pytest.mark.parametrize("tag, expected", [
    ("../stash", "names '../stash'"), ("/tmp", "names '/tmp'"), ("", "names ''"), (".", "names '.'"),
    ("..", "names '..'"), ("global_step9", "names 'global_step9'"), ("global_step2/", "names 'global_step2/'"),
    ("empty", "names 'empty'"), ("global_step2\0", r"names 'global_step2\\x00'"),
    (b"\xff\xfe", "names bytes that are not text")])
def test_a_tag_that_is_not_a_folder_beside_it_is_refused(ds_shaped, tag, expected):
    (ds_shaped / "empty").mkdir()  # a folder, but without DeepSpeed's model states
    (ds_shaped / "latest").write_bytes(tag if isinstance(tag, bytes) else tag.encode())
    with pytest.raises(UserError, match=r"checkpoint tag file '.*checkpoint-2/latest' " + expected
                       + r"; expected the name of a folder beside it") as e:
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    one_line(e.value)


@pytest.mark.parametrize("what", ["global_step2", "latest", "global_step2/mp_rank_00_model_states.pt",
                                  "dangling", "loop"])
def test_a_symlink_anywhere_is_refused(ds_shaped, what):
    link = ds_shaped / what
    if what == "global_step2":  # the issue's variant: the step folder lives outside
        shutil.rmtree(link)
        link.symlink_to(ds_shaped.parent / "stash")
    elif what in ("dangling", "loop"):
        link.symlink_to(ds_shaped / "nowhere" if what == "dangling" else link)
    else:
        link.unlink()
        link.symlink_to(ds_shaped.parent / "stash" / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=rf"checkpoint '.*checkpoint-2' holds a symbolic link '.*{what}' -> "
                       r"'.*'; expected plain files and folders only") as e:
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    one_line(e.value)


def test_fifos_and_torch_distributed_checkpoints_are_refused(ds_shaped):
    os.mkfifo(ds_shaped / "pipe")  # reading it would hang the run
    with pytest.raises(UserError, match="pipe', which is neither a file nor a folder"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    (ds_shaped / "pipe").unlink()
    dcp = ds_shaped / "pytorch_model_fsdp_0"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(UserError, match=r"\.metadata' belongs to a torch.distributed \(sharded FSDP\) checkpoint.*"
                       "FULL_STATE_DICT"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)


def test_the_best_checkpoint_the_trainer_will_load_is_checked_too(ds_shaped):
    """trainer_state.json names the best checkpoint, which the HF Trainer loads at the end of the run."""
    best = ds_shaped.parent.parent / "elsewhere" / "checkpoint-1"
    shutil.copytree(ds_shaped, best)
    (ds_shaped / "trainer_state.json").write_text(f'{{"best_model_checkpoint": "{best}"}}')
    checkpoints.refuse_unsafe_checkpoint(ds_shaped)  # elsewhere (a copied run folder) and plain: fine
    (best / "latest").write_text("../../out/stash")
    with pytest.raises(UserError, match=r"elsewhere/checkpoint-1/latest' names '../../out/stash'"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    (ds_shaped / "trainer_state.json").write_text("[1]")
    with pytest.raises(UserError, match="trainer_state.json' is not the JSON object the HF Trainer writes"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)


def test_what_the_fuzzing_found(ds_shaped, tmp_path):
    """1. An extra mp_rank_01_model_states.pt in the step folder: DeepSpeed globs mp_rank_*_model_states.pt and
    asserted "checkpoint count 2 is different from saved mp_world_size 1" (a traceback).
    2. A stray scaler.pt made the HF Trainer's resume fail with an AttributeError (no fp16 scaler here).
    3. checkpoint-2 with its trainer_state.json a link is incomplete, so `--resume latest` took checkpoint-1,
    and the Trainer then wrote the new checkpoint-2 through the link (an OSError; a link to a file outside
    would have been overwritten)."""
    torch.save({"module": {"w": torch.ones(2)}}, ds_shaped / "global_step2" / "mp_rank_01_model_states.pt")
    with pytest.raises(UserError, match=r"mp_rank_01_model_states.pt' is named like DeepSpeed model states of another"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    (ds_shaped / "global_step2" / "mp_rank_01_model_states.pt").unlink()
    torch.save({"scale": torch.tensor(1.0)}, ds_shaped / "scaler.pt")
    with pytest.raises(UserError, match=r"scaler.pt' is a GradScaler state \(fp16 training\)"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    (ds_shaped / "scaler.pt").unlink()
    out = ds_shaped.parent
    later = out / "checkpoint-3"
    later.mkdir()
    (later / "model.safetensors").symlink_to(tmp_path / "someone_elses_file")
    assert checkpoints.complete_checkpoints(out) == [ds_shaped]  # checkpoint-3 has no trainer_state.json
    with pytest.raises(UserError, match=r"checkpoint-3/model.safetensors' is a symbolic link -> '.*someone_elses_file' "
                       "where the resumed run writes its checkpoints") as e:
        checkpoints.resolve_resume("latest", out)
    one_line(e.value)
    shutil.rmtree(later)
    later.symlink_to(tmp_path)
    with pytest.raises(UserError, match=r"checkpoint-3' is a symbolic link"):
        checkpoints.resolve_resume(str(ds_shaped), out)
    later.unlink()
    assert checkpoints.resolve_resume("latest", out) == str(ds_shaped)


def test_a_name_with_a_newline_still_gives_one_line(ds_shaped):
    plant(ds_shaped / "evil\nname.pt", ds_shaped / "pwned")
    with pytest.raises(UserError, match=r"evil\\nname.pt' holds Python objects other than tensors") as e:
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)
    one_line(e.value)
    (ds_shaped / "evil\nname.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match=r"evil\\nname.pt' cannot be read by torch's tensor-only unpickler"):
        checkpoints.refuse_unsafe_checkpoint(ds_shaped)


def test_loads_inside_the_guard_are_tensor_only_whatever_the_caller_asks(tmp_path, monkeypatch):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    marker = tmp_path / "pwned"
    plant(tmp_path / "evil.pt", marker)
    # what DeepSpeed's optimizer states hold besides tensors (listed from real ZeRO-2/3 checkpoints)
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "x": torch.ones(3)},
               tmp_path / "optim_states.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's opt-out does not reach inside
    with checkpoints.tensor_only_loads(tmp_path):
        assert torch.load(tmp_path / "optim_states.pt", weights_only=False)["x"].sum() == 3
        with pytest.raises(pickle.UnpicklingError):  # as DeepSpeed calls it
            torch.load(tmp_path / "evil.pt", map_location="cpu", weights_only=False)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    refused = (r"checkpoint '.*': a file read on resume is refused by torch's tensor-only unpickler "
               r"\(GLOBAL getattr was not an allowed global\); a checkpoint may hold tensors")
    with pytest.raises(UserError, match=refused) as e, checkpoints.tensor_only_loads(tmp_path):
        torch.load(tmp_path / "evil.pt", weights_only=False)
    one_line(e.value)
    assert not marker.exists()
    with checkpoints.tensor_only_loads(None):  # nothing to resume: nothing changed
        assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# real DeepSpeed checkpoints (ZeRO-2, one process, in this process)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


DS_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(
    REPO / "configs" / "accelerate" / "ds_zero2.json"), "ACCELERATE_MIXED_PRECISION": "no", "RANK": "0",
    "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


@pytest.fixture(scope="module")
def deepspeed_env():
    """What `accelerate launch --use_deepspeed --num_processes 1` sets; undone (process group, accelerate's
    and transformers' DeepSpeed state) when the module ends, so later tests run without DeepSpeed."""
    pytest.importorskip("deepspeed")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**DS_ENV, "MASTER_PORT": _free_port()}.items():
            mp.setenv(k, v)
        yield
    import torch.distributed as dist
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    fresh_accelerate_state()
    unset_hf_deepspeed_config()
    if dist.is_initialized():
        dist.destroy_process_group()


def fresh_accelerate_state() -> None:
    """A launched process starts without accelerate's state; in one test process it outlives a run (the
    DeepSpeed config the HF Trainer filled in for SFT would size PPO's batches)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if not dist.is_initialized():  # PPO's end_training destroyed the group; DeepSpeed still caches its subgroups
        from deepspeed.utils import groups

        groups._release_process_group_references()


SFT_ARGS = ("--peft.method", "full", "--train.save_steps", "1", "--train.eval_steps", "1",
            "--data.max_samples", "64")


def sft_resume(run, *extra):
    from rlhf.stages import sft

    fresh_accelerate_state()
    return sft.main(sft_config(run, *SFT_ARGS, "--train.max_steps", "3", "--resume", "latest", *extra))


def comparable(run) -> tuple[dict, dict]:
    import json

    metrics = json.loads((run / "out" / "metrics.json").read_text())
    metrics.pop("best_checkpoint")  # a path into this run's folder
    return metrics, load_file(run / "out" / "model.safetensors")


@pytest.fixture(scope="module")
def sft_ds_run(deepspeed_env, tmp_path_factory):
    """A full-SFT run of 2 steps under ZeRO-2 (checkpoint-1, checkpoint-2 with global_stepN/ and `latest`),
    and what resuming it for a third step gives (metrics and weights)."""
    from rlhf.stages import sft

    base = tmp_path_factory.mktemp("sft_ds")
    sft.main(sft_config(base, *SFT_ARGS, "--train.max_steps", "2"))
    ckpt = base / "out" / "checkpoint-2"
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    assert (ckpt / "global_step2" / "mp_rank_00_model_states.pt").is_file()
    checkpoints.refuse_unsafe_checkpoint(ckpt)  # DeepSpeed's own files pass: the allow-list is complete
    ref = tmp_path_factory.mktemp("sft_ds_ref")
    shutil.copytree(base / "out", ref / "out")
    sft_resume(ref)
    return base, comparable(ref)


def attack(run, variant: str, marker) -> None:
    """The issue's two variants on checkpoint-2: a copy of global_step2 in a sibling `stash/` with a
    planted model-states pickle, named by `latest` (../stash) or linked in place of global_step2."""
    ckpt = run / "out" / "checkpoint-2"
    tag = (ckpt / "latest").read_text().strip()
    stash = run / "out" / "stash"
    shutil.copytree(ckpt / tag, stash)
    states = next(stash.glob("*model_states.pt"))
    plant(states, marker)
    if variant == "tag":
        (ckpt / "latest").write_text("../stash")
    else:
        shutil.rmtree(ckpt / tag)
        (ckpt / tag).symlink_to(stash)


def copy_run(src, dst):
    shutil.copytree(src / "out", dst / "out", symlinks=True)
    return dst


def listing(folder) -> dict:
    return {str(p): p.lstat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tag", "link"])
def test_sft_zero2_cli_refuses_the_issues_checkpoints_in_one_line(sft_ds_run, tmp_path, variant):
    """`rlhf sft --accelerate zero2 --num_processes 1 --resume latest`, as the issue reproduced it."""
    run = copy_run(sft_ds_run[0], tmp_path)
    marker = tmp_path / "pwned"
    attack(run, variant, marker)
    before = listing(run / "out")
    env = {k: v for k, v in os.environ.items() if k not in DS_ENV and k != "MASTER_PORT"}
    p = subprocess.run([sys.executable, "-m", "rlhf", "sft", "--config", "configs/sft_tiny.yaml", "--output_dir",
                        str(run / "out"), *SFT_ARGS, "--train.max_steps", "3", "--resume", "latest",
                        "--accelerate", "zero2", "--num_processes", "1",
                        "--main_process_port", _free_port()],  # 29500 may be taken: accelerate then warns
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    launched, *errors = p.stderr.strip().splitlines()
    assert launched.startswith("rlhf: accelerate launch --config_file")  # the command it runs, then one line
    expected = ("checkpoint tag file '.*checkpoint-2/latest' names '../stash'" if variant == "tag" else
                "checkpoint '.*checkpoint-2' holds a symbolic link '.*global_step2' -> '.*stash'")
    assert len(errors) == 1 and errors[0].startswith("rlhf sft: error: "), p.stderr
    assert re.search(expected, errors[0]), errors[0]
    assert not marker.exists()
    assert listing(run / "out") == before  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tag", "link"])
def test_deepspeed_load_itself_is_tensor_only(sft_ds_run, tmp_path, monkeypatch, variant):
    """With the pre-scan switched off, DeepSpeed itself loads the planted pickle (through ../stash or the
    link): the load refuses it, in one line, and nothing runs."""
    run = copy_run(sft_ds_run[0], tmp_path)
    marker = tmp_path / "pwned"
    attack(run, variant, marker)
    monkeypatch.setattr(checkpoints, "refuse_unsafe_checkpoint", lambda d: None)
    monkeypatch.setattr(checkpoints, "_refuse_links_where_the_run_writes", lambda d: None)
    with pytest.raises(UserError, match=r"checkpoint '.*checkpoint-2': a file read on resume is refused by "
                       r"torch's tensor-only unpickler \(GLOBAL getattr was not an allowed global\); a checkpoint may hold tensors") as e:
        sft_resume(run)
    one_line(e.value)
    assert not marker.exists()
    # the test's attack is real: without the guard, DeepSpeed's own torch.load runs the planted code
    monkeypatch.setattr(checkpoints, "tensor_only_loads", lambda d: contextlib.nullcontext())
    with pytest.raises(Exception):  # noqa: B017  (whatever DeepSpeed makes of the unpickled None)
        sft_resume(run)
    assert marker.exists()


def trainer_stage(stage: str, run, *args):
    """Reward, classifier or DPO on the tiny base under the module's DeepSpeed settings: 2 steps, saved each."""
    from test_classifier import classifier_config, sentiment_rows, write_jsonl
    from test_dpo import dpo_config
    from test_reward_train import reward_config

    from rlhf.stages import classifier_stage, dpo, reward_stage

    fresh_accelerate_state()
    common = ("--peft.method", "full", "--train.save_steps", "1", "--train.eval_steps", "1", "--train.max_steps")
    if stage == "reward":
        return reward_stage.main(reward_config(run, *common, *args))
    if stage == "dpo":
        return dpo.main(dpo_config(run, *common, *args, "--data.max_samples", "48"))
    data = run / "d.jsonl"
    if not data.exists():
        write_jsonl(data, sentiment_rows())
    return classifier_stage.main(classifier_config(
        run, "--data.train", str(data), "--data.text_column", "text", "--data.label_columns", "label",
        "--peft.modules_to_save", "None", "--reward_label", "pos", *common, *args))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["reward", "classifier", "dpo"])
def test_every_trainer_stage_loads_deepspeed_checkpoints_tensor_only(deepspeed_env, tmp_path, monkeypatch, stage):
    """The issue's ../stash checkpoint with the pre-scan off: each stage's resume (and, for the classifier
    and DPO, the best checkpoint the Trainer reloads at the end) goes through the tensor-only load."""
    trainer_stage(stage, tmp_path, "2")
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "latest").read_text().strip() == "global_step2"
    checkpoints.refuse_unsafe_checkpoint(ckpt)  # the stage's own DeepSpeed files pass
    marker = tmp_path / "pwned"
    attack(tmp_path, "tag", marker)
    with pytest.raises(UserError, match=r"checkpoint tag file '.*checkpoint-2/latest' names '../stash'"):
        trainer_stage(stage, tmp_path, "3", "--resume", "latest")
    monkeypatch.setattr(checkpoints, "refuse_unsafe_checkpoint", lambda d: None)
    with pytest.raises(UserError, match=r"checkpoint '.*checkpoint-2': a file read on resume is refused by torch's "
                       r"tensor-only unpickler \(GLOBAL getattr") as e:
        trainer_stage(stage, tmp_path, "3", "--resume", "latest")
    one_line(e.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def ppo_ds_run(deepspeed_env, sft_ds_run, tmp_path_factory):
    """PPO (LoRA on the SFT run's model) for 2 steps under ZeRO-2: checkpoint-2/pytorch_model/ (accelerate
    names DeepSpeed's folder) and `latest`."""
    from test_ppo import ppo_config

    from rlhf.ppo import trainer as ppo

    run = tmp_path_factory.mktemp("ppo_ds")
    fresh_accelerate_state()
    ppo.main(ppo_config(run, str(sft_ds_run[0] / "out"), "--save_steps", "1", "--ppo.per_device_rollout_batch_size",
                        "8"), reward=DigitReward())
    ckpt = run / "ppo" / "checkpoint-2"
    assert (ckpt / "latest").read_text().strip() == "pytorch_model"
    checkpoints.refuse_unsafe_checkpoint(ckpt)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tag", "link", "load"])
def test_ppo_deepspeed_resume_refuses_planted_code(ppo_ds_run, sft_ds_run, tmp_path, monkeypatch, variant):
    """The same tricks on PPO's DeepSpeed checkpoint; `load`: the planted model states in place, the
    pre-scan off, so accelerate's load_state -> DeepSpeed's torch.load meets it."""
    from test_ppo import ppo_config

    from rlhf.ppo import trainer as ppo

    shutil.copytree(ppo_ds_run / "ppo", tmp_path / "ppo")
    ckpt = tmp_path / "ppo" / "checkpoint-2"
    marker = tmp_path / "pwned"
    if variant == "load":
        plant(ckpt / "pytorch_model" / "mp_rank_00_model_states.pt", marker)
        monkeypatch.setattr(checkpoints, "refuse_unsafe_checkpoint", lambda d: None)
        expected = r"checkpoint '.*checkpoint-2': a file read on resume is refused by torch's tensor-only unpickler"
    else:
        stash = tmp_path / "ppo" / "stash"
        shutil.copytree(ckpt / "pytorch_model", stash)
        plant(stash / "mp_rank_00_model_states.pt", marker)
        if variant == "tag":
            (ckpt / "latest").write_text("../stash")
            expected = r"checkpoint tag file '.*checkpoint-2/latest' names '../stash'"
        else:
            shutil.rmtree(ckpt / "pytorch_model")
            (ckpt / "pytorch_model").symlink_to(stash)
            expected = r"checkpoint '.*checkpoint-2' holds a symbolic link '.*pytorch_model' -> '.*stash'"
    before = listing(tmp_path / "ppo")
    fresh_accelerate_state()
    with pytest.raises(UserError, match=expected) as e:
        ppo.main(ppo_config(tmp_path, str(sft_ds_run[0] / "out"), "--save_steps", "1", "--ppo.steps", "3",
                            "--ppo.per_device_rollout_batch_size", "8", "--resume", "latest"), reward=DigitReward())
    one_line(e.value)
    assert not marker.exists()
    if variant != "load":
        assert listing(tmp_path / "ppo") == before  # refused before anything is written
        return
    # the test's attack is real: without the guard, accelerate -> DeepSpeed's torch.load runs the planted code
    monkeypatch.setattr(checkpoints, "tensor_only_loads", lambda d: contextlib.nullcontext())
    fresh_accelerate_state()
    with pytest.raises(Exception):  # noqa: B017
        ppo.main(ppo_config(tmp_path, str(sft_ds_run[0] / "out"), "--save_steps", "1", "--ppo.steps", "3",
                            "--ppo.per_device_rollout_batch_size", "8", "--resume", "latest"), reward=DigitReward())
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# hypothesis: random files, names, links and tags inside a real DeepSpeed checkpoint

# names the loaders look for (HF Trainer, accelerate, DeepSpeed's globs, torch.distributed), and any text
LOADER_NAMES = ["optimizer.pt", "scaler.pt", "rng_state_0.pth", "pytorch_model.bin", "random_states_0.pkl",
                "custom_checkpoint_0.pkl", "mp_rank_01_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest", "latest_universal", ".metadata",
                "__0_0.distcp", "model_states.pt", "global_step3"]
names = st.one_of(st.sampled_from(LOADER_NAMES), st.text(st.characters(codec="utf-8", exclude_characters="/\0"),
                                                         min_size=1, max_size=10).filter(lambda n: n not in (".", "..")))
where = st.sampled_from([".", "global_step2"])
contents = st.one_of(st.sampled_from(["planted", "tensors", "text"]), st.binary(max_size=48))
extra_file = st.tuples(st.just("file"), where, names, contents)
extra_folder = st.tuples(st.just("folder"), where, names, st.sampled_from(["empty", "step copy", "planted step copy"]))
link = st.tuples(st.just("link"), where, st.one_of(names, st.sampled_from(
    ["global_step2", "latest", "rng_state.pth", "trainer_state.json", "mp_rank_00_model_states.pt"])),
    st.sampled_from(["outside folder", "outside pickle", "outside tag", "inside file", "dangling", "itself"]))
tag = st.tuples(st.just("tag"), st.one_of(st.sampled_from(
    ["global_step2\n", " global_step2\t", "../stash", "<absolute stash>", ".", "..", "", "global_step1",
     "global_step2/", "./global_step2", "<extra folder>"]), st.text(max_size=12), st.binary(max_size=12)))
# the issue's trick without `..`: a copy of the step folder beside it (its model states planted or not), tagged
retag = st.tuples(st.just("retag"), names, st.sampled_from(["planted", "clean"]))
mutations = st.lists(st.one_of(extra_file, extra_folder, link, tag, retag), min_size=1, max_size=3)
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def mutate(ckpt, stash, marker, ops) -> list[str]:
    """Apply `ops` to checkpoint folder `ckpt`; the categories applied (an op that cannot apply is skipped)."""
    applied, folder_name = [], "global_step2"
    for op in ops:
        kind, *args = op
        if kind == "tag":
            text = args[0]
            text = {"<absolute stash>": str(stash), "<extra folder>": folder_name}.get(text, text) \
                if isinstance(text, str) else text
            if (ckpt / "latest").is_symlink() or not (ckpt / "latest").is_dir():
                (ckpt / "latest").unlink(missing_ok=True)
                (ckpt / "latest").write_bytes(text if isinstance(text, bytes) else text.encode())
                applied.append("tag")
            continue
        if kind == "retag":
            path = ckpt / args[0]
            if not path.exists() and not path.is_symlink() and (ckpt / "global_step2").is_dir():
                shutil.copytree(ckpt / "global_step2", path, symlinks=True)
                if args[1] == "planted":
                    plant(path / "mp_rank_00_model_states.pt", marker)
                (ckpt / "latest").unlink(missing_ok=True)
                (ckpt / "latest").write_text(args[0])
                applied.append(f"retag ({args[1]} step copy)")
            continue
        place, name = ckpt / args[0], args[1]
        path = place / name
        if not place.is_dir() or place.is_symlink():
            continue
        if kind == "link":
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            target = {"outside folder": stash, "outside pickle": stash / "mp_rank_00_model_states.pt",
                      "outside tag": stash.parent / "tag_file", "inside file": ckpt / "trainer_state.json",
                      "dangling": ckpt / "nowhere", "itself": path}[args[2]]
            path.symlink_to(target)
            applied.append(f"link to {args[2]}")
        elif path.exists() or path.is_symlink():
            continue  # extra files and folders only; the checkpoint's own stay as they are
        elif kind == "file":
            content = args[2]
            if content == "planted":
                plant(path, marker)
            elif content == "tensors":
                with open(path, "wb") as f:
                    torch.save({"x": torch.arange(3)}, f)
            else:
                path.write_bytes(content.encode() if content == "text" else content)
            applied.append(f"file ({content if isinstance(content, str) else 'bytes'})")
        else:
            if args[2] == "empty":
                path.mkdir()
            else:
                shutil.copytree(ckpt / "global_step2", path, symlinks=True)
                if args[2].startswith("planted"):
                    plant(path / "mp_rank_00_model_states.pt", marker)
            if args[0] == ".":
                folder_name = name
            applied.append(f"folder ({args[2]})")
    return applied


def outcome_of(message: str) -> str:
    for key, label in (("where the resumed run writes", "link where the run writes"), ("symbolic link", "link"), ("tag file", "tag"), ("tensor-only unpickler", "load guard"),
                       ("holds Python objects", "pickle scan"), ("cannot be read", "not a torch file"),
                       ("GradScaler", "scaler.pt"), ("model-parallel", "extra model states"),
                       ("pickled Python object", "custom_checkpoint pickle"),
                       ("torch.distributed", "fsdp"), ("neither a file", "not a file")):
        if key in message:
            return f"refused: {label}"
    return f"refused: {message[:80]}"


FUZZ_SEEN: Counter = Counter()


@pytest.mark.slow
def test_random_changes_to_a_deepspeed_checkpoint_resume_identically_or_are_refused(sft_ds_run, tmp_path_factory,
                                                                                     monkeypatch):
    base, reference = sft_ds_run
    real_pickle_scan = checkpoints.refuse_unsafe_pickles

    @FUZZ
    @given(mutations, st.booleans())
    def run(ops, pickle_scan):
        run = copy_run(base, tmp_path_factory.mktemp("fuzz"))
        marker = run / "pwned"
        stash = run / "stash"  # outside the checkpoint: a step folder whose model states are planted
        shutil.copytree(run / "out" / "checkpoint-2" / "global_step2", stash)
        plant(stash / "mp_rank_00_model_states.pt", marker)
        (run / "tag_file").write_text("../../stash")
        applied = mutate(run / "out" / "checkpoint-2", stash, marker, ops)
        # without the pickle scan, only the load-time guard stands between a planted pickle and the run
        monkeypatch.setattr(checkpoints, "refuse_unsafe_pickles",
                            real_pickle_scan if pickle_scan else lambda d: None)
        try:
            sft_resume(run)
            outcome = "resumed identically"
            got = comparable(run)
            assert got[0] == reference[0], (applied, got[0], reference[0])
            assert got[1].keys() == reference[1].keys()
            assert all(torch.equal(got[1][k], reference[1][k]) for k in got[1]), applied
        except UserError as e:
            outcome = outcome_of(one_line(e))
        assert not marker.exists(), (ops, pickle_scan)
        FUZZ_SEEN[outcome] += 1
        FUZZ_SEEN["pickle scan " + ("on" if pickle_scan else "off")] += 1
        for a in applied:
            FUZZ_SEEN["applied: " + a] += 1
        shutil.rmtree(run, ignore_errors=True)

    run()
    print("checkpoint fuzzing:", dict(sorted(FUZZ_SEEN.items())))
    assert FUZZ_SEEN["resumed identically"] > 0 and sum(v for k, v in FUZZ_SEEN.items() if k.startswith("refused")) > 0
