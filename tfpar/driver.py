"""The training driver: config -> adapter -> model -> `model.fit` -> metrics.

`train(run)` is what `tfpar-train` calls; tests and users can call it as plain
Python. It composes the pieces and imports models and strategies, so nothing
below it imports it.
"""

import dataclasses
import json
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # pylint: disable=g-direct-tensorflow-import

from tfpar import callbacks as callbacks_lib
from tfpar import checkpointing
from tfpar import config as config_lib
from tfpar import data as data_lib
from tfpar import export as export_lib
from tfpar import modeling
from tfpar import plan as plan_lib
from tfpar import sources
from tfpar import training
from tfpar import models
from tfpar import strategies


def build_model(run: config_lib.RunConfig, adapter) -> modeling.LanguageModel:
    """Builds and compiles the model inside the adapter's scope."""
    with adapter.scope():
        model = models.build(run.model)
        adapter.prepare_model(model, run)
        optimizer = training.build_optimizer(
            run.optimizer, learning_rate=run.learning_rate, total_steps=run.total_steps,
            warmup_steps=run.warmup_steps, weight_decay=run.weight_decay,
            grad_clip_norm=run.grad_clip_norm)
        model.compile(optimizer=optimizer, loss=modeling.loss_fn(), jit_compile=False)
        adapter.prepare_optimizer(model, run)
    return model


def fit_callbacks(run: config_lib.RunConfig, adapter, model, work_dir: Optional[str],
                  recorder: callbacks_lib.StepRecorder, start_step: int = 0) -> List[Any]:
    """Per-epoch weights (while the loss is finite) and TensorBoard scalars under `work_dir`
    (the chief's model_dir), for a run that starts after `start_step` steps.

    Keras's TensorBoard callback (epoch metrics, profile) is added per `fit` call by `_fit_from`.
    """
    if not work_dir:
        return []
    logs = os.path.join(work_dir, "logs")
    return [
        callbacks_lib.FiniteEpochWeights(
            os.path.join(work_dir, "checkpoints", "epoch_{epoch:03d}.weights.h5"), recorder),
        callbacks_lib.TrainingScalars(
            os.path.join(logs, "steps"), run.data.global_batch_size * model.tokens_per_example(),
            adapter.devices, every_steps=min(10, run.steps_per_epoch), initial_step=start_step),
    ]


def _work_dir(run: config_lib.RunConfig, adapter) -> Optional[str]:
    """The chief writes to model_dir; other workers to a temporary place."""
    if not run.model_dir:
        return None
    if adapter.is_chief:
        return run.model_dir
    return tempfile.mkdtemp(prefix="tfpar_worker_")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns: the metrics JSON's content and the trained model."""
    metrics: Dict[str, Any]
    model: keras.Model


