"""tfpar-bench's arithmetic: step medians, tfpar/plain ratios, pipeline efficiency."""

import dataclasses
import json
import os
import statistics
from unittest import mock

from absl.testing import flagsaver

from tests.testbase import TestCase, absltest, keras, parameterized, run_cli, tf, tiny_run
from tfpar import bench
from tfpar import config as config_lib
from tfpar import strategies
from tfpar import training
from tfpar import train as train_cli
from tfpar import benchmark


def _result(label, impl, run, step_seconds, **metrics):
    ends = [i * step_seconds for i in range(12)]
    spec = {"label": label, "impl": impl, "warmup": 2, "window": 3}
    return benchmark.result_from_metrics(spec, run, {
        "step_end_seconds": ends, "params": 1000, "per_device_param_bytes": [4000, 4000],
        "peak_rss_mb": 500.0, **metrics})


class ReportTest(parameterized.TestCase):

    def test_ratios_and_pipeline_efficiency(self):
        base = tiny_run("default")
        pipe = tiny_run("pipeline", parallel=dict(pipeline_stages=2, num_microbatches=8))
        results = [
            _result("default", "tfpar", base, 0.100, jit_compile=True),
            _result("default", "plain", base, 0.125),
            _result("pipeline K2xM8", "tfpar", pipe, 0.200, bubble_fraction_gpipe_bound=1 / 9,
                    stage_busy_seconds=[0.16, 0.17], pipeline_efficiency=0.8, traced_step_seconds=0.206,
                    stage_compute_seconds=[0.1, 0.12]),
        ]
        rep = benchmark.report(results, base)
        pipe4 = tiny_run("pipeline", devices_count=4, parallel=dict(pipeline_stages=4, num_microbatches=8))
        with_two_ks = benchmark.report(results + [  # two K at one M: one set of curves per K
            _result("pipeline K4xM8", "tfpar", pipe4, 0.250, bubble_fraction_gpipe_bound=3 / 11,
                    stage_busy_seconds=[0.1] * 4, pipeline_efficiency=0.6, traced_step_seconds=0.26,
                    stage_compute_seconds=[0.05] * 4)], base)
        self.assertTrue(benchmark.plot(with_two_ks, os.path.join(self.create_tempdir(), "two_ks.png")))
        rows = rep["rows"]
        self.assertAlmostEqual(rows["default/tfpar"]["step_seconds"], 0.1)
        self.assertAlmostEqual(rows["default/tfpar"]["tfpar_over_plain"], 1.25)
        self.assertIsNone(rows["default/plain"]["tfpar_over_plain"])
        pipeline = rows["pipeline K2xM8/tfpar"]
        self.assertAlmostEqual(pipeline["bubble_fraction_measured"], 0.2)
        self.assertAlmostEqual(pipeline["efficiency_over_gpipe_bound"], 0.9)
        self.assertAlmostEqual(pipeline["compute_efficiency"], 0.22 / 0.4)
        # MFU: tokens/s x (6 x params + 12 x layers x seq x d) over the matmul peak of the run.
        cfg = base.model
        self.assertEqual(benchmark.model_flops_per_token(cfg, 1000),
                         6 * 1000 + 12 * cfg.num_layers * cfg.seq_len * cfg.d_model)
        seq2seq = config_lib.model_config("seq2seq", "tiny")  # encoder, decoder and cross attention
        self.assertEqual(benchmark.model_flops_per_token(seq2seq, 1000),
                         6 * 1000 + 12 * 3 * seq2seq.num_layers * seq2seq.seq_len * seq2seq.d_model)
        self.assertEqual([benchmark.peak_dtype(p) for p in ("float32", "mixed_bfloat16", "mixed_float16")],
                         [tf.float32, tf.bfloat16, tf.float16])
        self.assertAlmostEqual(rows["default/tfpar"]["mfu"], 2560 * benchmark.model_flops_per_token(cfg, 1000)
                               / rep["matmul_peak_flops"])
        text = benchmark.markdown(rep)
        self.assertIn("| default | tfpar | on | 100 (± 0) | 2,560 |", text)
        self.assertIn("| default | plain | off | 125 (± 0) | 2,048 |", text)
        self.assertIn("| pipeline K2xM8 | 200 | 206 | 160, 170 | 0.80 | 0.89 | 0.90 | 100, 120 | 0.55 |", text)
        self.assertIn("| 2,560 | ", text)
        failed = benchmark.markdown({**rep, "failures": {"mirrored 2 dev/tfpar": "cell 'm' failed: ['boom']"}})
        self.assertIn("| mirrored 2 dev | tfpar | | fails: ['boom'] |", failed)
        path = os.path.join(self.create_tempdir(), "bench.png")
        self.assertTrue(benchmark.plot(rep, path))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

    def test_mfu_uses_the_median_of_the_peaks_timed_before_each_cell(self):
        base = tiny_run("default")
        results = [{**_result("default", "tfpar", base, 0.100), "matmul_peak_flops": peak}
                   for peak in (2e11, 3e11, 4e11)]
        results.append({**_result("default", "plain", base, 0.100), "matmul_peak_flops": 1e11})
        with mock.patch.object(benchmark, "matmul_peak_flops") as measure_now:
            rep = benchmark.report(results, base)
        measure_now.assert_not_called()
        rows, flops = rep["rows"], 2560 * benchmark.model_flops_per_token(base.model, 1000)
        self.assertEqual((rep["matmul_peak_flops"], rep["matmul_peak_flops_range"]), (2.5e11, [1e11, 4e11]))
        self.assertAlmostEqual(rows["default/tfpar"]["matmul_peak_flops"], 3e11)  # median of its rounds
        self.assertAlmostEqual(rows["default/plain"]["matmul_peak_flops"], 1e11)
        for row in rows.values():  # one peak for all: MFU ranks the rows as tokens/s does
            self.assertAlmostEqual(row["mfu"], flops / 2.5e11)
        self.assertIn("median 250 GFLOP/s (100–400), the MFU of every row", benchmark.markdown(rep))
        # The CPU model goes with the peak: 2-core machines here differ (Xeon ~390, EPYC ~215 GFLOP/s).
        machine = rep["machine"]
        self.assertTrue(machine["cpu"])
        self.assertEqual((machine["cores"], machine["tensorflow"]), (len(os.sched_getaffinity(0)), tf.__version__))
        self.assertIn(f"measured on {benchmark.describe_machine(machine)}", benchmark.markdown(rep))
        self.assertEqual(benchmark.describe_machine({"cpu": "AMD EPYC", "cores": 2, "accelerators": [],
                                                      "tensorflow": "2.21.0"}),
                         "AMD EPYC, 2 cores, no accelerator, TensorFlow 2.21.0")
        empty = benchmark.report([], base)
        self.assertIsNone(empty["matmul_peak_flops"])
        self.assertNotIn("GFLOP/s", benchmark.markdown({**empty, "failures": {"default/tfpar": "boom"}}))

    def test_rounds_pool_their_windows(self):
        base = tiny_run("default")  # AdamW: weights + 2 moments per parameter byte
        results = [_result("default", "tfpar", base, step) for step in (0.100, 0.100, 0.130)]
        row = benchmark.report(results, base)["rows"]["default/tfpar"]
        self.assertEqual(row["windows"], 3 * len(results[0]["step_seconds_windows"]))
        self.assertAlmostEqual(row["step_seconds"], 0.100)  # the median of every round's windows
        self.assertEqual(row["per_device_state_bytes"], 3 * 4000)

    def test_windows_cover_every_step_after_warmup(self):
        ends = [float(i * i) for i in range(30)]  # step i lasts 2i - 1 s
        rates = benchmark.window_rates(ends, warmup=6, window=4)
        self.assertLen(rates, 6)  # steps 6..29
        self.assertEqual(rates[0], (ends[9] - ends[5]) / 4)  # steps 6, 7, 8, 9
        self.assertEqual(rates[-1], (ends[29] - ends[25]) / 4)
        self.assertLen(benchmark.window_rates(ends, warmup=6, window=5), 4)  # 24 steps: 4 whole windows

    @parameterized.named_parameters(("given_warmup", 3), ("default_warmup", None))
    def test_multi_worker_cell_flags_give_back_the_same_run(self, warmup_steps):
        run = tiny_run("multi_worker", warmup_steps=warmup_steps, weight_decay=0.05, deterministic=True,
                       jit_compile=True, seed=5, parallel=dict(communication="ring"))
        run = run.replace(data=dataclasses.replace(run.data, seed=5))  # one --seed sets both
        with flagsaver.flagsaver():
            train_cli.FLAGS.unparse_flags()
            train_cli.FLAGS(["tfpar-train", *benchmark.train_flags(run, steps=7)])
            parsed = train_cli.config_from_flags()
        self.assertEqual(parsed, run.replace(steps_per_epoch=7))


