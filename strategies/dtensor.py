"""`dtensor`: Megatron-style tensor parallelism (and data parallelism) with DTensor.

The mesh comes from `--mesh` (e.g. `batch:2,model:2`) over the first N logical
devices; every variable gets the layout that `tfpar.layouts` rules give its
path, and optimizer slots get their variable's layout. Training is plain
`model.fit`:

* Variables. Inside `scope()` every `tf.Variable` is created as a replicated
  `dtensor.DVariable`; `prepare_model` then re-creates each model variable
  with its rule's layout, before the optimizer builds (Keras keys optimizer
  slots by the tf.Variable's identity). The optimizer is built in
  `prepare_optimizer`, and each slot is laid out like its reference variable.
* Input. Keras's TF trainer reads a `tf.data` iterator inside its traced
  function, where DTensor finds no layout for `IteratorGetNext`. The dataset
  is therefore handed to `fit` as a Keras `DataAdapter` whose iterator is a
  Python iterator: Keras then calls the traced step on each batch, which is
  already a DTensor sharded on `batch` (packed eagerly, outside the trace).
* Eager reads and writes (`save_weights`, `load_weights`, metric resets) of a
  sharded DVariable go through `_MeshVariable`, which converts between the
  layout and host values, so `.weights.h5` files are mesh-independent.
"""

import contextlib
import types
from typing import Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor
from keras.src.optimizers import base_optimizer
from keras.src.trainers.data_adapters import data_adapter as keras_data_adapter

from tfpar import config as config_lib
from tfpar import devices as devices_lib
from tfpar import layouts as layouts_lib
from tfpar import training
from tfpar.strategies import base


def _is_dtensor(value) -> bool:
    return isinstance(value, tf.Tensor) and tf.executing_eagerly() and dtensor.is_dtensor(value)


class _MeshVariable(dtensor.DVariable):
    """A DVariable whose eager reads give host values and eager writes accept them."""

    def _to_mesh(self, value):
        if tf.executing_eagerly() and not isinstance(value, tf.Variable):
            value = tf.convert_to_tensor(value, dtype=self.dtype)
            if not _is_dtensor(value):
                replicated = dtensor.Layout.replicated(self.layout.mesh, value.shape.rank)
                value = dtensor.relayout(dtensor.copy_to_mesh(value, replicated), self.layout)
        return value

    def numpy(self):
        value = self.read_value()
        return dtensor.relayout(value, dtensor.Layout.replicated(
            self.layout.mesh, value.shape.rank)).numpy()

    def __array__(self, dtype=None, copy=None):
        del copy  # numpy() always returns a fresh host array
        return np.asarray(self.numpy(), dtype=dtype)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        return super().assign(self._to_mesh(value), use_locking, name, read_value)

    def assign_add(self, delta, use_locking=None, name=None, read_value=True):
        return super().assign_add(self._to_mesh(delta), use_locking, name, read_value)

    def assign_sub(self, delta, use_locking=None, name=None, read_value=True):
        return super().assign_sub(self._to_mesh(delta), use_locking, name, read_value)


class _PackedBatches(tf.distribute.DistributedDataset):
    """Iterable over a tf.data dataset whose elements are packed as DTensors.

    Not a `tf.data` iterator, so Keras's trainer calls its traced step once
    per batch from Python (`TensorFlowTrainer._make_function`), with DTensor
    inputs, instead of calling `get_next()` inside the trace.
    """

    def __init__(self, dataset: tf.data.Dataset, pack):
        self._dataset, self._pack = dataset, pack

    def __iter__(self):
        return (tf.nest.map_structure(self._pack, batch) for batch in self._dataset)

    @property
    def element_spec(self):
        return self._dataset.element_spec

    def reduce(self, initial_state, reduce_func):
        raise NotImplementedError("reduce is not supported on DTensor batches")


