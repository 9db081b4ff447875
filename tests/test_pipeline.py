"""Pipeline parallelism: stages on their devices, per-step losses equal to `default`."""

import os
import re

from tests.testbase import (ADAMW_ATOL, TestCase, absltest, keras, np, parameterized, reset_devices, tf,
                            tiny_run)
from tfpar import config as config_lib
from tfpar import driver
from tfpar import pipeline_schedule as schedule_lib
from tfpar import strategies


def pipeline_run(stages, microbatches, schedule="gpipe", **kwargs):
    parallel = dict(pipeline_stages=stages, num_microbatches=microbatches, pipeline_schedule=schedule)
    parallel.update(kwargs.pop("parallel", {}))
    return tiny_run("pipeline", parallel=parallel, **kwargs)


def _placed_by_resource(op) -> bool:
    """Ops with no device of their own that the placer puts with a variable:
    its handle and reads, and ops colocated with it (e.g. the shape of a gathered table)."""
    if op.device:
        return False
    if op.type in ("Placeholder", "ReadVariableOp"):
        return True
    try:
        return bool(op.get_attr("_class"))
    except ValueError:
        return False


class ScheduleTest(parameterized.TestCase):
    """Pure schedule logic: no TensorFlow."""

    @parameterized.product(stages=[1, 2, 4], microbatches=[1, 2, 4, 8], schedule=["gpipe", "1f1b"])
    def test_every_event_once_and_bubble_equals_bound(self, stages, microbatches, schedule):
        plans = schedule_lib.stage_events(schedule, stages, microbatches)
        order = schedule_lib.build_order(plans)
        expected = {(s, (kind, m)) for s in range(stages) for kind in "FB" for m in range(microbatches)}
        self.assertCountEqual(order, expected)
        result = schedule_lib.simulate(plans)
        self.assertAlmostEqual(result["bubble_fraction"],
                               schedule_lib.gpipe_bubble_bound(stages, microbatches))
        peak = stages if schedule == "1f1b" else microbatches
        self.assertEqual(result["peak_alive_microbatches"], min(peak, microbatches))

    def test_1f1b_order_of_first_stage(self):
        first = schedule_lib.stage_events("1f1b", 2, 4)[0]
        self.assertEqual(first, [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3),
                                 ("B", 2), ("B", 3)])

    def test_balanced_boundaries(self):
        self.assertEqual(schedule_lib.balanced_boundaries([1, 1, 1, 1], 4), (1, 2, 3))
        self.assertEqual(schedule_lib.balanced_boundaries([18, 50, 50, 17], 2), (2,))
        self.assertEqual(schedule_lib.balanced_boundaries([10, 1, 1, 1, 1], 2), (1,))

    @parameterized.named_parameters(("count", (1, 2), 2, "must list K-1 stack indices"),
                                    ("order", (3, 2), 3, "strictly increasing"),
                                    ("zero", (0,), 2, "strictly increasing"),
                                    ("end", (4,), 2, r"strictly increasing.* for a stack of 4 entries"),
                                    ("float", (1.5,), 2, "must be integers"))
    def test_bad_boundaries(self, boundaries, stages, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            schedule_lib.check_boundaries(boundaries, stages, 4)


class PipelineEquivalenceTest(TestCase):
    """K stages with M micro-batches train to the losses and weights of `default`."""

    def assertSameTraining(self, result, model="gpt", steps=5):
        metrics, weights = self.reference(tiny_run("default", model=model, steps=steps))
        losses = metrics["step_losses"]
        self.assertLess(losses[-1], losses[0])
        self.assertLossesClose(losses, result.metrics["step_losses"])
        self.assertLossesClose(metrics["grad_norms"], result.metrics["grad_norms"])  # all stages' together
        self.assertSameWeights(weights, result.model, atol=ADAMW_ATOL)  # SGD: the user-model tests

    @parameterized.named_parameters(
        ("k2_m1_gpipe", 2, 1, "gpipe"),
        ("k2_m4_1f1b", 2, 4, "1f1b"),
        ("k4_m2_gpipe", 4, 2, "gpipe"),
        ("k4_m8_1f1b", 4, 8, "1f1b"))
    def test_pipeline_equals_default(self, stages, microbatches, schedule):
        # A metrics JSON turns on the measured bubble (it costs extra steps): in one case here.
        measured = stages == 2 and microbatches == 1
        json_path = os.path.join(self.create_tempdir(), "metrics.json") if measured else None
        result = self.train(pipeline_run(stages, microbatches, schedule, metrics_json=json_path))
        self.assertSameTraining(result)
        metrics = result.metrics
        self.assertEqual(metrics["pipeline_stages"], stages)
        self.assertEqual(metrics["num_microbatches"], microbatches)
        self.assertLen(metrics["devices"], stages)
        self.assertLen(metrics["per_device_param_bytes"], stages)
        self.assertEqual(sum(metrics["per_device_param_bytes"]), metrics["params"] * 4)
        self.assertAlmostEqual(metrics["bubble_fraction_schedule"], (stages - 1) / (microbatches + stages - 1))
        if measured:
            self.assertStartsWith(metrics["bubble_fraction_source"], "measured")
            self.assertBusyTraced(metrics, stages)
            self.assertIsolatedWorkHasGradients(result.model)
        else:
            self.assertStartsWith(metrics["bubble_fraction_source"], "schedule estimate")

    def assertBusyTraced(self, metrics, devices):
        """Every device was busy for part of the traced step, and the bubble is a fraction."""
        busy = metrics["stage_busy_seconds"]
        self.assertLen(busy, devices)
        for seconds in busy:
            self.assertTrue(0 < seconds <= metrics["traced_step_seconds"], (busy, metrics["traced_step_seconds"]))
        self.assertTrue(0 <= metrics["bubble_fraction"] < 1, metrics["bubble_fraction"])
        self.assertAlmostEqual(metrics["bubble_fraction"],
                               1 - sum(busy) / (devices * metrics["traced_step_seconds"]))
        self.assertLen(metrics["stage_compute_seconds"], metrics["pipeline_stages"])

    def assertIsolatedWorkHasGradients(self, model):
        """The isolated stage timing computes the real weight gradients (not zeros)."""
        step = model.train_step_fn
        run = pipeline_run(2, 1)
        x = tf.random.uniform((2, run.model.seq_len), 0, 256, dtype=tf.int32, seed=1)
        work = step._stage_work(model, 0, step.devices[0], [x], [x])  # pylint: disable=protected-access
        checksum = float(work([x])[1])
        variables = [v for layer in step.stages[0] for v in layer.trainable_variables]
        with tf.GradientTape() as tape:
            out = x
            for layer in step.stages[0]:
                out = layer(out, training=True)
        grads = tape.gradient([t for t in tf.nest.flatten(out) if t.dtype.is_floating], variables)
        expected = sum(float(tf.reduce_sum(tf.convert_to_tensor(g))) for g in grads)
        self.assertNotAlmostEqual(expected, 0.0, places=3)
        self.assertAlmostEqual(checksum, expected, delta=1e-3 * abs(expected))

    def test_remat_equals_default(self):
        result = self.train(pipeline_run(2, 4, "1f1b", parallel=dict(remat=True)))
        self.assertSameTraining(result)

    def test_two_pipeline_replicas_equal_default(self):
        result = self.train(pipeline_run(2, 2, "1f1b", devices_count=4,
                                         metrics_json=os.path.join(self.create_tempdir(), "metrics.json")))
        self.assertSameTraining(result)
        self.assertEqual(result.metrics["num_replicas"], 2)
        self.assertLen(result.metrics["devices"], 4)
        self.assertBusyTraced(result.metrics, 4)

    def test_grad_accum_rounds_equal_default(self):
        result = self.train(pipeline_run(2, 2, "1f1b", grad_accum_steps=2))
        self.assertSameTraining(result)

    def test_mixed_bfloat16_trains(self):
        reference = self.bfloat16_reference(steps=5)
        result = self.train(pipeline_run(2, 2, "gpipe", mixed_precision="mixed_bfloat16"))
        self.assertTrainedInMixedBfloat16(result, reference)

    def test_seq2seq_encoder_decoder_split_equals_default(self):
        num_layers = config_lib.model_config("seq2seq", "tiny").num_layers
        result = self.train(pipeline_run(2, 2, "1f1b", model="seq2seq", steps=3,
                                         parallel=dict(stage_boundaries=(1 + num_layers,))))
        self.assertEqual(result.model.encoder_stack_size, 1 + num_layers)
        self.assertEqual(result.metrics["stage_layers"],
                         [["embed", "encoder_0", "encoder_1"], ["decoder_0", "decoder_1", "head"]])
        self.assertSameTraining(result, "seq2seq", steps=3)


class PipelineMemoryTest(TestCase):
    """Bytes TF's CPU allocator holds at its peak during one step, above what
    it held before the step, M=8 micro-batches.

    A model of `small` width: TF's CPU allocator statistics leave out the
    small allocations of `tiny`.
    """

    _peaks = {}  # (schedule, remat) -> bytes: GPipe's is measured once for both tests

    def peak_step_bytes(self, schedule, remat=False):
        if (schedule, remat) not in self._peaks:
            self._peaks[(schedule, remat)] = self._measure_peak_step_bytes(schedule, remat)
        return self._peaks[(schedule, remat)]

    def _measure_peak_step_bytes(self, schedule, remat):
        reset_devices()
        run = pipeline_run(2, 8, schedule, global_batch_size=32, parallel=dict(remat=remat))
        model_cfg = config_lib.ModelConfig(**{**config_lib.model_config("gpt", "small").__dict__,
                                              "num_layers": 2, "seq_len": 64})
        run = run.replace(model=model_cfg, data=config_lib.DataConfig(
            **{**run.data.__dict__, "seq_len": 64}))
        adapter = strategies.from_config(run.parallel)
        model = driver.build_model(run, adapter)
        tokens = tf.zeros((32, 64), tf.int32)
        step = tf.function(lambda x, y, model=model: model.train_step_fn(model, x, y))
        step(tokens, tokens)  # traced, optimizer state built
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        step(tokens, tokens)
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
        self.assertGreater(peak, 0)
        return peak

    def test_1f1b_peak_activation_memory_below_gpipe(self):
        gpipe, one_f_one_b = self.peak_step_bytes("gpipe"), self.peak_step_bytes("1f1b")
        self.assertLess(one_f_one_b, 0.5 * gpipe, (gpipe, one_f_one_b))

    def test_remat_keeps_less_than_the_stage_activations(self):
        """GPipe holds all M micro-batches' activations; with --remat stage 0 keeps only its inputs."""
        kept, recomputed = self.peak_step_bytes("gpipe"), self.peak_step_bytes("gpipe", remat=True)
        self.assertLess(recomputed, 0.75 * kept, (kept, recomputed))


class UserModelPipelineTest(TestCase):

    def test_stages_are_balanced_by_parameter_count(self):
        """448 | 1040 + 136 + 9 parameters: cut after the first layer, not in the middle."""
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(64), keras.layers.Dense(16),
                                  keras.layers.Dense(8), keras.layers.Dense(1)])
        adapter = strategies.get("pipeline", num_stages=2, num_microbatches=2, num_devices=4)
        pipelined = adapter.pipeline(model)
        self.assertEqual((adapter.boundaries, adapter.stage_params), ((1,), [448, 1185]))
        self.assertEqual(adapter.per_device_param_bytes(pipelined), [448 * 4, 1185 * 4, 0, 0])  # 2 replicas

    @parameterized.named_parameters(
        ("full_batches", 64, 4, "mse"),
        # last batch of 12 over 8 micro-batches: sizes 2,2,2,2,1,1,1,1
        ("partial_last_batch", 60, 8, "mse"),
        # last batch of 6 over 8 micro-batches: two are empty
        ("last_batch_smaller_than_micro_batches", 70, 8, "mse"),
        ("sum_reduction", 64, 4, "sum"),
        ("sum_reduction_partial_last_batch", 60, 8, "sum"))
    def test_user_sequential_pipelined_equals_plain_fit(self, examples, microbatches, loss):
        def make():
            keras.utils.set_random_seed(3)
            return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                     keras.layers.Dense(16, activation="relu"),
                                     keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])

        def compiled(model):
            model.compile(optimizer=keras.optimizers.SGD(0.05 if loss == "mse" else 0.002),
                          loss=keras.losses.MeanSquaredError(reduction="sum") if loss == "sum" else loss)
            return model

        rng = np.random.default_rng(0)
        x = rng.normal(size=(examples, 6)).astype("float32")
        y = np.sin(x).sum(axis=1, keepdims=True)
        fit = dict(batch_size=16, epochs=3, shuffle=False, verbose=0)
        plain = compiled(make())
        expected = plain.fit(x, y, **fit).history["loss"]

        adapter = strategies.get("pipeline", num_stages=2, num_microbatches=microbatches, num_devices=2)
        model = compiled(adapter.pipeline(make()))
        actual = model.fit(x, y, **fit).history["loss"]
        np.testing.assert_allclose(actual, expected, rtol=1e-5)
        self.assertLess(actual[-1], 0.9 * actual[0])
        for a, b in zip(model.trainable_variables, plain.trainable_variables):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        self.assertLen(adapter.stage_layers, 2)
        used = {v.value.device.split(":")[-1] for v in model.trainable_variables}
        self.assertEqual(used, {"0", "1"})

    def test_loss_without_batch_reduction_is_refused(self):
        adapter = strategies.get("pipeline", num_stages=2, num_microbatches=2, num_devices=2)
        model = adapter.pipeline(keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                                                   keras.layers.Dense(1)]))
        with self.assertRaisesRegex(ValueError, r"reduction over the batch\. Received: reduction=none; "
                                                r"accepted: one of sum_over_batch_size, .*, or sum"):
            model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError(reduction="none"))

    def test_what_the_pipeline_step_cannot_do_is_refused(self):
        def adapter(**options):
            return strategies.get("pipeline", num_stages=2, num_microbatches=2, num_devices=2, **options)

        def sequential(*middle):
            return keras.Sequential([keras.Input((6,)), *middle, keras.layers.Dense(1, name="out")])

        with self.assertRaisesRegex(ValueError, r"remat .* Received: drop; accepted: remat=False"):
            adapter(remat=True).pipeline(sequential(keras.layers.Dense(8), keras.layers.Dropout(0.1, name="drop")))
        with self.assertRaisesRegex(ValueError, r"regularizer .* Received: l2; accepted: layers without regularizers"):
            adapter().pipeline(sequential(keras.layers.Dense(8, kernel_regularizer="l2", name="l2")))
        model = adapter().pipeline(sequential(keras.layers.Dense(8)))
        for options, text in [(dict(jit_compile=True), "XLA"), (dict(metrics=["mae"]), "metrics")]:
            with self.assertRaisesRegex(ValueError, text):
                model.compile(optimizer="sgd", loss="mse", **options)
        model.compile(optimizer="sgd", loss="mse")  # Keras's "auto" would pick XLA on a GPU
        self.assertFalse(model.jit_compile)
        x, y = np.ones((8, 6), "float32"), np.ones((8, 1), "float32")
        with self.assertRaisesRegex(ValueError, "sample weights"):
            model.fit(x, y, sample_weight=np.ones(8, "float32"), batch_size=8, verbose=0)


