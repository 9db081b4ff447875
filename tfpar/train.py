"""tfpar-train: train a built-in Transformer under a parallel strategy.

    tfpar-train                                  # default run: mirrored, 2 virtual CPUs
    tfpar-train --strategy=default --model_size=tiny --steps_per_epoch=20
    python -m tfpar.train --flagfile=run.flags

Bad input exits with status 2 and one line on stderr, before TensorFlow starts.
"""

import contextlib
import json
import os
import sys
import tempfile
import warnings
from typing import Optional

from absl import app
from absl import flags
from absl import logging

from tfpar import cli
from tfpar import cluster
from tfpar import checks
from tfpar import config as config_lib
from tfpar import layouts

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "gpt", f"Model: {', '.join(config_lib.MODELS)}.")
flags.DEFINE_string("model_size", "small", f"Size preset: {', '.join(config_lib.MODEL_SIZES)}.")
flags.DEFINE_string("strategy", "mirrored", f"Strategy: {', '.join(config_lib.STRATEGIES)}.")
flags.DEFINE_integer("num_virtual_devices", 2, "Split the CPU (or, when given, the first GPU) into N "
                     "logical devices; 0 leaves them. Not given, GPUs are left whole.")
flags.DEFINE_list("devices", [], "Devices for `mirrored` (default: the first N virtual devices).")
flags.DEFINE_string("cross_device_ops", "auto", f"mirrored all-reduce: {', '.join(config_lib.CROSS_DEVICE_OPS)}.")
flags.DEFINE_string("communication", "auto", f"multi_worker collectives: {', '.join(config_lib.COMMUNICATIONS)}.")
flags.DEFINE_string("grad_reduce_dtype", "float32",
                    f"multi_worker: dtype in which gradients are summed over workers: "
                    f"{', '.join(config_lib.GRAD_REDUCE_DTYPES)} (bfloat16 halves the bytes and rounds "
                    f"the gradients and sums, also on a single worker).")
flags.DEFINE_string("mesh", "", "dtensor mesh, e.g. batch:2,model:2.")
flags.DEFINE_string("layout_rules", "", "dtensor layout rules file (JSON).")
flags.DEFINE_integer("pipeline_stages", 1, "pipeline: number of stages K.")
flags.DEFINE_integer("num_microbatches", 1, "pipeline: micro-batches M per replica batch.")
flags.DEFINE_string("pipeline_schedule", "gpipe", f"pipeline schedule: {', '.join(config_lib.SCHEDULES)}.")
flags.DEFINE_list("stage_boundaries", [], "pipeline: explicit first stack index of stages 2..K "
                  "(the stack is embed, block_0, ..., head: block i is index i + 1).")
flags.DEFINE_bool("remat", False, "pipeline: recompute activations in the backward pass.")
flags.DEFINE_integer("global_batch_size", 16, "Examples per optimizer step, over all replicas.")
flags.DEFINE_integer("seq_len", None, "Tokens per example (default: the size preset's).")
flags.DEFINE_integer("steps_per_epoch", 50, "Optimizer steps per epoch.")
flags.DEFINE_integer("epochs", 4, "Epochs.")
flags.DEFINE_string("optimizer", "adamw", f"Optimizer: {', '.join(config_lib.OPTIMIZERS)}.")
flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate (linear warmup, then cosine decay).")
flags.DEFINE_integer("warmup_steps", None, "Steps of linear learning-rate warmup (default: 20, or the "
                     "run's steps - 1 when it has fewer; a given number is kept as given).")
flags.DEFINE_float("weight_decay", None, "AdamW's decoupled weight decay (default 0.1); SGD takes none.")
flags.DEFINE_float("grad_clip_norm", 1.0, "Clip the gradients to this global norm, measured on the "
                   "gradients summed over all replicas, after accumulation (nanoGPT's and Megatron's "
                   "default, 1.0); 0 turns clipping off.")
