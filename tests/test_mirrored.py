"""Data parallelism: `mirrored` must train to the same per-step losses as `default`."""

import contextlib
import os
import subprocess
import sys
from unittest import mock

from tests.testbase import (ADAMW_ATOL, REPO_ROOT, TestCase, absltest, keras, np, parameterized, tf, tiny_run,
                            weights_of)
from tfpar import cluster
from tfpar import config as config_lib
from tfpar import strategies
from tfpar import training


LEARNING_RATES = {"sgd": 0.3, "adamw": 2e-3}


class DefaultReferenceTestCase(TestCase):

    def assertSameTraining(self, result, optimizer):
        """`result` trained as `default` does with the same optimizer: falling losses, and the same
        losses, gradient norms (of the summed gradient) and final weights."""
        metrics, weights = self.reference(tiny_run("default", optimizer=optimizer,
                                                   learning_rate=LEARNING_RATES[optimizer]))
        losses = metrics["step_losses"]
        self.assertLess(losses[-1], losses[0])
        self.assertLossesClose(losses, result.metrics["step_losses"])
        self.assertLossesClose(metrics["grad_norms"], result.metrics["grad_norms"])
        self.assertSameWeights(weights, result.model, atol=ADAMW_ATOL if optimizer == "adamw" else 1e-6)


class ReplicaDropoutTest(TestCase):
    """Each replica draws its own dropout masks, as DDP ranks do; the seed state advances as on
    one device."""

    @parameterized.parameters(False, True)
    def test_replicas_draw_their_own_masks(self, jit_compile):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=3), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        state = model.layers[0].seed_generator.state
        before = state.value.values[0].numpy()
        step = training.TrainStep(jit_compile=jit_compile)
        x, y = tf.ones((4, 64)), tf.zeros((4, 1))  # the same examples on both replicas
        losses = strategy.experimental_local_results(
            tf.function(lambda: strategy.run(lambda: step(model, x, y).loss))())
        self.assertNotAlmostEqual(float(losses[0]), float(losses[1]), places=4)  # other masks
        after = [v.numpy() for v in state.value.values]
        np.testing.assert_array_equal(after[0], after[1])
        np.testing.assert_array_equal(after[0], before + [0, 1])  # one draw, as one device makes
        # Replica 0 draws what one device draws from the same state.
        single = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=3), keras.layers.Dense(1)])
        single.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        single.set_weights(model.get_weights())
        single.layers[0].seed_generator.state.assign(before)
        alone = tf.function(lambda: training.TrainStep(jit_compile=jit_compile)(single, x, y).loss)()
        self.assertAlmostEqual(float(alone), float(losses[0]), places=5)


class SummedGradientsTest(TestCase):
    """The optimizer sees the gradients summed over replicas: clipping measures their
    global norm and loss scaling checks them (Keras 3 does both per replica)."""

    def test_clipping_measures_the_summed_gradient(self):
        kwargs = dict(optimizer="sgd", learning_rate=0.3, grad_clip_norm=0.1)
        clipped = self.train(tiny_run("default", **kwargs))
        unclipped = self.train(tiny_run("default", **{**kwargs, "grad_clip_norm": 0.0}))
        self.assertGreater(abs(clipped.metrics["step_losses"][-1] - unclipped.metrics["step_losses"][-1]), 0.1)
        mirrored = self.train(tiny_run("mirrored", devices_count=2, **kwargs))
        self.assertLossesClose(clipped.metrics["step_losses"], mirrored.metrics["step_losses"])
        self.assertSameWeights(weights_of(clipped.model), mirrored.model)

    @parameterized.parameters("float32", "bfloat16")
    def test_loss_scaling_skips_a_step_that_overflows_on_any_replica(self, reduce_dtype):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), loss="mse")
            model.optimizer.build(model.trainable_variables)
        before = model.get_weights()
        # Replica 1's examples overflow; replica 0's are fine.
        x = strategy.experimental_distribute_values_from_function(
            lambda context: tf.fill((2, 4), 1e30 * tf.cast(context.replica_id_in_sync_group, tf.float32) + 1.0))
        step = training.TrainStep(reduce_dtype=reduce_dtype)  # inf survives the sum in bfloat16
        tf.function(lambda x: strategy.run(lambda x: step(model, x, tf.zeros((2, 1))), args=(x,)))(x)
        for value, expected in zip(model.get_weights(), before):
            np.testing.assert_array_equal(value, expected)  # skipped, not NaN
        self.assertEqual(float(model.optimizer.dynamic_scale.numpy()), 2.0 ** 14)  # halved from 2**15
        # The optimizer's own all-reduce is on again for code other than TrainStep.
        self.assertNotIn("_all_reduce_sum_gradients", vars(model.optimizer.inner_optimizer))


