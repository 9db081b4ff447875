"""Resume after SIGKILL, determinism, non-finite loss, export, plan."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import h5py

from tests.checkpoint_files import latest_backup_step
from tests.testbase import (REPO_ROOT, TestCase, absltest, keras, np, parameterized, run_cli, tf, tiny_run,
                            weights_of)
from tfpar import config as config_lib
from tfpar import driver
from tfpar import export as export_lib
from tfpar import generate
from tfpar import modeling
from tfpar import models
from tfpar import plan
from tfpar import sources
from tfpar import strategies
from tfpar.strategies import default as default_strategy

RUN_FLAGS = ["--strategy=default", "--model_size=tiny", "--global_batch_size=8",
             "--steps_per_epoch=20", "--epochs=2", "--backup_every_steps=4", "--verbose=0"]
STEPS = 40  # the kill comes at the first backup (step 4): 36 steps leave time for it


def read_weights(path):
    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return values


class ResumeTest(TestCase):

    def test_sigkill_then_rerun_equals_uninterrupted(self):
        work = self.create_tempdir().full_path
        data = f"--data_dir={self.data_dir}"
        straight = run_cli("tfpar.train", *RUN_FLAGS, data, f"--model_dir={work}/straight")
        self.assertEqual(straight.returncode, 0, straight.stderr[-2000:])

        killed_dir = f"{work}/killed"
        proc = subprocess.Popen([sys.executable, "-m", "tfpar.train", *RUN_FLAGS, data,
                                 f"--model_dir={killed_dir}"], cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                # A killed process cannot delete its temporary files (AutoGraph's).
                                env={**os.environ, "TMPDIR": self.create_tempdir().full_path})
        try:
            deadline = time.time() + 240
            while time.time() < deadline and latest_backup_step(f"{killed_dir}/backup") < 4:
                time.sleep(0.05)
            self.assertGreaterEqual(latest_backup_step(f"{killed_dir}/backup"), 4, "no backup appeared")
            proc.send_signal(signal.SIGKILL)  # mid-epoch 1, before the last step
        finally:
            proc.kill()
            proc.wait(timeout=30)
        self.assertFalse(os.path.exists(f"{killed_dir}/final.weights.h5"))

        rerun = run_cli("tfpar.train", *RUN_FLAGS, data, f"--model_dir={killed_dir}",
                        f"--metrics_json={work}/m.json")
        self.assertEqual(rerun.returncode, 0, rerun.stderr[-2000:])
        with open(f"{work}/m.json") as f:
            metrics = json.load(f)
        self.assertGreaterEqual(metrics["resumed_from_step"], 4)
        self.assertLess(metrics["resumed_from_step"], STEPS)
        self.assertLen(metrics["step_losses"], STEPS - metrics["resumed_from_step"])
        expected = read_weights(f"{work}/straight/final.weights.h5")
        actual = read_weights(f"{killed_dir}/final.weights.h5")
        self.assertEqual(expected.keys(), actual.keys())
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)

    def assertResumesToTheSameWeights(self, run):
        """Trains `run` straight, and interrupted after its backup of step 2 then resumed:
        the same losses after step 2 and the same final weights."""
        work = self.create_tempdir().full_path
        straight = self.train(run.replace(model_dir=f"{work}/straight"))
        expected = weights_of(straight.model)

        def interrupt(batch, logs):
            if batch == 2:  # after the backup of step 2
                raise KeyboardInterrupt
        with self.assertRaises(KeyboardInterrupt):
            self.train(run.replace(model_dir=f"{work}/resumed"),
                       extra_callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=interrupt)])
        resumed = self.train(run.replace(model_dir=f"{work}/resumed"))
        self.assertEqual(resumed.metrics["resumed_from_step"], 2)
        self.assertLossesClose(straight.metrics["step_losses"][2:], resumed.metrics["step_losses"], rtol=1e-6)
        self.assertSameWeights(expected, resumed.model, rtol=1e-6, atol=1e-7)

    def test_an_interrupted_run_with_dropout_resumes_to_the_same_weights(self):
        """The dropout layers' random state is backed up: the masks after a resume are the same."""
        run = tiny_run(steps=4, backup_every_steps=2, model_dir="unused")
        self.assertResumesToTheSameWeights(run.replace(model=dataclasses.replace(run.model, dropout=0.2)))

    @parameterized.named_parameters(
        ("dtensor", "dtensor", 4, dict(mesh="batch:2,model:2"), 0.0),
        ("pipeline_1f1b", "pipeline", 2, dict(pipeline_stages=2, num_microbatches=2, pipeline_schedule="1f1b"), 0.0),
        ("mirrored_dropout", "mirrored", 2, {}, 0.2))  # each replica's own masks (ReplicaDropoutTest)
    def test_an_interrupted_run_resumes_to_the_same_weights_under(self, strategy, devices, parallel, dropout):
        """Backups hold sharded (dtensor) and stage-placed (pipeline) variables and optimizer slots,
        and the dropout state that mirrored replicas offset during a step."""
        run = tiny_run(strategy, devices_count=devices, parallel=parallel, steps=4, backup_every_steps=2,
                       model_dir="unused")
        self.assertResumesToTheSameWeights(run.replace(model=dataclasses.replace(run.model, dropout=dropout)))

    def test_steps_skipped_by_loss_scaling_count_as_trained(self):
        """mixed_float16's LossScaleOptimizer skips overflowing steps without advancing
        `optimizer.iterations`; backups and the resume point count fit's steps."""
        work = self.create_tempdir().full_path
        init = keras.optimizers.LossScaleOptimizer.__init__

        def overflowing(optimizer, inner, initial_scale=None, **kwargs):
            init(optimizer, inner, initial_scale=2.0 ** 20, **kwargs)  # every step here overflows
        run = tiny_run(steps=4, backup_every_steps=2, model_dir=work, mixed_precision="mixed_float16")
        with mock.patch.object(keras.optimizers.LossScaleOptimizer, "__init__", overflowing):
            first = self.train(run)
            self.assertEqual(int(first.model.optimizer.iterations.numpy()), 0)  # all 4 skipped
            rerun = self.train(run)
        self.assertEqual(sorted(os.listdir(f"{work}/backup")),
                         ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
                          "ckpt-4.data-00000-of-00001", "ckpt-4.index"])
        self.assertEqual((rerun.metrics["resumed_from_step"], rerun.metrics["step_losses"]), (4, []))

    def test_the_last_step_is_backed_up_off_the_interval(self):
        """Rerunning a finished run (5 steps, backups every 2) restores step 5 and trains nothing."""
        work = self.create_tempdir().full_path
        first = self.train(tiny_run(model_dir=work, steps=5, backup_every_steps=2))
        rerun = self.train(tiny_run(model_dir=work, steps=5, backup_every_steps=2))
        self.assertEqual(rerun.metrics["resumed_from_step"], 5)
        self.assertEqual(rerun.metrics["step_losses"], [])
        for expected, actual in zip(first.model.get_weights(), rerun.model.get_weights(), strict=True):
            np.testing.assert_array_equal(actual, expected)
        # Fewer steps than the saved run (2 epochs of 2): still nothing to train, no step added.
        shorter = self.train(tiny_run(model_dir=work, steps=2, epochs=2, backup_every_steps=2))
        self.assertEqual((shorter.metrics["resumed_from_step"], shorter.metrics["step_losses"]), (5, []))
        self.assertEqual(tf.train.latest_checkpoint(f"{work}/backup"), f"{work}/backup/ckpt-5")

    def test_profile_steps_count_from_the_runs_first_step_across_a_resume(self):
        work = self.create_tempdir().full_path
        self.train(tiny_run(model_dir=work, steps=4))
        resumed = self.train(tiny_run(model_dir=work, steps=4, epochs=2, profile_steps=(6, 7)))
        self.assertEqual(resumed.metrics["resumed_from_step"], 4)
        traces = tf.io.gfile.glob(f"{work}/logs/train/plugins/profile/*/*.xplane.pb")
        self.assertLen(traces, 1)  # steps 6..7 of the run: batches 2..3 of the resumed fit

    def test_step_scalars_count_the_runs_steps_across_a_mid_epoch_resume(self):
        """TensorBoard's step scalars count fit's steps, as backups do: mixed_float16's skipped
        steps included (they do not advance `optimizer.iterations`)."""
        work = self.create_tempdir().full_path
        init = keras.optimizers.LossScaleOptimizer.__init__

        def overflowing(optimizer, inner, initial_scale=None, **kwargs):
            init(optimizer, inner, initial_scale=2.0 ** 20, **kwargs)  # the first steps overflow
        with mock.patch.object(keras.optimizers.LossScaleOptimizer, "__init__", overflowing):
            self.train(tiny_run(model_dir=work, steps=2, mixed_precision="mixed_float16"))  # every 2 steps
            # 2 steps to finish epoch 1, then 4 in epoch 2; scalars every 4 steps
            self.train(tiny_run(model_dir=work, steps=4, epochs=2, mixed_precision="mixed_float16"))
        steps = sorted(event.step for path in tf.io.gfile.glob(f"{work}/logs/steps/events.*")
                       for event in tf.compat.v1.train.summary_iterator(path)
                       if any(v.tag == "step_loss" for v in event.summary.value))
        self.assertEqual(steps, [2, 4, 8])

    def test_a_resume_that_would_read_other_data_is_refused_and_changes_nothing(self):
        work = self.create_tempdir().full_path
        self.train(tiny_run(model_dir=work, steps=2))
        with open(f"{work}/config.json") as f:
            saved = f.read()
        for changes in (dict(global_batch_size=16), dict(seed=1), dict(optimizer="sgd"),
                        dict(weight_decay=0.0), dict(learning_rate=1e-2), dict(grad_clip_norm=0.5),
                        dict(eval_fraction=0.1)):  # held-out windows leave the training data
            run = tiny_run(model_dir=work, steps=4, **changes)
            if "seed" in changes:  # --seed sets both seeds, as tfpar-train does
                run = run.replace(data=dataclasses.replace(run.data, seed=1))
            with self.assertRaisesRegex(ValueError, "read other data or trained with other settings.*"
                                                    "accepted: .*a new --model_dir"):
                self.train(run)
            with open(f"{work}/config.json") as f:
                self.assertEqual(f.read(), saved, changes)
        with self.assertRaisesRegex(ValueError, "other settings.* Received: name='seq2seq'"):
            self.train(tiny_run(model_dir=work, steps=4, model="seq2seq"))
        with open(f"{work}/config.json") as f:
            self.assertEqual(f.read(), saved)
        legacy = json.loads(saved)
        del legacy["grad_clip_norm"]  # saved before tfpar clipped: those runs were not clipped
        with open(f"{work}/config.json", "w") as f:
            json.dump(legacy, f)
        with self.assertRaisesRegex(ValueError, "Received: grad_clip_norm=1.0; accepted: grad_clip_norm=0.0 as in"):
            self.train(tiny_run(model_dir=work, steps=4))
        del legacy["data"]["eval_fraction"]  # saved before tfpar held any text out: none was
        with open(f"{work}/config.json", "w") as f:
            json.dump(legacy, f)
        self.assertIsNone(driver._resume_refusal(tiny_run(model_dir=work, steps=4, grad_clip_norm=0)))  # pylint: disable=protected-access
        self.assertIn("Received: eval_fraction=0.1; accepted: eval_fraction=0.0 as in", driver._resume_refusal(  # pylint: disable=protected-access
            tiny_run(model_dir=work, steps=4, grad_clip_norm=0, eval_fraction=0.1)))
        # The default warmup is the one a run of the resumed length takes (4 steps: 3), not 20.
        with open(f"{work}/config.json", "w") as f:
            json.dump({**json.loads(saved), "warmup_steps": None}, f)
        with self.assertRaisesRegex(ValueError, "Received: warmup_steps=20; accepted: warmup_steps=3 as in"):
            self.train(tiny_run(model_dir=work, steps=4, warmup_steps=20))
        self.assertIsNone(driver._resume_refusal(tiny_run(model_dir=work, steps=4, warmup_steps=3)))  # pylint: disable=protected-access
        self.assertIsNone(driver._resume_refusal(tiny_run(model_dir=work, steps=40, warmup_steps=20)))  # pylint: disable=protected-access
        # What is evaluated is never trained on: another --eval_split may resume a run.
        resumed = json.loads(saved)
        resumed["data"]["eval_split"] = "validation"
        with open(f"{work}/config.json", "w") as f:
            json.dump(resumed, f)
        self.assertIsNone(driver._resume_refusal(tiny_run(model_dir=work, steps=4, grad_clip_norm=1.0)))  # pylint: disable=protected-access
        os.remove(f"{work}/config.json")  # e.g. a backup older than config.json: the restore refuses
        with self.assertRaisesRegex(ValueError, "another run"):
            self.train(tiny_run(model_dir=work, steps=4, model="seq2seq"))

    def test_a_resume_over_an_edited_text_file_is_refused(self):
        work = self.create_tempdir().full_path
        corpus = f"{work}/corpus.txt"
        with open(corpus, "w") as f:
            f.write("the first text " * 500)

        def run(steps):
            changed = tiny_run(model_dir=f"{work}/run", steps=steps)
            return changed.replace(data=dataclasses.replace(changed.data, dataset=f"text:{corpus}"))
        self.train(run(2))
        with open(corpus, "w") as f:
            f.write("another text " * 600)
        with self.assertRaisesRegex(ValueError, r"Received: data_source='text sha1:[0-9a-f]{16}'; accepted: "
                                                r"data_source='text sha1:[0-9a-f]{16}' as in"):
            self.train(run(4))

    def test_a_resume_under_another_pythons_builtin_text_is_refused(self):
        """pydoc's topics change between Python releases: the builtin corpus is hashed too."""
        work = self.create_tempdir().full_path
        self.train(tiny_run(model_dir=work, steps=2))
        sources._builtin_digest.cache_clear()  # pylint: disable=protected-access
        self.addCleanup(sources._builtin_digest.cache_clear)  # pylint: disable=protected-access
        with mock.patch.object(sources, "_builtin_text", return_value="another Python's topics " * 400):
            with self.assertRaisesRegex(ValueError, r"Received: data_source='tfpar_text 1.1.0 sha1:[0-9a-f]{16}'; "
                                                    r"accepted: data_source='tfpar_text 1.1.0 sha1:[0-9a-f]{16}'"):
                self.train(tiny_run(model_dir=work, steps=4))

    def test_a_damaged_backup_is_a_one_line_error_and_the_one_before_can_be_used(self):
        work = self.create_tempdir().full_path
        self.train(tiny_run(model_dir=work, steps=4, backup_every_steps=2))
        with open(f"{work}/backup/ckpt-4.data-00000-of-00001", "r+b") as f:
            f.truncate(100)
        with self.assertRaisesRegex(ValueError, r"^--model_dir's backup cannot be read \(damaged or "
                                                r"incomplete\)\. Received: backup=.*ckpt-4 .*delete .*ckpt-4\.\*"):
            self.train(tiny_run(model_dir=work, steps=4, epochs=2, backup_every_steps=2))
        for path in tf.io.gfile.glob(f"{work}/backup/ckpt-4.*"):  # as the error says
            os.remove(path)
        resumed = self.train(tiny_run(model_dir=work, steps=4, epochs=2, backup_every_steps=2))
        self.assertEqual(resumed.metrics["resumed_from_step"], 2)
        for path in tf.io.gfile.glob(f"{work}/backup/ckpt-*"):  # every backup gone: not a silent restart
            os.remove(path)
        with self.assertRaisesRegex(ValueError, r"cannot be read .*ckpt-8 \(its files are missing\)"):
            self.train(tiny_run(model_dir=work, steps=4, epochs=3, backup_every_steps=2))

    def test_a_backup_written_before_tfpar_counted_steps_resumes(self):
        """Backups without `steps_done` (and configs with the old default warmup, 20, and no hash
        of the builtin text) still resume."""
        work = self.create_tempdir().full_path
        first = self.train(tiny_run(model_dir=work, steps=2, warmup_steps=None))
        for path in tf.io.gfile.glob(f"{work}/backup/ckpt-2.*"):
            os.remove(path)
        legacy = tf.train.Checkpoint(model=first.model, optimizer=first.model.optimizer)  # as tfpar wrote it
        tf.train.CheckpointManager(legacy, f"{work}/backup", max_to_keep=2).save(checkpoint_number=2)
        with open(f"{work}/config.json") as f:
            saved = json.load(f)
        with open(f"{work}/config.json", "w") as f:
            json.dump({**saved, "warmup_steps": 20, "data_source": "tfpar_text 1.1.0"}, f)  # before the hash
        resumed = self.train(tiny_run(model_dir=work, steps=2, epochs=2, warmup_steps=None))
        self.assertEqual(resumed.metrics["resumed_from_step"], 2)
        self.assertLen(resumed.metrics["step_losses"], 2)

    def test_torn_checkpoint_write_keeps_the_last_good_one(self):
        work = self.create_tempdir().full_path
        losses = {}
        for name in ("clean", "torn"):
            self.train(tiny_run(model_dir=f"{work}/{name}", steps=4, backup_every_steps=2))
            if name == "torn":
                # A write that died after the data and index files but before the
                # `checkpoint` state file: the newest files on disk are garbage.
                for path in ("ckpt-6.data-00000-of-00001", "ckpt-6.index"):
                    with open(f"{work}/torn/backup/{path}", "wb") as f:
                        f.write(b"\0" * 10)
            resumed = self.train(tiny_run(model_dir=f"{work}/{name}", steps=6, backup_every_steps=2))
            self.assertEqual(resumed.metrics["resumed_from_step"], 4, name)
            losses[name] = resumed.metrics["step_losses"]
        self.assertLossesClose(losses["clean"], losses["torn"], rtol=1e-6)
        # tfpar-generate loads the run's final weights.
        loaded = generate.load_model(f"{work}/torn").get_weights()
        for expected, actual in zip(resumed.model.get_weights(), loaded, strict=True):
            np.testing.assert_array_equal(actual, expected)


