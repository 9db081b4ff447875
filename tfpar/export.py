"""Export a trained model, gathered to one device, as `.keras` and SavedModel.

The SavedModel has a `serve` endpoint for generation: given tokens padded to
the model's length and each row's true length, it returns the next-token
logits and the greedy next token (a seq2seq model takes its encoder tokens
too, as `encoder_tokens`, and the decoder's as `tokens`). It loads with
`tf.saved_model.load` alone.
"""

import os

import keras
import tensorflow as tf

from tfpar import models


def gather(model: keras.Model) -> keras.Model:
    """A single-device copy of `model` (built outside any strategy scope)."""
    copy = models.build(model.model_config)
    copy.set_weights([tf.convert_to_tensor(w).numpy() for w in model.get_weights()])
    return copy


def export(model: keras.Model, export_dir: str) -> str:
    """Writes export_dir/model.keras and export_dir/saved_model; returns export_dir."""
    os.makedirs(export_dir, exist_ok=True)
    single = gather(model)
    single.save(os.path.join(export_dir, "model.keras"))
    length = single.model_config.seq_len
    tokens_spec = tf.TensorSpec((None, length), tf.int32, name="tokens")
    lengths_spec = tf.TensorSpec((None,), tf.int32, name="lengths")

    vocab = single.model_config.vocab_size

    def checked(tokens, lengths, name="tokens"):
        """Bad input fails with what was accepted; unchecked, a GPU gathers zeros silently."""
        return [tf.debugging.assert_equal(tf.shape(lengths)[0], tf.shape(tokens)[0], message=(
                    f"serve: lengths must have one entry per row of {name}")),
                tf.debugging.assert_greater_equal(lengths, 1, message=(
                    f"serve: lengths must be in [1, {length}] (the count of real tokens in each row)")),
                tf.debugging.assert_less_equal(lengths, length, message=(
                    f"serve: lengths must be in [1, {length}] (the count of real tokens in each row)")),
                tf.debugging.assert_non_negative(tokens, message=f"serve: token ids must be in [0, {vocab})"),
                tf.debugging.assert_less(tokens, vocab, message=f"serve: token ids must be in [0, {vocab})")]

    def next_token(logits, lengths):  # logits: (batch, seq, vocab)
        last = tf.gather(logits, lengths - 1, axis=1, batch_dims=1)  # (batch, vocab)
        return {"next_token_logits": last, "next_token": tf.argmax(last, axis=-1, output_type=tf.int32)}

    archive = keras.export.ExportArchive()
    archive.track(single)
    if single.model_config.name == "gpt":
        def serve_gpt(tokens, lengths):
            with tf.control_dependencies(checked(tokens, lengths)):
                return next_token(single(tokens, training=False), lengths)
        archive.add_endpoint("serve", serve_gpt, input_signature=[tokens_spec, lengths_spec])
    else:  # seq2seq: the decoder's next token given the whole encoder input
        def serve_seq2seq(encoder_tokens, tokens, lengths):
            checks = checked(tokens, lengths) + checked(encoder_tokens, lengths, "encoder_tokens")
            with tf.control_dependencies(checks):
                logits = single({"encoder_tokens": encoder_tokens, "decoder_tokens": tokens}, training=False)
                return next_token(logits, lengths)
        archive.add_endpoint("serve", serve_seq2seq, input_signature=[
            tf.TensorSpec((None, length), tf.int32, name="encoder_tokens"), tokens_spec, lengths_spec])
    archive.write_out(os.path.join(export_dir, "saved_model"), verbose=False)
    return export_dir