class PipelinePlacementTest(TestCase):

    def test_stage_variables_and_ops_on_stage_devices(self):
        run = pipeline_run(4, 2, "1f1b")
        adapter = strategies.from_config(run.parallel)
        adapter.validate(run)
        model = driver.build_model(run, adapter)
        devices = adapter.devices
        self.assertLen(devices, 4)
        for stage, (device, names) in enumerate(zip(devices, adapter.stage_layers)):
            layers = [layer for layer in model.stack if layer.name in names]
            for v in [v for layer in layers for v in layer.variables]:
                self.assertTrue(v.value.device.endswith(device.split("/")[-1]), (stage, v.path, v.value.device))
        checked = 0
        for v in model.optimizer.variables:  # slots follow their variables
            owner = [layer for layer in model.stack
                     if f"{model.name}_{layer.name}_" in v.path.replace("/", "_")]
            if owner:
                stage = next(i for i, names in enumerate(adapter.stage_layers) if owner[0].name in names)
                self.assertTrue(v.value.device.endswith(devices[stage].split("/")[-1]), v.path)
                checked += 1
        self.assertEqual(checked, 2 * len(model.trainable_variables))  # AdamW's two moments each

        x = tf.zeros((8, run.model.seq_len), tf.int32)
        step = tf.function(lambda x, y: model.train_step_fn(model, x, y))
        graph = step.get_concrete_function(x, x).graph
        for stage, device in enumerate(devices):
            scope = re.compile(rf"pipeline/stage_{stage}_replica_0(_\d+)?/")  # every event of the stage
            ops = [op for op in graph.get_operations() if scope.search(op.name)]
            self.assertGreater(len(ops), 100)
            wrong = [(op.name, op.device) for op in ops if not (
                op.device.endswith(device.split("/")[-1]) or _placed_by_resource(op))]
            self.assertEmpty(wrong, f"stage {stage} should run on {device}")
        self.assertIn("embed", adapter.describe())
        self.assertLen(adapter.plan()["stages"], 4)


