"""GPT: a causal decoder-only language model (nanoGPT-shaped)."""

from keras import ops

from tfpar import config as config_lib
from tfpar import modeling
from tfpar.models import layers


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
