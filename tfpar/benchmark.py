"""Measurements behind tfpar-bench: one (implementation, strategy) cell per call.

`measure(spec)` trains either tfpar's model through `tfpar.driver` or the
same architecture written as plain Keras (a functional model over the same
layers, Keras's own `train_step`, `experimental_distribute_dataset`) and
returns step times after warm-up. Each cell runs in its own process (see
tfpar/bench.py) so that one cell's TF state cannot slow or break the next.
"""

import dataclasses
import statistics
import time
from typing import Any, Dict, List

import keras
import tensorflow as tf

from tfpar import config as config_lib
from tfpar import data as data_lib
from tfpar import modeling
from tfpar import training


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends: List[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def window_rates(ends: List[float], warmup: int, window: int) -> List[float]:
    """Seconds per step of consecutive windows of `window` steps after `warmup`."""
    rates = []
    for start in range(warmup, len(ends) - window, window):
        rates.append((ends[start + window] - ends[start]) / window)
    return rates


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


def model_flops_per_token(cfg: config_lib.ModelConfig, params: int) -> float:
    """6 x parameters + 12 x layers x seq x d (forward and backward)."""
    return 6 * params + 12 * cfg.num_layers * cfg.seq_len * cfg.d_model


def _plain_keras_fit(run: config_lib.RunConfig, adapter, steps: int) -> StepTimer:
    """The same model as plain Keras: functional, Keras's train_step, Keras's data path."""
    from tfpar import models  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(run.seed)
    with adapter.scope():
        tfpar_model = models.build(run.model)
        inputs = keras.Input((run.model.seq_len,), dtype="int32")
        state = inputs
        for layer in tfpar_model.stack:
            state = layer(state)
        model = keras.Model(inputs, state)
        optimizer = training.build_optimizer(
            run.optimizer, learning_rate=run.learning_rate, total_steps=steps,
            warmup_steps=run.warmup_steps, weight_decay=run.weight_decay)
        model.compile(optimizer=optimizer, loss=modeling.loss_fn(), jit_compile=run.jit_compile)
    dataset = data_lib.make_dataset_fn(run)(tf.distribute.InputContext())
    timer = StepTimer()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    return timer


def measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs one benchmark cell; `spec` holds impl, run (RunConfig as dict), steps, warmup, window."""
    from tfpar import devices, driver, strategies  # pylint: disable=import-outside-toplevel
    run = config_from_dict(spec["run"])
    devices.configure_virtual_devices(run.parallel.num_virtual_devices)
    adapter = strategies.from_config(run.parallel)
    steps, warmup, window = spec["steps"], spec["warmup"], spec["window"]
    if spec["impl"] == "plain":
        timer = _plain_keras_fit(run, adapter, steps)
        ends, params, per_device = timer.ends, None, None
    else:
        timer = StepTimer()
        result = driver.train(run.replace(steps_per_epoch=steps, epochs=1, verbose=0), adapter=adapter,
                              extra_callbacks=[timer])
        ends, params = timer.ends, result.metrics["params"]
        per_device = result.metrics["per_device_param_bytes"]
    rates = window_rates(ends, warmup, window)
    step_seconds = statistics.median(rates)
    tokens = run.data.global_batch_size * run.model.seq_len
    return {
        "impl": spec["impl"], "strategy": run.parallel.strategy,
        "devices": run.parallel.num_virtual_devices, "step_seconds": step_seconds,
        "step_seconds_windows": rates, "tokens_per_second": tokens / step_seconds,
        "params": params, "per_device_param_bytes": per_device,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    import resource  # pylint: disable=import-outside-toplevel
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def summarize(cells: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Median over repeats per (strategy, impl), with the spread of the windows."""
    grouped: Dict[tuple, List[Dict[str, Any]]] = {}
    for cell in cells:
        grouped.setdefault((cell["strategy"], cell["devices"], cell["impl"]), []).append(cell)
    summary = {}
    for (strategy, count, impl), group in grouped.items():
        windows = [w for c in group for w in c["step_seconds_windows"]]
        step = statistics.median(windows)
        summary[f"{strategy}/{impl}"] = {
            "strategy": strategy, "devices": count, "impl": impl, "step_seconds": step,
            "step_seconds_stdev": statistics.pstdev(windows) if len(windows) > 1 else 0.0,
            "tokens_per_second": group[0]["tokens_per_second"] * group[0]["step_seconds"] / step,
            "params": group[0]["params"], "per_device_param_bytes": group[0]["per_device_param_bytes"],
            "peak_rss_mb": max(c["peak_rss_mb"] for c in group), "windows": len(windows),
        }
    return summary


__all__ = ["measure", "matmul_peak_flops", "model_flops_per_token", "summarize"]
