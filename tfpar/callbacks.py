"""Callbacks tfpar adds to `model.fit`: per-step losses and throughput."""

import math
import time
from typing import List, Optional

import keras


class StepRecorder(keras.callbacks.Callback):
    """Records each optimizer step's loss and time; stops at a non-finite loss.

    Reads `logs["step_loss"]` (the step's own loss, which tfpar models report)
    rather than Keras's running mean `logs["loss"]`.
    """

    def __init__(self, tokens_per_step: int, warmup_steps: int = 1):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.warmup_steps = warmup_steps
        self.step_losses: List[float] = []
        self.step_ends: List[float] = []
        self.start_time: Optional[float] = None
        self.non_finite_step: Optional[int] = None

    def on_train_begin(self, logs=None):
        self.start_time = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        loss = float(logs.get("step_loss", logs.get("loss", math.nan)))
        self.step_losses.append(loss)
        self.step_ends.append(time.perf_counter())
        if not math.isfinite(loss) and self.non_finite_step is None:
            self.non_finite_step = len(self.step_losses)
            self.model.stop_training = True

    @property
    def tokens_per_second(self) -> float:
        """Throughput after the first `warmup_steps` steps (tracing excluded)."""
        timed = len(self.step_ends) - self.warmup_steps
        if timed <= 0:
            return 0.0
        seconds = self.step_ends[-1] - self.step_ends[self.warmup_steps - 1]
        return timed * self.tokens_per_step / seconds if seconds > 0 else 0.0

    @property
    def step_seconds(self) -> float:
        timed = len(self.step_ends) - self.warmup_steps
        if timed <= 0:
            return 0.0
        return (self.step_ends[-1] - self.step_ends[self.warmup_steps - 1]) / timed
