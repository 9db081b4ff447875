"""Tensor parallelism: `dtensor` must train to the same per-step losses as `default`."""

import json
import os


from tests.testbase import ADAMW_ATOL, TestCase, absltest, np, parameterized, tiny_run
from tfpar import driver
from tfpar import layouts
from tfpar import strategies


def reset_dtensor():
    """As TF's dtensor test_util.reset_dtensor: a fresh DTensor device per test."""
    from tensorflow.dtensor.python import api  # pylint: disable=import-outside-toplevel
    api._reset()  # pylint: disable=protected-access


class DTensorTestCase(TestCase):

    def setUp(self):
        reset_dtensor()
        super().setUp()

    def tearDown(self):
        reset_dtensor()
        super().tearDown()

    def with_data_dir(self, run):
        return run.replace(data=run.data.__class__(**{**run.data.__dict__, "data_dir": self.data_dir}))


class MeshSpecTest(parameterized.TestCase):

    def test_parse(self):
        self.assertEqual(layouts.parse_mesh("batch:2,model:2", 4).axes, (("batch", 2), ("model", 2)))
        self.assertEqual(layouts.parse_mesh("model:4", 4).axes, (("model", 4), ("batch", 1)))

    @parameterized.parameters(("batch:2,model:2", 8, "differs"), ("batch:2,tensor:2", 4, "unknown axis"),
                              ("batch=2", 2, "malformed"), ("", 4, "empty"),
                              ("model:2,model:2", 4, "twice"))
    def test_bad_mesh(self, spec, devices, message):
        with self.assertRaisesRegex(ValueError, message):
            layouts.parse_mesh(spec, devices)

    def test_two_rules_are_an_error(self):
        rules = layouts.LayoutRules(((r"kernel$", (None, "model")), (r"query/kernel$", ("model", None))))
        with self.assertRaisesRegex(ValueError, "matched by 2 layout rules"):
            rules.spec_for("gpt/block_0/attention/query/kernel", (64, 64), layouts.parse_mesh("model:4"))

    def test_indivisible_dimension_names_the_variable(self):
        with self.assertRaisesRegex(ValueError, "gpt/head/lm_head/kernel.*not divisible"):
            layouts.LayoutRules().spec_for("gpt/head/lm_head/kernel", (64, 250), layouts.parse_mesh("model:4"))

    def test_malformed_rules_are_one_line_errors(self):
        with self.assertRaisesRegex(ValueError, "splits two dimensions over one mesh axis"):
            layouts.LayoutRules(((r"kernel$", ("model", "model")),))
        path = os.path.join(absltest.get_default_test_tmpdir(), "latin1_rules.json")
        with open(path, "wb") as f:
            f.write(b'[["caf\xe9", [null]]]')  # not UTF-8
        with self.assertRaisesRegex(ValueError, "--layout_rules: cannot read the rules"):
            layouts.LayoutRules.from_json(path)

    def test_rules_from_json(self):
        path = os.path.join(absltest.get_default_test_tmpdir(), "rules.json")
        with open(path, "w") as f:
            json.dump([["fc_in/kernel$", [None, "model"]]], f)
        rules = layouts.LayoutRules.from_json(path)
        mesh = layouts.parse_mesh("model:2")
        self.assertEqual(rules.spec_for("a/mlp/fc_in/kernel", (4, 8), mesh), (None, "model"))
        self.assertEqual(rules.spec_for("a/attention/query/kernel", (4, 8), mesh), (None, None))


