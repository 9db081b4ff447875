"""What every strategy shares: AdamW's decay exclusions, the learning-rate schedule, the dtype
gradients are summed in, and the held-out evaluation."""

import dataclasses
import re
import types
from unittest import mock

from tests import tfds_splits
from tests.testbase import TestCase, absltest, keras, np, parameterized, reset_devices, tf, tiny_run
from tfpar import callbacks as callbacks_lib
from tfpar import config as config_lib
from tfpar import data as data_lib
from tfpar import driver
from tfpar import strategies
from tfpar import training


class ReplicasFromFlagsTest(absltest.TestCase):
    """Replicas the flags imply, so that batch checks run before TensorFlow starts."""

    def test_known_replicas(self):
        def replicas(strategy, **options):
            return config_lib.ParallelConfig(strategy=strategy, **options).known_replicas
        self.assertEqual(replicas("default"), 1)
        self.assertEqual(replicas("mirrored", num_virtual_devices=4), 4)
        self.assertEqual(replicas("pipeline", num_virtual_devices=4, pipeline_stages=2), 2)
        self.assertEqual(replicas("dtensor", num_virtual_devices=4, mesh="batch:2,model:2"), 2)
        self.assertEqual(replicas("dtensor", num_virtual_devices=4, mesh="model:4"), 1)
        self.assertIsNone(replicas("multi_worker"))
        with self.assertRaisesRegex(ValueError, "num_microbatches must divide the per-replica batch"):
            tiny_run("pipeline", global_batch_size=8, devices_count=4,
                     parallel=dict(pipeline_stages=2, num_microbatches=8))  # 2 replicas of 4


class StepRecorderTest(absltest.TestCase):

    def test_a_resumed_run_keeps_one_clock_and_times_only_steps_within_a_fit(self):
        recorder = callbacks_lib.StepRecorder(tokens_per_step=100)
        # fit 1 starts at 0 s: steps end at 1.0 (tracing), 1.1, 1.2; in fit 2 the first step
        # (a new dataset) ends at 6.0, then 6.1, 6.2.
        clock = iter([0.0, 1.0, 1.1, 1.2, 6.0, 6.1, 6.2])
        with mock.patch.object(callbacks_lib.time, "perf_counter", lambda: next(clock)):
            for _ in range(2):
                recorder.on_train_begin()
                for step in range(3):
                    recorder.on_train_batch_end(step, {"step_loss": 1.0})
        self.assertEqual(recorder.start_time, 0.0)
        self.assertAlmostEqual(recorder.step_seconds, 0.1)
        self.assertAlmostEqual(recorder.tokens_per_second, 1000.0)

    def test_evaluations_are_not_timed_and_their_losses_are_kept(self):
        recorder = callbacks_lib.StepRecorder(tokens_per_step=100)
        # Steps end at 1.0 (tracing), 1.1, 1.2; the evaluation after epoch 1 runs from 1.2 to
        # 5.0; the next steps end at 5.2 (with 0.1 s of epoch-end work, counted as it is without
        # an evaluation) and 5.3.
        clock = iter([0.0, 1.0, 1.1, 1.2, 1.2, 5.0, 5.2, 5.3])
        with mock.patch.object(callbacks_lib.time, "perf_counter", lambda: next(clock)):
            recorder.on_train_begin()
            for step in range(3):
                recorder.on_train_batch_end(step, {"step_loss": 1.0})
            recorder.on_test_begin()
            recorder.on_test_end()
            recorder.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.5})
            for step in range(2):
                recorder.on_train_batch_end(step, {"step_loss": 1.0})
            recorder.on_epoch_end(1, {"loss": 1.0})  # an epoch without evaluation
        self.assertAlmostEqual(recorder.step_seconds, 0.5 / 4)  # 0.1, 0.1, 0.2 (0.1 of it epoch end), 0.1
        self.assertEqual(recorder.val_losses, [2.5])

    def test_a_run_without_a_timed_step_reports_no_speed(self):
        recorder = callbacks_lib.StepRecorder(tokens_per_step=100)
        with mock.patch.object(callbacks_lib.time, "perf_counter", iter([0.0, 1.0]).__next__):
            recorder.on_train_begin()
            recorder.on_train_batch_end(0, {"step_loss": 1.0})  # the one step traces: not timed
        self.assertIsNone(recorder.tokens_per_second)  # not 0 tokens/s
        self.assertIsNone(recorder.step_seconds)