class DTensorBatches(keras_data_adapter.DataAdapter):
    """What `model.fit` receives: global batches, sharded on the `batch` axis."""

    def __init__(self, dataset: tf.data.Dataset, pack):
        self._dataset, self._batches = dataset, _PackedBatches(dataset, pack)

    def get_tf_dataset(self):
        return self._batches

    def get_numpy_iterator(self):
        raise NotImplementedError("DTensor batches feed only the TensorFlow trainer")

    def get_jax_iterator(self):
        raise NotImplementedError("DTensor batches feed only the TensorFlow trainer")

    def get_torch_dataloader(self):
        raise NotImplementedError("DTensor batches feed only the TensorFlow trainer")

    @property
    def num_batches(self):
        cardinality = int(self._dataset.cardinality())
        return cardinality if cardinality >= 0 else None

    @property
    def batch_size(self):
        return tf.nest.flatten(self._dataset.element_spec)[0].shape[0]

    @property
    def has_partial_batch(self):
        return False

    @property
    def partial_batch_size(self):
        return None


def _tf_variable(variable):
    return variable._value if isinstance(variable, keras.Variable) else variable  # pylint: disable=protected-access


def make_stateless(optimizer) -> None:
    """Lets a built Keras TF optimizer run `stateless_apply` (see DTensorTrainStep).

    Keras's TF optimizer refuses `stateless_apply` and writes through
    `tf.Variable.assign` and `tf.distribute` updates; the backend-neutral base
    class writes through `keras.Variable.assign`, which a StatelessScope
    records. Slots stay keyed by their tf.Variable's `_unique_id`.
    """
    base_cls = base_optimizer.BaseOptimizer
    for name in ("assign", "assign_add", "assign_sub", "_backend_update_step",
                 "_apply_weight_decay", "stateless_apply"):
        setattr(optimizer, name, types.MethodType(getattr(base_cls, name), optimizer))
    optimizer._var_key = lambda variable: _tf_variable(variable)._unique_id  # pylint: disable=protected-access


