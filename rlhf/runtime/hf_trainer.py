"""What the stages built on a transformers Trainer (SFT, reward, classifier, DPO) add to it: `attach(trainer)`.

- Progress as `rlhf.runtime.progress` draws it (plain lines off a terminal), in place of transformers'
  ProgressCallback.
- TRL's token count across a resume. TRL's trainers count the training tokens they have seen (the log's
  `num_tokens` and `eval_num_tokens`) in `trainer._total_train_tokens`, which no checkpoint holds, so a
  resumed run counted from 0 again while everything else continued. The count is written into each
  checkpoint's trainer_state.json (under `stateful_callbacks`, which transformers saves as it finds it) and
  read back from there when training resumes.
"""

from __future__ import annotations

from transformers import ProgressCallback, TrainerCallback
from transformers.trainer_utils import has_length

from rlhf.runtime.progress import Progress, interactive

TOKENS_KEY = "rlhf_total_train_tokens"  # our entry in trainer_state.json's stateful_callbacks


class TrainerProgress(ProgressCallback):
    """transformers' ProgressCallback with `Progress` bars; evaluation bars only on a terminal (off it, the
    evaluation's result is logged as a line anyway)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a resumed run's bar starts where its checkpoint was
            self.training_bar = Progress(total=state.max_steps, initial=state.global_step, desc="train",
                                         dynamic_ncols=True)
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader) and interactive():
            if self.prediction_bar is None:
                self.prediction_bar = Progress(total=len(eval_dataloader), leave=self.training_bar is None,
                                               desc="eval", dynamic_ncols=True)
            self.prediction_bar.update(1)


class TokenCount(TrainerCallback):
    """Keeps a TRL trainer's `_total_train_tokens` in the trainer state (see the module's docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        # state is the checkpoint's on a resume (loaded before this call), a new one otherwise
        saved = state.stateful_callbacks.get(TOKENS_KEY)
        if saved is None and state.global_step > 0:  # a checkpoint written before the count was kept
            saved = next((row["num_tokens"] for row in reversed(state.log_history) if "num_tokens" in row), 0)
        if saved is not None:
            self.trainer._total_train_tokens = int(saved)

    def on_step_end(self, args, state, control, **kwargs):
        # before the step's log, evaluation and checkpoint (which writes trainer_state.json)
        state.stateful_callbacks[TOKENS_KEY] = self.trainer._total_train_tokens


def attach(trainer) -> None:
    """Our progress bars, and for TRL's trainers (SFT, reward, DPO) the token count kept across resumes."""
    if trainer.pop_callback(ProgressCallback) is not None:  # absent with disable_tqdm (PrinterCallback instead)
        trainer.add_callback(TrainerProgress())
    if "_total_train_tokens" in vars(trainer):  # TRL's trainers; transformers' own (the classifier) counts none
        trainer.add_callback(TokenCount(trainer))