class NonChiefAdapter(default_strategy.DefaultAdapter):
    """A worker that is not the chief (as under multi_worker), on one device."""

    @property
    def is_chief(self) -> bool:
        return False


class ChiefFilesTest(TestCase):

    def test_only_the_chief_writes_and_other_workers_leave_nothing(self):
        work = self.create_tempdir().full_path
        os.makedirs(f"{work}/tmp")
        run = tiny_run(steps=2, model_dir=f"{work}/model", metrics_json=f"{work}/metrics.json",
                       export_dir=f"{work}/export", backup_every_steps=1, data_dir=self.data_dir)
        with mock.patch.object(tempfile, "tempdir", f"{work}/tmp"), \
                mock.patch.object(tempfile, "mkdtemp", wraps=tempfile.mkdtemp) as mkdtemp:
            result = driver.train(run, adapter=NonChiefAdapter())
        self.assertLen(result.metrics["step_losses"], 2)
        self.assertEqual(sorted(os.listdir(work)), ["tmp"])  # no model_dir, metrics or export
        self.assertEqual([call.kwargs for call in mkdtemp.call_args_list], [{"prefix": "tfpar_worker_"}])
        # Its own backups went to that temporary directory, which is gone.
        self.assertEqual([name for name in os.listdir(f"{work}/tmp") if name.startswith("tfpar_worker_")], [])