class MirroredEquivalenceTest(DefaultReferenceTestCase):

    @parameterized.named_parameters(("sgd", "sgd", 0.3), ("adamw", "adamw", 2e-3))
    def test_mirrored_equals_default(self, optimizer, learning_rate):
        mirrored = self.train(tiny_run("mirrored", devices_count=4, optimizer=optimizer,
                                       learning_rate=learning_rate))
        self.assertEqual(mirrored.metrics["num_replicas"], 4)
        self.assertSameTraining(mirrored, optimizer)

    def test_jit_compile_under_mirrored_and_default_equals_default(self):
        # SGD under mirrored (XLA computes the gradients: a scaled gradient shows in the weights)...
        jitted = self.train(tiny_run("mirrored", devices_count=2, jit_compile=True, optimizer="sgd",
                                     learning_rate=0.3))
        self.assertSameTraining(jitted, "sgd")
        self.assertCompiledWithXla(jitted.model, ("gradients",))
        # ... and AdamW without a strategy, where XLA compiles the optimizer update too.
        jitted_default = self.train(tiny_run("default", jit_compile=True, grad_accum_steps=2,
                                             optimizer="adamw", learning_rate=2e-3))
        self.assertSameTraining(jitted_default, "adamw")
        self.assertCompiledWithXla(jitted_default.model, ("whole step",))

    def assertCompiledWithXla(self, model, kinds):
        """The model's step ran through XLA-compiled functions of these kinds only."""
        compiled = model.train_step_fn._compiled  # pylint: disable=protected-access
        self.assertEqual(sorted("whole step" if isinstance(key, tuple) else "gradients" for key in compiled),
                         sorted(kinds))
        for function in compiled.values():
            self.assertTrue(function._jit_compile)  # pylint: disable=protected-access

    def test_devices_and_cross_device_ops_reach_the_strategy(self):
        for name, expected in (("reduction_to_one_device", tf.distribute.ReductionToOneDevice),
                               ("hierarchical_copy", tf.distribute.HierarchicalCopyAllReduce)):
            adapter = strategies.from_config(config_lib.ParallelConfig(
                strategy="mirrored", num_virtual_devices=2, cross_device_ops=name))
            self.assertIsInstance(adapter.strategy.extended._cross_device_ops, expected)  # pylint: disable=protected-access
        self.assertEqual(adapter.num_replicas, 2)
        picked = strategies.from_config(config_lib.ParallelConfig(strategy="mirrored", devices=("/cpu:1", "cpu:3")))
        self.assertEqual([name.split("device:")[-1] for name in picked.devices], ["CPU:1", "CPU:3"])
        with self.assertRaisesRegex(ValueError, "names a device twice"):
            strategies.get("mirrored", devices=["/cpu:0", "CPU:0"])
        # On CPUs each replica has its own input pipeline (no MultiDeviceIterator: BUILD_NOTES.md).
        self.assertEqual(adapter.input_options().experimental_replication_mode,
                         tf.distribute.InputReplicationMode.PER_REPLICA)

    def test_mixed_bfloat16_trains_under_mirrored(self):
        reference = self.bfloat16_reference(steps=5)
        result = self.train(tiny_run("mirrored", devices_count=2, steps=5,
                                     mixed_precision="mixed_bfloat16"))
        self.assertTrainedInMixedBfloat16(result, reference, min_drop=0.2)

    def test_mixed_float16_uses_loss_scaling(self):
        """float16 gradients are scaled up before and down after: the weights move as in float32."""
        kwargs = dict(devices_count=2, steps=5, optimizer="sgd", learning_rate=0.3)
        reference = self.train(tiny_run("mirrored", **kwargs))
        result = self.train(tiny_run("mirrored", mixed_precision="mixed_float16", **kwargs))
        self.assertIsInstance(result.model.optimizer, keras.optimizers.LossScaleOptimizer)
        losses, expected = result.metrics["step_losses"], reference.metrics["step_losses"]
        self.assertTrue(np.all(np.isfinite(losses)))
        self.assertGreater(expected[0] - expected[-1], 0.1, expected)
        self.assertLossesClose(expected, losses, rtol=1e-2)


