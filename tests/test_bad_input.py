"""Bad input, every strategy: exit status 2, one line on stderr, no traceback.

One table (README's troubleshooting section lists the same cases). Each case
runs the real command in a subprocess; most fail before TensorFlow is imported.
"""

import concurrent.futures
import os
import re
import subprocess
import sys

from tests.testbase import REPO_ROOT, absltest

W5 = ('{"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}, '
      '"task": {"type": "worker", "index": 5}}')

# (case, module, flags, extra environment, texts the one line must contain)
CASES = [
    # (name, module, args, env, expected substrings)
    ("unknown_strategy", "tfpar.train", ["--strategy=mirorred"], None, ["strategy", "mirrored"]),
    ("unknown_model_size", "tfpar.train", ["--model_size=huge"], None, ["model_size", "tiny"]),
    ("unknown_model", "tfpar.train", ["--model=bert"], None, ["model", "gpt"]),
    ("unknown_optimizer", "tfpar.train", ["--optimizer=adam"], None, ["optimizer", "adamw"]),
    ("unknown_precision", "tfpar.train", ["--mixed_precision=fp8"], None, ["mixed_precision", "mixed_bfloat16"]),
    ("unknown_flag", "tfpar.train", ["--stratgy=mirrored"], None, ["stratgy"]),
    ("positional_argument", "tfpar.train", ["train"], None, ["unexpected", "--name=value"]),
    ("not_an_integer", "tfpar.train", ["--global_batch_size=eight"], None, ["global_batch_size", "int"]),
    ("zero_seq_len", "tfpar.train", ["--seq_len=0"], None, ["seq_len", "> 0"]),
    ("negative_learning_rate", "tfpar.train", ["--learning_rate=-1"], None, ["learning_rate", "> 0"]),
    ("negative_weight_decay", "tfpar.train", ["--weight_decay=-0.1"], None, ["weight_decay", ">= 0"]),
    ("negative_grad_clip_norm", "tfpar.train", ["--grad_clip_norm=-1"], None, ["grad_clip_norm", ">= 0"]),
    ("infinite_grad_clip_norm", "tfpar.train", ["--grad_clip_norm=inf"], None, ["grad_clip_norm=inf", "finite"]),
    ("sgd_with_weight_decay", "tfpar.train", ["--optimizer=sgd", "--weight_decay=0.1"], None, ["weight_decay=0.1", "SGD"]),
    ("builtin_with_an_argument", "tfpar.train", ["--dataset=builtin:corpus.txt"], None, ["builtin", "text:PATH"]),
    ("eval_fraction_out_of_range", "tfpar.train", ["--eval_fraction=1"], None, ["eval_fraction=1.0", "[0, 1)"]),
    ("eval_steps_without_eval_fraction", "tfpar.train", ["--eval_steps=2"], None, ["eval_steps=2", "--eval_fraction > 0"]),
    ("eval_fraction_of_tfds", "tfpar.train", ["--dataset=tfds:mnist", "--eval_fraction=0.1"], None, ["eval_fraction", "tfds:NAME"]),
    ("eval_split_of_builtin", "tfpar.train", ["--eval_split=validation"], None, ["eval_split='validation'", "tfds:NAME"]),
    ("eval_fraction_too_small", "tfpar.train", ["--strategy=default", "--eval_fraction=0.0001"], None, ["holds out", "0 global batches"]),
    ("out_of_memory", "tfpar.train", ["--seq_len=600000", "--steps_per_epoch=1", "--epochs=1"], None, ["out of memory", "seq_len=600000"]),
    ("dropout_out_of_range", "tfpar.train", ["--dropout=1.5"], None, ["dropout", "[0, 1)"]),
    ("plan_only_with_export", "tfpar.train", ["--plan_only", "--export_dir=/tmp/tfpar_bi_export"], None, ["plan_only", "export_dir"]),
    ("verbose_out_of_range", "tfpar.train", ["--verbose=3"], None, ["verbose=3", "0 (silent)"]),
    ("zero_epochs", "tfpar.train", ["--epochs=0"], None, ["epochs", "> 0"]),
    ("accum_not_dividing", "tfpar.train", ["--global_batch_size=8", "--grad_accum_steps=3"], None, ["grad_accum_steps", "divisible"]),
    ("missing_text_file", "tfpar.train", ["--dataset=text:/no/such/file.txt"], None, ["dataset", "text:PATH"]),
    ("unknown_dataset_kind", "tfpar.train", ["--dataset=csv:x.csv"], None, ["dataset", "tfds"]),
    ("unknown_tfds_name", "tfpar.train", ["--dataset=tfds:no_such_dataset_xyz", "--data_dir=/tmp/tfpar_no_data"], None, ["dataset", "tfds.list_builders"]),
    ("model_dir_is_a_file", "tfpar.train", ["--model_dir=/etc/hostname"], None, ["model_dir", "directory"]),
    ("export_dir_is_a_file", "tfpar.train", ["--export_dir=/etc/hostname"], None, ["export_dir", "directory"]),
    ("profile_steps_one_value", "tfpar.train", ["--profile_steps=3", "--model_dir=/tmp/tfpar_bi"], None, ["profile_steps", "FIRST,LAST"]),
    ("profile_steps_without_model_dir", "tfpar.train", ["--profile_steps=2,3"], None, ["profile_steps", "model_dir"]),
    ("negative_virtual_devices", "tfpar.train", ["--num_virtual_devices=-2"], None, ["num_virtual_devices", ">= 0"]),
    ("mirrored_batch_not_divisible", "tfpar.train", ["--strategy=mirrored", "--num_virtual_devices=3", "--global_batch_size=8"], None, ["global_batch_size", "replicas=3"]),
    ("mirrored_device_missing", "tfpar.train", ["--strategy=mirrored", "--num_virtual_devices=2", "--devices=/cpu:0,/cpu:5"], None, ["devices", "available"]),
    ("mirrored_device_twice", "tfpar.train", ["--strategy=mirrored", "--num_virtual_devices=2", "--devices=/cpu:0,CPU:0"], None, ["devices", "twice"]),
    ("mirrored_nccl_on_cpus", "tfpar.train", ["--strategy=mirrored", "--num_virtual_devices=2", "--cross_device_ops=nccl"], None, ["nccl", "GPUs only"]),
    ("mirrored_hierarchical_copy_odd", "tfpar.train", ["--strategy=mirrored", "--num_virtual_devices=3", "--global_batch_size=12", "--cross_device_ops=hierarchical_copy"], None, ["hierarchical_copy", "3 devices"]),
    ("mirrored_unknown_cross_device_ops", "tfpar.train", ["--strategy=mirrored", "--cross_device_ops=ncll"], None, ["cross_device_ops", "nccl"]),
    ("multi_worker_malformed_tf_config", "tfpar.train", ["--strategy=multi_worker"], {"TF_CONFIG": '{"cluster": '}, ["TF_CONFIG", "malformed JSON"]),
    ("multi_worker_index_out_of_range", "tfpar.train", ["--strategy=multi_worker"], {"TF_CONFIG": W5}, ["TF_CONFIG", "out of range"]),
    ("multi_worker_unknown_communication", "tfpar.train", ["--strategy=multi_worker", "--communication=rings"], None, ["communication", "ring"]),
    ("multi_worker_unknown_grad_reduce_dtype", "tfpar.train", ["--strategy=multi_worker", "--grad_reduce_dtype=float16"], None, ["grad_reduce_dtype", "bfloat16"]),
    ("grad_reduce_dtype_without_workers", "tfpar.train", ["--strategy=mirrored", "--grad_reduce_dtype=bfloat16"], None, ["grad_reduce_dtype", "multi_worker"]),
    ("launch_zero_workers", "tfpar.launch", ["--num_workers=0"], None, ["num_workers", ">= 1"]),
    ("dtensor_malformed_mesh", "tfpar.train", ["--strategy=dtensor", "--num_virtual_devices=4", "--mesh=batch=2"], None, ["mesh", "malformed"]),
    ("dtensor_mesh_size_differs", "tfpar.train", ["--strategy=dtensor", "--num_virtual_devices=2", "--mesh=batch:2,model:2"], None, ["mesh", "differs"]),
    ("dtensor_missing_rules_file", "tfpar.train", ["--strategy=dtensor", "--num_virtual_devices=2", "--mesh=model:2", "--layout_rules=/no/rules.json"], None, ["layout_rules", "cannot read"]),
    ("dtensor_jit_compile", "tfpar.train", ["--strategy=dtensor", "--num_virtual_devices=2", "--mesh=model:2", "--jit_compile"], None, ["jit_compile"]),
    ("pipeline_unknown_schedule", "tfpar.train", ["--strategy=pipeline", "--pipeline_schedule=interleaved"], None, ["pipeline_schedule", "1f1b"]),
    ("pipeline_more_stages_than_blocks", "tfpar.train", ["--strategy=pipeline", "--num_virtual_devices=8", "--pipeline_stages=8"], None, ["pipeline_stages", "stack entries"]),
    ("pipeline_microbatches_not_dividing", "tfpar.train", ["--strategy=pipeline", "--num_virtual_devices=2", "--pipeline_stages=2", "--num_microbatches=3", "--global_batch_size=8"], None, ["num_microbatches"]),
    ("pipeline_boundaries_not_integers", "tfpar.train", ["--strategy=pipeline", "--stage_boundaries=a"], None, ["stage_boundaries", "integers"]),
    ("pipeline_grad_accum", "tfpar.train", ["--strategy=pipeline", "--num_virtual_devices=2", "--pipeline_stages=2", "--global_batch_size=8", "--num_microbatches=4", "--grad_accum_steps=4"], None, ["grad_accum_steps", "divide"]),
    ("bench_unknown_strategy", "tfpar.bench", ["--strategies=default,pipelin"], None, ["strategies", "pipeline"]),
    ("bench_malformed_pipeline_shape", "tfpar.bench", ["--strategies=pipeline", "--pipeline_shapes=2y8"], None, ["pipeline_shapes", "KxM"]),
    ("bench_no_timed_window", "tfpar.bench", ["--steps=8"], None, ["steps", "window"]),
    ("bench_nothing_to_measure", "tfpar.bench", ["--strategies="], None, ["nothing to measure", "strategies="]),
    ("bench_multi_worker_batch_not_divisible", "tfpar.bench", ["--strategies=multi_worker", "--global_batch_size=15"], None, ["global_batch_size", "workers=2"]),
    ("bench_out_dir_is_a_file", "tfpar.bench", ["--out_dir=/etc/hostname"], None, ["out_dir", "a file"]),
    ("pipeline_flag_under_mirrored", "tfpar.train", ["--strategy=mirrored", "--remat"], None, ["remat", "pipeline"]),
    ("mesh_without_dtensor", "tfpar.train", ["--strategy=default", "--mesh=model:2"], None, ["mesh", "dtensor"]),
    ("metrics_json_is_a_directory", "tfpar.train", ["--metrics_json=/tmp"], None, ["metrics_json", "directory"]),
    ("metrics_json_cannot_be_written", "tfpar.train", ["--metrics_json=/etc/hostname/m.json"], None, ["metrics_json", "written"]),
    ("negative_seed", "tfpar.train", ["--seed=-1"], None, ["seed", "2**32"]),
    ("backups_without_model_dir", "tfpar.train", ["--backup_every_steps=5"], None, ["backup_every_steps", "model_dir"]),
    ("tfds_not_prepared", "tfpar.train", ["--dataset=tfds:mnist", "--data_dir=/tmp/tfpar_no_data"], None, ["dataset", "not prepared"]),
    ("tfds_without_text", "tfpar.train", ["--dataset=tfds:mnist"], None, ["dataset", "no text feature"]),
    ("launch_other_strategy", "tfpar.launch", ["--", "--strategy", "mirrored"], None, ["strategy", "multi_worker"]),
    ("launch_bad_train_flag", "tfpar.launch", ["--", "--model_size=huge"], None, ["model_size", "tiny"]),
    ("generate_without_model", "tfpar.generate", ["--model_dir=/no/such/run"], None, ["model_dir", "no trained model"]),
    ("generate_top_k_when_greedy", "tfpar.generate", ["--model_dir=/no/such/run", "--top_k=20"], None, ["top_k=20", "temperature"]),
    ("generate_training_flag", "tfpar.generate", ["--model_dir=/no/such/run", "--model_size=small"], None, ["--model_size", "no training flags"]),
]
PROGRAMS = {"tfpar.train": "tfpar-train", "tfpar.launch": "tfpar-launch", "tfpar.bench": "tfpar-bench",
            "tfpar.generate": "tfpar-generate"}


