"""GPT: a causal decoder-only language model (nanoGPT-shaped)."""

import keras
from keras import ops

from tfpar import config as config_lib
from tfpar import modeling
from tfpar.models import layers


@keras.saving.register_keras_serializable(package="tfpar")
class GPT(modeling.LanguageModel):
    """tokens (batch, seq) -> logits (batch, seq, vocab).

    stack = [embed, block_0, ..., block_{L-1}, head]; every stage maps a
    (batch, seq, d_model) tensor except the first (tokens) and last (logits).
    """

    def __init__(self, cfg: config_lib.ModelConfig, **kwargs):
        kwargs.setdefault("name", "gpt")
        super().__init__(cfg, **kwargs)
        self.embed = layers.Embed(cfg, name="embed")
        self.blocks = [layers.Block(cfg, causal=True, name=f"block_{i}") for i in range(cfg.num_layers)]
        self.head = layers.Head(cfg, name="head")

    @property
    def stack(self):
        return [self.embed, *self.blocks, self.head]

    def example_inputs(self, batch_size=1):
        return ops.zeros((batch_size, self.model_config.seq_len), dtype="int32")


def generate(model: GPT, prompt: bytes, *, max_new_tokens: int = 200, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> bytes:
    """Samples bytes after `prompt`: greedy at temperature 0, else softmax(logits / T) over the top k.

    The window is padded to the model's fixed length, so one traced function
    serves every step (attention is causal, so padding after the last token
    does not change its logits).
    """
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    length = model.model_config.seq_len
    forward = tf.function(lambda t: model(t, training=False))
    rng = np.random.default_rng(seed)
    start = list(prompt) or [ord("\n")]  # an empty prompt starts after a newline
    tokens = list(start)
    for _ in range(max_new_tokens):
        window = tokens[-length:]
        padded = np.zeros((1, length), np.int32)
        padded[0, :len(window)] = window
        logits = forward(tf.constant(padded))[0, len(window) - 1].numpy().astype(np.float64)
        if temperature <= 0:
            token = int(np.argmax(logits))
        else:
            if top_k:
                logits[logits < np.sort(logits)[-top_k]] = -np.inf
            probs = np.exp((logits - logits.max()) / temperature)
            token = int(rng.choice(len(probs), p=probs / probs.sum()))
        tokens.append(token)
    return bytes(t for t in tokens[len(start):] if t < 256)