class DeterminismTest(TestCase):

    def test_two_deterministic_runs_are_bitwise_equal(self):
        from tensorflow.python.framework import config as tf_config  # pylint: disable=import-outside-toplevel
        from tfpar import driver  # pylint: disable=import-outside-toplevel

        class Probe(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.during_fit = tf_config.is_op_determinism_enabled()

        # On CPUs every op is deterministic anyway: with dropout, the runs are equal only if
        # every replica's dropout masks are seeded too.
        for strategy, count in (("default", 0), ("mirrored", 2)):
            run = tiny_run(strategy, devices_count=count, deterministic=True, data_dir=self.data_dir)
            run = run.replace(model=dataclasses.replace(run.model, dropout=0.1))
            probe = Probe()
            a = driver.train(run, extra_callbacks=[probe])
            self.assertTrue(probe.during_fit, strategy)  # TF's op determinism on inside fit
            self.assertFalse(tf_config.is_op_determinism_enabled(), strategy)  # and off again
            if strategy == "mirrored":
                b = self.train(run)
                self.assertEqual(a.metrics["step_losses"], b.metrics["step_losses"])


class NonFiniteLossTest(TestCase):

    def test_stops_at_the_first_non_finite_step_and_keeps_the_good_backup(self):
        work = self.create_tempdir().full_path
        # The warmup's first steps are finite, then SGD at up to 1e9 blows up (not clipped).
        run = tiny_run(optimizer="sgd", learning_rate=1e9, warmup_steps=4, steps=8, grad_clip_norm=0.0,
                       model_dir=work, backup_every_steps=1)
        counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))
        steps = []
        with self.assertRaisesRegex(FloatingPointError, r"non-finite at step \d+") as raised:
            self.train(run, extra_callbacks=[counter])
        bad_step = int(re.search(r"step (\d+)", str(raised.exception)).group(1))
        self.assertGreater(bad_step, 2)
        self.assertLen(steps, bad_step)  # training stopped at that step
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        latest = tf.train.latest_checkpoint(f"{work}/backup")
        # The backup after step bad_step - 1 fed the non-finite loss: the one before it is kept.
        self.assertEqual(os.path.basename(latest), f"ckpt-{bad_step - 2}")
        reader = tf.train.load_checkpoint(latest)
        for name in reader.get_variable_to_shape_map():
            value = reader.get_tensor(name)
            if np.issubdtype(np.asarray(value).dtype, np.floating):
                self.assertTrue(np.all(np.isfinite(value)), name)
        self.assertFalse(os.path.exists(f"{work}/checkpoints"))  # no epoch ended with finite weights

    def test_non_finite_weights_after_the_last_update_are_not_kept(self):
        """The last step's update is seen by no loss: its backup and epoch weights are checked."""
        work = self.create_tempdir().full_path
        run = tiny_run(steps=4, model_dir=work, backup_every_steps=2)

        def poison(batch, logs):
            if batch == 3:  # as if the last update overflowed
                kernel = poisoner.model.trainable_variables[0]
                kernel.assign(np.full(kernel.shape, np.nan, "float32"))
        poisoner = keras.callbacks.LambdaCallback(on_train_batch_end=poison)
        with self.assertRaisesRegex(FloatingPointError, r"^weights became non-finite at step 4 "):
            self.train(run, extra_callbacks=[poisoner])
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        self.assertEqual(tf.train.latest_checkpoint(f"{work}/backup"), f"{work}/backup/ckpt-2")
        self.assertFalse(os.path.exists(f"{work}/checkpoints"))
        self.assertFalse(os.path.exists(f"{work}/final.weights.h5"))

    def test_cli_reports_the_step_in_one_line(self):
        result = run_cli("tfpar.train", "--strategy=default", "--model_size=tiny", "--optimizer=sgd",
                         "--learning_rate=1e9", "--grad_clip_norm=0", "--warmup_steps=0", "--steps_per_epoch=8", "--epochs=1",
                         "--global_batch_size=8", "--verbose=0", f"--data_dir={self.data_dir}")
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stderr.strip(), r"^tfpar: error: loss became non-finite at step \d+")
        self.assertLen(result.stderr.strip().splitlines(), 1)


