"""`pipeline`: the model's stack cut into K stages on K devices, with micro-batches.

The adapter cuts `model.stack` (or a user's `keras.Sequential`) into K
consecutive stages balanced by parameter count, moves each stage's variables
and optimizer slots to its device, and installs `tfpar.pipeline_step.
PipelineStep`, which runs the schedule:

* gpipe: all forwards, then all backwards (M micro-batches of activations alive);
* 1f1b: K-s-1 warm-up forwards on stage s, then one forward / one backward
  (at most K-s micro-batches alive on stage s).

Gradients are summed over micro-batches of loss/M, so a step equals one step
on the whole batch. With R x K devices, R pipeline replicas each take 1/R of
the batch (data parallel); the variables stay on the first replica's stage
devices, the others read them, and all gradients are summed there before one
update (central storage, as in tf.distribute's CentralStorageStrategy). With
`remat`, a stage keeps only its input in the forward pass and recomputes its
activations under the tape in the backward pass.
"""

from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from tfpar import checks
from tfpar import config as config_lib
from tfpar import devices as devices_lib
from tfpar import pipeline_schedule as schedule_lib
from tfpar import training
from tfpar.pipeline_step import PipelineStep, batch_reduction
from tfpar.strategies import base


def move_variable(variable, device: str) -> None:
    """Re-creates a Keras variable's tf.Variable on `device`, keeping its value."""
    old = variable.value
    with tf.init_scope(), tf.device(device):
        variable._value = tf.Variable(  # pylint: disable=protected-access
            old.read_value(), dtype=old.dtype, trainable=old.trainable, name=variable.name,
            aggregation=old.aggregation, synchronization=old.synchronization)


def _placed_like_reference(add_variable_from_reference):
    def add(reference_variable, *args, **kwargs):
        device = getattr(reference_variable, "value", reference_variable).device
        with tf.device(device):
            return add_variable_from_reference(reference_variable, *args, **kwargs)
    return add


