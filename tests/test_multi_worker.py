"""Multi-worker data parallelism: TF_CONFIG validation, launcher, equivalence, fail-fast.

Worker processes run as subprocesses on 127.0.0.1; this module itself never
imports TensorFlow. The subprocess tests take about two minutes on 2 cores.
"""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import psutil

from tests.checkpoint_files import latest_backup_step
from tfpar import cluster
from tfpar import launch

# No warmup: every loss after the first depends on the gradients.
TINY = ("--model_size=tiny", "--global_batch_size=8", "--steps_per_epoch=4", "--epochs=1",
        "--warmup_steps=0", "--verbose=0")
# SGD: a gradient scaled by a constant (a wrong all-reduce) changes the losses; Adam would hide it.
SGD = ("--optimizer=sgd", "--learning_rate=0.3")
HELD_OUT = ("--eval_fraction=0.1", "--eval_steps=2")  # each worker evaluates its shard of the batches
TIMEOUT = 300
_W = '"cluster": {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}'


class TFConfigTest(parameterized.TestCase):
    """Bad TF_CONFIG values raise a one-line ValueError; good ones parse."""

    @parameterized.named_parameters(
        ("malformed_json", '{"cluster": ', "malformed JSON"),
        ("not_an_object", "[1, 2]", "must be a JSON object"),
        ("missing_cluster", '{"task": {"type": "worker", "index": 0}}', "missing 'cluster'"),
        ("empty_cluster", '{"cluster": {}, "task": {"type": "worker", "index": 0}}', "non-empty"),
        ("missing_task", "{" + _W + "}", "missing task type"),
        ("missing_task_type", "{" + _W + ', "task": {"index": 0}}', "missing task type"),
        ("unknown_task_type", "{" + _W + ', "task": {"type": "master", "index": 0}}',
         "unknown task type"),
        ("unknown_job", '{"cluster": {"master": ["a:1"]}, "task": {"type": "worker", "index": 0}}',
         "unknown job name"),
        ("task_type_not_in_cluster", "{" + _W + ', "task": {"type": "chief", "index": 0}}',
         "has no job"),
        ("index_out_of_range", "{" + _W + ', "task": {"type": "worker", "index": 2}}',
         "out of range"),
        ("index_negative", "{" + _W + ', "task": {"type": "worker", "index": -1}}', "out of range"),
        ("index_string", "{" + _W + ', "task": {"type": "worker", "index": "0"}}', "not an integer"),
        ("index_float", "{" + _W + ', "task": {"type": "worker", "index": 0.5}}', "not an integer"),
        ("index_bool", "{" + _W + ', "task": {"type": "worker", "index": true}}', "not an integer"),
        ("index_missing", "{" + _W + ', "task": {"type": "worker"}}', "not an integer"),
        ("port_not_a_number", '{"cluster": {"worker": ["h:22a"]}, "task": {"type": "worker", "index": 0}}',
         "numeric port"),
        ("no_port", '{"cluster": {"worker": ["h"]}, "task": {"type": "worker", "index": 0}}',
         "numeric port"),
        ("addresses_not_a_list", '{"cluster": {"worker": "h:1"}, "task": {"type": "worker", "index": 0}}',
         "non-empty list"),
        ("two_chiefs", '{"cluster": {"chief": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
         "at most one chief"),
        ("one_address_twice", '{"cluster": {"chief": ["a:1"], "worker": ["b:2", "a:1"]}, '
         '"task": {"type": "chief", "index": 0}}', 'more than one task. Received: ["a:1"]'),
    )
    def test_bad_tf_config_raises_one_line(self, text, expected):
        with self.assertRaises(ValueError) as raised:
            cluster.parse_tf_config(text)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(expected, message)
        self.assertIn("Received:", message)
        self.assertIn("accepted:", message)

    @parameterized.named_parameters(
        ("worker0_without_chief", {"worker": ["a:1", "b:2"]}, "worker", 0, 2, True),
        ("worker1_without_chief", {"worker": ["a:1", "b:2"]}, "worker", 1, 2, False),
        ("chief", {"chief": ["c:1"], "worker": ["a:1", "b:2"]}, "chief", 0, 3, True),
        ("worker0_with_chief", {"chief": ["c:1"], "worker": ["a:1"]}, "worker", 0, 2, False),
        ("evaluator", {"worker": ["a:1"], "evaluator": ["e:1"]}, "evaluator", 0, 1, False),
    )
    def test_good_tf_config(self, jobs, task_type, index, num_workers, is_chief):
        spec = cluster.parse_tf_config(json.dumps(
            {"cluster": jobs, "task": {"type": task_type, "index": index}}))
        self.assertEqual((spec.task_type, spec.task_index), (task_type, index))
        self.assertEqual(spec.num_workers, num_workers)
        self.assertEqual(spec.is_chief, is_chief)

    def test_slurm_only_inside_an_srun_step(self):
        without_tf_config = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CONFIG", "SLURM_"))}
        with mock.patch.dict(os.environ, {**without_tf_config, "SLURM_JOB_ID": "7"}, clear=True):
            self.assertIsNone(cluster.cluster_resolver())  # e.g. one process in an salloc shell
        # An srun step whose variables are incomplete: one line, not TF's RuntimeError.
        with mock.patch.dict(os.environ, {**without_tf_config, "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"},
                             clear=True), self.assertRaisesRegex(ValueError, r"^the Slurm job's cluster "
                                                                 r"could not be resolved\. Received: "):
            cluster.spec_from_resolver(cluster.cluster_resolver())

    def test_tf_config_for_and_free_ports(self):
        ports = cluster.free_ports(3)
        self.assertLen(set(ports), 3)
        hosts = [f"127.0.0.1:{p}" for p in ports]
        spec = cluster.parse_tf_config(cluster.tf_config_for(hosts, 2))
        self.assertEqual(spec.cluster, {"worker": tuple(hosts)})
        self.assertEqual((spec.task_index, spec.num_workers, spec.is_chief), (2, 3, False))
        with self.assertRaisesRegex(ValueError, "out of range"):
            cluster.tf_config_for(hosts, 3)

    def test_local_workers_share_the_cores_unless_the_user_chose(self):
        share = str(max(1, cluster.local_cores() // 2))
        pools = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
        unset = {k: v for k, v in os.environ.items() if k not in pools}
        with mock.patch.dict(os.environ, unset, clear=True):
            envs = launch.local_launcher(2, []).envs
        self.assertEqual([(env[pools[0]], env[pools[1]]) for env in envs], [(share, share)] * 2)
        with mock.patch.dict(os.environ, {**unset, pools[1]: "7"}, clear=True):
            envs = launch.local_launcher(2, []).envs
        self.assertEqual([(env[pools[0]], env[pools[1]]) for env in envs], [(share, "7")] * 2)
        self.assertEqual([cluster.parse_tf_config(env["TF_CONFIG"]).task_index for env in envs],
                         [0, 1])


def _launch_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "tfpar.launch", *args], capture_output=True,
                          text=True, timeout=timeout)


