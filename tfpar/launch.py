"""tfpar-launch: run N local multi-worker processes, or print cluster configs.

    tfpar-launch --num_workers=2 -- --model_size=tiny --steps_per_epoch=20
    tfpar-launch --print_tf_config --hosts=10.0.0.1:2222,10.0.0.2:2222 -- --model_size=small
    tfpar-launch --print_tf_config --kubernetes --hosts=a:2222,b:2222 --image=me/tfpar:0.1

Local runs: each worker is `python -m tfpar.train --strategy=multi_worker
--num_virtual_devices=0 <flags after -->` with its TF_CONFIG on 127.0.0.1
addresses, in its own process group. TF's gRPC server listens on every
interface whatever host its address names, so the ports are chosen free on
all of them, and the workers can be reached from the network unless a
firewall stops it (the server has no authentication). Every output line is prefixed with
`[worker i] `. When one worker fails, the others are stopped at once and the
launcher exits with that worker's status (128+N for signal N). SIGINT and
SIGTERM are forwarded to all workers. Does not import TensorFlow.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional, Sequence

from absl import app
from absl import flags

from tfpar import cli
from tfpar import cluster as cluster_lib

FLAGS = flags.FLAGS

flags.DEFINE_integer("num_workers", 2, "Local worker processes to start.")
flags.DEFINE_bool("print_tf_config", False, "Print one TF_CONFIG per --hosts entry and exit.")
flags.DEFINE_list("hosts", [], "host:port of each worker, for --print_tf_config.")
flags.DEFINE_bool("kubernetes", False, "With --print_tf_config: print a Kubeflow TFJob manifest.")
flags.DEFINE_string("image", "tfpar:latest", "Container image for --kubernetes.")
flags.DEFINE_string("job_name", "tfpar", "TFJob name for --kubernetes.")
flags.DEFINE_float("grace_seconds", 5.0, "Seconds workers get to exit after SIGTERM before SIGKILL.")
flags.DEFINE_float("finish_timeout", 600.0,
                   "Seconds the other workers get to finish once one has exited 0; then they are stopped "
                   "(the workers of a synchronous job end together; one left alone waits for its peers).")

_WORKER_FLAGS = ("--strategy=multi_worker", "--num_virtual_devices=0")


def fail(message: str) -> None:
    cli.fail(message, "tfpar-launch")


parse_flags_one_line = cli.one_line_flags_parser("tfpar-launch")


def worker_command(train_flags: Sequence[str]) -> List[str]:
    """The command line of one local worker."""
    return [sys.executable, "-m", "tfpar.train", *_WORKER_FLAGS, *train_flags]


def check_train_flags(train_flags: Sequence[str], *, local: bool) -> None:
    """Fails (one line, status 2) for worker flags tfpar-train would refuse, before any worker starts.

    The flags are parsed by tfpar-train's own parser in a short subprocess (no
    TensorFlow), after the flags the launcher sets, so whatever form a later
    `--strategy` or `--num_virtual_devices` takes is caught too. For configs
    printed for other hosts, their paths and flag files are not read here.
    """
    if not local:  # a flag file is a file on the hosts (absl reads none after "--")
        end = train_flags.index("--") if "--" in train_flags else len(train_flags)
        drop = set()
        for i, flag in enumerate(train_flags[:end]):
            if flag.startswith(("--flagfile=", "-flagfile=")):
                drop.add(i)
            elif flag in ("--flagfile", "-flagfile") and i + 1 < end:
                drop.update((i, i + 1))
        train_flags = [flag for i, flag in enumerate(train_flags) if i not in drop]
    code = f"from tfpar import train; train.check_flags_main(local={local})"
    try:
        proc = subprocess.run([sys.executable, "-c", code, *_WORKER_FLAGS, *train_flags],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        fail("checking the tfpar-train flags after -- took over 120 s. Received: a stalled "
             "Python start; accepted: a machine that can start Python.")
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"status {proc.returncode}"]
        fail(f"tfpar-train flags after --: {lines[-1].removeprefix('tfpar: error: ')}")
    resolved = json.loads(proc.stdout.strip().splitlines()[-1])
    if resolved["strategy"] != "multi_worker" or resolved["num_virtual_devices"] not in (0, 1):
        fail(f"workers run --strategy=multi_worker with one device each. Received: "
             f"strategy={resolved['strategy']}, num_virtual_devices={resolved['num_virtual_devices']} "
             "after --; accepted: neither flag, --strategy=multi_worker, --num_virtual_devices=0 or 1.")


class Launcher:
    """Starts, watches and stops a group of local workers."""

    def __init__(self, commands: Sequence[Sequence[str]], envs: Sequence[dict], *,
                 grace_seconds: float = 5.0, finish_timeout: float = 600.0, out=None):
        self.commands, self.envs = list(commands), list(envs)
        self.grace_seconds = grace_seconds
        self.finish_timeout = finish_timeout
        self.out = out or sys.stdout
        self.procs: List[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._signal: Optional[int] = None
        self.tmp_dir: Optional[str] = None

    def _pump(self, index: int, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                self.out.write(f"[worker {index}] {line}\n")
                self.out.flush()
        stream.close()

    def start(self) -> None:
        """Starts every worker in its own process group, then their output pumps.

        Workers get a temporary directory of the launcher's (TMPDIR) that `stop`
        deletes: a killed worker cannot delete its own temporary files.
        """
        preexec_fn = cluster_lib.death_signal_fn()
        self.tmp_dir = tempfile.mkdtemp(prefix="tfpar_launch_")
        try:
            for command, env in zip(self.commands, self.envs):
                self.procs.append(subprocess.Popen(
                    command, env={**env, "TMPDIR": self.tmp_dir}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=preexec_fn))
        except OSError:  # e.g. a command that does not exist: stop those already started
            self.stop(0.0)
            raise
        for i, proc in enumerate(self.procs):
            thread = threading.Thread(target=self._pump, args=(i, proc.stdout), daemon=True)
            thread.start()
            self._threads.append(thread)

    def signal_all(self, signum: int) -> None:
        """Sends `signum` to the process group of every worker still running."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def stop(self, grace_seconds: Optional[float] = None) -> None:
        """SIGTERM to all process groups, then SIGKILL after the grace period.

        TensorFlow's coordination service takes SIGTERM as a preemption notice
        and keeps running, so SIGKILL is what ends a blocked worker.
        """
        self.signal_all(signal.SIGTERM)
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for proc in self.procs:  # also kills what a worker started in its group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        for thread in self._threads:
            thread.join(timeout=2)
        if self.tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _on_signal(self, signum, frame):
        del frame
        self._signal = signum
        self.signal_all(signum)

    def wait(self, timeout: Optional[float] = None) -> int:
        """Waits for all workers; returns 0, or the status of the first that failed.

        After `timeout` seconds all workers are stopped and 124 is returned.
        Always stops every worker before it returns.
        """
        previous = {}
        if threading.current_thread() is threading.main_thread():  # forward SIGINT/SIGTERM
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        end = None if timeout is None else time.monotonic() + timeout
        grace = None
        finished_at, told = None, False  # when the first worker exited 0 with others running
        try:
            while True:
                if end is not None and time.monotonic() > end:
                    print(f"tfpar-launch: workers still running after {timeout} s; stopping them.",
                          file=sys.stderr, flush=True)
                    return 124
                codes = [p.poll() for p in self.procs]
                if self._signal is not None:  # forwarded; give the workers a grace period
                    deadline = time.monotonic() + self.grace_seconds
                    while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    grace = 0.0  # already waited
                    return 128 + self._signal
                failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    index, code = failed[0]
                    status = 128 - code if code < 0 else code
                    print(f"tfpar-launch: worker {index} exited with status {status}; "
                          "stopping the others.", file=sys.stderr, flush=True)
                    return status
                if all(c == 0 for c in codes):
                    return 0
                if 0 in codes:
                    finished_at = finished_at or time.monotonic()
                    waited = time.monotonic() - finished_at
                    running = [i for i, c in enumerate(codes) if c is None]
                    if waited > self.finish_timeout:
                        print(f"tfpar-launch: worker {codes.index(0)} finished {waited:.0f} s ago and "
                              f"worker(s) {', '.join(map(str, running))} still run; stopping them "
                              f"(--finish_timeout={self.finish_timeout:g}).", file=sys.stderr, flush=True)
                        return 1
                    if waited > min(30.0, self.finish_timeout / 2) and not told:
                        told = True
                        print(f"tfpar-launch: worker {codes.index(0)} finished; waiting up to "
                              f"{self.finish_timeout:g} s (--finish_timeout) for worker(s) "
                              f"{', '.join(map(str, running))}.", file=sys.stderr, flush=True)
                time.sleep(0.05)
        finally:
            self.stop(grace)
            for s, handler in previous.items():
                signal.signal(s, handler)