def run_case(module, flags, env):
    if module == "tfpar.train":
        flags = ["--model_size=tiny", "--verbose=0", *flags]
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True,
                          timeout=180, cwd=REPO_ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})


class BadInputTableTest(absltest.TestCase):

    def test_every_case_is_one_line_and_exit_2(self):
        self.assertGreaterEqual(len(CASES), 25)
        self.assertLen({case[0] for case in CASES}, len(CASES))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda case: run_case(*case[1:4]), CASES))
        for (name, _, _, _, expected), result in zip(CASES, results):
            with self.subTest(name):
                self.assertEqual(result.returncode, 2, result.stderr[-2000:])
                self.assertNotIn("Traceback", result.stderr)
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                self.assertLen(lines, 1, result.stderr[-2000:])
                self.assertRegex(lines[0], r"^tfpar(-launch)?: error: ")
                for text in expected:
                    self.assertIn(text, lines[0])


    def test_readme_lists_every_case(self):
        """README's troubleshooting table shows each case's command and the texts its line contains."""
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            rows = re.findall(r"^\| [^|`]+ \| `([^`]+)` \| (.+) \|$", f.read(), re.M)
        readme = {command: re.findall(r"`([^`]+)`", texts) for command, texts in rows}
        self.assertLen(readme, len(CASES))
        for name, module, flags, env, expected in CASES:
            if env:  # README shows the environment in words
                continue
            with self.subTest(name):
                command = " ".join([PROGRAMS[module], *flags])
                self.assertIn(command, readme)
                self.assertEqual(readme[command], expected)


