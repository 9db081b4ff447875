"""tfpar-bench's arithmetic: step medians, tfpar/plain ratios, pipeline efficiency."""

from tests.testbase import absltest, tiny_run
from tfpar import benchmark


def _result(label, impl, run, step_seconds, **metrics):
    ends = [i * step_seconds for i in range(12)]
    spec = {"label": label, "impl": impl, "warmup": 2, "window": 3}
    return benchmark.result_from_metrics(spec, run, {
        "step_end_seconds": ends, "params": 1000, "per_device_param_bytes": [4000, 4000],
        "peak_rss_mb": 500.0, **metrics})


class ReportTest(absltest.TestCase):

    def test_ratios_and_pipeline_efficiency(self):
        base = tiny_run("default")
        pipe = tiny_run("pipeline", parallel=dict(pipeline_stages=2, num_microbatches=8))
        results = [
            _result("default", "tfpar", base, 0.100),
            _result("default", "plain", base, 0.125),
            _result("pipeline K2xM8", "tfpar", pipe, 0.200, bubble_fraction_gpipe_bound=1 / 9,
                    stage_busy_seconds=[0.16, 0.17], pipeline_efficiency=0.8,
                    stage_compute_seconds=[0.1, 0.12]),
        ]
        rep = benchmark.report(results, base)
        rows = rep["rows"]
        self.assertAlmostEqual(rows["default/tfpar"]["step_seconds"], 0.1)
        self.assertAlmostEqual(rows["default/tfpar"]["tfpar_over_plain"], 1.25)
        self.assertIsNone(rows["default/plain"]["tfpar_over_plain"])
        pipeline = rows["pipeline K2xM8/tfpar"]
        self.assertAlmostEqual(pipeline["bubble_fraction_measured"], 0.2)
        self.assertAlmostEqual(pipeline["efficiency_over_gpipe_bound"], 0.9)
        self.assertAlmostEqual(pipeline["compute_efficiency"], 0.22 / 0.4)
        self.assertGreater(rows["default/tfpar"]["mfu"], 0)
        text = benchmark.markdown(rep)
        self.assertIn("| pipeline K2xM8 | 200 | 160, 170 | 0.80 | 0.89 | 0.90 | 100, 120 | 0.55 |", text)


if __name__ == "__main__":
    absltest.main()