def train(run: config_lib.RunConfig, adapter=None, extra_callbacks=()) -> TrainResult:
    """Trains `run` under `adapter` (made from `run.parallel` if None).

    `extra_callbacks` are added to `model.fit`'s callbacks.

    Raises:
      ValueError: for a configuration the adapter cannot run.
      FloatingPointError: if the loss becomes non-finite (names the step).
    """
    adapter = adapter or strategies.from_config(run.parallel)
    adapter.validate(run)
    determinism_was_on = tf_config.is_op_determinism_enabled()
    if run.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(run.seed)
    eval_batches = data_lib.evaluated_batches(run)  # a bad --eval_split or fraction fails before the model
    work_dir = _work_dir(run, adapter)
    caller_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(run.mixed_precision)
    try:
        model = build_model(run, adapter)
        if run.verbose or run.plan_only:
            plan = plan_lib.make_plan(run, adapter, model)
            print(plan_lib.format_plan(plan), flush=True)
            if run.plan_only:  # the plan is what --metrics_json holds then
                if run.metrics_json and adapter.is_chief:
                    write_json(run.metrics_json, {"plan": plan})
                return TrainResult(metrics={"plan": plan}, model=model)
        recorder = callbacks_lib.StepRecorder(run.data.global_batch_size * model.tokens_per_example())
        callbacks = [recorder, *extra_callbacks]
        start_step = 0
        if work_dir:
            os.makedirs(work_dir, exist_ok=True)
            backup = checkpointing.StepBackup(
                os.path.join(work_dir, "backup"), model,
                every_steps=run.backup_every_steps or run.steps_per_epoch,
                restore_from=os.path.join(run.model_dir, "backup"))
            # Every worker checks the saved run, and all learn whether any refused, before the
            # restore: a restore (or a refusal) on some workers only would leave the others
            # waiting in collectives.
            try:
                backup_step = backup.latest_step()
                refusal = _resume_refusal(run) if backup_step > 0 else None
                error = ValueError(refusal) if refusal else None
            except (ValueError, OSError) as e:  # e.g. an unreadable config.json or text file
                backup_step, error = -1, e
            adapter.check_resume_step(backup_step, refused=error is not None)
            if error:
                raise error
            with adapter.scope():  # the optimizer may build its slots here
                start_step = backup.restore()
            # Written once the resume is accepted (a refused rerun leaves the model_dir as it
            # was), atomically: other workers may read it.
            write_json(os.path.join(work_dir, "config.json"),
                       {**dataclasses.asdict(run), "data_source": sources.source_version(run.data)})
            callbacks += [*fit_callbacks(run, adapter, model, work_dir, recorder, start_step), backup]
            if start_step and run.verbose:
                print(f"tfpar: resuming from the backup at step {start_step}", flush=True)
        start = time.perf_counter()
        _fit_from(run, adapter, model, start_step, callbacks, work_dir, eval_batches)
        wall = time.perf_counter() - start
        if recorder.non_finite_step is not None:
            raise FloatingPointError(
                f"loss became non-finite at step {start_step + recorder.non_finite_step}; "
                "training stopped and the last good checkpoint was kept.")
        if not checkpointing.weights_are_finite(model):  # the last update, which no loss has seen
            raise FloatingPointError(
                f"weights became non-finite at step {start_step + len(recorder.step_losses)} "
                "(the last update); the last good checkpoint was kept.")
        if work_dir:
            model.save_weights(os.path.join(work_dir, "final.weights.h5"))
        if run.export_dir and adapter.is_chief:
            export_lib.export(model, run.export_dir)
        metrics = collect_metrics(run, adapter, model, recorder, wall)
        if run.metrics_json:  # measured after training (seconds of work), for the JSON only
            metrics.update(adapter.measured_metrics(
                model, lambda: next(iter(data_lib.make_dataset_fn(run)(tf.distribute.InputContext()))),
                recorder.step_seconds))
        metrics["resumed_from_step"] = start_step
        if run.metrics_json and adapter.is_chief:
            write_json(run.metrics_json, metrics)
        return TrainResult(metrics=metrics, model=model)
    finally:
        keras.mixed_precision.set_global_policy(caller_policy)  # the process as found
        if run.deterministic and not determinism_was_on:
            tf_config.disable_op_determinism()  # no public API; train() must leave the process as found
        if work_dir and not adapter.is_chief:
            shutil.rmtree(work_dir, ignore_errors=True)


# What a resumed run must share with the run it continues, besides the data: the model
# (shapes are checked by the restore, the rest is not) and how the optimizer steps.
_RESUMED_SETTINGS = ("optimizer", "learning_rate", "warmup_steps", "weight_decay", "grad_clip_norm",
                     "mixed_precision")


def _resume_refusal(run: config_lib.RunConfig) -> Optional[str]:
    """Why `run` cannot resume the run saved in its model_dir, or None.

    A resumed run must read the data as the saved run did (or it resumes at the wrong
    batch), with the same model and optimizer settings (or it does not continue that run).
    More steps or epochs are allowed: they extend it.
    """
    path = os.path.join(run.model_dir, "config.json")
    if not os.path.exists(path):  # a backup from before config.json was written
        return None
    with open(path) as f:
        saved = json.load(f)
    current = json.loads(json.dumps(dataclasses.asdict(run)))  # tuples as the JSON's lists
    current["data_source"] = sources.source_version(run.data)  # e.g. a text file edited since
    # Defaults were written as values before they became None (warmup 20, weight decay 0.1).
    if saved.get("warmup_steps") == config_lib.DEFAULT_WARMUP_STEPS and run.warmup_steps is None:
        saved["warmup_steps"] = None
    for config in (current, saved):
        # A resumed run takes the schedule of its own length (more steps extend a run): a
        # default warmup is compared as the steps it means for that length.
        config["warmup_steps"] = training.warmup_steps_for(config.get("warmup_steps"), run.total_steps)
        if config.get("optimizer") == "sgd":  # SGD never applied a weight decay
            config["weight_decay"] = None
        elif config.get("weight_decay") is None:
            config["weight_decay"] = config_lib.DEFAULT_WEIGHT_DECAY
        config.setdefault("grad_clip_norm", 0.0)  # runs saved before clipping was not clipped
        config.setdefault("data", {}).setdefault("eval_fraction", 0.0)  # nor held out any text
    if current["data_source"].startswith(f"{saved.get('data_source')} sha1:"):
        saved["data_source"] = current["data_source"]  # saved before the builtin text's hash was
    # Where data lives, and what is evaluated (never trained on), may change.
    data_keys = [k for k in current["data"] if k not in ("data_dir", "eval_split")]
    compared = [(current["data"], saved.get("data", {}), data_keys),
                (current["model"], saved.get("model", {}), list(current["model"])),
                (current, saved, (*_RESUMED_SETTINGS, "data_source"))]
    changed = {k: (now[k], before[k]) for now, before, keys in compared for k in keys
               if k in before and before[k] != now[k]}  # seq_len is in data and model: named once
    if not changed:
        return None
    return ("--model_dir holds a run that read other data or trained with other settings, so this "
            "run cannot resume it. Received: " + ", ".join(f"{k}={v!r}" for k, (v, _) in changed.items()) +
            "; accepted: " + ", ".join(f"{k}={s!r}" for k, (_, s) in changed.items()) + " as in " + path +
            ", or a new --model_dir.")