def local_launcher(num_workers: int, train_flags: Sequence[str], *, commands=None,
                   grace_seconds: float = 5.0, finish_timeout: float = 600.0, out=None) -> Launcher:
    """A Launcher for `num_workers` workers on 127.0.0.1 and free ports.

    `commands` (one per worker) replaces the tfpar-train command line.
    """
    hosts = [f"127.0.0.1:{port}" for port in cluster_lib.free_ports(num_workers)]
    base_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
                "PYTHONUNBUFFERED": "1"}
    # N workers on one host share its cores: each gets its share of TF's
    # intra-op and inter-op pools unless the user chose (BUILD_NOTES.md).
    share = str(max(1, cluster_lib.local_cores() // num_workers))
    base_env.setdefault("TF_NUM_INTRAOP_THREADS", share)
    base_env.setdefault("TF_NUM_INTEROP_THREADS", share)
    envs = [{**base_env, "TF_CONFIG": cluster_lib.tf_config_for(hosts, i)}
            for i in range(num_workers)]
    commands = commands or [worker_command(train_flags)] * num_workers
    return Launcher(commands, envs, grace_seconds=grace_seconds, finish_timeout=finish_timeout, out=out)


def tfjob_manifest(name: str, image: str, replicas: int, train_flags: Sequence[str]) -> str:
    """A Kubeflow TFJob (kubeflow.org/v1) whose operator sets each pod's TF_CONFIG."""
    args = ["tfpar-train", *_WORKER_FLAGS, *train_flags]
    return "\n".join([
        "apiVersion: kubeflow.org/v1",
        "kind: TFJob",
        "metadata:",
        f"  name: {json.dumps(name)}",
        "spec:",
        "  tfReplicaSpecs:",
        "    Worker:",
        f"      replicas: {replicas}",
        "      restartPolicy: OnFailure",
        "      template:",
        "        spec:",
        "          containers:",
        "            - name: tensorflow",
        f"              image: {json.dumps(image)}",
        f"              command: {json.dumps(args)}",
        "              ports:",
        "                - name: tfjob-port",
        "                  containerPort: 2222",
    ])


def print_configs(hosts: Sequence[str], train_flags: Sequence[str]) -> None:
    """Prints one `export TF_CONFIG=...` line per host and the command each host runs
    after it, or a TFJob manifest."""
    configs = [cluster_lib.tf_config_for(hosts, i) for i in range(len(hosts))]  # validates
    if FLAGS.kubernetes:
        print(tfjob_manifest(FLAGS.job_name, FLAGS.image, len(hosts), train_flags))
        return
    for i, (host, text) in enumerate(zip(hosts, configs)):
        print(f"export TF_CONFIG='{text}'  # worker {i} on {host}")
    print(f"{shlex.join(['tfpar-train', *_WORKER_FLAGS, *train_flags])}  # on every host, after its export")


def main(argv):
    cluster_lib.die_with_parent(signal.SIGTERM)  # started by tfpar-bench: stop the workers with it
    train_flags = argv[1:]
    stray = [a for a in train_flags if not a.startswith("-")]
    if stray and "--" not in sys.argv:
        fail(f"unexpected arguments. Received: {' '.join(stray)}; accepted: tfpar-train flags "
             "after `--`.")
    check_train_flags(train_flags, local=not FLAGS.print_tf_config)
    if FLAGS.kubernetes and not FLAGS.print_tf_config:
        fail("--kubernetes goes with --print_tf_config. Received: --kubernetes alone; "
             "accepted: --print_tf_config --kubernetes --hosts=h1:port,...")
    if FLAGS.print_tf_config:
        if not FLAGS.hosts:
            fail("--print_tf_config needs --hosts. Received: hosts=''; accepted: "
                 "--hosts=host1:port,host2:port.")
        try:
            print_configs(FLAGS.hosts, train_flags)
        except ValueError as e:
            fail(str(e))
        return 0
    if FLAGS.num_workers < 1:
        fail(f"--num_workers must be >= 1. Received: num_workers={FLAGS.num_workers}; "
             "accepted: an integer >= 1.")
    if FLAGS.hosts:
        fail("--hosts goes with --print_tf_config; local runs pick free 127.0.0.1 ports. "
             f"Received: hosts={','.join(FLAGS.hosts)}; accepted: --hosts with --print_tf_config.")
    if FLAGS.finish_timeout <= 0:
        fail(f"--finish_timeout must be > 0. Received: finish_timeout={FLAGS.finish_timeout:g}; "
             "accepted: seconds > 0.")
    launcher = local_launcher(FLAGS.num_workers, train_flags, grace_seconds=FLAGS.grace_seconds,
                              finish_timeout=FLAGS.finish_timeout)
    launcher.start()
    return launcher.wait()


def run_main():
    """Console-script entry point."""
    app.run(main, flags_parser=parse_flags_one_line)


if __name__ == "__main__":
    run_main()