class PlanTest(absltest.TestCase):

    def _xla(self, run=None, **flags):
        """(label, impl) -> (tfpar's jit_compile, plain Keras's jit_compile) for each planned cell."""
        with flagsaver.flagsaver(strategies=["default", "mirrored", "pipeline"], impls=["tfpar", "plain"],
                                 pipeline_shapes=["2x2"], scaling=False, **flags):
            return {(label, impl): (run.jit_compile, extra.get("keras_jit_compile"))
                    for label, impl, run, extra in bench.plan_cells(run or tiny_run("default"))}

    def test_each_implementation_at_its_default_unless_jit_compile_is_given(self):
        self.assertEqual(self._xla(jit_compile=None), {
            ("default", "tfpar"): (True, None), ("default", "plain"): (True, "auto"),
            ("mirrored 2 dev", "tfpar"): (True, None), ("mirrored 2 dev", "plain"): (True, "auto"),
            ("pipeline K2xM2", "tfpar"): (False, None)})
        self.assertEqual(self._xla(jit_compile=True), {
            ("default", "tfpar"): (True, None), ("default", "plain"): (True, True),
            ("mirrored 2 dev", "tfpar"): (True, None), ("mirrored 2 dev", "plain"): (True, True),
            ("pipeline K2xM2", "tfpar"): (False, None)})  # pipeline refuses XLA
        cells = self._xla(jit_compile=False)
        self.assertEqual({setting for pair in cells.values() for setting in pair if setting is not None},
                         {False}, cells)
        bf16 = self._xla(tiny_run("default", mixed_precision="mixed_bfloat16"), jit_compile=None)
        self.assertEqual(bf16[("default", "tfpar")], (False, None))


    def test_cells_that_cannot_run_are_refused_before_any_cell(self):
        with flagsaver.flagsaver(strategies=["default", "pipeline"], impls=["tfpar"], pipeline_shapes=["2x8"],
                                 scaling=False):
            with self.assertRaisesRegex(ValueError, "num_microbatches must divide the per-replica batch"):
                bench.plan_cells(tiny_run("default", global_batch_size=4))
        with flagsaver.flagsaver(strategies=["default"], impls=["tfpar", "plain"], scaling=False):
            with self.assertRaisesRegex(ValueError, "--grad_accum_steps has no plain-Keras cell"):
                bench.plan_cells(tiny_run("default", grad_accum_steps=2))

    def test_scaling_cells_vary_one_field_of_the_default_model(self):
        with flagsaver.flagsaver(strategies=["default"], impls=["tfpar"], scaling=True):
            cells = [(label, run, extra) for label, _, run, extra in bench.plan_cells(tiny_run("default"))]
        scaling = [(run, extra["scaling"]) for _, run, extra in cells if extra.get("scaling")]
        self.assertLen(scaling, sum(len(values) for values in bench.SCALING.values()))
        base = tiny_run("default").model
        for run, (field, value) in scaling:
            self.assertEqual(getattr(run.model, field), value)
            self.assertEqual(run.data.seq_len, run.model.seq_len)
            self.assertEqual(run.parallel.strategy, "default")
            # Width keeps the MLP's ratio to d_model; every other field stays the base's.
            expected = dict(base.__dict__, **{field: value})
            if field == "d_model":
                expected["mlp_dim"] = value * base.mlp_dim // base.d_model
            self.assertEqual(run.model.__dict__, expected)
        for field, values in bench.SCALING.items():
            self.assertGreaterEqual(len(set(values)), 4, field)


