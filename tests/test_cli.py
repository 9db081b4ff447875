"""The command line: a run writes metrics, checkpoints and logs; generate samples from it."""

import dataclasses
import json
import os
import re
import subprocess
import sys

from tests.testbase import REPO_ROOT, TestCase, absltest, np, run_cli, tf
from tfpar import config as config_lib
from tfpar import modeling
from tfpar import models
from tfpar import training

TINY = ["--model_size=tiny", "--verbose=0"]


class TrainCliTest(TestCase):

    def test_train_writes_metrics_and_generate_samples(self):
        work = self.create_tempdir().full_path
        metrics_path = os.path.join(work, "metrics.json")
        model_dir = os.path.join(work, "run")
        result = run_cli("tfpar.train", *TINY, "--strategy=mirrored", "--num_virtual_devices=2",
                         "--global_batch_size=8", "--steps_per_epoch=3", "--epochs=2",
                         f"--metrics_json={metrics_path}", f"--model_dir={model_dir}", "--profile_steps=2,3",
                         f"--data_dir={self.data_dir}")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(metrics_path) as f:
            metrics = json.load(f)
        for key in ("strategy", "num_replicas", "devices", "params", "model_config", "step_losses",
                    "final_loss", "tokens_per_second", "wall_seconds"):
            self.assertIn(key, metrics)
        for key in ("d_model", "num_layers", "num_heads", "vocab_size", "seq_len"):
            self.assertIn(key, metrics["model_config"])
        self.assertEqual(metrics["strategy"], "mirrored")
        self.assertEqual(metrics["num_replicas"], 2)
        self.assertLen(metrics["step_losses"], 6)
        self.assertEqual(metrics["final_loss"], metrics["step_losses"][-1])
        ends = metrics["step_end_seconds"]  # the first step (tracing) is left out of the throughput
        self.assertAlmostEqual(metrics["tokens_per_second"], 5 * 8 * 32 / (ends[5] - ends[0]), places=3)
        self.assertGreaterEqual(metrics["wall_seconds"], ends[-1])
        self.assertLen(set(metrics["devices"]), 2)
        self.assertEqual((metrics["global_batch_size"], metrics["grad_accum_steps"]), (8, 1))
        tiny = config_lib.model_config("gpt", "tiny")
        self.assertEqual(metrics["model_config"], dataclasses.asdict(tiny))
        self.assertEqual(metrics["params"], modeling.count_params(models.build(tiny)))
        for name in ("final.weights.h5", "config.json", "checkpoints/epoch_002.weights.h5"):
            self.assertTrue(os.path.exists(os.path.join(model_dir, name)), name)
        with open(os.path.join(model_dir, "config.json")) as f:
            self.assertIs(json.load(f)["jit_compile"], True)  # XLA by default under mirrored
        scalars = {}
        for event_file in tf.io.gfile.glob(os.path.join(model_dir, "logs", "steps", "events.*")):
            for event in tf.compat.v1.train.summary_iterator(event_file):
                for value in event.summary.value:
                    scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
        for tag in ("step_loss", "grad_norm", "learning_rate", "tokens_per_second", "memory/host_rss_mb"):
            self.assertEqual(sorted(scalars.get(tag, {})), [3, 6], tag)
        losses, norms = metrics["step_losses"], metrics["grad_norms"]
        self.assertLen(norms, 6)
        np.testing.assert_allclose([scalars["step_loss"][3], scalars["step_loss"][6]], [losses[2], losses[5]],
                                   rtol=1e-6)
        np.testing.assert_allclose([scalars["grad_norm"][3], scalars["grad_norm"][6]], [norms[2], norms[5]],
                                   rtol=1e-6)
        with open(os.path.join(model_dir, "config.json")) as f:
            run_config = json.load(f)
        optimizer = training.build_optimizer(
            run_config["optimizer"], learning_rate=run_config["learning_rate"], total_steps=6,
            warmup_steps=run_config["warmup_steps"], weight_decay=run_config["weight_decay"])
        for step in (3, 6):  # the rate the step used: at iterations = step - 1, before its update
            optimizer.iterations.assign(step - 1)
            self.assertAlmostEqual(scalars["learning_rate"][step], float(optimizer.learning_rate), places=7)
        for tag in ("tokens_per_second", "memory/host_rss_mb"):
            self.assertTrue(all(0 < value < 1e9 for value in scalars[tag].values()), (tag, scalars[tag]))
        traces = tf.io.gfile.glob(os.path.join(model_dir, "logs", "train", "plugins", "profile", "*", "*.xplane.pb"))
        self.assertNotEmpty(traces)

        sample = run_cli("tfpar.generate", f"--model_dir={model_dir}", "--prompt=The ",
                         "--max_new_tokens=20", "--temperature=0.8", "--top_k=10", timeout=120)
        self.assertEqual(sample.returncode, 0, sample.stderr[-3000:])
        self.assertTrue(sample.stdout.startswith("The "))
        self.assertGreater(len(sample.stdout.rstrip("\n")), len("The "))
        nan = run_cli("tfpar.generate", f"--model_dir={model_dir}", "--temperature=nan", timeout=120)
        self.assertEqual(nan.returncode, 2)
        self.assertRegex(nan.stderr.strip(), r"^tfpar: error: bad sampling options\. Received: temperature=nan")

    def test_a_text_dataset_is_kept_by_its_absolute_path(self):
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import train as train_cli  # pylint: disable=import-outside-toplevel
        work = self.create_tempdir().full_path
        with open(os.path.join(work, "corpus.txt"), "w") as f:
            f.write("text " * 100)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            with flagsaver.flagsaver(dataset="text:corpus.txt"):
                dataset = train_cli.config_from_flags().data.dataset
        finally:
            os.chdir(cwd)
        self.assertEqual(dataset, "text:" + os.path.join(os.path.realpath(work), "corpus.txt"))

    def test_xla_by_default_only_where_it_is_supported_and_faster(self):
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import train as train_cli  # pylint: disable=import-outside-toplevel
        expected = {"default": True, "mirrored": True, "multi_worker": True, "dtensor": False, "pipeline": False}
        for strategy, jit in expected.items():
            with flagsaver.flagsaver(strategy=strategy):
                self.assertIs(train_cli.config_from_flags().jit_compile, jit, strategy)
        with flagsaver.flagsaver(strategy="mirrored", mixed_precision="mixed_bfloat16"):
            self.assertIs(train_cli.config_from_flags().jit_compile, False)  # measured slower on CPU
        with flagsaver.flagsaver(strategy="mirrored", jit_compile=False):
            self.assertIs(train_cli.config_from_flags().jit_compile, False)

    def test_generate_without_a_model_is_one_line(self):
        result = run_cli("tfpar.generate", "--model_dir=/no/such/dir", timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertLen(result.stderr.strip().splitlines(), 1, result.stderr)


class GenerateTest(TestCase):
    """Sampling options change what is sampled (an untrained tiny GPT: its logits are nearly flat)."""

    def test_temperature_top_k_and_seed(self):
        from tfpar.models import gpt  # pylint: disable=import-outside-toplevel
        model = models.build(config_lib.model_config("gpt", "tiny"))

        def sample(**options):
            return gpt.generate(model, b"The ", max_new_tokens=12, **options)

        greedy = sample()
        self.assertLen(greedy, 12)
        self.assertLen(gpt.generate(model, b"", max_new_tokens=5), 5)  # no starter byte in the output
        self.assertEqual(sample(temperature=1.0, top_k=1, seed=3), greedy)  # one candidate: the argmax
        self.assertEqual(sample(temperature=1e-4, seed=3), greedy)  # nearly greedy
        self.assertEqual(sample(temperature=1.0, seed=3), sample(temperature=1.0, seed=3))
        self.assertNotEqual(sample(temperature=1.0, seed=3), sample(temperature=1.0, seed=4))
        self.assertNotEqual(sample(temperature=1.0, seed=3), greedy)


class ReadmeSnippetsTest(absltest.TestCase):

    def test_python_snippets_run_as_written(self):
        """Each README Python block that trains through an adapter runs on a plain machine."""
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
        snippets = [b for b in blocks if "tfpar.strategies.get" in b]
        self.assertLen(snippets, 2)
        for snippet in snippets:
            result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True,
                                    timeout=180, cwd=self.create_tempdir().full_path,
                                    env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            self.assertEqual(result.returncode, 0, f"{snippet}\n{result.stderr[-2000:]}")
            self.assertIn("loss", result.stdout)


if __name__ == "__main__":
    absltest.main()
