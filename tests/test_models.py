"""Models: the GPT attends only to the past; the seq2seq decoder also attends to the encoder."""

from tests.testbase import TestCase, absltest, np, tf
from tfpar import config as config_lib
from tfpar import models


def changed_at(tokens, position):
    """A copy of int32 `tokens` (batch, seq) with another token at `position`."""
    other = tokens.numpy().copy()
    other[:, position] = (other[:, position] + 1) % 256
    return tf.constant(other)


class AttentionTest(TestCase):

    def assertOnlyFromOn(self, before, after, position):
        """Logits before `position` are unchanged; every one from it on changed."""
        before, after = before.numpy(), after.numpy()
        np.testing.assert_allclose(after[:, :position], before[:, :position], rtol=0, atol=1e-6)
        self.assertTrue(np.all(np.abs(after - before)[:, position:].max(axis=-1) > 1e-6))

    def test_gpt_is_causal(self):
        model = models.build(config_lib.model_config("gpt", "tiny"))
        tokens = tf.random.uniform((2, model.model_config.seq_len), 0, 256, tf.int32, seed=1)
        self.assertOnlyFromOn(model(tokens), model(changed_at(tokens, 10)), 10)

    def test_seq2seq_decoder_is_causal_and_reads_the_whole_encoder(self):
        model = models.build(config_lib.model_config("seq2seq", "tiny"))
        shape = (2, model.model_config.seq_len)
        inputs = {"encoder_tokens": tf.random.uniform(shape, 0, 256, tf.int32, seed=1),
                  "decoder_tokens": tf.random.uniform(shape, 0, 256, tf.int32, seed=2)}
        logits = model(inputs)
        decoder_changed = model({**inputs, "decoder_tokens": changed_at(inputs["decoder_tokens"], 10)})
        self.assertOnlyFromOn(logits, decoder_changed, 10)
        last = shape[1] - 1  # the last encoder token reaches every decoder position, the first included
        encoder_changed = model({**inputs, "encoder_tokens": changed_at(inputs["encoder_tokens"], last)})
        self.assertOnlyFromOn(logits, encoder_changed, 0)


if __name__ == "__main__":
    absltest.main()
