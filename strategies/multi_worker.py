"""`multi_worker`: synchronous data parallelism over processes (TF_CONFIG or Slurm).

Each process is one worker; its devices are its replicas (one per process on
CPU). The strategy must be created before anything else starts the TensorFlow
runtime, with TF_CONFIG already set: `tfpar-launch` does both.
"""

import logging
from typing import Optional

import tensorflow as tf

from tfpar import cluster as cluster_lib
from tfpar import checks
from tfpar import config as config_lib
from tfpar.strategies import base


def communication_options(name: str) -> tf.distribute.experimental.CommunicationOptions:
    """CommunicationOptions for a name of config.COMMUNICATIONS."""
    checks.choice("communication", name, config_lib.COMMUNICATIONS)
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[name]
    return tf.distribute.experimental.CommunicationOptions(implementation=implementation)


def _rank(value) -> Optional[int]:
    if isinstance(value, tf.distribute.DistributedValues):
        value = value.values[0]
    shape = getattr(value, "shape", None)
    return shape.rank if shape is not None else None


class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` accepts what Keras 3's trainer passes.

    Keras 3's TensorFlow trainer calls `reduce` in two ways the collective
    strategy rejects (keras-team/keras#20585, tensorflow/tensorflow#72388):

    * `reduce("MEAN", (x, y), axis=None)` on a nest of per-replica values
      (`TensorFlowTrainer._maybe_symbolic_build`): each leaf is reduced.
    * `reduce("MEAN", scalar, axis=0)` on per-replica scalars (metrics, in
      `reduce_per_replica`): a scalar has no batch axis, so it is reduced
      across replicas only (`axis=None`), which is what MirroredStrategy's
      path in Keras computes.

    Everything else goes to MultiWorkerMirroredStrategy unchanged.
    """

    def reduce(self, reduce_op, value, axis=None):
        if not isinstance(value, tf.distribute.DistributedValues) and tf.nest.is_nested(value):
            return tf.nest.map_structure(lambda v: self.reduce(reduce_op, v, axis), value)
        if axis is not None and _rank(value) == 0:
            axis = None
        return super().reduce(reduce_op, value, axis)


class MultiWorkerAdapter(base.StrategyAdapter):
    """MultiWorkerMirroredStrategy for the cluster in TF_CONFIG (or Slurm).

    Without TF_CONFIG or Slurm the process trains as a single worker.

    Raises (from the constructor):
      ValueError: for an invalid TF_CONFIG or communication name.
    """

    name = "multi_worker"

    def __init__(self, *, communication: str = "auto"):
        super().__init__()
        self.communication = communication
        options = communication_options(communication)
        resolver = cluster_lib.cluster_resolver()
        self.cluster = cluster_lib.spec_from_resolver(resolver) if resolver else None
        if self.cluster is None:
            logging.warning("multi_worker: no TF_CONFIG and no Slurm job; training as one "
                            "local worker.")
        elif self.cluster.task_type not in cluster_lib.TRAINING_TASK_TYPES:
            raise ValueError(
                f"multi_worker trains only in chief and worker tasks. Received: task type "
                f"{self.cluster.task_type!r}; accepted: "
                f"{', '.join(cluster_lib.TRAINING_TASK_TYPES)}.")
        try:
            self.strategy = KerasMultiWorkerMirroredStrategy(
                cluster_resolver=resolver, communication_options=options)
        except tf.errors.OpError as e:  # e.g. "Could not start gRPC server": the port is taken
            address = (self.cluster.cluster[self.cluster.task_type][self.cluster.task_index]
                       if self.cluster else "local")
            raise ValueError(
                f"multi_worker could not start this worker's collective server. Received: address="
                f"{address} ({str(e).splitlines()[0][:200]}); accepted: an address whose port is "
                f"free on every interface of this host (TF's server listens on all of them).") from None

    @classmethod
    def from_config(cls, parallel: config_lib.ParallelConfig) -> "MultiWorkerAdapter":
        if parallel.num_virtual_devices > 1 or parallel.devices:
            raise ValueError(
                f"multi_worker uses one replica per worker process (its CPU, or its GPUs); "
                f"it does not take virtual devices or a device list. Received: "
                f"num_virtual_devices={parallel.num_virtual_devices}, "
                f"devices={list(parallel.devices)}; accepted: --num_virtual_devices=0 or 1 "
                f"and no --devices.")
        return cls(communication=parallel.communication)

    @property
    def num_workers(self) -> int:
        return self.cluster.num_workers if self.cluster else 1

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 when the cluster has no chief."""
        return self.cluster.is_chief if self.cluster else True

    def check_resume_step(self, backup_step: int, refused: bool = False) -> None:
        """Every worker restores the chief's backup, so all resume at one step; a worker
        that cannot read it would start over, out of step with the others' collectives.
        `backup_step` is this worker's (-1: no backup); `refused`, whether this worker
        refuses to resume it (it raises its own error after this check).

        Raises (on every worker that did not refuse):
          ValueError: if another worker refused, or if the workers would restore
            different steps.
        """
        if self.num_workers <= 1:
            return
        gather = lambda: tf.distribute.get_replica_context().all_gather(  # noqa: E731
            tf.constant([[backup_step, int(refused)]], tf.int64), axis=0)
        gathered = tf.function(lambda: self.strategy.run(gather))()  # eager `run` warns of overhead
        steps, refusals = zip(*self.strategy.experimental_local_results(gathered)[0].numpy().tolist())
        if refused:
            return  # this worker raises its own error
        if any(refusals):
            per_worker = len(refusals) // self.num_workers  # replicas (e.g. GPUs) per worker
            refusing = ", ".join(str(w) for w in sorted({i // per_worker for i, r in enumerate(refusals) if r}))
            raise ValueError(
                f"multi_worker: another worker refused to resume --model_dir's run (its error says "
                f"why), so no worker trains. Received: a refusal from worker {refusing}; accepted: "
                f"the same flags on every worker, matching the saved run's config.json, or a new "
                f"--model_dir.")
        if len(set(steps)) > 1:
            raise ValueError(
                f"multi_worker: the workers would resume from different steps of --model_dir's backup, so "
                f"they cannot train in step. Received: backup steps "
                f"{', '.join(str(step) if step >= 0 else 'none' for step in steps)} (one per replica, "
                f"in worker order); accepted: one --model_dir that every worker reads (a shared "
                f"filesystem, as for Keras's BackupAndRestore), or a new --model_dir.")

    def describe(self) -> str:
        task = f"{self.cluster.task_type}:{self.cluster.task_index}" if self.cluster else "local"
        return (f"{super().describe()}, workers={self.num_workers}, task={task}, "
                f"chief={self.is_chief}, communication={self.communication}")

    def plan(self):
        return {**super().plan(), "num_workers": self.num_workers, "is_chief": self.is_chief}
