"""Measurements behind tfpar-bench: one (implementation, strategy) cell per call.

`measure(spec)` trains either tfpar's model through `tfpar.driver` or the
same architecture written as plain Keras (a functional model over the same
layers, Keras's own `train_step`, `experimental_distribute_dataset`) and
returns step times after warm-up. Each cell runs in its own process (see
tfpar/bench.py) so that one cell's TF state cannot slow or break the next.
"""

import dataclasses
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any, Dict, List

import keras
import tensorflow as tf

from tfpar import callbacks as callbacks_lib
from tfpar import config as config_lib
from tfpar import data as data_lib
from tfpar import modeling
from tfpar import training


def window_rates(ends: List[float], warmup: int, window: int) -> List[float]:
    """Seconds per step of consecutive windows of `window` steps after the first `warmup` (>= 1).

    `ends[i]` is when step i ended, so a window of steps i..i+window-1 lasts
    from ends[i-1] to ends[i+window-1].
    """
    if warmup < 1 or window < 1:
        raise ValueError(f"warmup and window must be >= 1. Received: warmup={warmup}, "
                         f"window={window}; accepted: integers >= 1 (step 1 has no start time).")
    return [(ends[last] - ends[last - window]) / window
            for last in range(warmup - 1 + window, len(ends), window)]


