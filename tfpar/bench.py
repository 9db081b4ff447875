"""tfpar-bench: tfpar against the same model as plain Keras, in one run.

    tfpar-bench --strategies=default,mirrored --model_size=small --out_dir=bench_out

Each (strategy, implementation) cell runs in its own process, cells are
interleaved over `--repeats` rounds (so drift on a shared machine hits both
sides alike), and each reports the median step time over windows after
warm-up. Writes bench.json, bench.md and, with matplotlib, bench.png.
"""

import json
import os
import subprocess
import sys

from absl import app
from absl import flags

from tfpar import config as config_lib
from tfpar import train as train_cli

FLAGS = flags.FLAGS

flags.DEFINE_list("strategies", ["default", "mirrored"], "Strategies to measure.")
flags.DEFINE_list("impls", ["tfpar", "plain"], "Implementations: tfpar, plain (Keras).")
flags.DEFINE_integer("bench_devices", 2, "Virtual devices for multi-device strategies.")
flags.DEFINE_integer("steps", 30, "Steps per cell, warm-up included.")
flags.DEFINE_integer("warmup", 6, "Steps excluded from timing.")
flags.DEFINE_integer("window", 4, "Steps per timed window.")
flags.DEFINE_integer("repeats", 2, "Rounds over all cells.")
flags.DEFINE_string("out_dir", "bench_out", "Where bench.json, bench.md and bench.png go.")
flags.DEFINE_string("cell", None, "Internal: run one cell from this JSON spec and print its result.")


def _run_config(strategy: str) -> config_lib.RunConfig:
    run = train_cli.config_from_flags()
    count = 0 if strategy == "default" else FLAGS.bench_devices
    parallel = config_lib.ParallelConfig(**{**run.parallel.__dict__, "strategy": strategy,
                                            "num_virtual_devices": count})
    return run.replace(parallel=parallel, model_dir=None, metrics_json=None, verbose=0)


def _run_cell(spec) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "tfpar.bench", f"--cell={json.dumps(spec)}"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark cell {spec['impl']}/{spec['run']['parallel']['strategy']} "
                           f"failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _markdown(summary, peak, flops_per_token) -> str:
    lines = ["| strategy | impl | ms/step (± sd) | tokens/s | MFU | tfpar/plain | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for key, row in summary.items():
        plain = summary.get(f"{row['strategy']}/plain")
        ratio = f"{row['tokens_per_second'] / plain['tokens_per_second']:.3f}" if plain and row["impl"] == "tfpar" else ""
        mfu = row["tokens_per_second"] * flops_per_token / peak if flops_per_token else 0.0
        lines.append(f"| {row['strategy']} ({row['devices'] or 1} dev) | {row['impl']} | "
                     f"{1000 * row['step_seconds']:.0f} (± {1000 * row['step_seconds_stdev']:.0f}) | "
                     f"{row['tokens_per_second']:,.0f} | {100 * mfu:.1f} % | {ratio} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + f"\n\nmatmul peak (float32, 2048²): {peak / 1e9:.0f} GFLOP/s\n"


def _plot(summary, path) -> None:
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    names = list(summary)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [summary[n]["tokens_per_second"] for n in names])
    ax.set_ylabel("tokens/s")
    ax.set_title("tfpar-bench throughput")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv):
    if len(argv) > 1:
        train_cli.fail(f"unexpected arguments: {' '.join(argv[1:])}.")
    train_cli.quiet_tensorflow()
    if FLAGS.cell:
        from tfpar import benchmark  # pylint: disable=import-outside-toplevel
        print(json.dumps(benchmark.measure(json.loads(FLAGS.cell))), flush=True)
        return
    try:
        for name in FLAGS.strategies:
            config_lib.choice("strategies", name, config_lib.STRATEGIES)
        for impl in FLAGS.impls:
            config_lib.choice("impls", impl, ("tfpar", "plain"))
        runs = {s: _run_config(s) for s in FLAGS.strategies}
    except ValueError as e:
        train_cli.fail(str(e))
    from tfpar import benchmark  # pylint: disable=import-outside-toplevel
    cells = []
    for round_index in range(FLAGS.repeats):
        for strategy, run in runs.items():
            for impl in FLAGS.impls:
                spec = {"impl": impl, "run": benchmark.config_to_dict(run), "steps": FLAGS.steps,
                        "warmup": FLAGS.warmup, "window": FLAGS.window}
                cell = _run_cell(spec)
                print(f"round {round_index + 1}: {strategy}/{impl}: {1000 * cell['step_seconds']:.0f} ms/step",
                      flush=True)
                cells.append(cell)
    summary = benchmark.summarize(cells)
    peak = benchmark.matmul_peak_flops()
    any_run = next(iter(runs.values()))
    params = next((r["params"] for r in summary.values() if r["params"]), 0)
    flops_per_token = benchmark.model_flops_per_token(any_run.model, params) if params else 0.0
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    table = _markdown(summary, peak, flops_per_token)
    with open(os.path.join(FLAGS.out_dir, "bench.json"), "w") as f:
        json.dump({"summary": summary, "cells": cells, "matmul_peak_flops": peak,
                   "model_flops_per_token": flops_per_token}, f, indent=2)
    with open(os.path.join(FLAGS.out_dir, "bench.md"), "w") as f:
        f.write(table)
    _plot(summary, os.path.join(FLAGS.out_dir, "bench.png"))
    print(table)


def run_main():
    app.run(main, flags_parser=train_cli.parse_flags_one_line)


if __name__ == "__main__":
    run_main()