class LauncherCliTest(parameterized.TestCase):
    """Fast checks of tfpar-launch's flags (no worker is started)."""

    def test_print_tf_config_one_per_host(self):
        result = _launch_cli("--print_tf_config", "--hosts=h1:2222,h2:2223")
        self.assertEqual(result.returncode, 0, result.stderr)
        *exports, command = result.stdout.splitlines()
        self.assertLen(exports, 2)
        for i, line in enumerate(exports):
            spec = cluster.parse_tf_config(line.split("'")[1])
            self.assertEqual((spec.task_type, spec.task_index), ("worker", i))
            self.assertEqual(dict(spec.cluster), {"worker": ("h1:2222", "h2:2223")})
        self.assertEqual(command.split("  #")[0], "tfpar-train --strategy=multi_worker --num_virtual_devices=0")
        result = _launch_cli("--print_tf_config", "--hosts=h1:2222,h2:2223", "--", "--model_dir=/runs/my run")
        self.assertEqual(result.stdout.splitlines()[-1].split("  #")[0],
                         "tfpar-train --strategy=multi_worker --num_virtual_devices=0 '--model_dir=/runs/my run'")

    def test_communication_reaches_the_strategy(self):
        code = ("from tfpar import strategies; "
                "print(strategies.get('multi_worker', communication='ring')"
                ".strategy.extended._communication_options.implementation.name)")
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                                env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=False)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertEqual(result.stdout.split()[-1], "RING")

    def test_kubernetes_manifest(self):
        result = _launch_cli("--print_tf_config", "--kubernetes", "--hosts=a:1,b:2", "--",
                             "--model_size=tiny")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("kind: TFJob", result.stdout)
        self.assertIn("replicas: 2", result.stdout)
        command = next(line for line in result.stdout.splitlines() if line.strip().startswith("command:"))
        self.assertEqual(json.loads(command.split(":", 1)[1]),
                         ["tfpar-train", "--strategy=multi_worker", "--num_virtual_devices=0", "--model_size=tiny"])

    def test_printed_configs_do_not_check_paths_here(self):
        for train_flags in (
                ("--dataset=text:/only/on/the/hosts.txt", "--num_virtual_devices=1",
                 "--model_dir=/only/on/the/hosts"),
                # the flag file (on the hosts) may hold the --model_dir that backups need
                ("--flagfile=/only/on/the/hosts.flags", "--backup_every_steps=100")):
            result = _launch_cli("--print_tf_config", "--hosts=h1:2222,h2:2223", "--", *train_flags)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertLen(result.stdout.splitlines(), 3)
        # `-flagfile PATH` (two words) is one flag, read on the hosts
        result = _launch_cli("--print_tf_config", "--hosts=h1:2222,h2:2223", "--", "-flagfile", "/only/on/hosts")
        self.assertEqual(result.returncode, 0, result.stderr)

    @parameterized.named_parameters(
        ("bad_port", ("--print_tf_config", "--hosts=h1:x"), "port"),
        ("one_address_twice", ("--print_tf_config", "--hosts=h1:2222,h1:2222"),
         'more than one task. Received: ["h1:2222"]'),
        ("unknown_flag", ("--bogus",), "bogus"),
        ("zero_workers", ("--num_workers=0",), "--num_workers must be >= 1"),
        ("other_strategy", ("--", "--strategy=mirrored"), "strategy"),
        ("printed_with_a_bad_train_flag", ("--print_tf_config", "--hosts=a:1,b:2", "--", "--model_size=huge"),
         "model_size"),
        ("printed_with_a_flag_file_and_another_strategy",
         ("--print_tf_config", "--hosts=a:1,b:2", "--", "-flagfile", "/only/on/hosts", "--strategy=mirrored"),
         "Received: strategy=mirrored"),
        ("printed_with_a_flag_file_and_a_bad_value",
         ("--print_tf_config", "--hosts=a:1,b:2", "--", "--flagfile=/only/on/hosts", "--model_size=huge"),
         "model_size"),
        ("printed_with_a_value_that_looks_like_a_flag_file",
         ("--print_tf_config", "--hosts=a:1,b:2", "--", "--model_dir", "flagfile_runs", "--strategy=mirrored"),
         "Received: strategy=mirrored"),
    )
    def test_bad_input_exits_2_with_one_line(self, args, text):
        result = _launch_cli(*args)
        self.assertEqual(result.returncode, 2)
        self.assertLen(result.stderr.strip().splitlines(), 1, result.stderr)
        self.assertIn(text, result.stderr)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class LauncherSignalTest(absltest.TestCase):
    """The launcher's workers end with it: on SIGTERM, on SIGKILL, and at its timeout."""

    SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
    SCRIPT = textwrap.dedent("""
        import sys
        from tfpar import launch
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
        launcher = launch.local_launcher(2, [], commands=[sleeper, sleeper], grace_seconds=1.0)
        launcher.start()
        print(" ".join(str(p.pid) for p in launcher.procs), flush=True)
        sys.exit(launcher.wait())
        """)

    def start_launcher(self):
        # A SIGKILLed launcher cannot delete its workers' TMPDIR: keep it in the test's directory.
        env = {**os.environ, "TMPDIR": self.create_tempdir().full_path}
        proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], stdout=subprocess.PIPE, text=True,
                                env=env)
        self.addCleanup(proc.wait, timeout=30)
        self.addCleanup(proc.kill)
        pids = [int(pid) for pid in proc.stdout.readline().split()]
        self.assertLen(pids, 2)
        for pid in pids:
            self.addCleanup(lambda pid=pid: _running(pid) and os.kill(pid, signal.SIGKILL))
        return proc, pids

    @staticmethod
    def catches(pid: int, signum: int) -> bool:
        """Whether process `pid` has a handler for `signum` (Linux: SigCgt in /proc)."""
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
        return bool(int(caught, 16) >> (signum - 1) & 1)

    def test_a_child_that_asks_dies_with_its_parent(self):
        """tfpar-bench's cells: the child itself asks Linux for a signal when the bench dies."""
        child = ("from tfpar import cluster; import signal, time; "
                 "cluster.die_with_parent(signal.SIGKILL); print('ready', flush=True); time.sleep(60)")
        parent = ("import os, subprocess, sys; from tfpar import cluster; "
                  f"child = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, "
                  "env={**os.environ, cluster.PARENT_PID_ENV: str(os.getpid())}); "
                  "child.stdout.readline(); print(child.pid, flush=True)")  # then the parent exits
        result = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertStopped([int(result.stdout.split()[-1])])

    def assertStopped(self, pids, within=10.0):
        deadline = time.monotonic() + within
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([pid for pid in pids if _running(pid)], [])

    def test_sigterm_is_forwarded_and_exits_143(self):
        proc, pids = self.start_launcher()
        deadline = time.monotonic() + 10
        while not self.catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.02)  # until wait() has installed its handler
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=15), 128 + signal.SIGTERM)
        self.assertStopped(pids)

    def test_a_killed_launcher_leaves_no_worker(self):
        proc, pids = self.start_launcher()
        proc.kill()
        proc.wait(timeout=15)
        self.assertStopped(pids)

    def test_workers_left_running_after_one_finished_are_stopped(self):
        launcher = launch.local_launcher(2, [], commands=[[sys.executable, "-c", "pass"], self.SLEEPER],
                                         grace_seconds=0.5, finish_timeout=1.0, out=io.StringIO())
        launcher.start()
        self.addCleanup(launcher.stop, 0.0)
        with mock.patch("sys.stderr", io.StringIO()) as stderr:
            self.assertEqual(launcher.wait(timeout=60), 1)
        self.assertIn("worker 0 finished", stderr.getvalue())
        self.assertIn("worker(s) 1 still run", stderr.getvalue())
        self.assertIsNotNone(launcher.procs[1].poll())

    def test_killed_workers_temporary_files_are_deleted(self):
        writer = [sys.executable, "-c", "import tempfile, time; "
                  "print(tempfile.mkdtemp(prefix='tfpar_worker_'), flush=True); time.sleep(120)"]
        out = io.StringIO()
        launcher = launch.local_launcher(2, [], commands=[writer] * 2, grace_seconds=0.5, out=out)
        launcher.start()
        self.addCleanup(launcher.stop, 0.0)
        deadline = time.monotonic() + 30
        while out.getvalue().count("tfpar_worker_") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        made = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
        self.assertLen(made, 2)
        for path in made:  # in the launcher's directory, not the system's
            self.assertEqual(os.path.dirname(path), launcher.tmp_dir)
            self.assertTrue(os.path.isdir(path))
        with mock.patch("sys.stderr", io.StringIO()):
            self.assertEqual(launcher.wait(timeout=0.1), 124)  # SIGTERM, then SIGKILL
        self.assertFalse(os.path.exists(launcher.tmp_dir))

    def test_timeout_stops_the_workers_with_124(self):
        launcher = launch.local_launcher(2, [], commands=[self.SLEEPER] * 2, grace_seconds=0.5,
                                         out=io.StringIO())
        launcher.start()
        self.addCleanup(launcher.stop, 0.0)
        with mock.patch("sys.stderr", io.StringIO()):
            self.assertEqual(launcher.wait(timeout=0.5), 124)
        self.assertEqual([p.poll() is None for p in launcher.procs], [False, False])


