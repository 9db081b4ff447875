"""Virtual devices: split the CPU (or a GPU) into N logical devices."""

import os
from typing import List, Sequence

import tensorflow as tf

from tfpar import cluster

# Memory cap per logical GPU when a physical GPU is split.
_GPU_SLICE_MB = 2048


def configure_virtual_devices(num_devices: int, concurrent_devices: int = 1) -> List[str]:
    """Splits the accelerator (or the CPU) into `num_devices` logical devices.

    Must run before TensorFlow initializes its devices. With 0 the devices are
    left as they are. Returns the names of the logical devices of that kind.

    Virtual CPUs share one intra-op thread pool sized to all cores, so
    `concurrent_devices` CPUs running ops at once oversubscribe the cores
    (mirrored over 2 virtual CPUs on 2 cores: 0.85x the single-device
    throughput, 0.98x with one thread each; BUILD_NOTES.md). When the CPU is
    split and the user has not set the pool size, each concurrent device gets
    its share of the cores.

    Raises:
      ValueError: if `num_devices` is negative, or TensorFlow already
        initialized its devices with a different split.
    """
    if num_devices < 0:
        raise ValueError(
            f"--num_virtual_devices must be >= 0. Received: num_virtual_devices={num_devices}; "
            "accepted: an integer >= 0.")
    gpus = tf.config.list_physical_devices("GPU")
    physical = gpus[0] if gpus else tf.config.list_physical_devices("CPU")[0]
    kind = "GPU" if gpus else "CPU"
    if num_devices:
        if gpus:
            configs = [tf.config.LogicalDeviceConfiguration(memory_limit=_GPU_SLICE_MB)
                       for _ in range(num_devices)]
        else:
            configs = [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)]
        try:
            tf.config.set_logical_device_configuration(physical, configs)
        except RuntimeError:
            current = len(tf.config.list_logical_devices(kind))
            if current != num_devices:
                raise ValueError(
                    f"--num_virtual_devices: TensorFlow already initialized {current} "
                    f"{kind} device(s); virtual devices can be set only before that. "
                    f"Received: num_virtual_devices={num_devices}; accepted: {current}, or a fresh "
                    "process.") from None
        user_set = (tf.config.threading.get_intra_op_parallelism_threads() != 0
                    or "TF_NUM_INTRAOP_THREADS" in os.environ)
        if kind == "CPU" and concurrent_devices > 1 and not user_set:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(
                    max(1, cluster.local_cores() // concurrent_devices))
            except RuntimeError:  # TF already started with this split: its pool stays as it is
                pass
    return [d.name for d in tf.config.list_logical_devices(kind)]


def accelerator_kind() -> str:
    """'GPU' when a GPU is visible, else 'CPU'."""
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def select_devices(requested: Sequence[str], count: int = 0) -> List[str]:
    """Resolves device names: `requested` if given, else the first `count` (0: all).

    Raises:
      ValueError: if a requested device does not exist or `count` exceeds them.
    """
    available = [d.name for d in tf.config.list_logical_devices(accelerator_kind())]
    short = {name.split("device:")[-1].lower(): name for name in available}
    if requested:
        resolved = []
        for name in requested:
            key = name.split("device:")[-1].lower().lstrip("/")
            if name not in available and key not in short:
                raise ValueError(
                    f"--devices: no such device. Received: devices={name!r}; accepted (available): "
                    f"{', '.join(available)}.")
            resolved.append(name if name in available else short[key])
        if len(set(resolved)) < len(resolved):
            raise ValueError(
                f"--devices names a device twice. Received: devices={','.join(requested)}; accepted: "
                f"distinct devices of {', '.join(available)}.")
        return resolved
    if count > len(available):
        raise ValueError(
            f"more devices asked for than exist. Received: {count} devices; accepted: at most "
            f"{len(available)} ({', '.join(available)}), or split the CPU first with "
            f"--num_virtual_devices={count} (tfpar.devices.configure_virtual_devices({count}) in "
            "Python, before TensorFlow starts).")
    return available[:count] if count else available
