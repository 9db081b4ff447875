"""Frozen run configuration, validated once when it is made.

Every check raises `ValueError` with one line: what is wrong, what was
received and what is accepted (with the closest valid name for a misspelt
one; the checks of single values are `tfpar.checks`). Entry points turn flags into these dataclasses; library code never reads
flags.
"""

import dataclasses
import math
import os
from typing import Optional, Tuple

from tfpar import layouts
from tfpar.checks import choice, positive, shown, valid_seed, writable_path

STRATEGIES = ("default", "mirrored", "multi_worker", "dtensor", "pipeline")
MODELS = ("gpt", "seq2seq")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Strategies that compile with XLA; dtensor and pipeline refuse --jit_compile.
XLA_STRATEGIES = ("default", "mirrored", "multi_worker")
# Options that only some strategies read: refused under the others rather than
# silently ignored (a value other than the default counts as given).
STRATEGY_ONLY_OPTIONS = {
    "devices": ("mirrored", "pipeline"),
    "cross_device_ops": ("mirrored",),
    "communication": ("multi_worker",),
    "grad_reduce_dtype": ("multi_worker",),
    "mesh": ("dtensor",),
    "layout_rules": ("dtensor",),
    "pipeline_stages": ("pipeline",),
    "num_microbatches": ("pipeline",),
    "pipeline_schedule": ("pipeline",),
    "stage_boundaries": ("pipeline",),
    "remat": ("pipeline",),
}
CROSS_DEVICE_OPS = ("auto", "hierarchical_copy", "reduction_to_one_device", "nccl")
COMMUNICATIONS = ("auto", "ring", "nccl")
GRAD_REDUCE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("gpipe", "1f1b")
DEFAULT_WARMUP_STEPS = 20
DEFAULT_WEIGHT_DECAY = 0.1  # AdamW's (nanoGPT's); SGD takes none


# size -> (d_model, num_layers, num_heads, mlp_dim, default seq_len)
MODEL_SIZES = {
    "tiny": (64, 2, 4, 256, 32),
    "small": (256, 4, 4, 1024, 128),
    "medium": (512, 8, 8, 2048, 256),
    "large": (768, 12, 12, 3072, 512),
}
# Byte vocabulary; seq2seq adds MASK and BOS and pads to a multiple of 8 so
# that the vocabulary splits evenly over a model axis of up to 8 devices.
VOCAB_SIZES = {"gpt": 256, "seq2seq": 264}
MASK_ID, BOS_ID = 256, 257


def model_config(name: str = "gpt", size: str = "small", *,
                 seq_len: Optional[int] = None, dropout: float = 0.0) -> "ModelConfig":
    """A ModelConfig from a named size preset."""
    choice("model", name, MODELS)
    choice("model_size", size, MODEL_SIZES)
    d_model, num_layers, num_heads, mlp_dim, default_len = MODEL_SIZES[size]
    return ModelConfig(
        name=name, size=size, d_model=d_model, num_layers=num_layers,
        num_heads=num_heads, mlp_dim=mlp_dim, vocab_size=VOCAB_SIZES[name],
        seq_len=default_len if seq_len is None else seq_len, dropout=dropout)


