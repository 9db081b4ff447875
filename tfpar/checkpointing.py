"""Step-level backup and resume with `tf.train.CheckpointManager`.

Keras's BackupAndRestore resumes at the start of the epoch in which a run
died (its metadata records the batch but `_load_model` only restores the
epoch), so every step of that epoch since the backup runs twice, on other
data than the first time. tfpar backs up model and optimizer every N steps
and on resume skips exactly the global batches already trained on, so a
killed and rerun job ends with the weights of an uninterrupted one.

CheckpointManager writes the checkpoint files first and the `checkpoint`
state file last, so a process killed mid-write leaves the previous
checkpoint as the latest; restore verifies that every variable was matched.
A backup is only trusted once the next step's loss is finite (that loss is
the first computed from its weights): a backup followed by a non-finite
loss is dropped, so the latest backup is always the last good state.
"""

import math
import os
import re
from typing import Optional

from absl import logging
import keras
import tensorflow as tf


class StepBackup(keras.callbacks.Callback):
    """Saves model + optimizer every `every_steps` optimizer steps and at the end of training."""

    def __init__(self, directory: str, model: keras.Model, every_steps: int, max_to_keep: int = 2,
                 restore_from: Optional[str] = None):
        """Saves into `directory`; restores from `restore_from` (default: `directory`).

        Under multi-worker training every worker saves (saving reads
        variables collectively) but only the chief into the run's directory;
        all of them restore from the chief's backup.
        """
        super().__init__()
        self.restore_from = restore_from or directory
        self.every_steps = every_steps
        self.healthy = True  # no non-finite loss seen yet
        self.unverified: Optional[str] = None  # the backup whose weights no loss has used yet
        # Non-trainable state, e.g. the dropout layers' seed-generator states, which
        # Keras does not expose to tf.train.Checkpoint: restored, a resumed run draws
        # the masks the uninterrupted run would have drawn.
        self.state = {"non_trainable": list(model.non_trainable_variables)} if model.non_trainable_variables else {}
        # Steps trained, counted here: a LossScaleOptimizer (mixed_float16) does not
        # advance `optimizer.iterations` on the steps it skips for overflowing gradients.
        self.steps_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="steps_done")
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              steps_done=self.steps_done, **self.state)
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep)

    def restore(self) -> int:
        """Restores the latest backup, if any; returns the number of steps it holds.

        Raises:
          ValueError: if the backup does not match the model (another config).
        """
        latest = self._latest()
        if latest is None:
            return 0
        model = self.checkpoint.model
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        # A backup written before tfpar counted steps itself (or kept the dropout
        # state) has no `steps_done` (`non_trainable`): restored without them.
        saved = {name.split("/")[0] for name, _ in tf.train.list_variables(latest)}
        checkpoint = self.checkpoint
        if "steps_done" not in saved or (self.state and "non_trainable" not in saved):
            checkpoint = tf.train.Checkpoint(
                model=model, optimizer=model.optimizer,
                **({"steps_done": self.steps_done} if "steps_done" in saved else {}),
                **(self.state if "non_trainable" in saved else {}))
        try:
            checkpoint.restore(latest).assert_existing_objects_matched()
            if "steps_done" not in saved:
                self.steps_done.assign(model.optimizer.iterations)
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            raise ValueError(
                f"--model_dir holds a backup of another run that does not match this model. "
                f"Received: backup={latest}; accepted: the same flags as the run that wrote it, "
                f"or a new --model_dir. ({str(e).splitlines()[0]})") from None
        except (IndexError, OSError) as e:  # a truncated data file: "Read less bytes than requested"
            raise ValueError(
                f"--model_dir's backup cannot be read (damaged or incomplete). Received: backup="
                f"{latest} ({str(e).splitlines()[0]}); accepted: a whole backup (delete {latest}.* "
                f"to resume from the backup before it), or a new --model_dir.") from None
        return self.step

    def latest_step(self) -> int:
        """The step of the backup `restore` would load (-1: none), from its name
        (`ckpt-STEP`), without loading it.

        Raises:
          ValueError: for a checkpoint that tfpar did not name.
        """
        latest = self._latest()
        if latest is None:
            return -1
        match = re.fullmatch(r"ckpt-(\d+)", os.path.basename(latest))
        if not match:
            raise ValueError(
                f"--model_dir's backup is not one tfpar wrote. Received: backup={latest}; "
                f"accepted: backups named ckpt-STEP, or a new --model_dir.")
        return int(match.group(1))

    def _latest(self) -> Optional[str]:
        """The latest backup whose files exist (path prefix), None if there is none.

        Raises:
          ValueError: if the `checkpoint` state file names backups whose files are all
            gone (TF would return None, and the run would silently start over).
        """
        latest = tf.train.latest_checkpoint(self.restore_from)
        state = tf.train.get_checkpoint_state(self.restore_from)
        if latest is not None or state is None or not state.model_checkpoint_path:
            return latest
        whole = [path for path in state.all_model_checkpoint_paths if tf.io.gfile.exists(f"{path}.index")]
        if whole:  # e.g. a damaged latest backup whose files the user deleted
            logging.warning("backup %s has no files; resuming from %s.", state.model_checkpoint_path, whole[-1])
            return whole[-1]
        raise ValueError(
            f"--model_dir's backup cannot be read (damaged or incomplete). Received: backup="
            f"{state.model_checkpoint_path} (its files are missing); accepted: a whole backup, or a new "
            f"--model_dir (or delete {self.restore_from} to start over in this one).")

    @property
    def step(self) -> int:
        """Steps trained (restored ones included)."""
        return int(self.steps_done.numpy())

    def on_train_batch_end(self, batch, logs=None):
        self.steps_done.assign_add(1)
        loss = (logs or {}).get("step_loss", (logs or {}).get("loss", 0.0))
        if not self.healthy:
            return
        if not math.isfinite(float(loss)):
            self.healthy = False
            self._drop_unverified()
            return
        self.unverified = None
        if self.step % self.every_steps == 0:
            self.unverified = self.manager.save(checkpoint_number=self.step)

    def on_train_end(self, logs=None):
        if not self.healthy:
            return
        if not weights_are_finite(self.checkpoint.model):  # the last update: no loss has seen it
            self.healthy = False
            self._drop_unverified()
        elif self.manager.latest_checkpoint != self._path_for(self.step):
            self.manager.save(checkpoint_number=self.step)

    def _drop_unverified(self) -> None:
        """Forgets the latest backup when the first loss computed from its weights is non-finite."""
        if self.unverified is None:
            return
        kept = [path for path in self.manager.checkpoints if path != self.unverified]
        state_file = os.path.join(self.manager.directory, "checkpoint")
        if kept:
            tf.compat.v1.train.update_checkpoint_state(self.manager.directory, kept[-1], kept)
        elif tf.io.gfile.exists(state_file):
            tf.io.gfile.remove(state_file)
        for path in tf.io.gfile.glob(self.unverified + ".*"):
            tf.io.gfile.remove(path)
        self.unverified = None

    def _path_for(self, step: int) -> Optional[str]:
        return os.path.join(self.manager.directory, f"ckpt-{step}")


def weights_are_finite(model: keras.Model) -> bool:
    """True if no trainable variable holds a NaN or Inf."""
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.trainable_variables)
