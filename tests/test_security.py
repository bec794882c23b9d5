"""Nothing we read runs code: a crafted checkpoint is refused before anything unpickles it, our own
checkpoints (PPO, DeepSpeed, HF Trainer) hold only JSON, safetensors and plain tensor pickles, and
pickle weights (.bin) load only when the user opts in."""

import pickle
import shutil

import pytest
import torch

from conftest import sft_config
from rewards import DigitReward
from rlhf import checkpoints, ppo, sft
from rlhf.errors import UserError
from test_ppo import ppo_config, sft_policy  # noqa: F401  (session fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class RunsACommand:
    """Unpickling this runs `touch MARKER`, as a crafted checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def ppo_run(sft_policy, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ppo_run")
    ppo.main(ppo_config(out, sft_policy, "--save_steps", "1"), reward=DigitReward())
    return out / "ppo"


def test_ppo_checkpoint_is_json_safetensors_and_tensor_pickles(ppo_run):
    ckpt = checkpoints.complete_checkpoints(ppo_run, ppo.STATE_FILE)[-1]
    names = {p.name for p in ckpt.iterdir()}
    assert not any(n.endswith(".pkl") for n in names), names  # no pickled scheduler, no pickled RNG
    assert {"ppo_state.json", "rng_state_0.json", "rng_state_0.safetensors", "model.safetensors"} <= names
    checkpoints.refuse_unsafe_pickles(ckpt)  # the optimizer's torch.save holds tensors and plain data only


@pytest.mark.parametrize("name", ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_crafted_checkpoint_is_refused_before_it_runs(tmp_path, sft_policy, ppo_run, name):  # noqa: F811
    out = tmp_path / "ppo"
    shutil.copytree(ppo_run, out)
    ckpt = checkpoints.complete_checkpoints(out, ppo.STATE_FILE)[-1]
    marker = tmp_path / "pwned"
    with open(ckpt / name, "wb") as f:
        pickle.dump({"state": RunsACommand(marker)}, f)
    with pytest.raises(UserError, match=f"checkpoint file '.*{name}'.*could run code"):
        ppo.main(ppo_config(tmp_path, sft_policy, "--resume", "latest", "--ppo.steps", "3"), reward=DigitReward())
    assert not marker.exists()
    # the same payload through the plain unpickler does run: the test's payload is real
    with open(ckpt / name, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_trainer_checkpoints_pass_and_crafted_ones_are_refused(tmp_path):
    sft.main(sft_config(tmp_path / "a", "--train.max_steps", "2", "--train.save_steps", "1", "--train.eval_steps", "1"))
    out = tmp_path / "a" / "out"
    ckpt = checkpoints.complete_checkpoints(out)[-1]
    assert {"optimizer.pt", "rng_state.pth"} <= {p.name for p in ckpt.iterdir()}
    assert checkpoints.resolve_resume("latest", out) == str(ckpt)  # numpy RNG state is plain data
    marker = tmp_path / "pwned"
    torch.save({"x": RunsACommand(marker)}, ckpt / "rng_state.pth")
    with pytest.raises(UserError, match="rng_state.pth.*could run code"):
        sft.main(sft_config(tmp_path / "a", "--train.max_steps", "3", "--train.save_steps", "1", "--train.eval_steps", "1",
                            "--resume", "latest"))
    assert not marker.exists()