def default_jit_compile(strategy: str, mixed_precision: str) -> bool:
    """What --jit_compile means when not given: XLA where it was measured faster.

    Unlike Keras's jit_compile="auto" (off on CPU-only machines and under
    tf.distribute): on a 2-core CPU, XLA makes a float32 `small` step 15-21 %
    faster under default and mirrored, but mixed_bfloat16 steps 15-50 % slower
    (mixed_float16 is treated alike); BUILD_NOTES "Speed with XLA on CPU".
    dtensor and pipeline refuse XLA.
    """
    return strategy in XLA_STRATEGIES and mixed_precision == "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a built-in Transformer. `num_layers` counts blocks per stack."""
    name: str = "gpt"
    size: str = "small"
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    vocab_size: int = 256
    seq_len: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        choice("model", self.name, MODELS)
        positive("seq_len", self.seq_len)
        for field in ("d_model", "num_layers", "num_heads", "mlp_dim", "vocab_size"):
            positive(field, getattr(self, field))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads. Received: d_model={self.d_model}, "
                f"num_heads={self.num_heads}; accepted: a num_heads dividing {self.d_model}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(
                f"--dropout must be in [0, 1). Received: dropout={self.dropout}; accepted: a "
                "number in [0, 1).")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are batched."""
    dataset: str = "builtin"
    data_dir: Optional[str] = None
    global_batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    shuffle_buffer: int = 10_000
    eval_fraction: float = 0.0  # the source's last windows, held out of training for evaluation
    eval_split: str = ""  # a tfds:NAME source's split evaluated instead, e.g. "validation"

    def __post_init__(self):
        positive("global_batch_size", self.global_batch_size)
        positive("seq_len", self.seq_len)
        valid_seed("seed", self.seed)
        kind, _, arg = self.dataset.partition(":")
        if kind in ("builtin", "text"):  # prepared into data_dir (TFDS datasets are only read)
            writable_path("data_dir", self.data_dir, directory=True)
        choice("dataset", kind if arg or kind == "builtin" else self.dataset,
               ("builtin", "text", "tfds"))
        if kind == "builtin" and self.dataset != "builtin":
            raise ValueError(
                f"--dataset=builtin takes no argument. Received: dataset={self.dataset!r}; "
                "accepted: builtin, text:PATH or tfds:NAME.")
        if kind == "text" and not os.path.isfile(arg):
            raise ValueError(
                f"--dataset: text file not found. Received: dataset={self.dataset!r}; "
                "accepted: text:PATH to an existing file.")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(
                f"--eval_fraction must be in [0, 1). Received: eval_fraction={self.eval_fraction}; "
                f"accepted: a fraction of the text's windows, e.g. 0.1 (0: no evaluation).")
        if self.eval_fraction and kind == "tfds":
            raise ValueError(
                f"--eval_fraction holds out the end of a builtin or text:PATH source. Received: "
                f"dataset={self.dataset!r}, eval_fraction={self.eval_fraction}; accepted: "
                f"--eval_fraction=0 with tfds:NAME (its own split: --eval_split).")
        if self.eval_split and kind != "tfds":
            raise ValueError(
                f"--eval_split names a split of a tfds:NAME source. Received: dataset={self.dataset!r}, "
                f"eval_split={self.eval_split!r}; accepted: --eval_fraction with builtin or text:PATH.")
        if any(part.partition("[")[0].strip() == "train" for part in self.eval_split.split("+")):
            raise ValueError(
                f"--eval_split must not hold windows tfpar trains on. Received: eval_split="
                f"{self.eval_split!r}; accepted: another split, e.g. validation or test.")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Which strategy, over which devices, with which options."""
    strategy: str = "default"
    num_virtual_devices: int = 0
    devices: Tuple[str, ...] = ()
    cross_device_ops: str = "auto"
    communication: str = "auto"
    grad_reduce_dtype: str = "float32"
    mesh: str = ""
    layout_rules: str = ""
    pipeline_stages: int = 1
    num_microbatches: int = 1
    pipeline_schedule: str = "gpipe"
    stage_boundaries: Tuple[int, ...] = ()
    remat: bool = False

    def __post_init__(self):
        choice("strategy", self.strategy, STRATEGIES)
        choice("cross_device_ops", self.cross_device_ops, CROSS_DEVICE_OPS)
        choice("communication", self.communication, COMMUNICATIONS)
        choice("grad_reduce_dtype", self.grad_reduce_dtype, GRAD_REDUCE_DTYPES)
        choice("pipeline_schedule", self.pipeline_schedule, SCHEDULES)
        positive("num_virtual_devices", self.num_virtual_devices, allow_zero=True)
        positive("pipeline_stages", self.pipeline_stages)
        positive("num_microbatches", self.num_microbatches)
        for name in ("devices", "stage_boundaries"):  # lists from JSON or Python callers
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a sequence. Received: {name}={value!r}; accepted: a "
                                 f"list or tuple, e.g. {name}=({value!r},).")
            object.__setattr__(self, name, tuple(value or ()))
        for field in dataclasses.fields(self):
            users = STRATEGY_ONLY_OPTIONS.get(field.name)
            value = getattr(self, field.name)
            if users and self.strategy not in users and value and value != field.default:
                raise ValueError(
                    f"--{field.name} applies only to --strategy={' or '.join(users)}. Received: "
                    f"strategy={self.strategy}, {field.name}={shown(value)!r}; accepted: "
                    f"--strategy={' or '.join(users)}, or no --{field.name}.")

    @property
    def concurrent_devices(self) -> int:
        """How many devices run ops at the same time (sizes the CPU thread pools)."""
        if self.strategy == "mirrored":
            return len(self.devices) or self.num_virtual_devices or 1
        if self.strategy == "dtensor":
            return self.num_virtual_devices or 1
        if self.strategy == "pipeline":
            return self.pipeline_stages
        return 1

    @property
    def known_replicas(self) -> Optional[int]:
        """Replicas implied by the flags alone (before TF starts), if they say."""
        if self.strategy == "default":
            return 1
        if self.strategy == "mirrored":
            return len(self.devices) or self.num_virtual_devices or None
        if self.strategy == "pipeline":
            devices = len(self.devices) or self.num_virtual_devices
            return devices // self.pipeline_stages if devices >= self.pipeline_stages else None
        if self.strategy == "dtensor" and self.mesh:
            return layouts.parse_mesh(self.mesh).sizes["batch"]
        return None


