"""One optimizer step for `model.fit`: micro-batched accumulation, optional XLA.

`TrainStep` is what tfpar's models call from `train_step`. It differs from
Keras's own step in four ways that tf.distribute users need:

* `grad_accum_steps=K` splits each replica's batch into K micro-batches and
  averages their gradients before one `apply_gradients`, so the step equals one
  step on the whole batch. It never calls the optimizer inside a condition,
  which is what makes Keras's `gradient_accumulation_steps` raise under
  MirroredStrategy (keras-team/keras#17429).
* `reduce_dtype="bfloat16"` sums the gradients over replicas in bfloat16, so
  that the all-reduce sends half the bytes (Megatron-LM's
  `--grad-reduce-in-bf16`, Horovod's compression); the sums are cast back to
  float32 for clipping and the update. The gradients are rounded even with
  one replica, so one worker computes what N do.
* Under tf.distribute it sums the gradients over replicas itself, before the
  optimizer sees them (`sum_over_replicas`), so the optimizer's global-norm
  clipping and LossScaleOptimizer's finite check see the summed gradients
  (`summed_gradients` keeps the optimizer from summing them again).
  Keras 3 clips and checks each replica's own gradients, before its
  all-reduce (tensorflow/tensorflow#33929 on why that is wrong).
* `jit_compile=True` under a strategy compiles only the gradient computation,
  as a pure function of the variables' values (`Layer.stateless_call`); the
  variables are read, all-reduced and updated outside XLA. Keras compiles the
  whole replicated step, which fails on virtual CPUs with "tf.Variable on a
  different device". Without a strategy the update is compiled too.
"""

import contextlib
from typing import Any, List, NamedTuple, Optional, Tuple

import keras
import tensorflow as tf

from tfpar import checks
from tfpar import config as config_lib


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def split_microbatches(tree: Any, k: int, uneven: bool = False) -> List[Any]:
    """Splits every tensor of `tree` into k parts along the batch axis.

    The parts are equal; with `uneven`, a batch that k does not divide (a last
    partial batch) gives parts whose sizes differ by one (see `microbatch_sizes`).
    """
    if k == 1:
        return [tree]
    flat = tf.nest.flatten(tree)
    sizes = microbatch_sizes(flat[0], k) if uneven else k
    parts = [tf.split(t, sizes, axis=0) for t in flat]
    return [tf.nest.pack_sequence_as(tree, [p[i] for p in parts]) for i in range(k)]


def microbatch_sizes(batch: tf.Tensor, k: int):
    """The sizes of k near-equal parts of `batch`: the first `len % k` are one
    larger, and some are empty when the batch is smaller than k. Python ints
    when the batch size is static, else an int32 tensor."""
    n = batch.shape[0]
    if n is None:
        n = tf.shape(batch)[0]
        return n // k + tf.cast(tf.range(k) < n % k, n.dtype)
    return [n // k + (i < n % k) for i in range(k)]


def loss_scale(optimizer) -> tf.Tensor:
    """The optimizer's loss-scale factor (1 unless it is a LossScaleOptimizer)."""
    return tf.convert_to_tensor(optimizer.scale_loss(tf.constant(1.0)), tf.float32)


def dense(grad):
    """Embedding gradients arrive as IndexedSlices; Keras's optimizers update
    those rows lazily (Adam moments of absent rows are not decayed), which is
    not the dense Adam step, and sparse all-reduce orders sums differently.
    Dense gradients give the same update under every strategy."""
    return tf.convert_to_tensor(grad) if grad is not None else None


def _in_replica_context() -> bool:
    return tf.distribute.has_strategy() and tf.distribute.get_replica_context() is not None


_REPLICA_SEED_STRIDE = 1_000_003


def replica_seed_offsets(non_trainable: list) -> list:
    """What to add to each non-trainable variable for this replica's forward pass: the
    seed of every random generator (Dropout's) shifted by the replica's index, None elsewhere.

    Keras's seed-generator state is one mirrored variable, so every replica would draw
    the same dropout masks for its own examples (DDP seeds each rank apart). The offset
    is taken off again after the step, so the state advances as on one device and
    replica 0 draws what one device draws.
    """
    if not _in_replica_context() or num_replicas() == 1:
        return [None] * len(non_trainable)
    replica = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
    return [tf.cast(tf.stack([replica * _REPLICA_SEED_STRIDE, tf.constant(0, tf.int64)]), v.dtype)
            if v.name == "seed_generator_state" and tuple(v.shape) == (2,) else None
            for v in non_trainable]


class StepOutput(NamedTuple):
    """What a tfpar step returns to `train_step`."""
    loss: tf.Tensor       # the replica's mean loss over its batch
    grad_norm: tf.Tensor  # the global L2 norm of the applied gradient, before clipping


def step_output(result: Any) -> StepOutput:
    """`result` of a step object, checked: a bare loss from a step written before the
    gradient norm would otherwise fail later as "iterating over a scalar tensor"."""
    if not isinstance(result, StepOutput):
        raise TypeError(f"a train_step_fn must return tfpar.training.StepOutput(loss, grad_norm). "
                        f"Received: {type(result).__name__}; accepted: StepOutput.")
    return result


def squared_norm(grads: list) -> tf.Tensor:
    """The sum of the squares of every gradient's elements, in float32 (0 for none)."""
    terms = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grads if g is not None]
    return tf.add_n(terms) if terms else tf.constant(0.0)