class PipelineAdapter(base.StrategyAdapter):
    """K consecutive stages of `model.stack` on K devices, M micro-batches per step."""

    name = "pipeline"

    def __init__(self, *, num_stages: int = 2, num_microbatches: int = 1, schedule: str = "gpipe",
                 stage_boundaries: Sequence[int] = (), remat: bool = False,
                 devices: Sequence[str] = (), num_devices: int = 0):
        """Raises: ValueError for a schedule, stage count or device set that cannot work."""
        super().__init__()
        checks.choice("pipeline_schedule", schedule, schedule_lib.SCHEDULES)
        checks.positive("pipeline_stages", num_stages)
        checks.positive("num_microbatches", num_microbatches)
        self.num_stages, self.num_microbatches = num_stages, num_microbatches
        self.schedule, self.remat = schedule, remat
        self.requested_boundaries = tuple(stage_boundaries)
        self.stage_devices = self._resolve_devices(devices, num_devices)
        self.boundaries: Optional[tuple] = None
        self.stage_layers: List[List[str]] = []
        self.stage_params: List[int] = []
        self.stage_bytes: List[int] = []

    def _resolve_devices(self, requested: Sequence[str], count: int) -> List[str]:
        """One device per stage: `requested`, or the first K of `count` (0: of all)."""
        k = self.num_stages
        chosen = devices_lib.select_devices(requested, count)  # validates names and count
        if k > len(chosen):
            raise ValueError(
                f"--pipeline_stages must not exceed the devices. Received: pipeline_stages={k}, "
                f"devices={len(chosen)}; accepted: 1..{len(chosen)} stages (or more devices "
                f"through --num_virtual_devices).")
        if not (requested or count):
            return chosen[:k]  # all devices were offered: one pipeline on the first K
        if len(chosen) % k:
            raise ValueError(
                f"--strategy=pipeline needs one device per stage of each pipeline replica. "
                f"Received: devices={len(chosen)}, pipeline_stages={k}; accepted: a multiple of "
                f"{k} (replicas x stages).")
        return chosen

    @classmethod
    def from_config(cls, parallel: config_lib.ParallelConfig) -> "PipelineAdapter":
        return cls(num_stages=parallel.pipeline_stages, num_microbatches=parallel.num_microbatches,
                   schedule=parallel.pipeline_schedule, stage_boundaries=parallel.stage_boundaries,
                   remat=parallel.remat, devices=parallel.devices,
                   num_devices=parallel.num_virtual_devices)

    @property
    def devices(self) -> List[str]:
        return list(self.stage_devices)

    @property
    def num_replicas(self) -> int:
        """Pipeline replicas (data parallel): each runs all K stages on its own K devices."""
        return len(self.stage_devices) // self.num_stages

    def validate(self, run: config_lib.RunConfig) -> None:
        super().validate(run)
        n = schedule_lib.stack_size(run.model.name, run.model.num_layers)
        if self.num_stages > n:
            raise ValueError(
                f"--pipeline_stages must not exceed the model's stack entries. Received: "
                f"pipeline_stages={self.num_stages}, stack entries={n} ({run.model.name}, "
                f"num_layers={run.model.num_layers}); accepted: 1..{n}.")
        if self.requested_boundaries:
            schedule_lib.check_boundaries(self.requested_boundaries, self.num_stages, n)
        config_lib.check_microbatches(run.data.global_batch_size // self.num_replicas,
                                      self.num_microbatches, run.grad_accum_steps)
        if run.jit_compile:
            raise ValueError(
                "--jit_compile is not supported with --strategy=pipeline (XLA cannot compile a "
                "function whose variables live on several devices). Received: jit_compile=True; "
                "accepted: False.")
        if self.remat and run.model.dropout > 0:
            raise ValueError(
                f"--remat with --dropout > 0 is not supported by the pipeline (recomputed dropout "
                f"masks would differ from the forward pass). Received: dropout={run.model.dropout}, "
                f"remat=True; accepted: dropout=0 or remat=False.")

    def pipeline(self, model: keras.Model, grad_accum_steps: int = 1) -> keras.Model:
        """A user's built `keras.Sequential` (or any model with ordered `layers`) as a pipeline.

        Returns a model over the same layers whose `fit` runs the pipeline;
        compile it as usual (its optimizer slots are placed on stage devices).
        """
        if not model.built:
            raise ValueError(
                "pipeline() needs a built model (its variables decide the stage cut). Received: "
                f"an unbuilt {type(model).__name__}; accepted: a model after build() or a first call.")
        stateful = [layer.name for layer in model.layers if layer.non_trainable_variables]
        regularized = [layer.name for layer in model.layers if layer.losses]
        for names, why, accepted in [
                (stateful if self.remat else [],
                 "with remat recomputes each stage's forward pass, so layers with random or "
                 "non-trainable state (Dropout, BatchNormalization) would differ from it",
                 "remat=False, or layers without such state"),
                (regularized, "takes each stage's gradient from the loss alone, so regularizer "
                 "losses of earlier stages would be missed",
                 "layers without regularizers (AdamW's weight decay instead)")]:
            if names:
                raise ValueError(f"pipeline() {why}. Received: {', '.join(names)}; accepted: {accepted}.")
        return self._cut(PipelinedLayers(model.layers, self), grad_accum_steps)

    def prepare_model(self, model: keras.Model, run: config_lib.RunConfig) -> keras.Model:
        """Cuts `model.stack` into stages, moves their variables and installs the step."""
        return self._cut(model, run.grad_accum_steps)

    def _cut(self, model: keras.Model, grad_accum_steps: int) -> keras.Model:
        stack = list(model.stack)
        costs = [sum(int(v.numpy().size) for v in layer.trainable_variables) for layer in stack]
        if self.requested_boundaries:
            self.boundaries = schedule_lib.check_boundaries(
                self.requested_boundaries, self.num_stages, len(stack))
        else:
            self.boundaries = schedule_lib.balanced_boundaries(costs, self.num_stages)
        ranges = schedule_lib.stage_ranges(self.boundaries, len(stack))
        stages = [[stack[i] for i in r] for r in ranges]
        staged = {id(v) for stage in stages for layer in stage for v in layer.trainable_variables}
        missing = [v.path for v in model.trainable_variables if id(v) not in staged]
        if missing:
            raise ValueError(
                f"--strategy=pipeline needs every trainable variable inside model.stack. "
                f"Received: variables outside the stack: {missing[:3]}; accepted: models whose "
                f"layers are all in model.stack.")
        for stage, device in zip(stages, self.stage_devices):
            for layer in stage:
                for variable in layer.variables:
                    move_variable(variable, device)
        self.stage_layers = [[layer.name for layer in stage] for stage in stages]
        self.stage_params = [sum(costs[i] for i in r) for r in ranges]
        self.stage_bytes = [sum(int(v.numpy().nbytes) for layer in stage for v in layer.trainable_variables)
                            for stage in stages]
        model.train_step_fn = PipelineStep(
            stages=stages, devices=self.stage_devices, num_microbatches=self.num_microbatches,
            schedule=self.schedule, remat=self.remat, grad_accum_steps=grad_accum_steps,
            replicas=self.num_replicas)
        return model

    def prepare_optimizer(self, model: keras.Model, run: Optional[config_lib.RunConfig] = None) -> None:
        """Builds the optimizer with each slot on its variable's device.

        Keras asks the (default) strategy to colocate a slot with its variable,
        which does nothing in eager mode, so every slot would land on the first
        device; building here, under `tf.device` of each reference, places them.
        """
        del run
        optimizer = model.optimizer
        wrapped = [o for o in (optimizer, getattr(optimizer, "inner_optimizer", None)) if o is not None]
        for opt in wrapped:
            opt.add_variable_from_reference = _placed_like_reference(opt.add_variable_from_reference)
        try:
            optimizer.build(model.trainable_variables)
        finally:
            for opt in wrapped:
                del opt.add_variable_from_reference  # the instance attribute set above

    def per_device_param_bytes(self, model: keras.Model) -> List[int]:
        """Stage variables live on the first pipeline's devices; other replicas read them."""
        return list(self.stage_bytes) + [0] * (len(self.stage_devices) - self.num_stages)

    def measured_metrics(self, model: keras.Model, batch_fn, step_seconds: float) -> Dict[str, object]:
        """The measured bubble (profiler trace) and the stages' isolated compute time."""
        if not step_seconds:
            return {}
        x, y = batch_fn()[:2]
        step = model.train_step_fn
        busy, traced_step = step.traced_busy_seconds(model, x, y)
        efficiency = sum(busy) / (len(busy) * traced_step)
        per_replica = int(tf.nest.flatten(x)[0].shape[0]) // self.num_replicas
        x, y = tf.nest.map_structure(lambda t: t[:per_replica], (x, y))
        compute = step.isolated_compute_seconds(model, x, y)
        return {"stage_busy_seconds": busy, "traced_step_seconds": traced_step,
                "pipeline_efficiency": efficiency, "bubble_fraction": 1.0 - efficiency,
                "bubble_fraction_source": ("measured: 1 - sum(device busy seconds) / (devices x step "
                                           "seconds), from a profiler trace of 3 steps"),
                "stage_compute_seconds": compute,
                "compute_efficiency": sum(compute) / (self.num_stages * step_seconds)}

    def schedule_estimate(self) -> Dict[str, float]:
        plans = schedule_lib.stage_events(self.schedule, self.num_stages, self.num_microbatches)
        return schedule_lib.simulate(plans)

    def extra_metrics(self) -> Dict[str, object]:
        estimate = self.schedule_estimate()
        return {
            # Not measured: the idle share of the schedule on an ideal clock (equal
            # stages, backward = 2 x forward); see BUILD_NOTES.md.
            "bubble_fraction": estimate["bubble_fraction"],
            "bubble_fraction_source": "schedule estimate (equal stages, B=2F), not measured",
            "bubble_fraction_schedule": estimate["bubble_fraction"],
            "bubble_fraction_gpipe_bound": schedule_lib.gpipe_bubble_bound(
                self.num_stages, self.num_microbatches),
            "pipeline_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "pipeline_schedule": self.schedule,
            "peak_alive_microbatches": estimate["peak_alive_microbatches"],
            "stage_boundaries": list(self.boundaries or ()),
            "stage_layers": self.stage_layers,
            "stage_params": self.stage_params,
        }

    def describe(self) -> str:
        text = (f"stages={self.num_stages}, microbatches={self.num_microbatches}, "
                f"schedule={self.schedule}, remat={self.remat}, devices={self.devices}")
        if self.stage_layers:
            parts = [f"{d}: {', '.join(names)} ({p:,} params)"
                     for d, names, p in zip(self.devices, self.stage_layers, self.stage_params)]
            text += "; " + "; ".join(parts)
        return text

    def plan(self) -> Dict[str, object]:
        plan = super().plan()
        plan.update(schedule=self.schedule, num_microbatches=self.num_microbatches, remat=self.remat,
                    stages=[{"device": d, "layers": names, "params": p}
                            for d, names, p in zip(self.devices, self.stage_layers, self.stage_params)])
        return plan


