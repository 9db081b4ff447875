"""Pure pipeline-schedule logic: stage partitions, per-stage event orders, bubbles.

No TensorFlow here; `tfpar.strategies.pipeline` turns these plans into ops.

An *event* is `("F", m)` or `("B", m)`: the forward or backward pass of
micro-batch `m` on one stage. A schedule gives each stage its events in the
order they must run; `build_order` merges them into one order in which every
event comes after what it needs (F of the stage before, B of the stage after).
"""

import numbers
from typing import Dict, List, Sequence, Tuple

Event = Tuple[str, int]

SCHEDULES = ("gpipe", "1f1b")


def stack_size(model_name: str, num_layers: int) -> int:
    """len(model.stack) of a built-in model, known before the model is built."""
    return num_layers + 2 if model_name == "gpt" else 2 * num_layers + 2


def check_boundaries(boundaries: Sequence[int], num_stages: int, num_layers: int) -> Tuple[int, ...]:
    """Validates explicit boundaries (first stack index of stages 2..K).

    Raises:
      ValueError: unless there are K-1 strictly increasing indices in [1, num_layers).
    """
    if not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in boundaries):
        raise ValueError(
            f"stage boundaries must be integers (stack indices). Received: "
            f"{', '.join(map(repr, boundaries))}; accepted: {num_stages - 1} increasing integers.")
    boundaries = tuple(int(b) for b in boundaries)
    if len(boundaries) != num_stages - 1:
        raise ValueError(
            f"--stage_boundaries must list K-1 stack indices (the first entry of stages 2..K). "
            f"Received: stage_boundaries={list(boundaries)}, pipeline_stages={num_stages}; "
            f"accepted: {num_stages - 1} increasing integers in [1, {num_layers - 1}].")
    previous = 0
    for b in boundaries:
        if not previous < b < num_layers:
            raise ValueError(
                f"--stage_boundaries must be strictly increasing and within the model's stack. "
                f"Received: stage_boundaries={list(boundaries)} for a stack of {num_layers} entries; "
                f"accepted: increasing integers in [1, {num_layers - 1}].")
        previous = b
    return boundaries


def balanced_boundaries(costs: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    """Cuts `costs` into K non-empty consecutive parts minimising the largest sum.

    Among the optimal cuts, the earliest boundaries win (deterministic).
    """
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(
            f"--pipeline_stages must be between 1 and the number of stack entries. "
            f"Received: pipeline_stages={num_stages}; accepted: 1..{n}.")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest max-stage cost splitting costs[:i] into k stages.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    boundaries, i = [], n
    for k in range(num_stages, 1, -1):
        i = cut[k][i]
        boundaries.append(i)
    return tuple(reversed(boundaries))


def stage_ranges(boundaries: Sequence[int], num_layers: int) -> List[range]:
    """The stack indices of each stage."""
    edges = [0, *boundaries, num_layers]
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:])]


def stage_events(schedule: str, num_stages: int, num_microbatches: int) -> List[List[Event]]:
    """Each stage's events in order.

    gpipe: all forwards, then all backwards. 1f1b (PipeDream-flush): stage s
    runs K-s-1 warm-up forwards, then alternates one forward and one backward,
    then drains the remaining backwards; at most K-s micro-batches of
    activations are alive on stage s at any time.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule. Received: {schedule!r}; accepted: {', '.join(SCHEDULES)}.")
    k, m = num_stages, num_microbatches
    plans = []
    for s in range(k):
        if schedule == "gpipe":
            plans.append([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
            continue
        warmup = min(k - s - 1, m)
        events = [("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            events += [("F", warmup + i), ("B", i)]
        events += [("B", i) for i in range(m - warmup, m)]
        plans.append(events)
    return plans


def _ready(event: Event, stage: int, done: set, num_stages: int) -> bool:
    kind, m = event
    if kind == "F":
        return stage == 0 or ("F", m, stage - 1) in done
    if ("F", m, stage) not in done:
        return False
    return stage == num_stages - 1 or ("B", m, stage + 1) in done


def build_order(plans: List[List[Event]]) -> List[Tuple[int, Event]]:
    """Merges per-stage plans into one dependency-respecting order of (stage, event).

    Raises:
      ValueError: if the plans deadlock (an event waits for one that never comes).
    """
    k = len(plans)
    cursor, done, order = [0] * k, set(), []
    total = sum(len(p) for p in plans)
    while len(order) < total:
        progressed = False
        for s in range(k):
            if cursor[s] < len(plans[s]) and _ready(plans[s][cursor[s]], s, done, k):
                event = plans[s][cursor[s]]
                order.append((s, event))
                done.add((event[0], event[1], s))
                cursor[s] += 1
                progressed = True
        if not progressed:
            raise ValueError(f"pipeline schedule deadlocks. Received: plans={plans}.")
    return order


def simulate(plans: List[List[Event]], forward_cost: float = 1.0,
             backward_cost: float = 2.0) -> Dict[str, float]:
    """Runs the plans on an idealised clock (each stage busy one event at a time).

    Returns the makespan, the bubble fraction (idle share of stage-time) and the
    peak number of micro-batches whose activations a stage holds.
    """
    k = len(plans)
    finish: Dict[Tuple[str, int, int], float] = {}
    free = [0.0] * k
    alive, peak = [0] * k, [0] * k
    for s, (kind, m) in build_order(plans):
        deps = []
        if kind == "F" and s > 0:
            deps.append(finish[("F", m, s - 1)])
        if kind == "B":
            deps.append(finish[("F", m, s)])
            if s < k - 1:
                deps.append(finish[("B", m, s + 1)])
        start = max([free[s], *deps])
        free[s] = start + (forward_cost if kind == "F" else backward_cost)
        finish[(kind, m, s)] = free[s]
        alive[s] += 1 if kind == "F" else -1
        peak[s] = max(peak[s], alive[s])
    makespan = max(free)
    busy = sum((forward_cost if kind == "F" else backward_cost) for plan in plans for kind, _ in plan)
    return {"makespan": makespan, "bubble_fraction": 1.0 - busy / (k * makespan) if makespan else 0.0,
            "peak_alive_microbatches": max(peak) if peak else 0}


def gpipe_bubble_bound(num_stages: int, num_microbatches: int) -> float:
    """(K-1)/(M+K-1): the idle share of a GPipe pipeline with equal stages."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)