flags.DEFINE_float("dropout", 0.0, "Dropout rate.")
flags.DEFINE_string("mixed_precision", "float32", f"Precision policy: {', '.join(config_lib.PRECISIONS)}.")
flags.DEFINE_integer("grad_accum_steps", 1, "Split each replica's batch into this many micro-batches, run "
                     "one after another; their gradients are averaged into one update (the global batch "
                     "stays --global_batch_size; Keras's gradient_accumulation_steps instead takes that "
                     "many batches per update).")
flags.DEFINE_bool("jit_compile", None, "Compile with XLA: the whole step without a strategy, the gradient "
                  "computation under one (default: on in float32 under default, mirrored and "
                  "multi_worker; dtensor and pipeline do not support it).")
flags.DEFINE_string("dataset", "builtin", "builtin, text:PATH or tfds:NAME.")
flags.DEFINE_float("eval_fraction", 0.0, "Hold out this fraction of a builtin or text:PATH source's "
                   "windows, its end (nanoGPT's val split), and report their loss after each epoch "
                   "(val_loss); 0: no evaluation.")
flags.DEFINE_string("eval_split", "", "Evaluate this split of a tfds:NAME source after each epoch "
                    "(val_loss), e.g. validation, or a slice such as validation[:10%]; '': none.")
