"""transformers.Trainer glue: drop-and-regrow as a TrainerCallback (needs transformers).

    trainer = Trainer(model=apet_model, args=args, train_dataset=ds,
                      callbacks=[RegrowthCallback(interval=100, fraction=0.3)])
"""

from __future__ import annotations

from transformers import TrainerCallback

from .positions import Regrower


class RegrowthCallback(TrainerCallback):
    """Runs a ``Regrower`` inside a Trainer: it observes the gradients of each optimizer step that ends
    with a regrowth (on_step_begin .. on_step_end, all micro-batches of the step) and moves the deltas
    after the optimizer has stepped. ``total_steps`` defaults to the Trainer's max_steps."""

    def __init__(self, interval: int, fraction: float = 0.2, schedule: str = "cosine", score: str = "abs",
                 total_steps: int | None = None):
        self.kwargs = dict(interval=interval, fraction=fraction, schedule=schedule, score=score)
        self.total_steps = total_steps
        self.regrower: Regrower | None = None
        self._observing = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.regrower = Regrower(model, optimizer, total_steps=self.total_steps or state.max_steps, **self.kwargs)
        self.regrower.steps = state.global_step  # resuming from a checkpoint

    def on_step_begin(self, args, state, control, **kwargs):
        self._observing = self.regrower.observe()
        self._observing.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._observing is not None:
            self._observing.__exit__(None, None, None)
            self._observing = None
        self.regrower.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self._observing is not None:
            self._observing.__exit__(None, None, None)
            self._observing = None
