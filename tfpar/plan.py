"""The plan of a run, printed before training and by `--plan_only`."""

from typing import Any, Dict

from tfpar import config as config_lib
from tfpar import modeling

_DTYPE_BYTES = {"float32": 4, "mixed_bfloat16": 2, "mixed_float16": 2}
_OPTIMIZER_SLOTS = {"adamw": 2, "sgd": 0}


def activation_bytes(run: config_lib.RunConfig, batch: int) -> int:
    """Activation memory of one forward pass kept for the backward pass.

    Megatron's estimate per layer, s*b*h*(34 + 5*a*s/h) bytes at 2-byte
    precision (Korthikanti et al., 2022), scaled to the compute dtype; a
    seq2seq model counts its encoder and decoder layers.
    """
    m = run.model
    s, h, a = m.seq_len, m.d_model, m.num_heads
    layers = m.num_layers * (2 if m.name == "seq2seq" else 1)
    per_layer = s * batch * h * (34 + 5 * a * s / h)
    return int(layers * per_layer * _DTYPE_BYTES[run.mixed_precision] / 2)


def make_plan(run: config_lib.RunConfig, adapter, model) -> Dict[str, Any]:
    params = modeling.count_params(model)
    per_replica = run.data.global_batch_size // adapter.num_replicas
    micro = per_replica // run.grad_accum_steps // adapter.num_microbatches
    param_bytes = adapter.per_device_param_bytes(model)
    slots = _OPTIMIZER_SLOTS[run.optimizer]
    return {
        **adapter.plan(),
        "model": f"{run.model.name}/{run.model.size}",
        "params": params,
        "per_device_param_bytes": param_bytes,
        "per_device_optimizer_bytes": [slots * b for b in param_bytes],
        "global_batch_size": run.data.global_batch_size,
        "per_replica_batch_size": per_replica,
        "micro_batch_size": micro,
        "estimated_activation_bytes_per_replica": activation_bytes(run, per_replica // run.grad_accum_steps),
        "steps": run.total_steps,
        "precision": run.mixed_precision,
        "jit_compile": run.jit_compile,
        **({"grad_reduce_dtype": run.parallel.grad_reduce_dtype}
           if run.parallel.strategy == "multi_worker" else {}),
    }


def format_plan(plan: Dict[str, Any]) -> str:
    """Human-readable lines, one per item."""
    lines = ["tfpar plan:"]
    for key, value in plan.items():
        if isinstance(value, list) and value and isinstance(value[0], int):
            value = ", ".join(f"{v / 2**20:.2f} MiB" if "bytes" in key else str(v) for v in value)
        elif isinstance(value, int) and "bytes" in key:
            value = f"{value / 2**20:.2f} MiB"
        elif isinstance(value, dict):
            value = "\n".join(f"    {k}: {v}" for k, v in value.items())
            lines.append(f"  {key}:\n{value}")
            continue
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