class TrainingScalarsTest(absltest.TestCase):

    def test_tokens_per_second_counts_the_steps_of_each_window(self):
        """A run resumed at step 6 logs at step 10 after 4 steps of work, not 10."""
        log_dir = self.create_tempdir().full_path
        scalars = callbacks_lib.TrainingScalars(log_dir, tokens_per_step=100, devices=["/cpu:0"],
                                                every_steps=10, initial_step=6)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        scalars.set_model(model)
        clock = iter([0.0, 2.0, 12.0, 20.0])  # fit 1 begins; step 10 at 2 s; step 20 at 12 s; fit 2 begins
        with mock.patch.object(callbacks_lib.time, "perf_counter", lambda: next(clock)):
            scalars.on_train_begin()
            for step in range(14):
                scalars.on_train_batch_begin(step)
                scalars.on_train_batch_end(step, {"step_loss": 1.0})
            scalars.on_train_end()
            scalars.on_train_begin()  # a second fit call: a new window from its own start
            scalars.on_train_end()
        logged = {event.step: float(tf.make_ndarray(value.tensor))
                  for path in tf.io.gfile.glob(f"{log_dir}/events.*")
                  for event in tf.compat.v1.train.summary_iterator(path)
                  for value in event.summary.value if value.tag == "tokens_per_second"}
        self.assertEqual(logged, {10: 4 * 100 / 2.0, 20: 10 * 100 / 10.0})
        self.assertEqual((scalars.step, scalars.window_start_step), (20, 20))


class DefaultDeviceTest(absltest.TestCase):

    def test_default_reports_the_gpu_where_there_is_one(self):
        """TF lists CPU:0 first on a GPU machine, but places ops on GPU:0."""
        from tfpar import devices as devices_lib  # pylint: disable=import-outside-toplevel
        listed = {"CPU": [types.SimpleNamespace(name="/device:CPU:0")],
                  "GPU": [types.SimpleNamespace(name="/device:GPU:0")]}
        with mock.patch.object(devices_lib, "accelerator_kind", return_value="GPU"), \
                mock.patch.object(tf.config, "list_logical_devices",
                                  lambda kind=None: listed.get(kind, listed["CPU"] + listed["GPU"])):
            self.assertEqual(strategies.get("default").devices, ["/device:GPU:0"])
        self.assertEqual(strategies.get("default").devices, ["/device:CPU:0"])


class PrecisionPolicyTest(TestCase):

    def test_train_leaves_the_callers_policy(self):
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        result = self.train(tiny_run(steps=1))  # a float32 run
        self.assertEqual(result.model.stack[1].compute_dtype, "float32")
        self.assertEqual(keras.mixed_precision.global_policy().name, "mixed_bfloat16")


class TracedStepsAreFreedTest(TestCase):

    def test_no_gradient_function_is_registered_for_good(self):
        """tf.custom_gradient (ReplicaContext.all_reduce's) would register a gradient function
        holding the traced step in TF's global registry at every trace (BUILD_NOTES.md)."""
        from tensorflow.python.framework import ops  # pylint: disable=import-outside-toplevel
        for strategy, count, parallel, jit in [("default", 0, None, False), ("default", 0, None, True),
                                               ("mirrored", 2, None, False),
                                               ("pipeline", 2, dict(pipeline_stages=2, num_microbatches=1), False)]:
            with self.subTest(strategy=strategy, jit_compile=jit):
                reset_devices()
                before = set(ops._gradient_registry.list())  # pylint: disable=protected-access
                self.train(tiny_run(strategy, devices_count=count, parallel=parallel, steps=1, jit_compile=jit))
                self.assertEmpty(set(ops._gradient_registry.list()) - before)  # pylint: disable=protected-access


class OptimizerTest(TestCase):

    def build(self, **changes):
        run = tiny_run("default", steps=10, learning_rate=1e-3, **changes)
        return driver.build_model(run, strategies.from_config(run.parallel))

    def test_adamw_decays_matrices_only(self):
        """A zero-gradient AdamW step changes exactly the weights that are decayed."""
        model = self.build(warmup_steps=0, weight_decay=0.1)
        variables = model.trainable_variables
        for v in variables:
            v.assign(np.ones(v.shape, v.dtype))
        model.optimizer.apply_gradients([(np.zeros(v.shape, v.dtype), v) for v in variables])
        decayed = {v.path for v in variables if not np.allclose(v.numpy(), 1.0, rtol=0, atol=0)}
        expected = {v.path for v in variables if not re.search(r"(gamma|beta|bias|embeddings)$", v.path)}
        self.assertTrue(any("kernel" in path for path in expected), expected)
        self.assertEqual(decayed, expected)
        for v in variables:
            if v.path in expected:  # w - lr * wd * w
                np.testing.assert_allclose(v.numpy(), 1.0 - 1e-3 * 0.1, rtol=1e-6, err_msg=v.path)

    def test_warmup_then_cosine_to_a_tenth(self):
        optimizer = self.build(warmup_steps=2).optimizer
        rates = []
        for step in (0, 1, 2, 6, 10):
            optimizer.iterations.assign(step)
            rates.append(float(optimizer.learning_rate))
        # nanoGPT's warmup, lr * (step + 1) / (warmup + 1): the first step already moves the weights
        np.testing.assert_allclose(rates, [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-4 + 9e-4 * 0.5, 1e-4], rtol=1e-5, atol=1e-9)

    def test_default_warmup_fits_a_short_run_and_a_given_one_is_kept(self):
        def rates(warmup_steps):  # at steps 1..10 of a 10-step run
            optimizer, values = self.build(warmup_steps=warmup_steps).optimizer, []
            for step in range(1, 11):
                optimizer.iterations.assign(step)
                values.append(float(optimizer.learning_rate))
            return values
        default = rates(None)  # 20 steps by default: shortened to 9 so that the run reaches the peak
        self.assertAlmostEqual(default[8], 1e-3)
        self.assertAlmostEqual(default[3], 5e-3 / 10)
        np.testing.assert_allclose(rates(100), np.arange(2, 12) * 1e-3 / 101, rtol=1e-5)  # as given