class DTensorEquivalenceTest(DTensorTestCase):

    # Both optimizers on the 2-D mesh; AdamW (whose slots need layouts too) on the 1-D meshes;
    # 2 micro-batches a step (strided rows of the batch-sharded input) equal the whole batch.
    @parameterized.named_parameters(
        ("batch2_model2_sgd", "batch:2,model:2", ("sgd", 0.3)),
        ("batch2_model2_adamw", "batch:2,model:2", ("adamw", 2e-3)),
        ("batch2_model2_adamw_accumulated", "batch:2,model:2", ("adamw", 2e-3), 2),
        ("model4_sgd", "model:4", ("sgd", 0.3)),
        ("model4_adamw", "model:4", ("adamw", 2e-3)),
        ("batch4_adamw", "batch:4", ("adamw", 2e-3)))
    def test_dtensor_equals_default(self, mesh, optimizer, grad_accum_steps=1):
        name, learning_rate = optimizer
        kwargs = dict(steps=10, optimizer=name, learning_rate=learning_rate)
        metrics, weights = self.reference(tiny_run("default", **kwargs))
        reset_dtensor()
        result = self.train(tiny_run("dtensor", devices_count=4, parallel=dict(mesh=mesh),
                                     grad_accum_steps=grad_accum_steps, **kwargs))
        self.assertEqual(result.metrics["mesh"], layouts.parse_mesh(mesh).__str__())
        self.assertLossesClose(metrics["step_losses"], result.metrics["step_losses"])
        self.assertLossesClose(metrics["grad_norms"], result.metrics["grad_norms"])  # of sharded gradients
        self.assertSameWeights(weights, result.model, atol=ADAMW_ATOL if name == "adamw" else 1e-6)

    def test_seq2seq_equals_default(self):
        kwargs = dict(model="seq2seq", steps=10)
        metrics, expected = self.reference(tiny_run("default", **kwargs))
        reset_dtensor()
        result = self.train(tiny_run("dtensor", devices_count=4, parallel=dict(mesh="batch:2,model:2"),
                                     **kwargs))
        self.assertLossesClose(metrics["step_losses"], result.metrics["step_losses"])
        self.assertSameWeights(expected, result.model, atol=ADAMW_ATOL)


class DTensorPrecisionTest(DTensorTestCase):

    def test_mixed_bfloat16_trains(self):
        reference = self.bfloat16_reference(steps=4)
        reset_dtensor()
        result = self.train(tiny_run("dtensor", devices_count=4, steps=4, mixed_precision="mixed_bfloat16",
                                     parallel=dict(mesh="batch:2,model:2")))
        self.assertTrainedInMixedBfloat16(result, reference)


# Megatron-LM's tensor-parallel layout of a GPT block, written out independently of
# layouts.DEFAULT_RULES: Q/K/V and fc_in column-parallel, attention output and fc_out
# row-parallel, vocabulary-parallel embedding and head, norms replicated.
_COLUMN, _ROW, _SPLIT, _WHOLE = ["unsharded", "model"], ["model", "unsharded"], ["model"], ["unsharded"]
MEGATRON_LAYOUT = {
    **{f"attention/{p}/kernel": _COLUMN for p in ("query", "key", "value")},
    **{f"attention/{p}/bias": _SPLIT for p in ("query", "key", "value")},
    "attention/output/kernel": _ROW, "attention/output/bias": _WHOLE,
    "mlp/fc_in/kernel": _COLUMN, "mlp/fc_in/bias": _SPLIT,
    "mlp/fc_out/kernel": _ROW, "mlp/fc_out/bias": _WHOLE,
    "token_embedding/embeddings": _ROW, "position_embedding/embeddings": ["unsharded", "unsharded"],
    "lm_head/kernel": _COLUMN, "lm_head/bias": _SPLIT,
    "/gamma": _WHOLE, "/beta": _WHOLE,
}


