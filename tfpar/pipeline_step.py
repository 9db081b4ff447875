"""One optimizer step as a pipeline: K stages on K devices, micro-batches, a schedule.

Each stage (consecutive layers) runs, per micro-batch, a forward pass under its
own `tf.GradientTape` and later its backward pass (`tape.gradient` with the next
stage's input gradients as `output_gradients`). The order of these events on
each stage follows the schedule (`tfpar.pipeline_schedule`) and is enforced
with control dependencies. `strategies/pipeline.py` cuts models into stages and
installs this step.
"""

import time
from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from tfpar import pipeline_schedule as schedule_lib
from tfpar import trace
from tfpar import training

# The name scope of a pipeline event's ops (TF appends _N to repeated scopes).
_EVENT_SCOPE = r"pipeline/(stage_\d+_replica_\d+)(?:_\d+)?/"
# Keras's reductions that average over the batch (without sample weights).
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def _float_leaves(state) -> List[tf.Tensor]:
    """The differentiable tensors of a state (a tensor, tuple or dict)."""
    return [t for t in tf.nest.flatten(state) if t.dtype.is_floating]


def microbatch_loss_weights(loss, batch: tf.Tensor, parts: int) -> list:
    """w_i such that the batch's loss is the sum of w_i x micro-batch i's loss.

    n_i / n for losses that average over the batch (Keras's default
    "sum_over_batch_size"), 1 for reduction="sum"; `loss` is the compiled loss
    (a string, function, Loss, or a list or dict of them).
    """
    if batch_reduction(loss) == "sum":
        return [1.0] * parts
    sizes = training.microbatch_sizes(batch, parts)
    if isinstance(sizes, list):
        return [size / sum(sizes) for size in sizes]
    return tf.unstack(tf.cast(sizes, tf.float32) / tf.cast(tf.reduce_sum(sizes), tf.float32))


def batch_reduction(loss) -> str:
    """"mean" or "sum": how the compiled loss reduces over the batch."""
    reductions = {getattr(fn, "reduction", "sum_over_batch_size") for fn in keras.tree.flatten(loss)}
    if reductions <= set(_MEAN_REDUCTIONS):
        return "mean"
    if reductions == {"sum"}:
        return "sum"
    raise ValueError(
        f"a pipeline weights each micro-batch's loss by the loss's reduction over the batch. "
        f"Received: reduction={', '.join(sorted(map(str, reductions)))}; accepted: one of "
        f"{', '.join(_MEAN_REDUCTIONS)}, or sum, for every output.")


