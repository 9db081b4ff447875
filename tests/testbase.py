"""Shared test base: virtual CPU devices, a fresh TF context per test, tiny runs.

Logical devices can be configured only once per TF context, and collective
state (group and instance keys) outlives a strategy inside one context, so
each test starts from a reset context with NUM_DEVICES virtual CPUs, as TF's
own DTensor tests do.
"""

import os
import subprocess
import sys
from typing import Any, Dict, List, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl.testing import absltest  # noqa: E402
from absl.testing import parameterized  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.python.eager import context  # noqa: E402  # pylint: disable=g-direct-tensorflow-import

from tfpar import config as config_lib  # noqa: E402
from tfpar import devices  # noqa: E402

NUM_DEVICES = 4
ADAMW_ATOL = 2e-4  # see TestCase.assertSameWeights
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reset_devices(num_devices: int = NUM_DEVICES) -> None:
    """A fresh TF context split into `num_devices` virtual CPUs."""
    context._reset_context()  # pylint: disable=protected-access
    keras.backend.clear_session()
    devices.configure_virtual_devices(num_devices)


def tiny_run(strategy: str = "default", *, model: str = "gpt", steps: int = 5,
             global_batch_size: int = 8, devices_count: int = 0, data_dir: str = None,
             parallel: dict = None, eval_fraction: float = 0.0, **changes) -> config_lib.RunConfig:
    """A RunConfig for a tiny model and a few steps, dropout 0, silent."""
    model_cfg = config_lib.model_config(model, "tiny")
    data = config_lib.DataConfig(seq_len=model_cfg.seq_len, global_batch_size=global_batch_size,
                                 data_dir=data_dir, eval_fraction=eval_fraction)
    parallel_cfg = config_lib.ParallelConfig(strategy=strategy, num_virtual_devices=devices_count,
                                             **(parallel or {}))
    # No warmup: from step 0 every update moves the weights, so every loss after the first
    # depends on the gradients (a warmup from 0 makes the first two losses equal under any bug).
    defaults = dict(steps_per_epoch=steps, epochs=1, verbose=0, warmup_steps=0)
    defaults.update(changes)
    return config_lib.RunConfig(model=model_cfg, data=data, parallel=parallel_cfg, **defaults)


_REFERENCES: Dict[str, Tuple[Dict[str, Any], Dict[str, np.ndarray]]] = {}  # see TestCase.reference


class TestCase(parameterized.TestCase):
    """Resets TF and Keras before each test; shares one TFDS data_dir per class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = os.path.join(absltest.get_default_test_tmpdir(), "tfds")

    def setUp(self):
        super().setUp()
        reset_devices()
        keras.mixed_precision.set_global_policy("float32")

    def train(self, run: config_lib.RunConfig, extra_callbacks=()):
        from tfpar import driver  # pylint: disable=import-outside-toplevel
        if run.data.data_dir is None:
            run = run.replace(data=run.data.__class__(**{**run.data.__dict__, "data_dir": self.data_dir}))
        return driver.train(run, extra_callbacks=extra_callbacks)

    def reference(self, run: config_lib.RunConfig) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """The metrics and final weights (`weights_of`) of `run`, trained once per test process.

        Equivalence tests share their `default` references: the same run always trains to the
        same losses and weights, and pytest-xdist keeps a file's tests in one process.
        """
        key = repr(run)
        if key not in _REFERENCES:
            result = self.train(run)
            _REFERENCES[key] = (result.metrics, weights_of(result.model))
        return _REFERENCES[key]

    def bfloat16_reference(self, steps: int) -> List[float]:
        """`default`'s per-step losses under mixed_bfloat16 (train it before other strategies)."""
        return self.reference(tiny_run("default", steps=steps, mixed_precision="mixed_bfloat16"))[0]["step_losses"]

    def assertTrainedInMixedBfloat16(self, result, reference: List[float], min_drop: float = 0.0):
        """The losses of `default` under mixed_bfloat16 (`bfloat16_reference`), falling; float32
        weights; every layer computes in bfloat16.

        Strategies agree with `default` within 2.3e-4 (relative) over 8 steps (2026-11-27; other
        summation orders in bfloat16); rtol 2e-3 still sees a wrong gradient scale or stage.
        """
        losses = result.metrics["step_losses"]
        self.assertLossesClose(reference, losses, rtol=2e-3)
        self.assertLess(losses[-1], losses[0] - min_drop, losses)
        self.assertEqual({v.dtype for v in result.model.trainable_variables}, {"float32"})
        for layer in result.model.stack:
            self.assertEqual((layer.compute_dtype, layer.variable_dtype), ("bfloat16", "float32"), layer.name)

    def assertLossesClose(self, expected: List[float], actual: List[float], rtol: float = 1e-4):
        self.assertLen(actual, len(expected))
        np.testing.assert_allclose(actual, expected, rtol=rtol)

    def assertSameWeights(self, expected: Dict[str, np.ndarray], model, rtol: float = 1e-4,
                          atol: float = 1e-6):
        """The model's trainable variables equal `expected` (path -> value; see `weights_of`).

        Weights see what losses may not: under SGD a gradient scaled by a constant,
        under Adam (nearly scale-free) wrong gradients of rarely seen rows. Adam turns
        the rounding noise of near-zero gradients (embedding rows of rare bytes) into
        updates that differ by up to ~1e-5 after 10 steps (summation order differs
        between strategies and with the machine's load); with gradient clipping, which
        scales every gradient closer to Adam's epsilon, one embedding element of 16,384
        differed by 1.05e-4 under dtensor `model:4` (2026-11-27; SGD on that mesh, clipped
        too, agrees within 1e-6). AdamW runs pass ADAMW_ATOL, still a tenth of one
        step's update (~lr = 2e-3).
        """
        actual = weights_of(model)
        self.assertEqual(sorted(actual), sorted(expected))
        for path, value in actual.items():
            if path.endswith("attention/key/bias"):
                # Softmax ignores a shift shared by all keys: this bias's true gradient
                # is 0, so it holds only rounding noise, which Adam scales up.
                continue
            np.testing.assert_allclose(value, expected[path], rtol=rtol, atol=atol, err_msg=path)


def weights_of(model) -> Dict[str, np.ndarray]:
    """A model's trainable variables by path, as host arrays."""
    return {v.path: np.array(v.numpy()) for v in model.trainable_variables}


def run_cli(module: str, *args: str, timeout: float = 300, env: dict = None) -> subprocess.CompletedProcess:
    """Runs `python -m module args` and returns the completed process."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO_ROOT)


__all__ = ["absltest", "parameterized", "tf", "np", "keras", "TestCase", "tiny_run", "run_cli", "weights_of",
           "reset_devices", "NUM_DEVICES", "ADAMW_ATOL"]
