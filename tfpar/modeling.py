"""The base of tfpar's models: an ordered stack of layers and a pluggable step.

What strategies may rely on (the whole interface between them and models):

* `model.stack`: the ordered layers; `model(x) == stack[-1](...stack[0](x))`.
  Each maps a "state" (a tensor or a tuple of tensors) to the next state; the
  pipeline adapter cuts this list into stages.
* `variable.path`: stable names such as `gpt/block_0/attention/query/kernel`,
  matched by layout rules.
* `model.train_step_fn`: the object that computes and applies one step and
  returns a `tfpar.training.StepOutput` (`tfpar.training.TrainStep` by
  default); an adapter may install another.
"""

import dataclasses
from typing import Any, List, Optional

import keras
import tensorflow as tf

from tfpar import config as config_lib
from tfpar import training


class LanguageModel(keras.Model):
    """A Keras model whose `call` runs `self.stack` in order."""

    def __init__(self, model_config: config_lib.ModelConfig, **kwargs):
        super().__init__(**kwargs)
        self.model_config = model_config
        self.train_step_fn: Optional[Any] = None
        self.running_loss = keras.metrics.Mean(name="loss")
        self.held_out_loss = keras.metrics.Mean(name="held_out_loss")

    def get_config(self):
        return {"name": self.name, "model_config": dataclasses.asdict(self.model_config)}

    @classmethod
    def from_config(cls, config):
        return cls(config_lib.ModelConfig(**config["model_config"]), name=config["name"])

    @property
    def stack(self) -> List[keras.layers.Layer]:
        raise NotImplementedError

    def call(self, inputs, training=False):
        state = inputs
        for layer in self.stack:
            state = layer(state, training=training)
        return state

    def train_step(self, data):
        x, y = data[0], data[1]
        step = self.train_step_fn or training.TrainStep()
        loss, grad_norm = training.step_output(step(self, x, y))
        self.running_loss.update_state(loss)
        # `loss` is Keras's running mean (progress bar); `step_loss` is this
        # optimizer step's loss, averaged over replicas by Keras; `grad_norm` is
        # the same on every replica.
        return {"loss": self.running_loss.result(), "step_loss": loss, "grad_norm": grad_norm}

    def test_step(self, data):
        """The batch's mean token loss; `fit` reports the mean over the held-out batches as
        `val_loss`. Keras's own test_step would report it under the name of `running_loss`
        (both are "loss"), whose value then wins."""
        x, y = data[0], data[1]
        y_pred = self(x, training=False)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        self.held_out_loss.update_state(tf.cast(loss, tf.float32) * training.num_replicas())
        return {"loss": self.held_out_loss.result()}

    def example_inputs(self, batch_size: int = 1):
        """Zero inputs of the right structure, to build the model."""
        raise NotImplementedError

    def tokens_per_example(self) -> int:
        return self.model_config.seq_len


def loss_fn():
    """Mean token cross-entropy on float32 logits."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build_with(model: LanguageModel) -> LanguageModel:
    """Creates the model's variables by calling it once on example inputs."""
    model(model.example_inputs(), training=False)
    return model


def count_params(model: keras.Model) -> int:
    return int(sum(tf.size(v).numpy() for v in model.trainable_variables))