class ExportAndPlanTest(TestCase):

    def test_export_loads_in_a_fresh_process_and_generates(self):
        export_dir = self.create_tempdir().full_path
        trained = self.train(tiny_run("mirrored", devices_count=2, export_dir=export_dir))
        script = (
            "import numpy as np, tensorflow as tf\n"
            f"m = tf.saved_model.load({export_dir + '/saved_model'!r})\n"
            "tokens = np.zeros((2, 32), np.int32); tokens[0, :3] = [84, 104, 101]\n"
            "tokens[1, :5] = [72, 101, 108, 108, 111]\n"
            "out = m.serve(tf.constant(tokens), tf.constant([3, 5]))\n"
            "print(*out['next_token'].numpy(), *out['next_token_logits'].numpy()[:, 0])\n"
            "try:\n    m.serve(tf.constant(tokens), tf.constant([0, 5]))\n"
            "except tf.errors.InvalidArgumentError as e:\n"
            "    print('REFUSED', *[l for l in e.message.splitlines() if l.startswith('assertion failed')])\n"
            "import keras, tfpar.models\n"
            f"k = keras.models.load_model({export_dir + '/model.keras'!r})\n"
            "print(float(k(tf.constant(tokens))[1, 4, 0]))\n")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=120, cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        refused = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
        self.assertLen(refused, 1, result.stdout)
        self.assertStartsWith(refused[0], "REFUSED assertion failed: [serve: lengths must be in [1, 32] (the count "
                                          "of real tokens in each row)] [Condition x >= y")
        *next_tokens, logit_0, logit_1, keras_logit = [
            word for line in result.stdout.splitlines() if line not in refused for word in line.split()]
        tokens = np.zeros((2, 32), np.int32)
        tokens[0, :3] = [84, 104, 101]
        tokens[1, :5] = [72, 101, 108, 108, 111]
        logits = trained.model(tokens).numpy()
        expected = [logits[0, 2], logits[1, 4]]  # each row at its own last token
        self.assertEqual([int(t) for t in next_tokens], [int(np.argmax(e)) for e in expected])
        self.assertAlmostEqual(float(logit_0), float(expected[0][0]), places=4)
        self.assertAlmostEqual(float(logit_1), float(expected[1][0]), places=4)
        self.assertAlmostEqual(float(keras_logit), float(expected[1][0]), places=4)

    def test_seq2seq_export_serves_the_decoders_next_token(self):
        export_dir = self.create_tempdir().full_path
        model = modeling.build_with(models.build(config_lib.model_config("seq2seq", "tiny")))
        export_lib.export(model, export_dir)
        served = tf.saved_model.load(f"{export_dir}/saved_model")
        rng = np.random.default_rng(0)
        source, target = rng.integers(0, 256, (2, 32), dtype=np.int32), rng.integers(0, 256, (2, 32), dtype=np.int32)
        out = served.serve(encoder_tokens=tf.constant(source), tokens=tf.constant(target), lengths=tf.constant([3, 32]))
        logits = model({"encoder_tokens": source, "decoder_tokens": target}).numpy()
        expected = np.stack([logits[0, 2], logits[1, 31]])
        np.testing.assert_allclose(out["next_token_logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["next_token"].numpy(), np.argmax(expected, axis=-1))
        bad_target = target.copy()
        bad_target[1, 0] = 264  # one past the vocabulary
        for lengths, decoder, text in (([3, 33], target, r"lengths must be in \[1, 32\]"),
                                       ([3], target, "one entry per row"),
                                       ([3, 32], bad_target, r"token ids must be in \[0, 264\)")):
            with self.assertRaisesRegex(tf.errors.InvalidArgumentError, text):
                served.serve(encoder_tokens=tf.constant(source), tokens=tf.constant(decoder),
                             lengths=tf.constant(lengths))

    def test_plan_figures(self):
        """Parameter, optimizer and activation bytes of the tiny models under `default`."""
        for name, layers in (("gpt", 2), ("seq2seq", 4)):  # seq2seq: encoder and decoder layers
            run = tiny_run(model=name, global_batch_size=8, grad_accum_steps=2)
            adapter = strategies.from_config(run.parallel)
            model = driver.build_model(run, adapter)
            figures = plan.make_plan(run, adapter, model)
            params = figures["params"]
            self.assertEqual(figures["per_device_param_bytes"], [4 * params], name)
            self.assertEqual(figures["per_device_optimizer_bytes"], [8 * params], name)  # AdamW: 2 slots
            self.assertEqual((figures["per_replica_batch_size"], figures["micro_batch_size"]), (8, 4))
            s, h, a = run.model.seq_len, run.model.d_model, run.model.num_heads  # Megatron's per layer, fp32
            expected = layers * s * 4 * h * (34 + 5 * a * s / h) * 4 / 2
            self.assertEqual(figures["estimated_activation_bytes_per_replica"], int(expected), name)
            self.assertNotIn("grad_reduce_dtype", figures)  # multi_worker's only
        run = tiny_run("multi_worker", parallel=dict(grad_reduce_dtype="bfloat16"))
        adapter = strategies.from_config(run.parallel)
        figures = plan.make_plan(run, adapter, driver.build_model(run, adapter))
        self.assertEqual(figures["grad_reduce_dtype"], "bfloat16")

    def test_plan_only_prints_the_plan_and_does_not_train(self):
        result = run_cli("tfpar.train", "--plan_only", "--strategy=mirrored", "--num_virtual_devices=2",
                         "--model_size=tiny", "--global_batch_size=8", "--grad_accum_steps=2",
                         f"--data_dir={self.data_dir}", f"--metrics_json={self.create_tempdir().full_path}/plan.json",
                         timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        for text in ("num_replicas: 2", "per_replica_batch_size: 4", "micro_batch_size: 2",
                     "per_device_param_bytes", "estimated_activation_bytes_per_replica"):
            self.assertIn(text, result.stdout)
        self.assertNotIn("Epoch", result.stdout)
        metrics_json = re.search(r"--metrics_json=(\S+)", " ".join(result.args)).group(1)
        with open(metrics_json) as f:
            plan = json.load(f)["plan"]  # the plan, as printed
        self.assertEqual((plan["num_replicas"], plan["per_replica_batch_size"], plan["micro_batch_size"]), (2, 4, 2))


if __name__ == "__main__":
    absltest.main()