def matmul_peak_flops(size: int = 2048, repeats: int = 10, dtype=tf.float32) -> float:
    """Best measured FLOP/s of a size x size matmul on this machine's first device."""
    a = tf.random.normal((size, size), dtype=dtype)
    b = tf.random.normal((size, size), dtype=dtype)
    mm = tf.function(lambda x, y: tf.matmul(x, y))
    mm(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def machine() -> Dict[str, Any]:
    """What the figures were measured on. The same "2-core CPU machine" may be one of
    several CPU models, whose matmul peaks differ (an MFU is only comparable on one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:  # not Linux
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    accelerators = [d.name for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
    return {"cpu": cpu, "cores": cores, "accelerators": accelerators, "tensorflow": tf.__version__}


def describe_machine(info: Dict[str, Any]) -> str:
    accelerators = ", ".join(info["accelerators"]) or "no accelerator"
    return f"{info['cpu']}, {info['cores']} cores, {accelerators}, TensorFlow {info['tensorflow']}"


def leave_gpu_memory_to_cells() -> None:
    """Lets this process's peak timings take only the GPU memory they use, so
    that the cells it starts afterwards get the rest."""
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def peak_dtype(mixed_precision: str) -> tf.DType:
    """The dtype of the matmul peak a run's MFU is measured against."""
    return {"mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}.get(mixed_precision, tf.float32)


def model_flops_per_token(cfg: config_lib.ModelConfig, params: int) -> float:
    """6 x parameters + 12 x attention layers x seq x d (forward and backward).

    A GPT block has one attention layer; a seq2seq block pair three (encoder
    self-attention, decoder self-attention, cross-attention), each over seq_len keys.
    """
    attention_layers = cfg.num_layers * (3 if cfg.name == "seq2seq" else 1)
    return 6 * params + 12 * attention_layers * cfg.seq_len * cfg.d_model


def _plain_keras_fit(run: config_lib.RunConfig, adapter, steps: int, jit_compile) -> tuple:
    """The same model as plain Keras: functional, Keras's train_step, Keras's data path.

    Returns the step end times and the XLA setting Keras resolved (`jit_compile="auto"`
    is off on a CPU-only machine and under tf.distribute).
    """
    from tfpar import models  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(run.seed)
    keras.mixed_precision.set_global_policy(run.mixed_precision)  # as tfpar's cell computes
    try:
        with adapter.scope():
            tfpar_model = models.build(run.model)
            example = tfpar_model.example_inputs()  # seq2seq: a dict of encoder and decoder tokens
            if isinstance(example, dict):
                inputs = {k: keras.Input(t.shape[1:], dtype=t.dtype, name=k) for k, t in example.items()}
            else:
                inputs = keras.Input(example.shape[1:], dtype=example.dtype)
            state = inputs
            for layer in tfpar_model.stack:
                state = layer(state)
            model = keras.Model(inputs, state)
            optimizer = training.build_optimizer(
                run.optimizer, learning_rate=run.learning_rate, total_steps=steps,
                warmup_steps=run.warmup_steps, weight_decay=run.weight_decay,
                grad_clip_norm=run.grad_clip_norm)
            model.compile(optimizer=optimizer, loss=modeling.loss_fn(), jit_compile=jit_compile)
        dataset = data_lib.make_dataset_fn(run)(tf.distribute.InputContext())
        recorder = callbacks_lib.StepRecorder(tokens_per_step=0)
        model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[recorder], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return recorder.step_ends, bool(model.jit_compile)


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs one benchmark cell in this process; `spec` is what tfpar/bench.py plans."""
    from tfpar import devices, driver, strategies  # pylint: disable=import-outside-toplevel
    run = config_from_dict(spec["run"])
    # plain Keras gets TF's default thread pools, as hand-written code would.
    concurrent = run.parallel.concurrent_devices if spec["impl"] == "tfpar" else 1
    devices.configure_virtual_devices(run.parallel.num_virtual_devices, concurrent)
    adapter = strategies.from_config(run.parallel)
    if spec["impl"] == "plain":
        ends, jit_compile = _plain_keras_fit(run, adapter, spec["steps"], spec["keras_jit_compile"])
        metrics = {"params": None, "per_device_param_bytes": None, "step_end_seconds": ends,
                   "jit_compile": jit_compile,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    else:
        with tempfile.TemporaryDirectory() as tmp:  # a metrics JSON turns on the measured metrics
            metrics = driver.train(run.replace(steps_per_epoch=spec["steps"], epochs=1, verbose=0,
                                               metrics_json=os.path.join(tmp, "metrics.json")),
                                   adapter=adapter).metrics
    return result_from_metrics(spec, run, metrics)


def result_from_metrics(spec, run: config_lib.RunConfig, metrics) -> Dict[str, Any]:
    """One cell's result from its step end times and tfpar's metrics JSON."""
    rates = window_rates(metrics["step_end_seconds"], spec["warmup"], spec["window"])
    step_seconds = statistics.median(rates)
    return {
        "label": spec["label"], "impl": spec["impl"], "strategy": run.parallel.strategy,
        "devices": len(metrics.get("devices") or []) or max(run.parallel.num_virtual_devices, 1),
        "workers": spec.get("launch_workers", 1), "scaling": spec.get("scaling"),
        "model_config": dataclasses.asdict(run.model), "mixed_precision": run.mixed_precision,
        "jit_compile": metrics.get("jit_compile", run.jit_compile), "optimizer": run.optimizer,
        "step_seconds": step_seconds, "step_seconds_windows": rates,
        "tokens_per_second": run.data.global_batch_size * run.model.seq_len / step_seconds,
        "params": metrics.get("params"), "per_device_param_bytes": metrics.get("per_device_param_bytes"),
        "bubble_fraction_gpipe_bound": metrics.get("bubble_fraction_gpipe_bound"),
        "num_stages": run.parallel.pipeline_stages if run.parallel.strategy == "pipeline" else None,
        "stage_busy_seconds": metrics.get("stage_busy_seconds"),
        "pipeline_efficiency": metrics.get("pipeline_efficiency"),
        "traced_step_seconds": metrics.get("traced_step_seconds"),
        "stage_compute_seconds": metrics.get("stage_compute_seconds"),
        "peak_rss_mb": metrics["peak_rss_mb"],
    }


def train_flags(run: config_lib.RunConfig, steps: int) -> List[str]:
    """tfpar-train flags for `run` with `steps` steps (the multi_worker cell's command line)."""
    m = run.model
    return [f"--strategy={run.parallel.strategy}", f"--model={m.name}", f"--model_size={m.size}",
            f"--seq_len={m.seq_len}", f"--dropout={m.dropout}",
            f"--global_batch_size={run.data.global_batch_size}", f"--steps_per_epoch={steps}",
            "--epochs=1", f"--optimizer={run.optimizer}", f"--learning_rate={run.learning_rate}",
            f"--mixed_precision={run.mixed_precision}", f"--grad_accum_steps={run.grad_accum_steps}",
            f"--jit_compile={run.jit_compile}", f"--seed={run.seed}",
            f"--deterministic={run.deterministic}", f"--communication={run.parallel.communication}",
            f"--grad_reduce_dtype={run.parallel.grad_reduce_dtype}", f"--grad_clip_norm={run.grad_clip_norm}",
            f"--dataset={run.data.dataset}", "--verbose=0"] + (
                [f"--data_dir={run.data.data_dir}"] if run.data.data_dir else []) + (
                [f"--warmup_steps={run.warmup_steps}"] if run.warmup_steps is not None else []) + (
                [f"--weight_decay={run.weight_decay}"] if run.weight_decay is not None else [])


def config_from_dict(d: Dict[str, Any]) -> config_lib.RunConfig:
    """Inverse of dataclasses.asdict for RunConfig."""
    parallel = dict(d["parallel"])
    parallel["devices"] = tuple(parallel["devices"])
    parallel["stage_boundaries"] = tuple(parallel["stage_boundaries"])
    return config_lib.RunConfig(**{
        **d, "model": config_lib.ModelConfig(**d["model"]), "data": config_lib.DataConfig(**d["data"]),
        "parallel": config_lib.ParallelConfig(**parallel)})


def config_to_dict(run: config_lib.RunConfig) -> Dict[str, Any]:
    return dataclasses.asdict(run)


def report(results: List[Dict[str, Any]], base: config_lib.RunConfig) -> Dict[str, Any]:
    """Per (label, impl): median step time over every window of every round, and derived figures.

    MFU is against the median of the matmul peaks timed before each cell
    (`matmul_peak_flops` in the results; one peak timed now if none has one):
    on a shared machine a single timing of the peak is noisy and does not move
    with the step times, and one peak for every row keeps MFU in the order of
    tokens/s. Each row also keeps the median peak of its own rounds.
    """
    grouped: Dict[tuple, List[Dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault((result["label"], result["impl"]), []).append(result)
    dtype = peak_dtype(base.mixed_precision)
    peaks = [r["matmul_peak_flops"] for r in results if r.get("matmul_peak_flops")] or (
        [matmul_peak_flops(dtype=dtype)] if results else [])
    peak = statistics.median(peaks) if peaks else None
    rows = {}
    for (label, impl), group in grouped.items():
        first = group[0]
        windows = [w for r in group for w in r["step_seconds_windows"]]
        step = statistics.median(windows)
        cfg = config_lib.ModelConfig(**first["model_config"])
        params = next((r["params"] for r in results if r["params"] and r["model_config"] == first["model_config"]), 0)
        tokens_per_second = base.data.global_batch_size * cfg.seq_len / step
        own_peaks = [r["matmul_peak_flops"] for r in group if r.get("matmul_peak_flops")]
        slots = 3 if first["optimizer"] == "adamw" else 1  # weights + Adam's two moments
        per_device = first["per_device_param_bytes"]
        rows[f"{label}/{impl}"] = {
            **{k: first[k] for k in ("label", "impl", "strategy", "devices", "workers", "scaling",
                                     "num_stages", "bubble_fraction_gpipe_bound", "jit_compile")},
            **{key: ([statistics.median(t) for t in zip(*(r[key] for r in group))] if first.get(key) else None)
               for key in ("stage_busy_seconds", "stage_compute_seconds")},
            **{key: (statistics.median(r[key] for r in group) if first.get(key) is not None else None)
               for key in ("pipeline_efficiency", "traced_step_seconds")},
            "model_config": first["model_config"], "params": params,
            "step_seconds": step, "step_seconds_stdev": statistics.pstdev(windows) if len(windows) > 1 else 0.0,
            "windows": len(windows), "tokens_per_second": tokens_per_second,
            "matmul_peak_flops": statistics.median(own_peaks) if own_peaks else None,
            "mfu": tokens_per_second * model_flops_per_token(cfg, params) / peak if params else None,
            "per_device_state_bytes": max(per_device) * slots if per_device else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in group),
        }
    for row in rows.values():
        plain = rows.get(f"{row['label']}/plain")
        row["tfpar_over_plain"] = (row["tokens_per_second"] / plain["tokens_per_second"]
                                   if plain and row["impl"] == "tfpar" else None)
        if row["num_stages"] and row["pipeline_efficiency"] is not None:
            # Measured efficiency (profiler trace): device busy time over devices x the traced step.
            row["bubble_fraction_measured"] = 1.0 - row["pipeline_efficiency"]
            row["efficiency_over_gpipe_bound"] = row["pipeline_efficiency"] / (1.0 - row["bubble_fraction_gpipe_bound"])
            # Against the stages' compute run alone: also counts their slowdown on shared cores.
            row["compute_efficiency"] = (sum(row["stage_compute_seconds"]) /
                                         (row["num_stages"] * row["step_seconds"]))
    return {"rows": rows, "matmul_peak_flops": peak,
            "matmul_peak_flops_range": [min(peaks), max(peaks)] if peaks else None, "peak_dtype": dtype.name,
            "global_batch_size": base.data.global_batch_size, "model_size": base.model.size,
            "mixed_precision": base.mixed_precision, "machine": machine()}


def _fmt(value, pattern: str, scale: float = 1) -> str:
    return "" if value is None else pattern.format(value * scale)


def _on_off(row) -> str:
    return "on" if row["jit_compile"] else "off"


def markdown(rep: Dict[str, Any]) -> str:
    """The report as markdown tables (strategies, then scaling)."""
    head = ("| cell | impl | XLA | ms/step (± sd) | tokens/s | MFU | tfpar/plain | state bytes/device "
            "| peak RSS MB per process | bubble measured (bound) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines, scaling = [head], ["| scaling | XLA | params | ms/step | tokens/s | MFU | peak RSS MB |",
                              "|---|---|---|---|---|---|---|"]
    for row in rep["rows"].values():
        if row["scaling"]:
            field, value = row["scaling"]
            scaling.append(f"| {field}={value} | {_on_off(row)} | {row['params']:,} | {1000 * row['step_seconds']:.0f} | "
                           f"{row['tokens_per_second']:,.0f} | {_fmt(row['mfu'], '{:.1%}')} | {row['peak_rss_mb']:.0f} |")
            continue
        bubble = ""
        if row.get("bubble_fraction_measured") is not None:
            bubble = f"{row['bubble_fraction_measured']:.2f} ({row['bubble_fraction_gpipe_bound']:.2f})"
        lines.append(
            f"| {row['label']} | {row['impl']} | {_on_off(row)} | {1000 * row['step_seconds']:.0f} (± {1000 * row['step_seconds_stdev']:.0f}) "
            f"| {row['tokens_per_second']:,.0f} | {_fmt(row['mfu'], '{:.1%}')} | {_fmt(row['tfpar_over_plain'], '{:.3f}')} "
            f"| {_fmt(row['per_device_state_bytes'], '{:,}')} | {row['peak_rss_mb']:.0f} | {bubble} |")
    for key, error in rep.get("failures", {}).items():
        label, impl = key.rsplit("/", 1)
        lines.append(f"| {label} | {impl} | | fails: {error.split('failed: ')[-1][:120]} | | | | | | |")
    text = "\n".join(lines)
    pipeline = [r for r in rep["rows"].values() if r.get("efficiency_over_gpipe_bound") is not None]
    if pipeline:
        text += ("\n\n| pipeline | ms/step | traced step ms | device busy ms (trace) | efficiency | "
                 "GPipe bound | efficiency / bound | stage compute ms (alone) | compute-only efficiency |\n"
                 "|---|---|---|---|---|---|---|---|---|\n")
        text += "\n".join(
            f"| {r['label']} | {1000 * r['step_seconds']:.0f} | {_fmt(r['traced_step_seconds'], '{:.0f}', 1000)} "
            f"| {', '.join(f'{1000 * b:.0f}' for b in r['stage_busy_seconds'])} "
            f"| {r['pipeline_efficiency']:.2f} | {1 - r['bubble_fraction_gpipe_bound']:.2f} "
            f"| {r['efficiency_over_gpipe_bound']:.2f} | {', '.join(f'{1000 * c:.0f}' for c in r['stage_compute_seconds'])} "
            f"| {r['compute_efficiency']:.2f} |" for r in pipeline)
    if len(scaling) > 2:
        text += "\n\n" + "\n".join(scaling)
    text += (f"\n\nmodel {rep['model_size']}, global batch {rep['global_batch_size']}, "
             f"{rep['mixed_precision']}")
    if rep["matmul_peak_flops"]:
        low, high = rep["matmul_peak_flops_range"]
        text += (f"; matmul peak ({rep['peak_dtype']}, 2048^2, best of 10, timed before each cell): "
                 f"median {rep['matmul_peak_flops'] / 1e9:.0f} GFLOP/s ({low / 1e9:.0f}–{high / 1e9:.0f}), "
                 f"the MFU of every row")
    if rep.get("machine"):
        text += f"; measured on {describe_machine(rep['machine'])}"
    return text + "\n"


def plot(rep: Dict[str, Any], path: str) -> bool:
    """Throughput and MFU per cell, and the scaling curves, into one PNG.

    Returns False, writing nothing, without matplotlib (`pip install -e ".[bench]"`).
    """
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return False
    rows = [r for r in rep["rows"].values() if not r["scaling"]]
    curves = {}
    for r in rep["rows"].values():
        if r["scaling"]:
            curves.setdefault(r["scaling"][0], []).append((r["scaling"][1], r["tokens_per_second"], r["peak_rss_mb"]))
    pipeline = {}  # K -> [(M, row)]: the GPipe bound depends on both
    for r in rows:
        if r.get("pipeline_efficiency") is not None:
            pipeline.setdefault(r["num_stages"], []).append((int(r["label"].split("xM")[1]), r))
    extra = len(curves) + (1 if pipeline else 0)
    fig, axes = plt.subplots(1, 2 + extra, figsize=(6 + 4 * (1 + extra), 4))
    names = [f"{r['label']}\n{r['impl']}" for r in rows]
    axes[0].bar(names, [r["tokens_per_second"] for r in rows])
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(names, [100 * (r["mfu"] or 0) for r in rows])
    axes[1].set_ylabel("MFU %")
    for ax in axes[:2]:
        plt.setp(ax.get_xticklabels(), rotation=60, ha="right", fontsize=7)
    for ax, (field, points) in zip(axes[2:], curves.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="tokens/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(field)
        ax.set_ylabel("tokens/s")
        twin = ax.twinx()
        twin.plot([p[0] for p in points], [p[2] for p in points], "s--", color="tab:red", label="peak RSS MB")
        twin.set_ylabel("peak RSS MB")
    if pipeline:
        ax = axes[-1]
        for k, points in sorted(pipeline.items()):
            points.sort(key=lambda point: point[0])
            micro, cells = [m for m, _ in points], [r for _, r in points]
            line = ax.plot(micro, [r["pipeline_efficiency"] for r in cells], "o-", label=f"K={k} measured (trace)")
            color = line[0].get_color()
            ax.plot(micro, [r["compute_efficiency"] for r in cells], "s:", color=color,
                    label=f"K={k} vs stages' compute alone")
            ax.plot(micro, [1 - r["bubble_fraction_gpipe_bound"] for r in cells], "--", color=color,
                    label=f"K={k} GPipe bound")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batches M")
        ax.set_ylabel("pipeline efficiency")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle("tfpar-bench (" + rep["model_size"] + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


__all__ = ["measure", "matmul_peak_flops", "machine", "peak_dtype", "leave_gpu_memory_to_cells",
           "model_flops_per_token", "report", "markdown", "plot"]
