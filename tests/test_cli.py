"""The command line: bad input gets one line, exit status 2, no traceback."""

import json
import os

from tests.testbase import TestCase, absltest, parameterized, run_cli

TINY = ["--model_size=tiny", "--verbose=0"]


class BadInputTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("unknown_strategy", ["--strategy=mirorred"], "strategy", "mirrored"),
        ("unknown_model_size", ["--model_size=huge"], "model_size", "tiny"),
        ("unknown_model", ["--model=bert"], "model", "gpt"),
        ("batch_not_divisible", ["--strategy=mirrored", "--num_virtual_devices=3",
                                 "--global_batch_size=8"], "global_batch_size", "replicas=3"),
        ("more_devices_than_exist", ["--strategy=mirrored", "--num_virtual_devices=2",
                                     "--devices=/cpu:0,/cpu:5"], "devices", "available"),
        ("missing_text_file", ["--dataset=text:/no/such/file.txt"], "dataset", "text:PATH"),
        ("unknown_tfds_name", ["--dataset=tfds:no_such_dataset_xyz", "--data_dir=/tmp/tfpar_no_data"],
         "dataset", "tfds.list_builders"),
        ("zero_seq_len", ["--seq_len=0"], "seq_len", "> 0"),
        ("negative_learning_rate", ["--learning_rate=-1"], "learning_rate", "> 0"),
        ("not_an_integer", ["--global_batch_size=eight"], "global_batch_size", "int"),
        ("unknown_flag", ["--stratgy=mirrored"], "stratgy", ""),
        ("unknown_precision", ["--mixed_precision=fp8"], "mixed_precision", "mixed_bfloat16"),
        ("accum_not_dividing", ["--global_batch_size=8", "--grad_accum_steps=3"], "grad_accum_steps", "divisible"),
        ("positional_argument", ["train"], "unexpected", "--name=value"),
    )
    def test_one_line_error(self, flags, expected_name, expected_hint):
        result = run_cli("tfpar.train", *TINY, *flags, timeout=120)
        self.assertEqual(result.returncode, 2, result.stderr)
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        self.assertLen(lines, 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn(expected_name, lines[0])
        self.assertIn(expected_hint, lines[0])


class TrainCliTest(TestCase):

    def test_train_writes_metrics_and_generate_samples(self):
        work = self.create_tempdir().full_path
        metrics_path = os.path.join(work, "metrics.json")
        model_dir = os.path.join(work, "run")
        result = run_cli("tfpar.train", *TINY, "--strategy=mirrored", "--num_virtual_devices=2",
                         "--global_batch_size=8", "--steps_per_epoch=3", "--epochs=2",
                         f"--metrics_json={metrics_path}", f"--model_dir={model_dir}",
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
        self.assertGreater(metrics["tokens_per_second"], 0)
        for name in ("final.weights.h5", "config.json", "checkpoints/epoch_002.weights.h5"):
            self.assertTrue(os.path.exists(os.path.join(model_dir, name)), name)
        self.assertNotEmpty(os.listdir(os.path.join(model_dir, "logs")))

        sample = run_cli("tfpar.generate", f"--model_dir={model_dir}", "--prompt=The ",
                         "--max_new_tokens=20", "--temperature=0.8", "--top_k=10", timeout=120)
        self.assertEqual(sample.returncode, 0, sample.stderr[-3000:])
        self.assertTrue(sample.stdout.startswith("The "))
        self.assertGreater(len(sample.stdout.rstrip("\n")), len("The "))

    def test_generate_without_a_model_is_one_line(self):
        result = run_cli("tfpar.generate", "--model_dir=/no/such/dir", timeout=60)
        self.assertEqual(result.returncode, 2)
        self.assertLen(result.stderr.strip().splitlines(), 1, result.stderr)


if __name__ == "__main__":
    absltest.main()