class PipelineValidationTest(TestCase):
    """Each bad input is refused with a ValueError before training starts."""

    @parameterized.named_parameters(
        ("microbatches_not_dividing_batch", dict(stages=2, microbatches=3), "num_microbatches"),
        ("more_stages_than_devices", dict(stages=8, microbatches=1), "more devices|must not exceed the devices"),
        ("more_stages_than_stack", dict(stages=4, microbatches=1, num_layers=1), "stack entries"),
        ("boundaries_not_increasing", dict(stages=3, microbatches=1, parallel=dict(stage_boundaries=(3, 2))),
         "stage_boundaries must be strictly increasing"),
        ("boundary_out_of_range", dict(stages=2, microbatches=1, parallel=dict(stage_boundaries=(4,))),
         r"strictly increasing.* for a stack of 4 entries"),
        ("wrong_boundary_count", dict(stages=2, microbatches=1, parallel=dict(stage_boundaries=(1, 2))),
         "must list K-1 stack indices"),
        ("devices_not_multiple", dict(stages=2, microbatches=1, devices_count=3), "one device per stage"),
        ("accum_times_microbatches_not_dividing", dict(stages=2, microbatches=4, grad_accum_steps=4),
         "grad_accum_steps"),
        ("jit_compile", dict(stages=2, microbatches=1, jit_compile=True),
         "--jit_compile is not supported with --strategy=pipeline"),
        ("remat_with_dropout", dict(stages=2, microbatches=1, dropout=0.1, parallel=dict(remat=True)),
         "--remat with --dropout > 0 is not supported"))
    def test_bad_input_raises(self, spec, pattern):
        spec = dict(spec)
        num_layers, dropout = spec.pop("num_layers", None), spec.pop("dropout", 0.0)
        run = pipeline_run(spec.pop("stages"), spec.pop("microbatches"), **spec)
        if num_layers or dropout:
            model = config_lib.ModelConfig(**{**run.model.__dict__, "num_layers": num_layers or
                                              run.model.num_layers, "dropout": dropout})
            run = run.replace(model=model)
        with self.assertRaisesRegex(ValueError, pattern):
            driver.train(run)


if __name__ == "__main__":
    absltest.main()