def global_norm(grads: list, scale: tf.Tensor) -> tf.Tensor:
    """The L2 norm of all gradients together, of the loss before loss scaling (÷ `scale`):
    the norm that `global_clipnorm` clips (nanoGPT's and Megatron's logged grad norm). It is
    inf or NaN for a step that loss scaling skips."""
    return tf.sqrt(squared_norm(grads)) / scale


def sum_over_replicas(grads: list) -> list:
    """The gradients summed over the strategy's replicas (in replica context), in one
    batched all-reduce; as they are without a tf.distribute strategy. Apply them under
    `summed_gradients(optimizer)`, so that they are not summed again.

    `ReplicaContext.all_reduce` would do the same sums, but wraps them in a
    `tf.custom_gradient`, which graph mode registers in TF's global gradient registry
    under a new name at every trace, never to be removed: each traced step's graph
    stayed alive (~20,000-50,000 Python objects a `fit`; BUILD_NOTES.md). Its
    merge_call branch, without the gradient that is never taken here, is used instead.
    """
    if not _in_replica_context():
        return grads
    present = [g for g in grads if g is not None]

    def batch_sum(strategy, *values):
        destinations = [v.device if isinstance(v, tf.Tensor) else v for v in values]
        return strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, list(zip(values, destinations)))
    summed = iter(tf.distribute.get_replica_context().merge_call(batch_sum, args=present) if present else [])
    return [None if g is None else next(summed) for g in grads]


@contextlib.contextmanager
def summed_gradients(optimizer):
    """Within it, `optimizer` applies the gradients it is given without its own all-reduce.

    Keras 3 has no public switch (Keras 2 had `experimental_aggregate_gradients`): the
    all-reduce is turned off on this optimizer instance only, while the step is traced,
    and restored after. Every replica passes its all-reduce before the update's
    merge_call completes, so no replica restores it while another still needs it off.
    Without a strategy Keras's all-reduce sums over the one default replica, but
    through `ReplicaContext.all_reduce`, whose gradient registration kept every traced
    step alive (`sum_over_replicas`): it is turned off there too.
    """
    if tf.distribute.has_strategy() and not _in_replica_context():
        yield
        return
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # the one that all-reduces
    if not hasattr(inner, "_all_reduce_sum_gradients"):
        raise RuntimeError(  # a Keras release that renamed it would sum the gradients twice
            f"{type(inner).__name__} has no _all_reduce_sum_gradients to turn off; tfpar's "
            f"TrainStep needs a Keras 3 TF optimizer that has one.")
    inner._all_reduce_sum_gradients = list  # pylint: disable=protected-access
    try:
        yield
    finally:
        vars(inner).pop("_all_reduce_sum_gradients", None)