def check_microbatches(per_replica: int, num_microbatches: int, grad_accum_steps: int) -> None:
    """A pipeline splits each replica's batch into grad_accum_steps x num_microbatches parts."""
    if per_replica % num_microbatches:
        raise ValueError(
            f"--num_microbatches must divide the per-replica batch. Received: "
            f"num_microbatches={num_microbatches}, per-replica batch={per_replica}; "
            f"accepted: a divisor of {per_replica}.")
    if per_replica % (num_microbatches * grad_accum_steps):
        raise ValueError(
            f"--num_microbatches x --grad_accum_steps must divide the per-replica batch. "
            f"Received: num_microbatches={num_microbatches}, grad_accum_steps="
            f"{grad_accum_steps}, per-replica batch={per_replica}; accepted: a product "
            f"dividing {per_replica}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    parallel: ParallelConfig = ParallelConfig()
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    warmup_steps: Optional[int] = None  # None: DEFAULT_WARMUP_STEPS, at most the run's steps - 1
    weight_decay: Optional[float] = None  # None: DEFAULT_WEIGHT_DECAY for AdamW
    grad_clip_norm: float = 1.0  # the summed gradient's global norm is clipped to this; 0: no clipping
    steps_per_epoch: int = 50
    epochs: int = 4
    mixed_precision: str = "float32"
    grad_accum_steps: int = 1
    eval_steps: int = 0  # held-out batches evaluated after each epoch; 0: all of them
    jit_compile: bool = False
    model_dir: Optional[str] = None
    backup_every_steps: int = 0
    metrics_json: Optional[str] = None
    export_dir: Optional[str] = None
    seed: int = 0
    deterministic: bool = False
    plan_only: bool = False
    profile_steps: Tuple[int, ...] = ()
    verbose: int = 1

    def __post_init__(self):
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("mixed_precision", self.mixed_precision, PRECISIONS)
        positive("learning_rate", self.learning_rate)
        if self.weight_decay is not None:
            positive("weight_decay", self.weight_decay, allow_zero=True)
            if self.optimizer == "sgd" and self.weight_decay:
                raise ValueError(
                    f"--weight_decay is AdamW's; tfpar's SGD takes none. Received: optimizer=sgd, "
                    f"weight_decay={self.weight_decay}; accepted: --optimizer=adamw with --weight_decay, "
                    f"or SGD without it.")
        if not math.isfinite(self.grad_clip_norm):  # Keras's clip would compute inf * 0: NaN gradients
            raise ValueError(
                f"--grad_clip_norm must be finite. Received: grad_clip_norm={self.grad_clip_norm}; "
                f"accepted: a number >= 0 (0 turns clipping off).")
        positive("grad_clip_norm", self.grad_clip_norm, allow_zero=True)
        positive("steps_per_epoch", self.steps_per_epoch)
        positive("epochs", self.epochs)
        positive("grad_accum_steps", self.grad_accum_steps)
        if self.warmup_steps is not None:
            positive("warmup_steps", self.warmup_steps, allow_zero=True)
        positive("backup_every_steps", self.backup_every_steps, allow_zero=True)
        positive("eval_steps", self.eval_steps, allow_zero=True)
        if self.eval_steps and not (self.data.eval_fraction or self.data.eval_split):
            raise ValueError(
                f"--eval_steps needs windows to evaluate. Received: eval_steps={self.eval_steps}, "
                f"eval_fraction=0.0, eval_split=''; accepted: --eval_fraction > 0 (or --eval_split "
                f"with tfds:NAME) with --eval_steps.")
        valid_seed("seed", self.seed)
        if self.plan_only and self.export_dir:
            raise ValueError(
                f"--plan_only trains nothing, so there is no model to export. Received: plan_only=True, "
                f"export_dir={self.export_dir!r}; accepted: --plan_only without --export_dir.")
        if self.verbose not in (0, 1, 2):  # Keras takes any int (above 2 as 2): not silently here
            raise ValueError(
                f"--verbose: unknown value. Received: verbose={self.verbose}; accepted: 0 (silent), "
                f"1 (progress bar), 2 (one line per epoch).")
        if self.data.seq_len != self.model.seq_len:
            raise ValueError(
                f"seq_len differs between data and model. Received: "
                f"data.seq_len={self.data.seq_len}, model.seq_len={self.model.seq_len}; accepted: "
                "the same seq_len in both.")
        replicas = self.parallel.known_replicas
        if replicas and self.data.global_batch_size % replicas:
            raise ValueError(
                f"--global_batch_size must be divisible by the number of replicas. "
                f"Received: global_batch_size={self.data.global_batch_size}, replicas={replicas}; "
                f"accepted: a multiple of {replicas}.")
        if replicas and self.parallel.strategy == "pipeline":
            check_microbatches(self.data.global_batch_size // replicas, self.parallel.num_microbatches,
                               self.grad_accum_steps)
        writable_path("model_dir", self.model_dir, directory=True)
        writable_path("export_dir", self.export_dir, directory=True)
        writable_path("metrics_json", self.metrics_json, directory=False)
        if self.profile_steps:
            first, last = (tuple(self.profile_steps) + (0, 0))[:2]
            if len(self.profile_steps) != 2 or not 1 <= first <= last <= self.total_steps:
                raise ValueError(
                    f"--profile_steps must be two steps FIRST,LAST. Received: "
                    f"profile_steps={','.join(map(str, self.profile_steps))}; accepted: FIRST,LAST "
                    f"with 1 <= FIRST <= LAST <= {self.total_steps} (the run's steps).")
            if not self.model_dir:
                raise ValueError("--profile_steps writes the trace under --model_dir/logs. Received: "
                                 "model_dir=None; accepted: --model_dir=DIR with --profile_steps.")
        if self.backup_every_steps and not self.model_dir:
            raise ValueError(
                f"--backup_every_steps writes backups under --model_dir. Received: "
                f"backup_every_steps={self.backup_every_steps}, model_dir=None; accepted: "
                "--model_dir=DIR with --backup_every_steps.")
        micro = self.data.global_batch_size % self.grad_accum_steps
        if micro:
            raise ValueError(
                f"--global_batch_size must be divisible by --grad_accum_steps. Received: "
                f"global_batch_size={self.data.global_batch_size}, "
                f"grad_accum_steps={self.grad_accum_steps}; accepted: a divisor of "
                f"{self.data.global_batch_size}.")

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)
