"""An encoder-decoder Transformer trained to reconstruct span-masked text."""

from keras import ops
import keras

from tfpar import config as config_lib
from tfpar import modeling
from tfpar.models import layers


class Seq2SeqEmbed(keras.layers.Layer):
    """{encoder_tokens, decoder_tokens} -> (encoder_state, decoder_state).

    Encoder and decoder each have their own token and position embeddings.
    """

    def __init__(self, cfg, **kwargs):
        super().__init__(**kwargs)
        self.encoder = layers.Embed(cfg, name="encoder")
        self.decoder = layers.Embed(cfg, name="decoder")

    def call(self, inputs, training=False):
        enc = self.encoder(inputs["encoder_tokens"], training=training)
        dec = self.decoder(inputs["decoder_tokens"], training=training)
        return enc, dec


class EncoderBlock(keras.layers.Layer):
    """(enc, dec) -> (block(enc), dec); `final=True` adds the encoder's final norm."""

    def __init__(self, cfg, final=False, **kwargs):
        super().__init__(**kwargs)
        self.block = layers.Block(cfg, causal=False, name="block")
        self.final_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm") if final else None

    def call(self, state, training=False):
        enc, dec = state
        enc = self.block(enc, training=training)
        return (self.final_norm(enc) if self.final_norm is not None else enc), dec


class DecoderBlock(keras.layers.Layer):
    """(enc, dec) -> (enc, block(dec, context=enc))."""

    def __init__(self, cfg, **kwargs):
        super().__init__(**kwargs)
        self.block = layers.Block(cfg, causal=True, cross=True, name="block")

    def call(self, state, training=False):
        enc, dec = state
        return enc, self.block(dec, context=enc, training=training)


class DecoderHead(keras.layers.Layer):
    def __init__(self, cfg, **kwargs):
        super().__init__(**kwargs)
        self.head = layers.Head(cfg, name="head")

    def call(self, state, training=False):
        return self.head(state[1], training=training)


@keras.saving.register_keras_serializable(package="tfpar")
class Seq2Seq(modeling.LanguageModel):
    """{encoder_tokens, decoder_tokens} (batch, seq) -> logits (batch, seq, vocab).

    stack = [embed, encoder_0..encoder_{L-1}, decoder_0..decoder_{L-1}, head];
    the state between stages is the pair (encoder_state, decoder_state).
    """

    def __init__(self, cfg: config_lib.ModelConfig, **kwargs):
        kwargs.setdefault("name", "seq2seq")
        super().__init__(cfg, **kwargs)
        n = cfg.num_layers
        self.embed = Seq2SeqEmbed(cfg, name="embed")
        self.encoder_blocks = [EncoderBlock(cfg, final=i == n - 1, name=f"encoder_{i}") for i in range(n)]
        self.decoder_blocks = [DecoderBlock(cfg, name=f"decoder_{i}") for i in range(n)]
        self.head = DecoderHead(cfg, name="head")

    @property
    def stack(self):
        return [self.embed, *self.encoder_blocks, *self.decoder_blocks, self.head]

    @property
    def encoder_stack_size(self) -> int:
        """Stack entries up to and including the last encoder block (for a split)."""
        return 1 + len(self.encoder_blocks)

    def example_inputs(self, batch_size=1):
        zeros = ops.zeros((batch_size, self.model_config.seq_len), dtype="int32")
        return {"encoder_tokens": zeros, "decoder_tokens": zeros}