class TrainStep:
    """Computes and applies one optimizer step; returns a `StepOutput`."""

    def __init__(self, *, grad_accum_steps: int = 1, jit_compile: bool = False,
                 reduce_dtype: str = "float32"):
        self.grad_accum_steps = grad_accum_steps
        self.jit_compile = jit_compile
        checks.choice("grad_reduce_dtype", reduce_dtype, config_lib.GRAD_REDUCE_DTYPES)
        self.reduce_dtype = tf.as_dtype(reduce_dtype)
        self._compiled = {}

    def __repr__(self):
        return (f"TrainStep(grad_accum_steps={self.grad_accum_steps}, "
                f"jit_compile={self.jit_compile}, reduce_dtype={self.reduce_dtype.name})")

    def __call__(self, model: keras.Model, x, y) -> StepOutput:
        variables = model.trainable_variables
        scale = loss_scale(model.optimizer)
        if self.jit_compile and not tf.distribute.has_strategy():
            return self._whole_step_compiled(model, x, y, scale)
        non_trainable = model.non_trainable_variables
        offsets = replica_seed_offsets(non_trainable)
        if self.jit_compile:
            grad_fn = self._compiled.get(id(model))
            if grad_fn is None:
                grad_fn = tf.function(self._stateless_grads(model), jit_compile=True)
                self._compiled[id(model)] = grad_fn
            loss, grads, new_values = grad_fn(
                [v.value for v in variables],
                [v.value if o is None else v.value + o for v, o in zip(non_trainable, offsets)], x, y, scale)
            for var, value, offset in zip(non_trainable, new_values, offsets):
                var.assign(value if offset is None else value - offset)
        else:
            seeds = [(var, offset) for var, offset in zip(non_trainable, offsets) if offset is not None]
            for var, offset in seeds:
                var.assign(var.value + offset)
            loss, grads = self._accumulate(
                lambda mx, my: self._stateful_grads(model, mx, my, scale), x, y)
            for var, offset in seeds:
                var.assign(var.value - offset)
            grads = self._for_reduce(grads)  # grad_fn casts inside XLA
        grads = self._from_reduce(sum_over_replicas(grads))
        with summed_gradients(model.optimizer):
            model.optimizer.apply_gradients(zip(grads, variables))
        return StepOutput(loss, global_norm(grads, scale))

    def _for_reduce(self, grads: list) -> list:
        """The float32 gradients in the dtype they are summed over replicas in."""
        if self.reduce_dtype == tf.float32:
            return grads
        return [tf.cast(g, self.reduce_dtype) if g is not None and g.dtype == tf.float32 else g
                for g in grads]

    def _from_reduce(self, grads: list) -> list:
        """The summed gradients back in float32, so that clipping measures their norm in float32."""
        if self.reduce_dtype == tf.float32:
            return grads
        return [tf.cast(g, tf.float32) if g is not None and g.dtype == self.reduce_dtype else g
                for g in grads]

    def _whole_step_compiled(self, model, x, y, scale) -> StepOutput:
        """Without a strategy there is no all-reduce between gradients and update,
        and every variable is on the one device: XLA compiles the whole step."""
        optimizer = model.optimizer
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        step_fn = self._compiled.get(("whole", id(model)))
        if step_fn is None:
            def step(x, y, scale):
                loss, grads = self._accumulate(
                    lambda mx, my: self._stateful_grads(model, mx, my, scale), x, y)
                grads = self._from_reduce(self._for_reduce(grads))
                with summed_gradients(optimizer):
                    optimizer.apply_gradients(zip(grads, model.trainable_variables))
                return StepOutput(loss, global_norm(grads, scale))
            step_fn = tf.function(step, jit_compile=True)
            self._compiled[("whole", id(model))] = step_fn
        return step_fn(x, y, scale)

    @staticmethod
    def split(tree: Any, k: int) -> List[Any]:
        """The k micro-batches of a batch (equal parts along the batch axis)."""
        return split_microbatches(tree, k)

    def _accumulate(self, micro_fn, x, y) -> Tuple[tf.Tensor, list]:
        """Averages micro_fn's (loss, grads) over micro-batches, run one after another."""
        k = self.grad_accum_steps
        total_loss, total_grads = None, None
        for mx, my in zip(self.split(x, k), self.split(y, k)):
            deps = [] if total_grads is None else [g for g in total_grads if g is not None]
            with tf.control_dependencies(deps):  # bounds live activations to one micro-batch
                loss, grads = micro_fn(mx, my)
            grads = [dense(g) for g in grads]
            if total_grads is None:
                total_loss, total_grads = loss, grads
            else:
                total_loss = total_loss + loss
                total_grads = [None if a is None else a + g for a, g in zip(total_grads, grads)]
        if k > 1:
            total_loss = total_loss / k
            total_grads = [None if g is None else g / k for g in total_grads]
        return total_loss, total_grads

    @staticmethod
    def _stateful_grads(model, x, y, scale):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = tf.cast(loss, tf.float32) * scale
        grads = tape.gradient(scaled, model.trainable_variables)
        return tf.cast(loss, tf.float32) * num_replicas(), grads

    def _stateless_grads(self, model):
        def grad_fn(trainable, non_trainable, x, y, scale):
            state = {"non_trainable": list(non_trainable)}

            def micro(mx, my):
                with tf.GradientTape() as tape:
                    tape.watch(trainable)
                    y_pred, state["non_trainable"] = model.stateless_call(
                        trainable, state["non_trainable"], mx, training=True)
                    loss = model.compute_loss(x=mx, y=my, y_pred=y_pred, training=True)
                    scaled = tf.cast(loss, tf.float32) * scale
                grads = [dense(g) for g in tape.gradient(scaled, trainable)]
                return tf.cast(loss, tf.float32) * num_replicas(), grads

            loss, grads = self._accumulate(micro, x, y)
            return loss, self._for_reduce(grads), state["non_trainable"]
        return grad_fn