class DTensorLayoutTest(DTensorTestCase):

    def test_every_variable_and_slot_has_its_rule_layout(self):
        run = self.with_data_dir(tiny_run("dtensor", devices_count=4, steps=2,
                                          parallel=dict(mesh="batch:2,model:2")))
        adapter = strategies.from_config(run.parallel)
        result = driver.train(run, adapter)
        model = result.model
        actual = adapter.variable_layouts(model)
        expected = {}
        for variable in model.trainable_variables:
            suffixes = [s for s in MEGATRON_LAYOUT if variable.path.endswith(s)]
            self.assertLen(suffixes, 1, variable.path)
            expected[variable.path] = spec = MEGATRON_LAYOUT[suffixes[0]]
            for slot in ("momentum", "velocity"):
                expected[f"adam_w/{variable.path.replace('/', '_')}_{slot}"] = spec
        for path, spec in expected.items():
            self.assertIn(path, actual)
            self.assertEqual(actual[path], spec, path)
        sharded = [v for v in model.trainable_variables if "model" in expected[v.path]]
        total = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
        half = sum(int(np.prod(v.shape)) * 4 for v in sharded) // 2
        self.assertEqual(result.metrics["per_device_param_bytes"], [total - half] * 4)
        self.assertIn("mesh=batch:2,model:2", adapter.describe())
        self.assertIn("gpt/block_0/attention/query/kernel: [None, 'model']", adapter.describe())

    def test_layout_rules_file_replaces_the_default_rules(self):
        path = os.path.join(self.create_tempdir().full_path, "rules.json")
        with open(path, "w") as f:
            json.dump([["fc_in/kernel$", [None, "model"]]], f)
        run = self.with_data_dir(tiny_run("dtensor", devices_count=2,
                                          parallel=dict(mesh="model:2", layout_rules=path)))
        adapter = strategies.from_config(run.parallel)
        model = driver.build_model(run, adapter)
        actual = adapter.variable_layouts(model)
        sharded = [v.path for v in model.trainable_variables if actual[v.path] != ["unsharded"] * len(v.shape)]
        self.assertNotEmpty(sharded)
        for path in sharded:
            self.assertRegex(path, "fc_in/kernel$")
            self.assertEqual(actual[path], ["unsharded", "model"], path)

    def test_a_rule_that_matches_no_variable_is_refused(self):
        path = os.path.join(self.create_tempdir().full_path, "rules.json")
        with open(path, "w") as f:
            json.dump([["fc_inn/kernel$", [None, "model"]]], f)  # a typo: nothing would be split
        run = self.with_data_dir(tiny_run("dtensor", devices_count=2,
                                          parallel=dict(mesh="model:2", layout_rules=path)))
        with self.assertRaisesRegex(ValueError, "a rule matches no variable.*fc_inn"):
            driver.build_model(run, strategies.from_config(run.parallel))

    def test_unsupported_options_are_refused(self):
        adapter = strategies.get("dtensor", mesh="model:4", num_devices=4)
        with self.assertRaisesRegex(ValueError, "jit_compile"):
            adapter.validate(tiny_run("dtensor", jit_compile=True))
        with self.assertRaisesRegex(ValueError, "differs from the number of devices"):
            strategies.get("dtensor", mesh="model:2", num_devices=4)


class DTensorCheckpointTest(DTensorTestCase):

    def test_weights_restore_across_meshes(self):
        run = self.with_data_dir(tiny_run("dtensor", devices_count=4, steps=2,
                                          parallel=dict(mesh="batch:2,model:2")))
        trained = driver.train(run).model
        path = os.path.join(self.create_tempdir().full_path, "w.weights.h5")
        trained.save_weights(path)
        saved = {v.path: np.array(v.numpy()) for v in trained.weights}
        for strategy, mesh in (("dtensor", "model:4"), ("dtensor", "batch:4"), ("default", "")):
            reset_dtensor()
            self.setUp()
            parallel = dict(mesh=mesh) if mesh else None
            other = self.with_data_dir(tiny_run(strategy, devices_count=4 if mesh else 0,
                                                parallel=parallel, seed=7))
            adapter = strategies.from_config(other.parallel)
            model = driver.build_model(other, adapter)
            model.load_weights(path)
            for variable in model.weights:
                np.testing.assert_array_equal(np.array(variable.numpy()), saved[variable.path],
                                              err_msg=f"{mesh or strategy}: {variable.path}")


if __name__ == "__main__":
    absltest.main()