flags.DEFINE_integer("eval_steps", 0, "Held-out global batches evaluated after each epoch (0: all).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("model_dir", None, "Checkpoints, backup, TensorBoard logs and final weights.")
flags.DEFINE_integer("backup_every_steps", 0, "BackupAndRestore every N steps (0: every epoch).")
flags.DEFINE_integer("seed", 0, "Seed for weights and data order.")
flags.DEFINE_string("metrics_json", None, "Write run metrics to this JSON file.")
flags.DEFINE_string("export_dir", None, "Export the trained model (.keras and SavedModel) here.")
flags.DEFINE_bool("deterministic", False, "Op determinism: bitwise-equal runs for a seed.")
flags.DEFINE_bool("plan_only", False, "Print the plan (devices, layouts, memory) and exit.")
flags.DEFINE_list("profile_steps", [], "FIRST,LAST: profile these steps into --model_dir/logs (TensorBoard).")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")


def _int_list(flag: str, values) -> tuple:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(
            f"--{flag} must be a list of integers. Received: {flag}={','.join(values)}; "
            "accepted: comma-separated integers.") from None


def expand_path(value):
    """A path flag's value with `~` expanded (absl does not expand it after `=`), or None."""
    return os.path.expanduser(value) if value else None


def model_from_flags() -> config_lib.ModelConfig:
    """The ModelConfig of the parsed flags (raises ValueError)."""
    checks.choice("model_size", FLAGS.model_size, tuple(config_lib.MODEL_SIZES))
    if FLAGS.seq_len is not None:
        checks.positive("seq_len", FLAGS.seq_len)
    return config_lib.model_config(FLAGS.model, FLAGS.model_size, seq_len=FLAGS.seq_len,
                                   dropout=FLAGS.dropout)


def parallel_options_from_flags(accelerator: Optional[str] = None) -> dict:
    """ParallelConfig's fields from the parsed flags (not yet validated against each other).

    --num_virtual_devices's default split is for CPU-only machines: not given, it
    is 0 (devices left as they are) under multi_worker (one replica per worker
    process), on GPUs (one replica per GPU), and while `accelerator` is not known
    yet (TensorFlow not imported; the replica checks wait for the second pass).
    """
    num_virtual_devices = FLAGS.num_virtual_devices
    if not FLAGS["num_virtual_devices"].present and (FLAGS.strategy == "multi_worker"
                                                     or accelerator != "CPU"):
        num_virtual_devices = 0
    return dict(
        strategy=FLAGS.strategy, num_virtual_devices=num_virtual_devices,
        devices=tuple(FLAGS.devices), cross_device_ops=FLAGS.cross_device_ops,
        communication=FLAGS.communication, grad_reduce_dtype=FLAGS.grad_reduce_dtype,
        mesh=FLAGS.mesh, layout_rules=expand_path(FLAGS.layout_rules) or "",
        pipeline_stages=FLAGS.pipeline_stages, num_microbatches=FLAGS.num_microbatches,
        pipeline_schedule=FLAGS.pipeline_schedule,
        stage_boundaries=_int_list("stage_boundaries", FLAGS.stage_boundaries), remat=FLAGS.remat)


def config_from_flags(parallel: Optional[config_lib.ParallelConfig] = None,
                      accelerator: Optional[str] = None) -> config_lib.RunConfig:
    """Turns the parsed flags into a validated RunConfig (raises ValueError).

    `parallel` replaces the parallel part the flags describe (tfpar-bench sets
    it per cell). `accelerator` ("CPU" or "GPU") resolves the default device split.
    """
    model = model_from_flags()
    kind, colon, source = FLAGS.dataset.partition(":")
    # A text file by its absolute path: a resume from another directory reads the same data.
    dataset = f"{kind}:{os.path.abspath(os.path.expanduser(source))}" if kind == "text" and colon else FLAGS.dataset
    data = config_lib.DataConfig(
        dataset=dataset, data_dir=expand_path(FLAGS.data_dir), global_batch_size=FLAGS.global_batch_size,
        seq_len=model.seq_len, seed=FLAGS.seed, eval_fraction=FLAGS.eval_fraction,
        eval_split=FLAGS.eval_split)
    parallel = parallel or config_lib.ParallelConfig(**parallel_options_from_flags(accelerator))
    jit_compile = FLAGS.jit_compile
    if jit_compile is None:  # not given: XLA where it was measured faster
        jit_compile = config_lib.default_jit_compile(parallel.strategy, FLAGS.mixed_precision)
    return config_lib.RunConfig(
        model=model, data=data, parallel=parallel, optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
        weight_decay=FLAGS.weight_decay, grad_clip_norm=FLAGS.grad_clip_norm,
        steps_per_epoch=FLAGS.steps_per_epoch, epochs=FLAGS.epochs,
        mixed_precision=FLAGS.mixed_precision, grad_accum_steps=FLAGS.grad_accum_steps,
        eval_steps=FLAGS.eval_steps,
        jit_compile=jit_compile, model_dir=expand_path(FLAGS.model_dir),
        backup_every_steps=FLAGS.backup_every_steps, metrics_json=expand_path(FLAGS.metrics_json),
        export_dir=expand_path(FLAGS.export_dir), seed=FLAGS.seed, deterministic=FLAGS.deterministic,
        plan_only=FLAGS.plan_only, profile_steps=_int_list("profile_steps", FLAGS.profile_steps), verbose=FLAGS.verbose)


fail = cli.fail
parse_flags_one_line = cli.one_line_flags_parser("tfpar")


@contextlib.contextmanager
def _stderr_to_file():
    """Sends file descriptor 2 to a temporary file; replays it if the body raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_tensorflow() -> None:
    """Starts TensorFlow without its start-up chatter unless TF_CPP_MIN_LOG_LEVEL < 2.

    On a machine without CUDA, TF's C++ side prints CUDA probing lines before
    it reads TF_CPP_MIN_LOG_LEVEL; they are kept out of stderr here so that an
    error stays one line. absl's Python INFO logs (e.g. "Using
    MirroredStrategy") are lowered to warnings.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*shuffle=True.*was passed.*")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] in ("", "0", "1"):  # TF reads other values as its own
        return
    with _stderr_to_file():
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        tf.config.list_physical_devices()


def refuse_positional(argv, program: str = "tfpar") -> None:
    """Exits with one line if anything but flags follows the program name."""
    if len(argv) > 1:
        cli.fail(f"unexpected arguments. Received: {' '.join(argv[1:])}; accepted: flags of the "
                 "form --name=value only.", program)


def checked_config(argv, accelerator: Optional[str] = None) -> config_lib.RunConfig:
    """The RunConfig of the parsed flags; bad input (or a positional argument) exits with one line."""
    refuse_positional(argv)
    try:
        return config_from_flags(accelerator=accelerator)
    except ValueError as e:
        fail(str(e))


