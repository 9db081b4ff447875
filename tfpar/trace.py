"""Busy time per name scope, read from a TensorFlow profiler trace.

`traced_busy_seconds` runs a step a few times under `tf.profiler.experimental`
(each run marked as a step with `tf.profiler.experimental.Trace`) and returns,
for every group of ops whose names match a pattern (one group per device of a
pipeline), the time at least one of its ops was running. That is what a
device's busy time means; the rest of the step is its idle time (the bubble).
"""

import collections
import glob
import os
import re
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import tensorflow as tf

_STEP_EVENT = "tfpar_traced_step"
Interval = Tuple[int, int]


def _union_length(intervals: List[Interval]) -> int:
    total, end = 0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _read_events(log_dir: str, group_pattern: re.Pattern):
    """(step intervals, {group: op intervals}) in picoseconds from the trace under `log_dir`."""
    # The trace's protocol buffer (the profiler writes no other readable format);
    # imported here so that TF builds without it still import tfpar.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
    steps: List[Interval] = []
    groups: Dict[str, List[Interval]] = collections.defaultdict(list)
    for path in glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.xplane.pb")):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            names = {key: meta.name for key, meta in plane.event_metadata.items()}
            for line in plane.lines:
                for event in line.events:
                    start = line.timestamp_ns * 1000 + event.offset_ps
                    interval = (start, start + event.duration_ps)
                    name = names.get(event.metadata_id, "")
                    if name == _STEP_EVENT:
                        steps.append(interval)
                        continue
                    match = group_pattern.search(name)
                    if match:
                        groups[match.group(1)].append(interval)
    return steps, groups


def traced_busy_seconds(run_step: Callable[[], object], group_pattern: str,
                        steps: int = 3) -> Tuple[Dict[str, float], float]:
    """Per-step busy seconds of each op group, and the traced step's wall seconds.

    `run_step` runs one step and returns once it has finished. An op belongs to
    the group named by the first capture group of `group_pattern` searched in
    its name (name scopes make this the layer path). Ops of one group that run
    at the same time count once.
    """
    pattern = re.compile(group_pattern)
    with tempfile.TemporaryDirectory() as log_dir:
        tf.profiler.experimental.start(log_dir)
        try:
            start = time.perf_counter()
            for i in range(steps):
                with tf.profiler.experimental.Trace(_STEP_EVENT, step_num=i, _r=1):
                    run_step()
            wall = time.perf_counter() - start
        finally:
            tf.profiler.experimental.stop()
        step_intervals, groups = _read_events(log_dir, pattern)
    if step_intervals:
        wall = sum(stop - start for start, stop in step_intervals) / 1e12
    busy = {}
    for group, intervals in groups.items():
        inside = [(a, b) for a, b in intervals
                  if any(s <= a and b <= e for s, e in step_intervals)] if step_intervals else intervals
        busy[group] = _union_length(inside) / 1e12 / steps
    return busy, wall / steps
