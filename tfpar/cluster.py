"""The cluster a multi-worker run belongs to: TF_CONFIG, Slurm, local ports.

TensorFlow-free on purpose (the launcher imports it); only `cluster_resolver`
imports TensorFlow, when it is called.

    spec = parse_tf_config(os.environ["TF_CONFIG"])  # ValueError for bad input
    spec.num_workers, spec.is_chief

Every error is one line: what is wrong, what was received, what is accepted.
"""

import dataclasses
import json
import os
import signal
import socket
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

TASK_TYPES = ("chief", "worker", "evaluator", "ps")
# Tasks that take part in the collective all-reduce of MultiWorkerMirroredStrategy.
TRAINING_TASK_TYPES = ("chief", "worker")
_EXAMPLE = ('{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
            '"task": {"type": "worker", "index": 0}}')


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """A validated cluster and this process's task in it."""
    cluster: Mapping[str, Tuple[str, ...]]
    task_type: str
    task_index: int
    num_workers: int
    is_chief: bool

    def __repr__(self):
        return (f"ClusterSpec(task={self.task_type}:{self.task_index}, "
                f"num_workers={self.num_workers}, is_chief={self.is_chief})")


def _error(what: str, received, accepted: str) -> ValueError:
    text = received if isinstance(received, str) else json.dumps(received)
    if len(text) > 200:
        text = text[:197] + "..."
    return ValueError(f"TF_CONFIG: {what}. Received: {text}; accepted: {accepted}.")


def _check_address(job: str, address) -> str:
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise _error(f"address of a '{job}' task is not host:port with a numeric port",
                     address, "'host:port' with port in 1..65535, e.g. '10.0.0.1:2222'")
    return address


def make_cluster_spec(cluster, task_type, task_index) -> ClusterSpec:
    """Validates a cluster dict and a task, and returns their ClusterSpec.

    Raises:
      ValueError: one line, naming what is wrong, what was received and what
        is accepted.
    """
    if not isinstance(cluster, dict) or not cluster:
        raise _error("'cluster' must be a non-empty object of job name -> addresses",
                     cluster, _EXAMPLE)
    jobs: Dict[str, Tuple[str, ...]] = {}
    for job, addresses in cluster.items():
        if job not in TASK_TYPES:
            raise _error("unknown job name in 'cluster'", job, ", ".join(TASK_TYPES))
        if not isinstance(addresses, list) or not addresses:
            raise _error(f"cluster['{job}'] must be a non-empty list of 'host:port'",
                         addresses, '["host1:2222", "host2:2222"]')
        jobs[job] = tuple(_check_address(job, a) for a in addresses)
    every = [address for addresses in jobs.values() for address in addresses]
    repeated = sorted({address for address in every if every.count(address) > 1})
    if repeated:  # the second task's gRPC server could not start
        raise _error("an address is given to more than one task", repeated,
                     "a distinct 'host:port' for each task")
    if len(jobs.get("chief", ())) > 1:
        raise _error("there can be at most one chief", list(jobs["chief"]), "one 'host:port'")
    if task_type not in TASK_TYPES:
        what = "missing task type" if task_type is None else "unknown task type"
        raise _error(what, "null" if task_type is None else task_type, ", ".join(TASK_TYPES))
    if task_type not in jobs:
        raise _error(f"task type '{task_type}' has no job in 'cluster'", sorted(jobs),
                     "a task type that is a key of 'cluster'")
    count = len(jobs[task_type])
    if isinstance(task_index, bool) or not isinstance(task_index, int):
        raise _error("task index is not an integer",
                     "null" if task_index is None else json.dumps(task_index),
                     f"an integer in 0..{count - 1}")
    if not 0 <= task_index < count:
        raise _error(f"task index out of range for the {count} '{task_type}' task(s)",
                     str(task_index), f"an integer in 0..{count - 1}")
    num_workers = sum(len(jobs.get(job, ())) for job in TRAINING_TASK_TYPES)
    is_chief = task_type == "chief" or (
        task_type == "worker" and task_index == 0 and "chief" not in jobs)
    return ClusterSpec(cluster=jobs, task_type=task_type, task_index=task_index,
                       num_workers=num_workers, is_chief=is_chief)