class PipelineStep:
    """One optimizer step as a pipeline over `stages` (lists of layers) on `devices`."""

    def __init__(self, *, stages: Sequence[Sequence[keras.layers.Layer]], devices: Sequence[str],
                 num_microbatches: int, schedule: str, remat: bool = False, grad_accum_steps: int = 1,
                 replicas: int = 1):
        """`devices` holds `replicas` x K devices: replica r runs stage s on devices[r * K + s]."""
        self.grad_accum_steps = grad_accum_steps
        self.replicas = replicas
        self.stages = [list(s) for s in stages]
        self.devices = list(devices)
        self.num_microbatches = num_microbatches
        self.schedule = schedule
        self.remat = remat
        self.plans = schedule_lib.stage_events(schedule, len(self.stages), num_microbatches)
        self.order = schedule_lib.build_order(self.plans)

    def __repr__(self):
        return (f"PipelineStep(stages={len(self.stages)}, num_microbatches={self.num_microbatches}, "
                f"schedule={self.schedule!r}, remat={self.remat})")

    def _forward(self, s: int, state):
        for layer in self.stages[s]:
            state = layer(state, training=True)
        return state

    def __call__(self, model: keras.Model, x, y) -> training.StepOutput:
        k, m, a, r = len(self.stages), self.num_microbatches, self.grad_accum_steps, self.replicas
        scale = training.loss_scale(model.optimizer)
        # Replica i takes the i-th 1/R of the batch. grad_accum_steps=A runs the
        # schedule A times over M micro-batches each (a flush between rounds).
        # Micro-batch ids are (replica, index) pairs; every replica reads the one
        # copy of the variables (on replica 0's stage devices), and the gradients
        # of all replicas are summed there before one update.
        parts = r * m * a
        xs, ys = training.split_microbatches(x, parts, True), training.split_microbatches(y, parts, True)
        weights = microbatch_loss_weights(model.loss, tf.nest.flatten(x)[0], parts)
        stage_vars = [[v for layer in stage for v in layer.trainable_variables] for stage in self.stages]
        inputs: Dict = {}    # (s, mb) -> the stage's input state
        tapes: Dict = {}     # (s, mb) -> (tape, flat float outputs or loss)
        outputs: Dict = {}   # (s, mb) -> the stage's output state
        in_grads: Dict = {}  # (s, mb) -> gradients w.r.t. the float leaves of inputs[(s, mb)]
        grads: List[List[Optional[list]]] = [[None] * k for _ in range(r)]
        losses = []
        last: Dict = {}  # (replica, stage) -> tensors of that stage's previous event

        for round_start in range(0, m * a, m):
            for s, (kind, mb) in self.order:
                for replica in range(r):
                    mb_id = replica * m * a + round_start + mb
                    with tf.name_scope(f"pipeline/stage_{s}_replica_{replica}"), \
                            tf.device(self.devices[replica * k + s]), \
                            tf.control_dependencies(last.get((replica, s), [])):
                        if kind == "F":
                            last[(replica, s)] = self._forward_event(
                                model, s, mb_id, xs, ys, weights[mb_id], scale, inputs, tapes, outputs, losses)
                        else:
                            last[(replica, s)] = self._backward_event(
                                s, mb_id, stage_vars, inputs, tapes, in_grads, grads[replica])
        flat_grads, squares = {}, []
        for s in range(k):
            with tf.device(self.devices[s]):
                summed = [tf.add_n(g) if r > 1 else g[0] for g in zip(*(grads[i][s] for i in range(r)))]
                for v, g in zip(stage_vars[s], summed):
                    flat_grads[id(v)] = g
                squares.append(training.squared_norm(summed))  # each stage's share, where it lives
        variables = model.trainable_variables
        with training.summed_gradients(model.optimizer):  # one replica's: nothing to sum
            model.optimizer.apply_gradients([(flat_grads[id(v)], v) for v in variables])
        return training.StepOutput(tf.add_n(losses) * training.num_replicas(),
                                   tf.sqrt(tf.add_n(squares)) / scale)

    def _forward_event(self, model, s, mb, xs, ys, weight, scale, inputs, tapes, outputs, losses):
        """`weight`: the micro-batch's share of the batch's loss (`microbatch_loss_weights`)."""
        k = len(self.stages)
        state = xs[mb] if s == 0 else outputs.pop((s - 1, mb))
        inputs[(s, mb)] = state
        if self.remat and s < k - 1:
            out = self._forward(s, state)  # activations are recomputed in the backward pass
            outputs[(s, mb)] = out
            return _float_leaves(out)
        with tf.GradientTape() as tape:
            tape.watch(_float_leaves(state))
            out = self._forward(s, state)
            if s == k - 1:
                loss = tf.cast(model.compute_loss(x=xs[mb], y=ys[mb], y_pred=out, training=True), tf.float32)
                losses.append(loss * weight)
                target = [loss * weight * scale]
            else:
                target = _float_leaves(out)
        tapes[(s, mb)] = (tape, target)
        if s < k - 1:
            outputs[(s, mb)] = out
        return list(target)

    def _backward_event(self, s, mb, stage_vars, inputs, tapes, in_grads, grads):
        k = len(self.stages)
        state = inputs.pop((s, mb))
        if (s, mb) in tapes:
            tape, target = tapes.pop((s, mb))
        else:  # remat: recompute this stage's activations under a tape
            with tf.GradientTape() as tape:
                tape.watch(_float_leaves(state))
                target = _float_leaves(self._forward(s, state))
        upstream = None if s == k - 1 else in_grads.pop((s + 1, mb))
        if upstream is not None:  # drop outputs the later stages did not use
            pairs = [(t, g) for t, g in zip(target, upstream) if g is not None]
            target, upstream = [t for t, _ in pairs], [g for _, g in pairs]
        sources = _float_leaves(state)
        result = tape.gradient(target, sources + stage_vars[s], output_gradients=upstream,
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        in_grads[(s, mb)] = result[:len(sources)]
        var_grads = [training.dense(g) for g in result[len(sources):]]
        if grads[s] is None:
            grads[s] = var_grads
        else:
            grads[s] = [a + g for a, g in zip(grads[s], var_grads)]
        return [*in_grads[(s, mb)], *grads[s]]

    def traced_busy_seconds(self, model: keras.Model, x, y, steps: int = 3):
        """Per-device busy seconds of one step and the step's seconds, from a profiler trace.

        A device is busy while at least one op of its stage's events runs; the
        rest of the step (bubble, optimizer update, copies) is its idle time.
        The traced steps' updates are undone afterwards.
        """
        step = tf.function(lambda: self(model, x, y).loss)
        variables = list(model.variables) + list(model.optimizer.variables)
        saved = [v.numpy() for v in variables]
        float(step())  # traced and warm
        busy, wall = trace.traced_busy_seconds(lambda: float(step()), _EVENT_SCOPE, steps)
        for variable, value in zip(variables, saved):
            variable.assign(value)
        k = len(self.stages)
        return [busy.get(f"stage_{d % k}_replica_{d // k}", 0.0) for d in range(len(self.devices))], wall

    def isolated_compute_seconds(self, model: keras.Model, x, y, repeats: int = 3) -> List[float]:
        """Seconds each stage of the first pipeline computes for one step, run alone.

        Each stage's forward and backward over the step's micro-batches, one
        after another (its inputs come from the stages before it), is compiled
        and timed on its device with no other stage running. Unlike the traced
        busy time, this leaves out the slowdown of stages that share cores
        (virtual CPU devices): sum(compute) / (K x step time) is the step's
        efficiency against the stages' compute alone.
        """
        m = self.num_microbatches * self.grad_accum_steps
        xs, ys = training.split_microbatches(x, m), training.split_microbatches(y, m)
        states, seconds = list(xs), []
        for s, device in enumerate(self.devices[:len(self.stages)]):
            work = self._stage_work(model, s, device, xs, ys)
            outputs, checksum = work(states)
            float(checksum)  # traced and warm
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                float(work(states)[1])
                best = min(best, time.perf_counter() - start)
            seconds.append(best)
            states = outputs
        return seconds

    def _stage_work(self, model: keras.Model, s: int, device: str, xs, ys):
        """A tf.function: stage `s`'s forward and backward over `xs`, one micro-batch after another."""
        # The variables are closed over, not passed as arguments: tf.function
        # would turn Keras variables given as arguments into tensors the tape
        # does not watch, and their gradients would silently be zero.
        variables = [v for layer in self.stages[s] for v in layer.trainable_variables]
        last = s == len(self.stages) - 1

        @tf.function
        def work(inputs):
            outputs, checksum = [], 0.0
            with tf.device(device):
                for i, state in enumerate(inputs):
                    with tf.control_dependencies([checksum] if i else []), tf.GradientTape() as tape:
                        tape.watch(_float_leaves(state))
                        out = self._forward(s, state)
                        target = ([model.compute_loss(x=xs[i], y=ys[i], y_pred=out, training=True)]
                                  if last else _float_leaves(out))
                    grads = tape.gradient(target, _float_leaves(state) + variables,
                                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
                    checksum += tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])
                    outputs.append(out)
            return outputs, checksum
        return work