class GradNormTest(TestCase):
    """Each step reports the global norm of its gradient before clipping (nanoGPT's and
    Megatron's logged grad norm); the equivalence tests compare it across strategies."""

    @parameterized.named_parameters(
        ("graph", {}), ("xla", dict(jit_compile=True)), ("accumulated", dict(grad_accum_steps=2)),
        ("loss_scaled", dict(mixed_precision="mixed_float16")))
    def test_the_norm_of_the_whole_batchs_gradient_before_clipping(self, changes):
        run = tiny_run("default", optimizer="sgd", learning_rate=0.3, grad_clip_norm=0.5, **changes)
        x = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 32)), tf.int32)
        y = tf.roll(x, -1, axis=1)
        self.addCleanup(keras.mixed_precision.set_global_policy, keras.mixed_precision.global_policy())
        keras.mixed_precision.set_global_policy(run.mixed_precision)
        model = driver.build_model(run, strategies.get("default"))
        scaled = isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        self.assertEqual(scaled, run.mixed_precision == "mixed_float16")  # gradients × 2**15 there
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)
        grads = tape.gradient(loss, model.trainable_variables)  # embeddings' as IndexedSlices:
        expected = float(tf.linalg.global_norm([training.dense(g) for g in grads]))  # repeated rows add up
        self.assertGreater(expected, 1.0)  # above the clip norm: the clipped norm would be 0.5
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
        self.assertAlmostEqual(history["grad_norm"][0], expected,
                               delta=expected * (1e-2 if "mixed_precision" in changes else 1e-5))

    def test_a_step_that_returns_a_bare_loss_is_a_clear_error(self):
        model = driver.build_model(tiny_run("default"), strategies.get("default"))
        model.train_step_fn = lambda model, x, y: tf.constant(1.0)  # a step written before StepOutput
        x = tf.zeros((8, 32), tf.int32)
        with self.assertRaisesRegex(TypeError, r"must return tfpar.training.StepOutput\(loss, grad_norm\). "
                                               r"Received: EagerTensor|Received: SymbolicTensor|Received: Tensor"):
            model.fit(x, x, batch_size=8, epochs=1, verbose=0)

    def test_a_step_that_loss_scaling_skips_records_none(self):
        recorder = callbacks_lib.StepRecorder(tokens_per_step=100)
        recorder.on_train_begin()
        for norm in (2.0, float("inf"), float("nan")):
            recorder.on_train_batch_end(0, {"step_loss": 1.0, "grad_norm": norm})
        recorder.on_train_batch_end(0, {"step_loss": 1.0})  # a model that reports none
        self.assertEqual(recorder.grad_norms, [2.0, None, None, None])