def parse_tf_config(text: str) -> ClusterSpec:
    """Parses and validates the TF_CONFIG environment variable's JSON text.

    Raises:
      ValueError: for malformed JSON, a missing `cluster`, a missing or unknown
        task type (accepted: chief, worker, evaluator, ps), a task index that
        is not an integer or out of range, or an address whose port is not a
        number. The message is one line.
    """
    try:
        config = json.loads(text)
    except (TypeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _error(f"malformed JSON ({reason})", repr(text), _EXAMPLE) from None
    if not isinstance(config, dict):
        raise _error("must be a JSON object", text, _EXAMPLE)
    if "cluster" not in config:
        raise _error("missing 'cluster'", text, _EXAMPLE)
    task = config.get("task")
    if not isinstance(task, dict):
        raise _error("missing task type ('task' must be an object with 'type' and 'index')",
                     "null" if task is None else task, '{"type": "worker", "index": 0}')
    return make_cluster_spec(config["cluster"], task.get("type"), task.get("index"))


def tf_config_for(hosts: Sequence[str], index: int, task_type: str = "worker") -> str:
    """TF_CONFIG (JSON text) for task `index` of a cluster of `task_type` tasks at `hosts`.

    Raises:
      ValueError: for a bad address or an index out of range.
    """
    text = json.dumps({"cluster": {task_type: list(hosts)},
                       "task": {"type": task_type, "index": index}})
    parse_tf_config(text)
    return text


def local_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_ports(n: int) -> List[int]:
    """`n` distinct TCP ports free on every interface (held together while chosen).

    TF's gRPC server listens on all interfaces whatever host its address names,
    so a port free on 127.0.0.1 alone may still be taken.
    """
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def spec_from_resolver(resolver) -> ClusterSpec:
    """The ClusterSpec of a tf.distribute ClusterResolver (TF_CONFIG or Slurm).

    Raises:
      ValueError: if the resolver's cluster or task is invalid.
    """
    try:
        jobs = {job: list(addresses) for job, addresses in resolver.cluster_spec().as_dict().items()}
        task_type, task_id = resolver.task_type, resolver.task_id
    except (RuntimeError, OSError, KeyError, ValueError) as e:  # Slurm: scontrol, its variables
        raise ValueError(
            f"the cluster could not be resolved from {type(resolver).__name__}. Received: {e}; "
            f"accepted: a TF_CONFIG, or tfpar-train started by srun in a Slurm job.") from None
    return make_cluster_spec(jobs, task_type, task_id)


def cluster_resolver(environ: Optional[Mapping[str, str]] = None):
    """The tf.distribute ClusterResolver for this process, or None for one local worker.

    TF_CONFIG (validated first) -> TFConfigClusterResolver; no TF_CONFIG but an
    srun step of a Slurm job (SLURM_JOB_ID and SLURM_PROCID set) ->
    SlurmClusterResolver; else None (e.g. a single process in an salloc shell).

    Raises:
      ValueError: for an invalid TF_CONFIG.
    """
    environ = os.environ if environ is None else environ
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    if environ.get("TF_CONFIG"):
        parse_tf_config(environ["TF_CONFIG"])
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if environ.get("SLURM_JOB_ID") and environ.get("SLURM_PROCID"):
        try:
            return tf.distribute.cluster_resolver.SlurmClusterResolver()
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            raise ValueError(
                f"the Slurm job's cluster could not be resolved. Received: {e}; accepted: "
                f"tfpar-train started by srun in a Slurm job, or a TF_CONFIG.") from None
    return None


# Set by a parent for a child that calls `die_with_parent` itself (see there).
PARENT_PID_ENV = "TFPAR_DIE_WITH_PARENT"


def _prctl():
    """libc's prctl, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # pylint: disable=import-outside-toplevel
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _set_death_signal(prctl, sig: int, parent: int) -> None:
    prctl(1, sig)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl
        os.kill(os.getpid(), sig)


def death_signal_fn(sig: int = signal.SIGKILL):
    """A preexec_fn that has Linux send the child `sig` when this process dies, or None.

    Only for a parent without threads (tfpar-launch): a preexec_fn may deadlock
    after fork in a threaded process. A parent that runs TensorFlow sets
    PARENT_PID_ENV in the child's environment instead (see `die_with_parent`).
    """
    prctl = _prctl()  # loaded before fork
    if prctl is None:
        return None
    parent = os.getpid()
    return lambda: _set_death_signal(prctl, sig, parent)


def die_with_parent(sig: int) -> None:
    """Has Linux send this process `sig` when the parent named by PARENT_PID_ENV dies.

    Called by the child itself, first thing; the variable is removed so that
    the child's own children do not inherit it.
    """
    parent = os.environ.pop(PARENT_PID_ENV, None)
    prctl = _prctl()
    if parent and prctl is not None:
        _set_death_signal(prctl, sig, int(parent))