class MultiWorkerProcessTest(absltest.TestCase):
    """2 workers on loopback: same losses as mirrored, user models, fail-fast."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # Prepare the TFDS directory once, so that workers only read it (they
        # would otherwise prepare it one after another under sources.py's lock).
        cls.data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")
        code = ("from tfpar import config, sources; "
                f"sources.text_dataset(config.DataConfig(data_dir={cls.data_dir!r}))")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       timeout=TIMEOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    def setUp(self):
        super().setUp()
        self.tmp = self.create_tempdir().full_path
        # Everything the launchers and workers put in TMPDIR lands in the test's directory.
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": self.tmp}
        self.procs = []

    def tearDown(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        super().tearDown()

    def data_flag(self):
        return f"--data_dir={self.data_dir}"

    def launch_two_workers(self, *extra_flags) -> dict:
        """Trains TINY on 2 local workers; returns the chief's metrics JSON."""
        workers_json = os.path.join(self.tmp, "multi_worker.json")
        result = subprocess.run(
            [sys.executable, "-m", "tfpar.launch", "--num_workers=2", "--", *TINY, self.data_flag(),
             *extra_flags, f"--metrics_json={workers_json}"],
            capture_output=True, text=True, timeout=TIMEOUT, env=self.env)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        for i in range(2):
            self.assertIn(f"[worker {i}] tfpar: final loss", result.stdout)
        with open(workers_json) as f:
            workers = json.load(f)
        self.assertEqual((workers["strategy"], workers["num_replicas"]), ("multi_worker", 2))
        self.assertLen(workers["step_losses"], 4)
        return workers

    _mirrored_metrics = None

    def mirrored_losses(self):
        """The per-step losses of `mirrored` over 2 virtual devices with SGD and held-out
        evaluation (trained once)."""
        if MultiWorkerProcessTest._mirrored_metrics is None:
            reference_json = os.path.join(self.tmp, "mirrored.json")
            result = subprocess.run(
                [sys.executable, "-m", "tfpar.train", "--strategy=mirrored", "--num_virtual_devices=2",
                 *TINY, *SGD, *HELD_OUT, self.data_flag(), f"--metrics_json={reference_json}"],
                capture_output=True, text=True, timeout=TIMEOUT, env=self.env)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            with open(reference_json) as f:
                MultiWorkerProcessTest._mirrored_metrics = json.load(f)
        return MultiWorkerProcessTest._mirrored_metrics["step_losses"]

    def test_two_workers_equal_mirrored_over_two_devices(self):
        expected = self.mirrored_losses()
        workers = self.launch_two_workers(*SGD, *HELD_OUT)
        self.assertEqual(workers["grad_reduce_dtype"], "float32")
        self.assertGreater(expected[0] - expected[-1], 0.1, expected)
        np.testing.assert_allclose(workers["step_losses"], expected, rtol=1e-5)
        # The norm of the gradient summed over both workers, as over both devices.
        np.testing.assert_allclose(workers["grad_norms"], self._mirrored_metrics["grad_norms"], rtol=1e-5)
        self.assertLen(workers["val_losses"], 1)  # the held-out loss over both workers' batches
        np.testing.assert_allclose(workers["val_losses"], self._mirrored_metrics["val_losses"], rtol=1e-5)

    def test_two_workers_sum_gradients_in_bfloat16(self):
        """Half the bytes between workers; the rounded sums keep the losses near float32's."""
        expected = self.mirrored_losses()
        workers = self.launch_two_workers(*SGD, *HELD_OUT, "--grad_reduce_dtype=bfloat16")
        self.assertEqual(workers["grad_reduce_dtype"], "bfloat16")
        # 5.2e-5 measured (2026-11-27); README: within ~5e-5 over 200 steps
        np.testing.assert_allclose(workers["step_losses"], expected, rtol=2e-4)
        self.assertFalse(np.allclose(workers["step_losses"], expected, rtol=1e-7, atol=0))  # rounded sums

    def test_user_functional_model_fits_under_two_workers(self):
        script = os.path.join(self.tmp, "user_worker.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent("""
                import json
                import tfpar  # sets KERAS_BACKEND
                import keras
                import numpy as np
                from tfpar import strategies

                adapter = strategies.get("multi_worker")  # before anything starts TF
                keras.utils.set_random_seed(1)
                x = np.random.default_rng(0).normal(size=(48, 8)).astype("float32")
                y = (x @ np.arange(8, dtype="float32"))[:, None]
                with adapter.scope():
                    inputs = keras.Input((8,))
                    hidden = keras.layers.Dense(16, activation="relu")(inputs)
                    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
                    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                                  metrics=["mae"])
                losses = []
                record = keras.callbacks.LambdaCallback(
                    on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
                model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[record])
                print("RESULT " + json.dumps({"replicas": adapter.num_replicas,
                                              "chief": adapter.is_chief, "losses": losses}))
            """))
        out = io.StringIO()
        launcher = launch.local_launcher(2, [], commands=[[sys.executable, script]] * 2, out=out)
        launcher.start()
        status = launcher.wait(timeout=TIMEOUT)
        self.assertEqual(status, 0, out.getvalue()[-3000:])
        results = {}
        for line in out.getvalue().splitlines():
            if " RESULT " in line:
                worker = int(line.split("]")[0].split()[-1])
                results[worker] = json.loads(line.split(" RESULT ", 1)[1])
        self.assertEqual(sorted(results), [0, 1], out.getvalue()[-3000:])
        self.assertEqual([results[0]["chief"], results[1]["chief"]], [True, False])
        self.assertEqual(results[0]["replicas"], 2)
        self.assertLen(results[0]["losses"], 3)
        np.testing.assert_allclose(results[1]["losses"], results[0]["losses"], rtol=1e-6)
        # The same script without TF_CONFIG trains as one local worker, same global batches.
        env = {k: v for k, v in self.env.items() if k != "TF_CONFIG"}
        single = subprocess.run([sys.executable, script], capture_output=True, text=True,
                                timeout=TIMEOUT, env=env)
        self.assertEqual(single.returncode, 0, single.stderr[-3000:])
        reference = json.loads(single.stdout.split("RESULT ", 1)[1])
        self.assertEqual(reference["replicas"], 1)
        np.testing.assert_allclose(results[0]["losses"], reference["losses"], rtol=1e-5)

    def test_workers_that_restore_different_steps_or_refuse_do_not_train(self):
        """A worker that cannot read the chief's --model_dir (no shared filesystem) would start
        over, and one that refuses the saved run would stop, leaving the others waiting in a
        collective: every worker refuses instead."""
        flags = [*TINY, self.data_flag(), "--nojit_compile"]
        chief_dir, other_dir = os.path.join(self.tmp, "chief"), os.path.join(self.tmp, "other")
        first = subprocess.run(  # one local worker: a backup at step 4
            [sys.executable, "-m", "tfpar.train", "--strategy=multi_worker", *flags,
             f"--model_dir={chief_dir}"], capture_output=True, text=True, timeout=TIMEOUT, env=self.env)
        self.assertEqual(first.returncode, 0, first.stderr[-3000:])
        out = io.StringIO()
        with mock.patch.dict(os.environ, {"TF_CPP_MIN_LOG_LEVEL": "3"}):
            launcher = launch.local_launcher(2, [], out=out, commands=[
                launch.worker_command([*flags, "--epochs=2", f"--model_dir={path}"])
                for path in (chief_dir, other_dir)])
        launcher.start()
        self.addCleanup(launcher.stop, 0.0)
        with mock.patch("sys.stderr", io.StringIO()):
            self.assertEqual(launcher.wait(timeout=TIMEOUT), 2, out.getvalue()[-3000:])
        for i in range(2):
            self.assertIn(f"[worker {i}] tfpar: error: multi_worker: the workers would resume from different "
                          "steps of --model_dir's backup, so they cannot train in step. Received: backup steps 4, none",
                          out.getvalue())

        # The same backup, but worker 0 asks for another learning rate: it refuses, and so does
        # worker 1, which would otherwise wait for worker 0 in its first collective (on a
        # cluster without tfpar-launch to stop it).
        out = io.StringIO()
        with mock.patch.dict(os.environ, {"TF_CPP_MIN_LOG_LEVEL": "3"}):
            launcher = launch.local_launcher(2, [], out=out, commands=[
                launch.worker_command([*flags, "--epochs=2", f"--model_dir={chief_dir}", *lr])
                for lr in (["--learning_rate=0.5"], [])])
        launcher.start()
        self.addCleanup(launcher.stop, 0.0)
        with mock.patch("sys.stderr", io.StringIO()):
            self.assertEqual(launcher.wait(timeout=TIMEOUT), 2, out.getvalue()[-3000:])
        self.assertIn("[worker 0] tfpar: error: --model_dir holds a run that read other data or trained with "
                      "other settings, so this run cannot resume it. Received: learning_rate=0.5", out.getvalue())
        self.assertIn("[worker 1] tfpar: error: multi_worker: another worker refused to resume --model_dir's "
                      "run (its error says why), so no worker trains. Received: a refusal from worker 0;",
                      out.getvalue())

    def test_killed_worker_fails_fast_and_rerun_resumes_exactly(self):
        run_flags = ["--model_size=tiny", "--global_batch_size=8", "--steps_per_epoch=40", "--epochs=2",
                     "--backup_every_steps=8", "--verbose=0", self.data_flag(),
                     "--nojit_compile"]  # resume is the subject; XLA with workers: the equivalence test

        def launch_command(model_dir, *extra):
            return [sys.executable, "-m", "tfpar.launch", "--num_workers=2", "--grace_seconds=2", "--",
                    *run_flags, f"--model_dir={model_dir}", *extra]

        straight_dir, killed_dir = os.path.join(self.tmp, "straight"), os.path.join(self.tmp, "killed")
        straight = subprocess.run(launch_command(straight_dir), capture_output=True, text=True,
                                  timeout=TIMEOUT, env=self.env)
        self.assertEqual(straight.returncode, 0, straight.stdout[-3000:] + straight.stderr[-3000:])

        log_path = os.path.join(self.tmp, "killed.log")
        with open(log_path, "w") as log:
            launcher = subprocess.Popen(launch_command(killed_dir), stdout=log, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)
        self.procs.append(launcher)
        deadline = time.monotonic() + TIMEOUT
        backup = os.path.join(killed_dir, "backup")
        while time.monotonic() < deadline and latest_backup_step(backup) < 16 and launcher.poll() is None:
            time.sleep(0.02)
        self.assertGreaterEqual(latest_backup_step(backup), 16, "no backup appeared")
        descendants = psutil.Process(launcher.pid).children(recursive=True)
        workers = {json.loads(p.environ()["TF_CONFIG"])["task"]["index"]: p
                   for p in descendants if "tfpar.train" in " ".join(p.cmdline())}
        self.assertLen(workers, 2)
        workers[1].send_signal(signal.SIGKILL)  # mid-epoch 0 or 1, before step 80
        killed_at = time.monotonic()
        status = launcher.wait(timeout=60)
        self.assertLess(time.monotonic() - killed_at, 60)
        self.assertNotEqual(status, 0)
        _, alive = psutil.wait_procs(descendants, timeout=5)
        self.assertEmpty(alive)
        self.assertFalse(os.path.exists(os.path.join(killed_dir, "final.weights.h5")))
        with open(log_path) as log:
            self.assertIn("worker 1 exited with status 137; stopping the others", log.read())
        # The killed worker's temporary backup directory went with the launcher's.
        self.assertEqual([n for n in os.listdir(self.tmp) if n.startswith(("tfpar_launch_", "tfpar_worker_"))],
                         [])

        metrics_path = os.path.join(self.tmp, "resumed.json")
        rerun = subprocess.run(launch_command(killed_dir, f"--metrics_json={metrics_path}"),
                               capture_output=True, text=True, timeout=TIMEOUT, env=self.env)
        self.assertEqual(rerun.returncode, 0, rerun.stdout[-3000:] + rerun.stderr[-3000:])
        with open(metrics_path) as f:
            metrics = json.load(f)
        self.assertGreaterEqual(metrics["resumed_from_step"], 16)
        self.assertLess(metrics["resumed_from_step"], 80)
        self.assertLen(metrics["step_losses"], 80 - metrics["resumed_from_step"])  # none lost or repeated
        expected = _read_h5(os.path.join(straight_dir, "final.weights.h5"))
        actual = _read_h5(os.path.join(killed_dir, "final.weights.h5"))
        self.assertEqual(expected.keys(), actual.keys())
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def _read_h5(path):
    import h5py  # pylint: disable=import-outside-toplevel
    values = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: values.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return values


if __name__ == "__main__":
    absltest.main()