def check_inputs_read_by_strategies(parallel: config_lib.ParallelConfig) -> None:
    """Checks what the strategies read themselves, where that needs no TensorFlow: TF_CONFIG
    and the layout rules file (raises ValueError)."""
    if parallel.strategy == "multi_worker" and os.environ.get("TF_CONFIG"):
        cluster.parse_tf_config(os.environ["TF_CONFIG"])
    if parallel.layout_rules:
        layouts.LayoutRules.from_json(parallel.layout_rules)


def main(argv):
    try:
        check_inputs_read_by_strategies(checked_config(argv).parallel)  # before TensorFlow starts
    except ValueError as e:
        fail(str(e))
    quiet_tensorflow()
    from tfpar import devices  # pylint: disable=import-outside-toplevel
    from tfpar import driver  # pylint: disable=import-outside-toplevel
    run = checked_config(argv, devices.accelerator_kind())  # the default device split resolved
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
        if run.parallel.strategy != "multi_worker":  # its strategy must start TF itself
            devices.configure_virtual_devices(run.parallel.num_virtual_devices, run.parallel.concurrent_devices)
        metrics = driver.train(run).metrics
    except FloatingPointError as e:
        fail(str(e))
    except ValueError as e:
        if "Received:" not in str(e):  # not one of tfpar's bad-input errors: a bug, shown whole
            raise
        fail(str(e))
    except ConnectionError as e:  # a TFDS download (an OSError too, but not a file's)
        fail(f"a download failed (no network?). Received: dataset={run.data.dataset} ({e}); accepted: "
             "a TFDS dataset prepared in --data_dir beforehand, or builtin or text:PATH (no network).")
    except OSError as e:  # e.g. a disk that filled up, or a path removed during the run
        fail(f"could not read or write a file. Received: {e.filename or ''} ({e.strerror or e}); "
             "accepted: paths this user can write, on a disk with space.")
    except tf.errors.ResourceExhaustedError:
        fail(f"out of memory. Received: model_size={FLAGS.model_size}, seq_len={run.data.seq_len}, "
             f"global_batch_size={run.data.global_batch_size}; accepted: a smaller --model_size, "
             "--seq_len or --global_batch_size (--plan_only shows the memory estimate).")
    if run.plan_only:
        return
    if not metrics["step_losses"]:
        print(f"tfpar: nothing to train: {run.model_dir} holds a run of {metrics['resumed_from_step']} "
              f"steps, and this one asks for {run.total_steps}.")
        return
    speed = metrics["tokens_per_second"]
    speed = f"{speed:,.0f} tokens/s" if speed is not None else "tokens/s not measured (the first step traces)"
    held_out = f"; held-out loss {metrics['val_losses'][-1]:.4f}" if metrics["val_losses"] else ""
    print(f"tfpar: final loss {metrics['final_loss']:.4f} (first {metrics['step_losses'][0]:.4f}){held_out}; "
          f"{speed}; {metrics['wall_seconds']:.1f} s", flush=True)


def run_main():
    """Console-script entry point."""
    app.run(main, flags_parser=parse_flags_one_line)


def check_flags_main(local: bool = True):
    """Validates tfpar-train flags (sys.argv[1:]) without TensorFlow; bad input exits with one line.

    With `local`, as `main` would on this machine. Otherwise (flags for other
    hosts, whose paths and flag files only they have) each flag's own value
    and the parallel options only. Prints the resolved strategy and virtual
    device count as JSON: tfpar-launch checks its workers' flags this way
    before starting any.
    """
    argv = parse_flags_one_line(sys.argv)
    if local:
        parallel = checked_config(argv).parallel
    else:
        refuse_positional(argv)
        try:
            model_from_flags()
            checks.choice("optimizer", FLAGS.optimizer, config_lib.OPTIMIZERS)
            checks.choice("mixed_precision", FLAGS.mixed_precision, config_lib.PRECISIONS)
            parallel = config_lib.ParallelConfig(**parallel_options_from_flags())
        except ValueError as e:
            fail(str(e))
    print(json.dumps({"strategy": parallel.strategy, "num_virtual_devices": parallel.num_virtual_devices}))


if __name__ == "__main__":
    run_main()