class DTensorTrainStep(training.TrainStep):
    """TrainStep whose optimizer update reads every variable once, then writes it once.

    Inside a DTensor function, a variable read after a write in the same
    step can return the value from before the write (measured: Adam's
    `assign_add` to its moments, then the read of the moments for the weight
    update, saw zeros, so the first Adam step changed no weight). Keras's
    optimizers read after write in every update with slots (Adam, RMSprop,
    SGD with momentum), plain SGD does not. The update therefore runs as
    `stateless_apply` on values read up front, and the results are assigned
    at the end.
    """

    @staticmethod
    def split(tree, k: int):
        """Micro-batch i takes rows i, i + k, i + 2k, ...: DTensor cannot split a
        batch-sharded axis, but it can reshape it to (batch / k, k) and slice."""
        if k == 1:
            return [tree]

        def strided(t, i):
            rows = tf.reshape(t, tf.concat([[tf.shape(t)[0] // k, k], tf.shape(t)[1:]], axis=0))
            return rows[:, i]
        return [tf.nest.map_structure(lambda t, i=i: strided(t, i), tree) for i in range(k)]

    def __call__(self, model: keras.Model, x, y) -> training.StepOutput:
        variables = model.trainable_variables
        optimizer = model.optimizer
        scale = training.loss_scale(optimizer)
        loss, grads = self._accumulate(
            lambda mx, my: self._stateful_grads(model, mx, my, scale), x, y)
        trainable_values = [_tf_variable(v).read_value() for v in optimizer._trainable_variables]  # pylint: disable=protected-access
        optimizer_values = [_tf_variable(v).read_value() for v in optimizer.variables]
        by_id = {id(v): g for v, g in zip(variables, grads)}
        ordered = [by_id.get(id(v)) for v in optimizer._trainable_variables]  # pylint: disable=protected-access
        new_trainable, new_optimizer = optimizer.stateless_apply(
            optimizer_values, ordered, trainable_values)
        with tf.control_dependencies([loss]):
            for variable, value in zip(optimizer._trainable_variables, new_trainable):  # pylint: disable=protected-access
                _tf_variable(variable).assign(value, read_value=False)
            for variable, value in zip(optimizer.variables, new_optimizer):
                _tf_variable(variable).assign(value, read_value=False)
        return training.StepOutput(loss, training.global_norm(grads, scale))


class DTensorAdapter(base.StrategyAdapter):
    """Tensor (`model` axis) and data (`batch` axis) parallelism on a DTensor mesh.

    Raises (constructor):
      ValueError: for a malformed mesh spec, an unknown axis, a mesh whose size
        differs from the device count, or malformed layout rules.
    """

    name = "dtensor"

    def __init__(self, *, mesh: str = "", num_devices: int = 0,
                 rules: Optional[layouts_lib.LayoutRules] = None):
        super().__init__()
        available = devices_lib.select_devices((), num_devices)
        spec = mesh or f"model:{len(available)}"
        self.mesh_spec = layouts_lib.parse_mesh(spec, len(available))
        self.user_rules = rules is not None
        self.rules = rules or layouts_lib.LayoutRules()
        self.mesh = dtensor.create_mesh(list(self.mesh_spec.axes), devices=available)
        self._device_names = available
        self.layouts: Dict[str, layouts_lib.Spec] = {}   # model variables, by path
        self.slot_layouts: Dict[str, layouts_lib.Spec] = {}  # optimizer slots, by path
        self._on_mesh = False  # set by prepare_model

    @classmethod
    def from_config(cls, parallel: config_lib.ParallelConfig) -> "DTensorAdapter":
        rules = layouts_lib.LayoutRules.from_json(parallel.layout_rules) if parallel.layout_rules else None
        return cls(mesh=parallel.mesh, num_devices=parallel.num_virtual_devices, rules=rules)

    # ----------------------------------------------------------------- basics
    @property
    def num_replicas(self) -> int:
        """Data-parallel replicas: the size of the `batch` axis."""
        return self.mesh_spec.sizes["batch"]

    @property
    def devices(self) -> List[str]:
        return list(self._device_names)

    def validate(self, run: config_lib.RunConfig) -> None:
        super().validate(run)
        if run.jit_compile:
            raise ValueError(
                "--jit_compile is not supported with --strategy=dtensor (DTensor's SPMD "
                "expansion runs outside XLA on CPU meshes). Received: jit_compile=True; "
                "accepted: jit_compile=False.")
        if run.mixed_precision == "mixed_float16":
            raise ValueError(
                "--mixed_precision=mixed_float16 is not supported with --strategy=dtensor "
                "(LossScaleOptimizer's conditional update). Received: "
                "mixed_precision='mixed_float16'; accepted: float32, mixed_bfloat16.")

    # --------------------------------------------------------------- variables
    def _layout(self, spec: layouts_lib.Spec) -> dtensor.Layout:
        return dtensor.Layout([dtensor.UNSHARDED if a is None else a for a in spec], self.mesh)

    def _creator(self, next_creator, **kwargs):
        """Once the model is laid out, creates variables as replicated DVariables."""
        if not self._on_mesh:
            return next_creator(**kwargs)
        initial_value = kwargs.pop("initial_value")
        with tf.init_scope():
            if callable(initial_value):
                initial_value = initial_value()
            initial_value = tf.convert_to_tensor(initial_value, dtype=kwargs.get("dtype"))
            if not _is_dtensor(initial_value):
                initial_value = dtensor.copy_to_mesh(
                    initial_value, dtensor.Layout.replicated(self.mesh, initial_value.shape.rank))
        accepted = ("trainable", "name", "dtype", "aggregation", "synchronization", "shape",
                    "validate_shape", "constraint", "caching_device")
        options = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
        return _MeshVariable(initial_value, **options)

    @contextlib.contextmanager
    def scope(self):
        with tf.variable_creator_scope(self._creator):
            yield

    def _relayout(self, variable, spec: layouts_lib.Spec) -> None:
        """Re-creates a Keras variable's tf.Variable with the layout of `spec`."""
        old = variable.value if isinstance(variable, keras.Variable) else variable
        layout = self._layout(spec)
        if isinstance(old, dtensor.DVariable) and old.layout == layout:
            return
        value = old.read_value() if isinstance(old, dtensor.DVariable) else tf.convert_to_tensor(old)
        if not _is_dtensor(value):
            value = dtensor.copy_to_mesh(value, dtensor.Layout.replicated(self.mesh, value.shape.rank))
        new = _MeshVariable(dtensor.relayout(value, layout), trainable=old.trainable,
                            name=old.name.split(":")[0], aggregation=old.aggregation,
                            synchronization=old.synchronization)
        variable._value = new  # pylint: disable=protected-access

    def prepare_model(self, model: keras.Model, run: config_lib.RunConfig) -> keras.Model:
        """Moves the built model onto the mesh, each variable laid out by the rules.

        Runs before the optimizer builds (which keys slots by tf.Variable). The
        model is built off the mesh, since its build call has host inputs.
        """
        if self.user_rules:  # a typo in a rules file would silently replicate what it meant to split
            unused = self.rules.unmatched([v.path for v in model.weights])
            if unused:
                raise ValueError(
                    f"--layout_rules: a rule matches no variable. Received: {', '.join(map(repr, unused))}; "
                    f"accepted: regexes that match variable paths, such as {model.weights[0].path!r}.")
        for variable in model.weights:
            spec = self.rules.spec_for(variable.path, variable.shape, self.mesh_spec)
            self.layouts[variable.path] = spec
            self._relayout(variable, spec)
        for metric in model.metrics:
            for variable in metric.variables:
                self._relayout(variable, (None,) * len(variable.shape))
        self._on_mesh = True
        return super().prepare_model(model, run)

    def prepare_optimizer(self, model: keras.Model, run: config_lib.RunConfig) -> None:
        """Builds the optimizer now, laying out each slot like its variable."""
        optimizer = model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        original = inner.add_variable_from_reference

        def add_slot(reference_variable, name=None, initializer="zeros"):
            slot = original(reference_variable, name=name, initializer=initializer)
            spec = self.layouts.get(reference_variable.path, (None,) * len(slot.shape))
            self._relayout(slot, spec)
            self.slot_layouts[slot.path] = spec
            return slot

        inner.add_variable_from_reference = add_slot
        try:
            with self.scope():
                optimizer.build(model.trainable_variables)
        finally:
            del inner.add_variable_from_reference
        make_stateless(inner)

    def train_step(self, run: config_lib.RunConfig):
        return DTensorTrainStep(grad_accum_steps=run.grad_accum_steps, jit_compile=False)

    # ------------------------------------------------------------------- input
    def _pack(self, tensor: tf.Tensor) -> tf.Tensor:
        """A host batch as a DTensor split on `batch` along its first dimension."""
        rank = tensor.shape.rank
        replicated = dtensor.copy_to_mesh(tensor, dtensor.Layout.replicated(self.mesh, rank))
        return dtensor.relayout(replicated, dtensor.Layout.batch_sharded(self.mesh, "batch", rank))

    def distribute_dataset(self, dataset_fn):
        """Global batches (one input pipeline), packed eagerly as DTensors."""
        return DTensorBatches(dataset_fn(tf.distribute.InputContext()), self._pack)

    # ---------------------------------------------------------------- reports
    def variable_layouts(self, model: keras.Model) -> Dict[str, str]:
        """Each variable's (model and optimizer) layout as DTensor reports it."""
        variables = list(model.weights) + list(getattr(model.optimizer, "variables", []))
        out = {}
        for variable in variables:
            value = variable.value if isinstance(variable, keras.Variable) else variable
            if isinstance(value, dtensor.DVariable):
                out[variable.path] = value.layout.sharding_specs
        return out

    def per_device_param_bytes(self, model: keras.Model) -> List[int]:
        """Bytes of trainable parameters per device (rules split evenly)."""
        total = 0
        for variable in model.trainable_variables:
            spec = self.layouts.get(variable.path, (None,) * len(variable.shape))
            nbytes = int(np.prod(variable.shape)) * np.dtype(variable.dtype).itemsize
            total += nbytes // layouts_lib.shard_fraction(spec, self.mesh_spec)
        return [total] * len(self.devices)

    def extra_metrics(self) -> Dict[str, object]:
        return {"mesh": str(self.mesh_spec),
                "layouts": {path: list(spec) for path, spec in self.layouts.items()}}

    def describe(self) -> str:
        lines = [f"mesh={self.mesh_spec}, devices={len(self.devices)}"]
        for path, spec in self.layouts.items():
            lines.append(f"  {path}: {list(spec)}")
        return "\n".join(lines)

    def plan(self) -> Dict[str, object]:
        return {**super().plan(), "mesh": str(self.mesh_spec),
                "layouts": {path: list(spec) for path, spec in self.layouts.items()},
                "slot_layouts": {path: list(spec) for path, spec in self.slot_layouts.items()}}