class PlainKerasCellTest(TestCase):

    def test_plain_cell_trains_without_tfpar_step_in_the_runs_precision(self):
        """The plain-Keras cell is Keras's own train_step and fit, not tfpar's step."""
        dtypes, fit = [], keras.Model.fit

        def recording_fit(model, *args, **kwargs):
            dtypes.append({layer.compute_dtype for layer in model.layers[1:]})
            return fit(model, *args, **kwargs)

        with mock.patch.object(training.TrainStep, "__call__", side_effect=AssertionError("tfpar step")), \
                mock.patch.object(keras.Model, "fit", recording_fit):
            ends, jit_compile = benchmark._plain_keras_fit(  # pylint: disable=protected-access
                tiny_run("default", mixed_precision="mixed_bfloat16"), strategies.get("default"), 3, "auto")
        self.assertLen(ends, 3)
        self.assertFalse(jit_compile)  # Keras's "auto" on a CPU-only machine
        self.assertEqual(dtypes, [{"bfloat16"}])
        self.assertEqual(keras.mixed_precision.global_policy().name, "float32")  # restored


class BenchCliTest(TestCase):

    def test_report_files_with_each_cells_own_peak(self):
        out = self.create_tempdir().full_path
        result = run_cli("tfpar.bench", "--strategies=default", "--impls=tfpar", "--model_size=tiny",
                         "--repeats=2", "--steps=8", "--warmup=2", "--window=2", f"--out_dir={out}",
                         f"--data_dir={self.data_dir}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(os.path.join(out, "bench.json")) as f:
            rep = json.load(f)
        peaks = [cell["matmul_peak_flops"] for cell in rep["cells"]]
        self.assertLen(peaks, 2)
        self.assertGreater(min(peaks), 1e9)
        row = rep["rows"]["default/tfpar"]
        self.assertAlmostEqual(rep["matmul_peak_flops"], statistics.median(peaks))
        flops = benchmark.model_flops_per_token(config_lib.ModelConfig(**row["model_config"]), row["params"])
        self.assertAlmostEqual(row["mfu"], row["tokens_per_second"] * flops / rep["matmul_peak_flops"])
        with open(os.path.join(out, "bench.md")) as f:
            self.assertIn("| default | tfpar | on |", f.read())
        self.assertTrue(os.path.exists(os.path.join(out, "bench.png")))


class StrategyOptionsTest(absltest.TestCase):

    def _cells(self, *argv):
        """(label -> ParallelConfig) of every cell for tfpar-bench flags `argv`."""
        with flagsaver.flagsaver():
            train_cli.FLAGS.unparse_flags()
            train_cli.FLAGS(["tfpar-bench", "--strategies=default,mirrored,pipeline", "--impls=tfpar",
                             "--pipeline_shapes=2x4", *argv])
            options = bench.strategy_options()
            return {label: run.parallel for label, _, run, _ in bench.plan_cells(tiny_run("default"), options)}

    def test_a_strategys_own_flags_reach_only_its_cells(self):
        cells = self._cells("--remat", "--pipeline_schedule=1f1b", "--cross_device_ops=hierarchical_copy")
        self.assertEqual((cells["pipeline K2xM4"].remat, cells["pipeline K2xM4"].pipeline_schedule), (True, "1f1b"))
        self.assertEqual(cells["mirrored 2 dev"].cross_device_ops, "hierarchical_copy")
        self.assertEqual((cells["default"].remat, cells["default"].cross_device_ops), (False, "auto"))

    def test_flags_no_cell_reads_are_refused(self):
        with self.assertRaisesRegex(ValueError, "--remat applies only to --strategies including pipeline"):
            self._cells("--strategies=default,mirrored", "--remat")
        with self.assertRaisesRegex(ValueError, "--mesh is set per cell.*--dtensor_meshes"):
            self._cells("--mesh=model:2")


if __name__ == "__main__":
    absltest.main()
