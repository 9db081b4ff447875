"""tfpar-bench: every strategy against plain Keras and the machine's own peak, in one run.

    tfpar-bench --model_size=small --out_dir=bench_out
    tfpar-bench --strategies=default --scaling --out_dir=bench_scaling

Cells: `default` and `mirrored` (tfpar and, with --impls, the same model as
plain Keras), `multi_worker` (2 worker processes through tfpar-launch),
`dtensor` at each --dtensor_meshes entry, `pipeline` at each --pipeline_shapes
KxM, and with --scaling tfpar `default` over width, depth and sequence length.
Each cell runs in its own process; cells are interleaved over --repeats rounds
(drift on a shared machine hits every cell alike) and report the median step
time over windows after warm-up. Training flags (--model_size, --mixed_precision,
--global_batch_size, ...) apply to every cell, a strategy's own flags (--remat,
--pipeline_schedule, --cross_device_ops, ...) to that strategy's cells; the
strategy, devices, mesh and pipeline shape come from the bench's own flags.
Without --jit_compile each
implementation runs at its own default (tfpar-train's: XLA for float32
default/mirrored/multi_worker; Keras's "auto": no XLA on a CPU-only machine);
--jit_compile turns XLA on for every cell whose strategy supports it (not
dtensor or pipeline), plain Keras included; --nojit_compile turns it off for
all. MFU is against the median of a 2048^2 matmul's peak timed (best of 10)
before each cell.
Writes bench.json, bench.md and bench.png (with matplotlib).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from tfpar import cluster as cluster_lib
from tfpar import checks
from tfpar import config as config_lib
from tfpar import train as train_cli

FLAGS = flags.FLAGS

flags.DEFINE_list("strategies", ["default", "mirrored", "multi_worker", "dtensor", "pipeline"],
                  "Strategies to measure.")
flags.DEFINE_list("impls", ["tfpar", "plain"], "tfpar, and plain Keras where upstream can do the job.")
flags.DEFINE_integer("bench_devices", 2, "Devices (or workers) for mirrored and multi_worker.")
flags.DEFINE_string("dtensor_meshes", "model:2;batch:2", "';'-separated --mesh values for dtensor cells.")
flags.DEFINE_list("pipeline_shapes", ["2x2", "2x8"], "KxM (stages x micro-batches) for pipeline cells.")
flags.DEFINE_bool("scaling", False, "Also measure tfpar default over width, depth and sequence length.")
flags.DEFINE_integer("steps", 30, "Steps per cell, warm-up included.")
flags.DEFINE_integer("warmup", 6, "Steps excluded from timing.")
flags.DEFINE_integer("window", 4, "Steps per timed window.")
flags.DEFINE_integer("repeats", 2, "Rounds over all cells.")
flags.DEFINE_string("out_dir", "bench_out", "Where bench.json, bench.md and bench.png go.")
flags.DEFINE_string("cell", None, "Internal: run one cell from this JSON spec and print its result.")

SCALING = {"d_model": (64, 128, 256, 512), "num_layers": (1, 2, 4, 8), "seq_len": (32, 64, 128, 256)}


# Training flags that tfpar-bench sets for each cell (or that a benchmark does
# not do), and what to use instead.
_SET_PER_CELL = {
    "strategy": "--strategies", "num_virtual_devices": "--bench_devices", "devices": "--bench_devices (a count: cells use the first N devices)",
    "mesh": "--dtensor_meshes", "pipeline_stages": "--pipeline_shapes",
    "num_microbatches": "--pipeline_shapes", "steps_per_epoch": "--steps", "epochs": "--steps",
    "model_dir": "--out_dir", "metrics_json": "--out_dir", "verbose": "nothing (cells run quietly)",
    "export_dir": "tfpar-train --export_dir", "plan_only": "tfpar-train --plan_only",
    "backup_every_steps": "tfpar-train --backup_every_steps", "profile_steps": "tfpar-train --profile_steps",
    "eval_fraction": "tfpar-train --eval_fraction", "eval_steps": "tfpar-train --eval_steps",
    "eval_split": "tfpar-train --eval_split"}


def strategy_options() -> dict:
    """The strategy-only training flags given (e.g. --remat), for the cells whose strategy reads them.

    Raises ValueError for one that no strategy of --strategies reads.
    """
    for name, instead in _SET_PER_CELL.items():
        if FLAGS[name].present:
            what = ("is tfpar-train's: tfpar-bench's cells do not use it" if instead.startswith("tfpar-train ")
                    else "is set per cell by tfpar-bench")
            raise ValueError(
                f"--{name} {what}. Received: {name}={checks.shown(FLAGS[name].value)!r}; "
                f"accepted: {instead}.")
    given = {}
    for name, value in train_cli.parallel_options_from_flags().items():
        users = config_lib.STRATEGY_ONLY_OPTIONS.get(name)
        if not users or not FLAGS[name].present:
            continue
        if not set(users) & set(FLAGS.strategies):
            raise ValueError(
                f"--{name} applies only to --strategies including {' or '.join(users)}. Received: "
                f"strategies={','.join(FLAGS.strategies)}, {name}={checks.shown(value)!r}; accepted: "
                f"--strategies with {' or '.join(users)}, or no --{name}.")
        given[name] = value
    return given


def _with(run: config_lib.RunConfig, options=None, **parallel) -> config_lib.RunConfig:
    """`run` with these parallel settings (plus the given `options` its strategy reads) and the
    XLA setting a tfpar cell gets for them."""
    strategy = parallel["strategy"]
    own = {name: value for name, value in (options or {}).items()
           if strategy in config_lib.STRATEGY_ONLY_OPTIONS[name]}
    run = run.replace(parallel=config_lib.ParallelConfig(**{**own, **parallel}))
    if FLAGS.jit_compile is None:  # not given: tfpar-train's default for this cell's strategy
        jit = config_lib.default_jit_compile(run.parallel.strategy, run.mixed_precision)
    else:  # given: on wherever the strategy supports XLA (dtensor and pipeline refuse it)
        jit = FLAGS.jit_compile and run.parallel.strategy in config_lib.XLA_STRATEGIES
    return run.replace(jit_compile=jit)


def _pipeline_shape(text: str):
    stages, _, micro = text.partition("x")
    if not (stages.isdigit() and micro.isdigit() and int(stages) > 1 and int(micro) > 0):
        raise ValueError(f"--pipeline_shapes: malformed entry. Received: {text!r}; accepted: KxM "
                         "with K >= 2 stages and M >= 1 micro-batches, e.g. 2x8.")
    return int(stages), int(micro)


def plan_cells(base: config_lib.RunConfig, options=None):
    """(label, impl, run, extra spec) for every cell of this invocation; ValueError for bad flags."""
    n = FLAGS.bench_devices
    cells = []
    if base.grad_accum_steps > 1 and "plain" in FLAGS.impls:
        raise ValueError(
            f"--grad_accum_steps has no plain-Keras cell: Keras's gradient_accumulation_steps "
            f"updates once every K batches (not K micro-batches of one batch) and fails under "
            f"MirroredStrategy (keras-team/keras#17429). Received: "
            f"grad_accum_steps={base.grad_accum_steps}, impls={','.join(FLAGS.impls)}; accepted: "
            f"--impls=tfpar with --grad_accum_steps, or no --grad_accum_steps.")

    def add(label, run, impls=("tfpar",), **extra):
        for impl in impls:
            if impl in FLAGS.impls:
                spec = extra
                if impl == "plain":  # Keras's own default, jit_compile="auto", unless --jit_compile is given
                    spec = {**extra, "keras_jit_compile": "auto" if FLAGS.jit_compile is None else FLAGS.jit_compile}
                cells.append((label, impl, run, spec))

    for strategy in FLAGS.strategies:
        checks.choice("strategies", strategy, config_lib.STRATEGIES)
        if strategy == "default":
            add("default", _with(base, options, strategy="default", num_virtual_devices=0), ("tfpar", "plain"))
        elif strategy == "mirrored":
            add(f"mirrored {n} dev", _with(base, options, strategy="mirrored", num_virtual_devices=n), ("tfpar", "plain"))
        elif strategy == "multi_worker":
            if base.data.global_batch_size % n:  # one replica per worker
                raise ValueError(
                    f"--global_batch_size must be divisible by the number of workers. Received: "
                    f"global_batch_size={base.data.global_batch_size}, workers={n}; accepted: a "
                    f"multiple of {n}.")
            add(f"multi_worker {n} workers", _with(base, options, strategy="multi_worker", num_virtual_devices=0),
                launch_workers=n)
        elif strategy == "dtensor":
            for mesh in filter(None, FLAGS.dtensor_meshes.split(";")):
                from tfpar import layouts  # pylint: disable=import-outside-toplevel
                size = layouts.parse_mesh(mesh, None).num_devices
                add(f"dtensor {mesh}", _with(base, options, strategy="dtensor", mesh=mesh, num_virtual_devices=size))
        elif strategy == "pipeline":
            for text in FLAGS.pipeline_shapes:
                k, m = _pipeline_shape(text)
                boundaries = (options or {}).get("stage_boundaries", ())
                if boundaries and len(boundaries) != k - 1:
                    raise ValueError(
                        f"--stage_boundaries fits only pipeline shapes with K={len(boundaries) + 1}. "
                        f"Received: stage_boundaries={checks.shown(boundaries)}, "
                        f"pipeline_shapes={','.join(FLAGS.pipeline_shapes)}; accepted: shapes with "
                        f"K={len(boundaries) + 1}, or no --stage_boundaries.")
                add(f"pipeline K{k}xM{m}", _with(base, options, strategy="pipeline", num_virtual_devices=k,
                                                 pipeline_stages=k, num_microbatches=m))
    if FLAGS.scaling:
        single = _with(base, options, strategy="default", num_virtual_devices=0)
        for field, values in SCALING.items():
            for value in values:
                changes = {field: value}
                if field == "d_model":  # width: the MLP keeps its ratio to d_model
                    changes["mlp_dim"] = value * single.model.mlp_dim // single.model.d_model
                model = config_lib.ModelConfig(**{**single.model.__dict__, **changes})
                data = config_lib.DataConfig(**{**single.data.__dict__, "seq_len": model.seq_len})
                add(f"scaling {field}={value}", single.replace(model=model, data=data),
                    scaling=(field, value))
    return cells


def check_timing_flags() -> None:
    """Raises ValueError unless every cell can time at least one window after its warm-up."""
    for flag in ("steps", "window", "repeats", "bench_devices"):
        checks.positive(flag, FLAGS[flag].value)
    if FLAGS.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first step compiles and has no start time). "
                         f"Received: warmup={FLAGS.warmup}; accepted: an integer >= 1.")
    if FLAGS.warmup + FLAGS.window > FLAGS.steps:
        raise ValueError(
            f"--steps leaves no timed window. Received: steps={FLAGS.steps}, warmup={FLAGS.warmup}, "
            f"window={FLAGS.window}; accepted: steps >= warmup + window.")


def _run_cell(label: str, spec) -> dict:
    # No cell outlives a killed bench: each cell (or cell launcher) asks Linux for a
    # signal when this process dies (this process runs TF: no preexec_fn after fork).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", cluster_lib.PARENT_PID_ENV: str(os.getpid())}
    if spec.get("launch_workers"):
        return _run_launched(label, spec, env)
    proc = subprocess.run([sys.executable, "-m", "tfpar.bench", f"--cell={json.dumps(spec)}"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark cell {label!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_launched(label: str, spec, env) -> dict:
    """A multi_worker cell: tfpar-launch starts the workers; the chief's metrics JSON is read."""
    from tfpar import benchmark  # pylint: disable=import-outside-toplevel
    run = benchmark.config_from_dict(spec["run"])
    with tempfile.TemporaryDirectory() as tmp:
        metrics_path = os.path.join(tmp, "metrics.json")
        train_flags = benchmark.train_flags(run, spec["steps"]) + [f"--metrics_json={metrics_path}"]
        proc = subprocess.run([sys.executable, "-m", "tfpar.launch", f"--num_workers={spec['launch_workers']}",
                               "--", *train_flags], capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:  # the workers' own errors are in the launcher's stdout
            errors = [line for line in proc.stdout.splitlines() if "error:" in line]
            raise RuntimeError(f"benchmark cell {label!r} failed: {(errors or proc.stderr.strip().splitlines())[-1:]}")
        with open(metrics_path) as f:
            metrics = json.load(f)
    return benchmark.result_from_metrics(spec, run, metrics)


def main(argv):
    train_cli.refuse_positional(argv)
    if FLAGS.cell:
        cluster_lib.die_with_parent(signal.SIGKILL)
        train_cli.quiet_tensorflow()
        from tfpar import benchmark  # pylint: disable=import-outside-toplevel
        print(json.dumps(benchmark.measure(json.loads(FLAGS.cell))), flush=True)
        return
    try:
        for impl in FLAGS.impls:
            checks.choice("impls", impl, ("tfpar", "plain"))
        check_timing_flags()
        checks.writable_path("out_dir", FLAGS.out_dir, directory=True)  # before minutes of cells
        options = strategy_options()
        base = train_cli.config_from_flags(config_lib.ParallelConfig()).replace(
            model_dir=None, metrics_json=None, verbose=0)
        cells = plan_cells(base, options)
        if not cells:
            raise ValueError(
                f"nothing to measure. Received: strategies={','.join(FLAGS.strategies)}, impls="
                f"{','.join(FLAGS.impls)}, scaling={FLAGS.scaling}; accepted: at least one strategy "
                f"and impl, or --scaling.")
    except ValueError as e:
        train_cli.fail(str(e))
    train_cli.quiet_tensorflow()
    from tfpar import benchmark  # pylint: disable=import-outside-toplevel
    benchmark.leave_gpu_memory_to_cells()
    results, failures = [], {}
    for round_index in range(FLAGS.repeats):
        for label, impl, run, extra in cells:
            if extra.get("scaling") and round_index:
                continue  # scaling curves: one round
            spec = {"impl": impl, "run": benchmark.config_to_dict(run), "steps": FLAGS.steps,
                    "warmup": FLAGS.warmup, "window": FLAGS.window, "label": label, **extra}
            try:
                # The peak as the machine is when this cell starts (MFU: their median).
                peak = benchmark.matmul_peak_flops(dtype=benchmark.peak_dtype(run.mixed_precision))
                result = {**_run_cell(label, spec), "matmul_peak_flops": peak}
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                # Recorded, and the other cells still run (plain Keras + XLA fails under
                # MirroredStrategy upstream; a tfpar cell failing makes the bench exit 1).
                print(f"round {round_index + 1}: {label} / {impl}: fails: {e}", flush=True)
                failures.setdefault(f"{label}/{impl}", str(e))
                continue
            print(f"round {round_index + 1}: {label} / {impl}: {1000 * result['step_seconds']:.0f} ms/step",
                  flush=True)
            results.append(result)
    report = {**benchmark.report(results, base), "failures": failures,
              "jit_compile_flag": FLAGS.jit_compile}
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "bench.json"), "w") as f:
        json.dump({**report, "cells": results}, f, indent=2)
    table = benchmark.markdown(report)
    with open(os.path.join(FLAGS.out_dir, "bench.md"), "w") as f:
        f.write(table)
    print(table)
    if not benchmark.plot(report, os.path.join(FLAGS.out_dir, "bench.png")):
        print('bench.png not written: it needs matplotlib (pip install -e ".[bench]").')
    failed = sorted(key for key in failures if key.endswith("/tfpar"))
    if failed:
        print(f"tfpar-bench: {len(failed)} tfpar cell(s) failed: {', '.join(failed)} "
              f"(their errors are in {FLAGS.out_dir}/bench.json).", file=sys.stderr)
        sys.exit(1)


def run_main():
    app.run(main, flags_parser=train_cli.parse_flags_one_line)


if __name__ == "__main__":
    run_main()