class GradientAccumulationTest(DefaultReferenceTestCase):
    """K micro-batches of B/K per step train as `default` does with one step of B: losses, gradient
    norms and weights (the split is real: see `split_microbatches`)."""

    @parameterized.parameters(("default", 0, "adamw"), ("mirrored", 2, "sgd"), ("mirrored", 2, "adamw"))
    def test_accumulation_equals_full_batch(self, strategy, devices_count, optimizer):
        with mock.patch.object(training, "split_microbatches", wraps=training.split_microbatches) as split:
            accumulated = self.train(tiny_run(strategy, devices_count=devices_count, grad_accum_steps=2,
                                              optimizer=optimizer, learning_rate=LEARNING_RATES[optimizer]))
        self.assertIn(2, [call.args[1] for call in split.call_args_list])  # the batch was really split
        self.assertSameTraining(accumulated, optimizer)


class ThreadShareTest(absltest.TestCase):
    """Virtual CPUs that run ops at once share the cores, unless the user sized TF's pool."""

    def intra_op_threads(self, **env):
        code = ("import tensorflow as tf; from tfpar import devices; devices.configure_virtual_devices(2, 2); "
                "print(tf.config.threading.get_intra_op_parallelism_threads())")
        environ = {k: v for k, v in os.environ.items() if k != "TF_NUM_INTRAOP_THREADS"}
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**environ, **env},
                                capture_output=True, text=True, timeout=120, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        return int(result.stdout.split()[-1])

    def test_each_concurrent_virtual_cpu_gets_its_share(self):
        self.assertEqual(self.intra_op_threads(), max(1, cluster.local_cores() // 2))
        self.assertEqual(self.intra_op_threads(TF_NUM_INTRAOP_THREADS="3"), 0)  # TF reads the user's value

    def test_devices_that_run_at_once(self):
        def concurrent(strategy, **options):
            return config_lib.ParallelConfig(strategy=strategy, **options).concurrent_devices
        self.assertEqual(concurrent("default"), 1)
        self.assertEqual(concurrent("mirrored", num_virtual_devices=4), 4)
        self.assertEqual(concurrent("dtensor", num_virtual_devices=4, mesh="batch:2,model:2"), 4)
        self.assertEqual(concurrent("pipeline", num_virtual_devices=4, pipeline_stages=2), 2)


class UserModelTest(TestCase):

    def test_functional_model_trains_with_plain_fit(self):
        """A user's own model under the adapter's scope trains as it does on one device."""
        x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
        y = (x @ np.arange(8, dtype="float32"))[:, None]

        def fit(scope):
            keras.utils.set_random_seed(1)
            with scope:
                inputs = keras.Input((8,))
                outputs = keras.layers.Dense(1)(keras.layers.Dense(16, activation="relu")(inputs))
                model = keras.Model(inputs, outputs)
                model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
            history = model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0)
            return model, history.history["loss"]

        adapter = strategies.get("mirrored", num_devices=4)
        model, losses = fit(adapter.scope())
        self.assertIs(model.distribute_strategy, adapter.strategy)
        self.assertEqual(adapter.num_replicas, 4)
        single, expected = fit(contextlib.nullcontext())
        self.assertLess(expected[-1], expected[0] / 2)
        self.assertLossesClose(expected, losses, rtol=1e-5)
        for a, b in zip(model.get_weights(), single.get_weights(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

if __name__ == "__main__":
    absltest.main()
