"""Meshes and layout rules for tensor parallelism, declared as data.

A mesh spec names the mesh axes and their sizes, e.g. ``"batch:2,model:2"``
(also ``"batch:4"`` or ``"model:4"``); an axis left out has size 1. Layout rules
are an ordered table, t5x/MaxText style, of

    (regex searched in the variable path, spec)

where `spec` has one entry per dimension of the variable: a mesh-axis name
(the dimension is split over that axis) or None (not split). A variable that
no rule matches is replicated; a variable that two rules match is an error.
Rules can be read from a JSON file: a list of ``[regex, [axis or null, ...]]``.

This module is TensorFlow-free: it turns specs and rules into plain tuples,
which `tfpar.strategies.dtensor` turns into DTensor layouts.
"""

import dataclasses
import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

MESH_AXES = ("batch", "model")

Spec = Tuple[Optional[str], ...]

# Megatron-style tensor parallelism over the `model` axis. Dense kernels are
# (in, out): column-parallel layers split `out` (last dim), row-parallel layers
# split `in` (first dim) and keep their bias whole.
_PROJ = r"(^|/)(attention|cross_attention)/"
DEFAULT_RULES: Tuple[Tuple[str, Spec], ...] = (
    (_PROJ + r"(query|key|value)/kernel$", (None, "model")),   # column-parallel
    (_PROJ + r"(query|key|value)/bias$", ("model",)),
    (_PROJ + r"output/kernel$", ("model", None)),              # row-parallel
    (_PROJ + r"output/bias$", (None,)),
    (r"(^|/)mlp/fc_in/kernel$", (None, "model")),              # column-parallel
    (r"(^|/)mlp/fc_in/bias$", ("model",)),
    (r"(^|/)mlp/fc_out/kernel$", ("model", None)),             # row-parallel
    (r"(^|/)mlp/fc_out/bias$", (None,)),
    (r"(^|/)token_embedding/embeddings$", ("model", None)),    # (vocab, d): vocab-parallel
    (r"(^|/)position_embedding/embeddings$", (None, None)),
    (r"(^|/)lm_head/kernel$", (None, "model")),                # (d, vocab): vocab-parallel
    (r"(^|/)lm_head/bias$", ("model",)),
    (r"(^|/)(norm_1|norm_2|cross_norm|final_norm)/(gamma|beta)$", (None,)),
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Mesh axes in order, each with its size; every axis of MESH_AXES appears."""
    axes: Tuple[Tuple[str, int], ...]

    @property
    def sizes(self) -> Dict[str, int]:
        return dict(self.axes)

    @property
    def num_devices(self) -> int:
        total = 1
        for _, size in self.axes:
            total *= size
        return total

    def __str__(self):
        return ",".join(f"{name}:{size}" for name, size in self.axes)


def parse_mesh(spec: str, num_devices: Optional[int] = None) -> MeshSpec:
    """Parses "batch:2,model:2"; checks the product against `num_devices`.

    Raises:
      ValueError: for a malformed spec, an unknown or repeated axis, a size
        < 1, or a mesh whose size differs from `num_devices`.
    """
    accepted = f"comma-separated AXIS:SIZE with AXIS in {', '.join(MESH_AXES)}, e.g. 'batch:2,model:2'"
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--mesh is empty. Received: mesh={spec!r}; accepted: {accepted}.")
    axes: List[Tuple[str, int]] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*:\s*(\d+)\s*", part)
        if not match:
            raise ValueError(f"--mesh is malformed at {part!r}. Received: mesh={spec!r}; "
                             f"accepted: {accepted}.")
        name, size = match.group(1), int(match.group(2))
        if name not in MESH_AXES:
            raise ValueError(f"--mesh has an unknown axis {name!r}. Received: mesh={spec!r}; "
                             f"accepted axes: {', '.join(MESH_AXES)}.")
        if name in dict(axes):
            raise ValueError(f"--mesh names axis {name!r} twice. Received: mesh={spec!r}; "
                             f"accepted: {accepted}.")
        if size < 1:
            raise ValueError(f"--mesh axis {name!r} has size {size}. Received: mesh={spec!r}; "
                             "accepted: sizes >= 1.")
        axes.append((name, size))
    axes += [(name, 1) for name in MESH_AXES if name not in dict(axes)]
    mesh = MeshSpec(tuple(axes))
    if num_devices is not None and mesh.num_devices != num_devices:
        raise ValueError(
            f"--mesh size differs from the number of devices. Received: mesh={spec!r} "
            f"({mesh.num_devices} devices), devices={num_devices}; accepted: a mesh whose "
            f"axis sizes multiply to {num_devices} (or set --num_virtual_devices={mesh.num_devices}).")
    return mesh


@dataclasses.dataclass(frozen=True)
class LayoutRules:
    """An ordered table of (regex, spec); see the module docstring."""
    rules: Tuple[Tuple[str, Spec], ...] = DEFAULT_RULES

    def __post_init__(self):
        for pattern, spec in self.rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"layout rule has an invalid regex. Received: {pattern!r} "
                                 f"({e}); accepted: a Python regular expression.") from None
            for axis in spec:
                if axis is not None and axis not in MESH_AXES:
                    raise ValueError(
                        f"layout rule {pattern!r} names an unknown mesh axis. Received: "
                        f"spec={list(spec)}; accepted: {', '.join(MESH_AXES)} or null.")
            axes = [axis for axis in spec if axis is not None]
            if len(set(axes)) < len(axes):
                raise ValueError(
                    f"layout rule {pattern!r} splits two dimensions over one mesh axis. Received: "
                    f"spec={list(spec)}; accepted: each mesh axis at most once per spec.")

    @classmethod
    def from_json(cls, path: str) -> "LayoutRules":
        """Reads `[[regex, [axis or null, ...]], ...]` from a JSON file.

        Raises:
          ValueError: for a missing file or a malformed table.
        """
        try:
            with open(path, encoding="utf-8") as f:  # JSON is UTF-8
                table = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
            raise ValueError(f"--layout_rules: cannot read the rules. Received: "
                             f"layout_rules={path!r} ({e}); accepted: a JSON file holding "
                             "[[regex, [axis or null, ...]], ...].") from None
        if not isinstance(table, list) or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                and isinstance(r[1], list) for r in table):
            raise ValueError(f"--layout_rules: malformed table. Received: layout_rules={path!r}; "
                             "accepted: a JSON list of [regex, [axis or null, ...]] pairs.")
        return cls(tuple((pattern, tuple(spec)) for pattern, spec in table))

    def matches(self, path: str) -> List[Tuple[str, Spec]]:
        """The (pattern, spec) rules whose pattern is found in the variable `path`."""
        return [(p, s) for p, s in self.rules if re.search(p, path)]

    def unmatched(self, paths: Sequence[str]) -> List[str]:
        """The patterns that match none of `paths`."""
        matched = {p for path in paths for p, _ in self.matches(path)}
        return [p for p, _ in self.rules if p not in matched]

    def spec_for(self, path: str, shape: Sequence[int], mesh: MeshSpec) -> Spec:
        """The spec of the variable `path` with `shape` on `mesh`.

        Raises:
          ValueError: if two rules match, the spec's rank differs from the
            variable's, or a dimension is not divisible by its mesh axis.
        """
        matched = self.matches(path)
        if len(matched) > 1:
            raise ValueError(
                f"variable {path!r} is matched by {len(matched)} layout rules. Received: "
                f"{', '.join(repr(p) for p, _ in matched)}; accepted: at most one rule per variable.")
        spec: Spec = matched[0][1] if matched else (None,) * len(shape)
        if len(spec) != len(shape):
            raise ValueError(
                f"layout rule {matched[0][0]!r} does not fit variable {path!r}. Received: "
                f"spec={list(spec)} for shape={list(shape)}; accepted: one entry per dimension.")
        sizes = mesh.sizes
        for dim, (length, axis) in enumerate(zip(shape, spec)):
            if axis is not None and length % sizes[axis]:
                raise ValueError(
                    f"variable {path!r}: dimension {dim} (size {length}) is not divisible by "
                    f"mesh axis {axis!r} (size {sizes[axis]}). Received: shape={list(shape)}, "
                    f"spec={list(spec)}, mesh={mesh}; accepted: sizes divisible by the axis.")
        return spec


def shard_fraction(spec: Spec, mesh: MeshSpec) -> int:
    """How many pieces a variable with `spec` is split into on `mesh`."""
    sizes, pieces = mesh.sizes, 1
    for axis in spec:
        if axis is not None:
            pieces *= sizes[axis]
    return pieces