class PipelinedLayers(keras.Model):
    """A user's ordered layers whose `fit` runs the pipeline step (see `PipelineAdapter.pipeline`)."""

    def __init__(self, layers: Sequence[keras.layers.Layer], adapter: "PipelineAdapter", **kwargs):
        super().__init__(**kwargs)
        self.pipeline_layers = list(layers)
        self.adapter = adapter
        self.train_step_fn: Optional[PipelineStep] = None
        self.running_loss = keras.metrics.Mean(name="loss")

    @property
    def stack(self) -> List[keras.layers.Layer]:
        return self.pipeline_layers

    def call(self, inputs, training=False):
        for layer in self.pipeline_layers:
            inputs = layer(inputs, training=training)
        return inputs

    def compile(self, *args, **kwargs):
        """Keras's compile, without XLA (its "auto" turns it on with a GPU) or compiled metrics."""
        if kwargs.get("jit_compile") not in (None, False, "auto"):
            raise ValueError(
                f"a pipeline cannot be compiled with XLA (its variables live on several devices). "
                f"Received: jit_compile={kwargs['jit_compile']!r}; accepted: False.")
        if kwargs.get("metrics") or kwargs.get("weighted_metrics"):
            raise ValueError(
                "a pipeline reports its loss only. Received: compiled metrics; accepted: none "
                "(evaluate them with the model's layers).")
        super().compile(*args, **{**kwargs, "jit_compile": False})
        batch_reduction(self.loss)  # one-line error now rather than at the first step
        self.adapter.prepare_optimizer(self)

    def train_step(self, data):
        if len(data) > 2 and data[2] is not None:
            raise ValueError("a pipeline does not take sample weights. Received: sample_weight; "
                             "accepted: (x, y) batches.")
        x, y = data[0], data[1]
        loss, grad_norm = training.step_output(self.train_step_fn(self, x, y))
        # Weighted by the batch's size, as Keras's loss tracker (a last batch may be partial).
        self.running_loss.update_state(loss, sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
        return {"loss": self.running_loss.result(), "grad_norm": grad_norm}
