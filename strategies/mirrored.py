"""`mirrored`: synchronous data parallelism over the devices of one machine."""

from typing import Sequence

import tensorflow as tf

from tfpar import checks
from tfpar import config as config_lib
from tfpar import devices as devices_lib
from tfpar.strategies import base


def cross_device_ops(name: str):
    """tf.distribute CrossDeviceOps for a name of config.CROSS_DEVICE_OPS."""
    checks.choice("cross_device_ops", name, config_lib.CROSS_DEVICE_OPS)
    return {
        "auto": lambda: None,
        "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
        "reduction_to_one_device": tf.distribute.ReductionToOneDevice,
        "nccl": tf.distribute.NcclAllReduce,
    }[name]()


class MirroredAdapter(base.StrategyAdapter):
    """MirroredStrategy over `devices`, or the first `num_devices` (0: all)."""

    name = "mirrored"

    def __init__(self, *, devices: Sequence[str] = (), num_devices: int = 0,
                 cross_device_ops_name: str = "auto"):
        super().__init__()
        self.cross_device_ops_name = cross_device_ops_name
        resolved = devices_lib.select_devices(devices, num_devices)
        if cross_device_ops_name == "nccl" and not all("GPU" in d.upper() for d in resolved):
            raise ValueError(  # TF would fail at the first all-reduce: no NcclAllReduce kernel
                f"--cross_device_ops=nccl needs GPUs only. Received: devices={resolved}; "
                f"accepted: --cross_device_ops=auto, hierarchical_copy or reduction_to_one_device.")
        if cross_device_ops_name == "hierarchical_copy" and len(resolved) % 2:
            # TF splits the devices into two groups of n // 2: an odd device's gradients are dropped.
            raise ValueError(
                f"--cross_device_ops=hierarchical_copy needs an even number of devices (TF's "
                f"reduction leaves out the last of an odd number). Received: {len(resolved)} devices; "
                f"accepted: an even number, or --cross_device_ops=auto or reduction_to_one_device.")
        self.strategy = tf.distribute.MirroredStrategy(
            devices=resolved, cross_device_ops=cross_device_ops(cross_device_ops_name))

    @classmethod
    def from_config(cls, parallel: config_lib.ParallelConfig) -> "MirroredAdapter":
        return cls(devices=parallel.devices, num_devices=parallel.num_virtual_devices,
                   cross_device_ops_name=parallel.cross_device_ops)

    def describe(self) -> str:
        return f"{super().describe()}, cross_device_ops={self.cross_device_ops_name}"

    def input_options(self):
        """One input pipeline per replica on CPUs (BUILD_NOTES.md "Slow exit after `fit`").

        Splitting one pipeline over virtual CPUs goes through a MultiDeviceIterator
        whose per-device datasets keep tf.data autotuning on; deleting it at the end
        of `fit` waited 35-94 s. Per-replica pipelines (each the `i::N` shard of
        the same global batch) have no such iterator; on GPUs batches are still
        fetched to the devices by one pipeline.
        """
        if devices_lib.accelerator_kind() != "CPU":
            return None
        return tf.distribute.InputOptions(
            experimental_fetch_to_device=False,
            experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)
