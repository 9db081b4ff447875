"""Callbacks tfpar adds to `model.fit`: per-step losses, throughput, TensorBoard scalars."""

import math
import time
from typing import List, Optional

import keras
import psutil

from tfpar import checkpointing


class StepRecorder(keras.callbacks.Callback):
    """Records each optimizer step's loss and time; stops at a non-finite loss.

    Reads `logs["step_loss"]` (the step's own loss, which tfpar models report)
    rather than Keras's running mean `logs["loss"]`, and `logs["grad_norm"]`
    (None where a model does not report it or it is not finite: a step that
    loss scaling skipped).
    """

    def __init__(self, tokens_per_step: int, warmup_steps: int = 1):
        super().__init__()
        self.tokens_per_step = tokens_per_step
        self.warmup_steps = warmup_steps
        self.step_losses: List[float] = []
        self.grad_norms: List[Optional[float]] = []
        self.step_ends: List[float] = []
        self.val_losses: List[float] = []  # the held-out loss after each epoch (--eval_fraction)
        self.start_time: Optional[float] = None
        self.non_finite_step: Optional[int] = None
        self._fit_starts = set()  # index of each `fit` call's first step
        self._evaluations = {}  # index of the step after evaluations -> their seconds
        self._evaluation_start = 0.0

    def on_train_begin(self, logs=None):
        if self.start_time is None:  # a resumed run calls `fit` twice: one clock
            self.start_time = time.perf_counter()
        self._fit_starts.add(len(self.step_ends))

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        loss = float(logs.get("step_loss", logs.get("loss", math.nan)))
        self.step_losses.append(loss)
        norm = float(logs["grad_norm"]) if "grad_norm" in logs else math.nan
        self.grad_norms.append(norm if math.isfinite(norm) else None)
        self.step_ends.append(time.perf_counter())
        if not math.isfinite(loss) and self.non_finite_step is None:
            self.non_finite_step = len(self.step_losses)
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if logs and "val_loss" in logs:
            self.val_losses.append(float(logs["val_loss"]))

    def on_test_begin(self, logs=None):
        self._evaluation_start = time.perf_counter()

    def on_test_end(self, logs=None):
        seconds = time.perf_counter() - self._evaluation_start
        self._evaluations[len(self.step_ends)] = self._evaluations.get(len(self.step_ends), 0.0) + seconds

    def _timed_steps(self) -> List[float]:
        """Step times after the first `warmup_steps` steps (tracing excluded), leaving out
        the first step of each later `fit` call (it also waits for a new dataset) and the
        evaluations (--eval_fraction) between steps."""
        ends = self.step_ends
        return [ends[i] - ends[i - 1] - self._evaluations.get(i, 0.0)
                for i in range(max(1, self.warmup_steps), len(ends)) if i not in self._fit_starts]

    @property
    def tokens_per_second(self) -> Optional[float]:
        """Throughput after the first `warmup_steps` steps; None when no step was timed
        (a run of one step: it traces)."""
        timed = self._timed_steps()
        seconds = sum(timed)
        return len(timed) * self.tokens_per_step / seconds if seconds > 0 else None

    @property
    def step_seconds(self) -> Optional[float]:
        """Mean seconds per timed step; None when no step was timed."""
        timed = self._timed_steps()
        return sum(timed) / len(timed) if timed else None


class FiniteEpochWeights(keras.callbacks.ModelCheckpoint):
    """Keras's ModelCheckpoint (weights each epoch), except after a non-finite loss
    or of non-finite weights (the epoch's last update, which no loss has seen).

    Keras still ends the epoch, and calls `on_epoch_end`, after `stop_training`.
    """

    def __init__(self, filepath: str, recorder: StepRecorder):
        super().__init__(filepath, save_weights_only=True)
        self.recorder = recorder

    def on_epoch_end(self, epoch, logs=None):
        if self.recorder.non_finite_step is None and checkpointing.weights_are_finite(self.model):
            super().on_epoch_end(epoch, logs)


class TrainingScalars(keras.callbacks.Callback):
    """TensorBoard scalars every `every_steps` steps: loss, gradient norm, learning rate,
    tokens/s, memory.

    Memory is each accelerator's current bytes in use (`tf.config.experimental.
    get_memory_info`) and, on every machine, the host process's resident set.
    Keras's TensorBoard callback (also installed) writes the per-epoch metrics
    and the profiler trace.
    """

    def __init__(self, log_dir: str, tokens_per_step: int, devices: List[str], every_steps: int = 10,
                 initial_step: int = 0):
        """`initial_step`: the steps trained before (a resumed run); counted on across `fit` calls."""
        super().__init__()
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        self.tf = tf
        self.log_dir = log_dir
        self.writer = None  # open from train begin to train end, as Keras's TensorBoard's
        self.tokens_per_step = tokens_per_step
        specs = [tf.DeviceSpec.from_string(d) for d in devices]
        self.accelerators = [f"{s.device_type}:{s.device_index or 0}" for s in specs
                             if s.device_type in ("GPU", "TPU")]
        self.every_steps = every_steps
        self.step = initial_step
        self.window_start: Optional[float] = None
        self.window_start_step = initial_step
        self.learning_rate = math.nan

    def on_train_begin(self, logs=None):
        self.writer = self.tf.summary.create_file_writer(self.log_dir)
        self.window_start, self.window_start_step = time.perf_counter(), self.step

    def on_train_batch_begin(self, batch, logs=None):
        if (self.step + 1) % self.every_steps == 0:  # the rate this step uses (read after, it is the next's)
            self.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1  # no host read of the step counter on every step
        step = self.step
        if step % self.every_steps:
            return
        now = time.perf_counter()
        logs = logs or {}
        scalars = {"step_loss": float(logs.get("step_loss", math.nan)),
                   "learning_rate": self.learning_rate,
                   "tokens_per_second": ((step - self.window_start_step) * self.tokens_per_step
                                         / (now - self.window_start)),
                   "memory/host_rss_mb": psutil.Process().memory_info().rss / 2**20}
        if "grad_norm" in logs:  # tfpar's models report it; a user's own model may not
            scalars["grad_norm"] = float(logs["grad_norm"])
        for device in self.accelerators:
            try:
                used = self.tf.config.experimental.get_memory_info(device)["current"]
            except (ValueError, self.tf.errors.OpError):
                continue
            scalars[f"memory/{device.replace(':', '_')}_mb"] = used / 2**20
        with self.writer.as_default(step=step):
            for name, value in scalars.items():
                self.tf.summary.scalar(name, value)
        self.window_start, self.window_start_step = now, step

    def on_train_end(self, logs=None):
        self.writer.close()
        self.writer = None