class GradientReduceDtypeTest(TestCase):
    """--grad_reduce_dtype=bfloat16 hands the all-reduce bfloat16 gradients (one local worker;
    MultiWorkerProcessTest sums them between two)."""

    def train_recording_all_reduce(self, run):
        """Trains `run`; returns the result and the dtypes the replicas' all-reduces summed."""
        summed, batch_reduce_to = set(), tf.distribute.StrategyExtended.batch_reduce_to

        def recording(extended, reduce_op, value_destination_pairs, options=None):
            summed.update(t.dtype.name for value, _ in value_destination_pairs for t in tf.nest.flatten(value))
            return batch_reduce_to(extended, reduce_op, value_destination_pairs, options)

        with mock.patch.object(tf.distribute.StrategyExtended, "batch_reduce_to", recording):
            return self.train(run), summed

    @parameterized.named_parameters(("graph", False), ("xla", True), ("loss_scaled", False, "mixed_float16"))
    def test_bfloat16_gradients_stay_close_to_float32(self, jit_compile, precision="float32"):
        """With mixed_float16 the loss-scaled gradients are summed in bfloat16 (float32's exponent
        range: a scaled gradient does not overflow there unless it would in float32)."""
        kwargs = dict(optimizer="sgd", learning_rate=0.3, jit_compile=jit_compile, mixed_precision=precision)
        reference, summed = self.train_recording_all_reduce(tiny_run("multi_worker", **kwargs))
        self.assertEqual(summed, {"float32"})
        result, summed = self.train_recording_all_reduce(
            tiny_run("multi_worker", parallel=dict(grad_reduce_dtype="bfloat16"), **kwargs))
        self.assertEqual(summed, {"bfloat16"})
        self.assertEqual(result.metrics["grad_reduce_dtype"], "bfloat16")
        self.assertEqual({v.dtype for v in result.model.trainable_variables}, {"float32"})
        losses, expected = result.metrics["step_losses"], reference.metrics["step_losses"]
        self.assertGreater(expected[0] - expected[-1], 0.1, expected)
        self.assertLossesClose(expected, losses, rtol=3e-4)  # 6.9e-5 measured (2026-11-27)
        self.assertFalse(np.allclose(losses, expected, rtol=1e-7, atol=0), losses)  # rounded gradients

    def test_one_device_rounds_as_n_replicas_do(self):
        """Without a strategy (the whole step under XLA, or not) the gradients are rounded too."""
        run = tiny_run("default", optimizer="sgd", learning_rate=0.3)
        x = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 32)), tf.int32)
        y = tf.roll(x, -1, axis=1)
        for jit_compile in (False, True):
            updated = {}
            for dtype in ("float32", "bfloat16"):
                keras.utils.set_random_seed(0)
                model = driver.build_model(run, strategies.get("default"))
                model.train_step_fn = training.TrainStep(jit_compile=jit_compile, reduce_dtype=dtype)
                model.fit(x, y, batch_size=8, epochs=1, verbose=0)
                updated[dtype] = model.get_weights()
            difference = max(float(np.abs(a - b).max()) for a, b in zip(updated["float32"], updated["bfloat16"]))
            self.assertBetween(difference, 1e-7, 1e-2, jit_compile)  # rounded, and only rounded

    def test_other_dtypes_are_refused(self):
        with self.assertRaisesRegex(ValueError, "grad_reduce_dtype.*float16.*bfloat16"):
            training.TrainStep(reduce_dtype="float16")


class HeldOutEvaluationTest(TestCase):

    def test_held_out_loss_is_the_models_mean_loss_and_the_same_under_every_strategy(self):
        """--eval_fraction: after each epoch, the mean token loss on the same held-out batches."""
        def held_out_run(strategy="default", count=0, parallel=None, model="gpt"):
            return tiny_run(strategy, devices_count=count, parallel=parallel, steps=2, epochs=2, model=model,
                            eval_fraction=0.1, eval_steps=2, data_dir=self.data_dir)
        for model in ("seq2seq", "gpt"):
            default = self.train(held_out_run(model=model))
            losses = default.metrics["val_losses"]
            self.assertLen(losses, 2)
            self.assertLess(losses[1], losses[0] - 0.1, model)  # training lowers it
            by_hand = [float(default.model.loss(y, default.model(x, training=False)))
                       for x, y in data_lib.make_eval_dataset_fn(held_out_run(model=model))(None).take(2)]
            self.assertAlmostEqual(losses[1], np.mean(by_hand), places=5, msg=model)
        for strategy, count, parallel in [("mirrored", 2, None), ("dtensor", 4, dict(mesh="batch:2,model:2")),
                                          ("pipeline", 2, dict(pipeline_stages=2, num_microbatches=2))]:
            with self.subTest(strategy):
                reset_devices()
                result = self.train(held_out_run(strategy, count, parallel))
                self.assertLossesClose(default.metrics["step_losses"], result.metrics["step_losses"])
                self.assertLossesClose(losses, result.metrics["val_losses"], rtol=1e-5)

    def test_a_tfds_sources_eval_split_is_evaluated_after_each_epoch(self):
        data_dir = self.create_tempdir().full_path
        tfds_splits.TfparTestSplits(data_dir=data_dir).download_and_prepare()
        run = tiny_run(steps=2, epochs=2, data_dir=data_dir)
        run = run.replace(data=dataclasses.replace(run.data, dataset="tfds:tfpar_test_splits",
                                                   eval_split="validation"), eval_steps=2)
        result = self.train(run)
        by_hand = [float(result.model.loss(y, result.model(x, training=False)))
                   for x, y in data_lib.make_eval_dataset_fn(run)(None).take(2)]
        self.assertLen(result.metrics["val_losses"], 2)
        self.assertAlmostEqual(result.metrics["val_losses"][1], np.mean(by_hand), places=5)


if __name__ == "__main__":
    absltest.main()