def warmup_steps_for(warmup_steps: Optional[int], total_steps: int) -> int:
    """The warmup a run of `total_steps` takes: `warmup_steps`, or for None
    DEFAULT_WARMUP_STEPS, shortened so that the run reaches the peak learning rate."""
    if warmup_steps is None:
        return min(config_lib.DEFAULT_WARMUP_STEPS, max(total_steps - 1, 0))
    return warmup_steps


def build_optimizer(name: str, *, learning_rate: float, total_steps: int,
                    warmup_steps: Optional[int], weight_decay: Optional[float],
                    grad_clip_norm: float = 0.0) -> keras.optimizers.Optimizer:
    """AdamW (or SGD) with linear warmup (lr × (step + 1) / (warmup + 1)) then cosine decay
    to 10 % of the peak, and the gradients' global norm clipped to `grad_clip_norm` (0: not
    clipped). Under tf.distribute, the norm is the summed gradient's only when the step
    sums them first, as `TrainStep` does; Keras's own step clips each replica's.

    `weight_decay` None: `config.DEFAULT_WEIGHT_DECAY` for AdamW; SGD takes none.

    `warmup_steps` None: `config.DEFAULT_WARMUP_STEPS`, shortened for a run of fewer
    steps so that it reaches the peak; a given number is kept even if the run ends
    before its warmup does.
    """
    warmup = warmup_steps_for(warmup_steps, total_steps)
    # The warmup starts at lr / (warmup + 1), as nanoGPT's (it + 1) / (warmup + 1): from 0,
    # Keras's default, the first step would leave the weights as they are.
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / (warmup + 1),
        decay_steps=max(total_steps - warmup, 1), alpha=0.1,
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    clip = grad_clip_norm or None
    if name == "sgd":
        if weight_decay:
            raise ValueError(f"SGD takes no weight decay. Received: weight_decay={weight_decay}; "
                             "accepted: None or 0.")
        return keras.optimizers.SGD(learning_rate=schedule, global_clipnorm=clip)
    if weight_decay is None:
        weight_decay = config_lib.DEFAULT_WEIGHT_DECAY
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=weight_decay, beta_1=0.9, beta_2=0.95, global_clipnorm=clip)
    # Short names, which also match the tf.Variable names seen under tf.distribute.
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias", "embeddings"])
    return optimizer