class FlagsToConfigTest(absltest.TestCase):

    def test_paths_expand_the_home_directory(self):
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import train  # pylint: disable=import-outside-toplevel
        with flagsaver.flagsaver():
            train.FLAGS.unparse_flags()
            train.FLAGS(["tfpar-train", "--data_dir=~/tfds", "--model_dir=~/runs/a",
                         "--metrics_json=~/m.json"])
            run = train.config_from_flags()
        home = os.path.expanduser("~")
        self.assertEqual((run.data.data_dir, run.model_dir, run.metrics_json),
                         (f"{home}/tfds", f"{home}/runs/a", f"{home}/m.json"))

    def test_xla_default_follows_the_parallel_config_given(self):
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import config as config_lib  # pylint: disable=import-outside-toplevel
        from tfpar import train  # pylint: disable=import-outside-toplevel
        with flagsaver.flagsaver():
            train.FLAGS.unparse_flags()
            train.FLAGS(["tfpar-train"])  # --strategy's default is mirrored (XLA on)
            run = train.config_from_flags(config_lib.ParallelConfig(strategy="pipeline", pipeline_stages=2))
        self.assertFalse(run.jit_compile)  # the pipeline refuses XLA

    def test_gpus_are_left_whole_unless_a_split_is_asked_for(self):
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import train  # pylint: disable=import-outside-toplevel
        # Before TensorFlow starts (accelerator None) the default split is not known: an odd
        # batch waits for the second pass, which refuses it on CPUs (2 replicas) only.
        for argv, accelerator, expected in [
                ([], None, 0), ([], "CPU", 2), ([], "GPU", 0), (["--num_virtual_devices=2"], "GPU", 2),
                (["--global_batch_size=9"], None, 0), (["--global_batch_size=9"], "GPU", 0),
                (["--global_batch_size=9"], "CPU", "replicas=2")]:
            with self.subTest(argv=argv, accelerator=accelerator), flagsaver.flagsaver():
                train.FLAGS.unparse_flags()
                train.FLAGS(["tfpar-train", *argv])
                if isinstance(expected, str):
                    with self.assertRaisesRegex(ValueError, expected):
                        train.config_from_flags(accelerator=accelerator)
                    continue
                run = train.config_from_flags(accelerator=accelerator)
                self.assertEqual((run.parallel.strategy, run.parallel.num_virtual_devices),
                                 ("mirrored", expected))

    def test_a_failed_download_is_not_called_a_file_error(self):
        import contextlib  # pylint: disable=import-outside-toplevel
        import io  # pylint: disable=import-outside-toplevel
        from unittest import mock  # pylint: disable=import-outside-toplevel
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import devices, driver, train  # pylint: disable=import-outside-toplevel
        stderr = io.StringIO()
        with flagsaver.flagsaver(), mock.patch.object(driver, "train", side_effect=ConnectionError("timed out")), \
                mock.patch.object(devices, "configure_virtual_devices"), \
                contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as exited:
            train.FLAGS.unparse_flags()
            train.FLAGS(["tfpar-train", "--strategy=default", "--dataset=tfds:lm1b"])
            train.main(["tfpar-train"])
        self.assertEqual(exited.exception.code, 2)
        self.assertEqual(stderr.getvalue(), "tfpar: error: a download failed (no network?). Received: "
                         "dataset=tfds:lm1b (timed out); accepted: a TFDS dataset prepared in --data_dir "
                         "beforehand, or builtin or text:PATH (no network).\n")

    def test_tf_config_and_layout_rules_are_checked_before_tensorflow_starts(self):
        import contextlib  # pylint: disable=import-outside-toplevel
        import io  # pylint: disable=import-outside-toplevel
        from unittest import mock  # pylint: disable=import-outside-toplevel
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import train  # pylint: disable=import-outside-toplevel
        for flags, env, line in [
                (["--strategy=multi_worker"], {"TF_CONFIG": '{"cluster": '}, "TF_CONFIG: malformed JSON"),
                (["--strategy=dtensor", "--num_virtual_devices=2", "--mesh=model:2", "--layout_rules=/no/r.json"],
                 {}, "--layout_rules: cannot read the rules. Received: layout_rules='/no/r.json'")]:
            stderr = io.StringIO()
            with self.subTest(line), flagsaver.flagsaver(), mock.patch.dict(os.environ, env), \
                    mock.patch.object(train, "quiet_tensorflow", side_effect=AssertionError("TensorFlow started")), \
                    contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as exited:
                train.FLAGS.unparse_flags()
                train.FLAGS(["tfpar-train", *flags])
                train.main(["tfpar-train"])
            self.assertEqual(exited.exception.code, 2)
            self.assertTrue(stderr.getvalue().startswith(f"tfpar: error: {line}"), stderr.getvalue())

    def test_an_internal_value_error_is_not_reported_as_bad_input(self):
        """tfpar's bad-input errors say what they received; any other ValueError is a bug and
        keeps its traceback (exit 1), instead of reading like a bad flag."""
        import io  # pylint: disable=import-outside-toplevel
        from unittest import mock  # pylint: disable=import-outside-toplevel
        from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
        from tfpar import devices, driver, train  # pylint: disable=import-outside-toplevel
        bug = ValueError("Shapes (2,) and (3,) are incompatible")
        with flagsaver.flagsaver(), mock.patch.object(driver, "train", side_effect=bug), \
                mock.patch.object(devices, "configure_virtual_devices"), \
                mock.patch("sys.stderr", io.StringIO()), self.assertRaises(ValueError) as raised:
            train.FLAGS.unparse_flags()
            train.FLAGS(["tfpar-train", "--strategy=default"])
            train.main(["tfpar-train"])
        self.assertIs(raised.exception, bug)

    def test_empty_strategy_options_from_python_are_not_given(self):
        from tfpar import config as config_lib  # pylint: disable=import-outside-toplevel
        parallel = config_lib.ParallelConfig(strategy="default", devices=[], stage_boundaries=[])
        self.assertEqual((parallel.devices, parallel.stage_boundaries), ((), ()))
        with self.assertRaisesRegex(ValueError, "--devices applies only to --strategy=mirrored or pipeline"):
            config_lib.ParallelConfig(strategy="default", devices=["/cpu:0"])


if __name__ == "__main__":
    absltest.main()