def _tensorboard(run: config_lib.RunConfig, work_dir: Optional[str], steps_done: int) -> List[Any]:
    """Keras's TensorBoard callback for a `fit` call that starts after `steps_done` steps.

    Keras counts profile batches from each `fit` call's start; the run's
    --profile_steps FIRST,LAST count from the run's first step, across resumes.
    """
    if not work_dir:
        return []
    first, last = run.profile_steps or (0, 0)
    profile = (max(first - steps_done, 1), last - steps_done) if last > steps_done else 0
    return [keras.callbacks.TensorBoard(os.path.join(work_dir, "logs"), update_freq="epoch",
                                        profile_batch=profile)]


def _fit_from(run, adapter, model, start_step: int, callbacks, work_dir: Optional[str] = None,
              eval_batches: int = 0) -> None:
    """Runs `fit` for the steps after `start_step`, on exactly the batches not yet seen,
    evaluating `eval_batches` held-out batches after each epoch.

    A run resumed mid-epoch first finishes that epoch, then runs whole epochs;
    one resumed at or past its last step trains nothing.
    """
    if start_step >= run.total_steps:
        return
    evaluation = {}
    if eval_batches:
        held_out = adapter.distribute_dataset(data_lib.make_eval_dataset_fn(run, eval_batches))
        evaluation = dict(validation_data=held_out, validation_steps=eval_batches)
    epoch, offset = divmod(start_step, run.steps_per_epoch)
    if offset:
        dataset = adapter.distribute_dataset(data_lib.make_dataset_fn(run, skip_steps=start_step))
        model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1,
                  steps_per_epoch=run.steps_per_epoch - offset,
                  callbacks=callbacks + _tensorboard(run, work_dir, start_step), verbose=run.verbose,
                  **evaluation)
        epoch += 1
    if epoch < run.epochs and not model.stop_training:
        skip = epoch * run.steps_per_epoch
        dataset = adapter.distribute_dataset(data_lib.make_dataset_fn(run, skip_steps=skip))
        model.fit(dataset, initial_epoch=epoch, epochs=run.epochs, steps_per_epoch=run.steps_per_epoch,
                  callbacks=callbacks + _tensorboard(run, work_dir, skip), verbose=run.verbose, **evaluation)


def collect_metrics(run, adapter, model, recorder, wall_seconds) -> Dict[str, Any]:
    """The metrics JSON of DESIGN.md."""
    cfg = dataclasses.asdict(run.model)
    return {
        "strategy": adapter.name,
        "num_replicas": adapter.num_replicas,
        "devices": adapter.devices,
        "params": modeling.count_params(model),
        "model_config": cfg,
        "global_batch_size": run.data.global_batch_size,
        "grad_accum_steps": run.grad_accum_steps,
        "grad_reduce_dtype": run.parallel.grad_reduce_dtype,
        "mixed_precision": run.mixed_precision,
        "jit_compile": run.jit_compile,
        "step_losses": recorder.step_losses,
        "final_loss": recorder.step_losses[-1] if recorder.step_losses else None,
        "val_losses": recorder.val_losses,
        "grad_norms": recorder.grad_norms,
        "tokens_per_second": recorder.tokens_per_second,
        "step_seconds": recorder.step_seconds,
        "step_end_seconds": [t - recorder.start_time for t in recorder.step_ends],
        "wall_seconds": wall_seconds,
        "per_device_param_bytes": adapter.per_device_param_bytes(model),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **adapter.extra_metrics(),
    }


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Writes JSON atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
