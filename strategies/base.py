"""The adapter interface every strategy implements."""

import contextlib
from typing import Callable, Dict, List, Optional

import keras
import tensorflow as tf

from tfpar import config as config_lib
from tfpar import devices as devices_lib
from tfpar import training


class StrategyAdapter:
    """Wraps one way of spreading training over devices.

    Subclasses set `name` and override what differs. Usage:

        adapter = tfpar.strategies.get("mirrored", devices=[...])
        with adapter.scope():
            model = ...; model.compile(...)
        model.fit(adapter.distribute_dataset(dataset_fn), ...)
    """

    name = "base"
    # Micro-batches each replica's batch (or accumulation round) is split into per step.
    num_microbatches = 1

    def __init__(self):
        self.strategy: Optional[tf.distribute.Strategy] = None

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync if self.strategy else 1

    @property
    def devices(self) -> List[str]:
        # Without a strategy TF places ops on the first GPU if there is one (CPU:0 is listed first).
        return list(self.strategy.extended.worker_devices) if self.strategy else [
            tf.config.list_logical_devices(devices_lib.accelerator_kind())[0].name]

    @property
    def is_chief(self) -> bool:
        """Whether this process writes checkpoints, exports and metrics."""
        return True

    def scope(self):
        """Context in which models, optimizers and metrics must be created."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def distribute_dataset(self, dataset_fn: Callable) -> tf.data.Dataset:
        """Turns `dataset_fn(input_context)` into what `model.fit` consumes."""
        if self.strategy is None:
            return dataset_fn(tf.distribute.InputContext())
        return self.strategy.distribute_datasets_from_function(dataset_fn, self.input_options())

    def input_options(self) -> Optional[tf.distribute.InputOptions]:
        """How `distribute_dataset` places the input pipelines (None: TF's default)."""
        return None

    def validate(self, run: config_lib.RunConfig) -> None:
        """Raises ValueError if `run` cannot work under this adapter."""
        per_replica = run.data.global_batch_size % self.num_replicas
        if per_replica:
            raise ValueError(
                f"--global_batch_size must be divisible by the number of replicas. "
                f"Received: global_batch_size={run.data.global_batch_size}, "
                f"replicas={self.num_replicas}; accepted: a multiple of {self.num_replicas}.")
        local = run.data.global_batch_size // self.num_replicas
        if local % run.grad_accum_steps:
            raise ValueError(
                f"the per-replica batch must be divisible by --grad_accum_steps. Received: "
                f"per-replica batch={local}, grad_accum_steps={run.grad_accum_steps}; accepted: a "
                f"divisor of {local}.")

    def train_step(self, run: config_lib.RunConfig):
        """The step object a tfpar model runs inside `fit`."""
        return training.TrainStep(grad_accum_steps=run.grad_accum_steps, jit_compile=run.jit_compile,
                                  reduce_dtype=run.parallel.grad_reduce_dtype)

    def prepare_model(self, model: keras.Model, run: config_lib.RunConfig) -> keras.Model:
        """Hook run after the model is built inside `scope()`."""
        if hasattr(model, "train_step_fn"):
            model.train_step_fn = self.train_step(run)
        return model

    def prepare_optimizer(self, model: keras.Model, run: config_lib.RunConfig) -> None:
        """Hook run after `model.compile` inside `scope()`: creates the optimizer's slots now.

        Created lazily they would appear while `fit` traces its first step, and
        tf.function then traces the whole step a second time (~2 s for `tiny`).
        Adapters that place slots themselves override this.
        """
        del run
        model.optimizer.build(model.trainable_variables)

    def check_resume_step(self, backup_step: int, refused: bool = False) -> None:
        """Hook run before the backup is restored, with the step it holds (-1: none) and
        whether this process refuses to resume it; multi-worker adapters check that every
        worker would restore the same step, and that no other worker refused."""
        del backup_step, refused

    def per_device_param_bytes(self, model: keras.Model) -> List[int]:
        """Bytes of trainable parameters held by each device."""
        total = sum(int(v.numpy().nbytes) for v in model.trainable_variables)
        return [total] * len(self.devices)

    def extra_metrics(self) -> Dict[str, object]:
        """Strategy-specific keys for the metrics JSON."""
        return {}

    def measured_metrics(self, model: keras.Model, batch_fn: Callable, step_seconds: float) -> Dict[str, object]:
        """Metrics JSON keys measured after training; `batch_fn()` gives one global batch (x, y).

        Called only when a metrics JSON is written (the measurement takes extra steps).
        """
        del model, batch_fn, step_seconds
        return {}

    @classmethod
    def from_config(cls, parallel: config_lib.ParallelConfig) -> "StrategyAdapter":
        """Creates the adapter from the parallel part of a run config."""
        del parallel
        return cls()

    def describe(self) -> str:
        return f"replicas={self.num_replicas}, devices={self.devices}"

    def plan(self) -> Dict[str, object]:
        return {"strategy": self.name, "num_replicas": self.num_replicas, "devices": self.devices}
