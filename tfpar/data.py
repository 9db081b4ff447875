"""Token datasets: a source's text (`tfpar.sources`) as batches of byte tokens.

The pipeline is deterministic for a seed: windows of bytes are shuffled with
the seed (a new permutation per pass), split between input pipelines (`tf.distribute.InputContext`)
after the shuffle, so that the union of the workers' k-th batches is exactly
the k-th global batch of a single pipeline, then batched per replica.
"""

import functools
from typing import Callable, Optional, Tuple

import tensorflow as tf

from tfpar import config as config_lib
from tfpar import sources

_PASSES = 16  # distinct permutations before the order repeats
_SEED_STRIDE = 1_000_003


def token_windows(data: config_lib.DataConfig, length: int) -> tf.data.Dataset:
    """Consecutive, non-overlapping windows of `length` byte tokens (int32), cached in
    memory when the source `sources.fits_in_memory`.

    Raises:
      ValueError: if the whole dataset holds fewer than `length` tokens.
    """
    return window_blocks(data, length).unbatch()


def window_blocks(data: config_lib.DataConfig, length: int, split: str = "train") -> tf.data.Dataset:
    """The windows of `token_windows`, one block [n, length] per record of the source's
    `split`.

    Work done per block instead of per window is ~100 times cheaper in tf.data: cutting
    the byte stream byte by byte (`unbatch().batch(length)`), or mapping each window,
    took ~0.25 s for every 10,000 windows, and a new iterator fills its 10,000-window
    shuffle buffer before the first batch.
    """
    texts = sources.text_dataset(data, split)
    tokens_seen = 0
    for text in texts:  # stops at the first record for any real corpus
        tokens_seen += len(text.numpy())
        if tokens_seen >= length:
            break
    else:
        which = f"dataset={data.dataset!r}" + (f", eval_split={split!r}" if split != "train" else "")
        raise ValueError(
            f"--{'eval_split' if split != 'train' else 'dataset'} holds too little text for one "
            f"window. Received: {which} with {tokens_seen} tokens (bytes); accepted: at least "
            f"{length} tokens for --seq_len={data.seq_len}.")
    blocks = texts.scan(tf.zeros([0], tf.uint8), _cut_windows(length))
    if sources.fits_in_memory(data):
        blocks = blocks.cache()  # as bytes: a quarter of int32's memory
    return blocks.map(lambda b: tf.cast(b, tf.int32))


def _cut_windows(length: int) -> Callable:
    """The `Dataset.scan` step of `window_blocks`: (bytes carried, text) -> (the bytes past
    the last whole window, carried into the next text, and the whole windows [n, length]
    of the carried bytes and the text). The stream's last bytes short of a window are
    dropped."""
    def cut(carried, text):
        joined = tf.concat([carried, tf.io.decode_raw(text, tf.uint8)], axis=0)
        whole = tf.shape(joined)[0] // length * length
        return joined[whole:], tf.reshape(joined[:whole], [-1, length])
    return cut


def causal_example(windows):
    """(tokens[:-1], tokens[1:]) for next-token prediction, of a window or a block of them."""
    return windows[..., :-1], windows[..., 1:]


def denoising_example(seed: int, mask_rate: float = 0.15, span: int = 3):
    """Returns a map fn: (index, window) -> ({encoder, decoder tokens}, target).

    Spans of `span` tokens starting with probability mask_rate/span are replaced
    by MASK in the encoder input; the decoder reconstructs the original window.
    """
    def fn(index, window):
        starts = tf.random.stateless_uniform(
            tf.shape(window), seed=tf.stack([tf.cast(seed, tf.int64), index])) < mask_rate / span
        starts = tf.cast(starts, tf.int32)
        padded = tf.pad(starts, [[span - 1, 0]])
        masked = tf.add_n([padded[i:i + tf.shape(window)[0]] for i in range(span)]) > 0
        encoder = tf.where(masked, config_lib.MASK_ID, window)
        decoder = tf.concat([[config_lib.BOS_ID], window[:-1]], axis=0)
        return {"encoder_tokens": encoder, "decoder_tokens": decoder}, window
    return fn


def _window_length(run: config_lib.RunConfig) -> int:
    return run.data.seq_len + 1 if run.model.name == "gpt" else run.data.seq_len


def _examples(run: config_lib.RunConfig, start: int = 0, stop: Optional[int] = None,
              split: str = "train") -> tf.data.Dataset:
    """The windows [start, stop) (all by default) of the source's `split` as (x, y)
    examples of the run's model, in order.

    The range is cut block by block. A cached source is read to its end, so that
    `window_blocks`'s cache is completed (a partly read cache is dropped, and the source
    read again); one read from disk on every pass stops after `stop`.
    """
    data = run.data
    blocks = window_blocks(data, _window_length(run), split)
    if start or stop is not None:
        def cut(done, block):  # (windows before the block, block) -> (to its end, (done, those in range))
            size = tf.shape(block, out_type=tf.int64)[0]
            first = tf.clip_by_value(start - done, 0, size)
            last = size if stop is None else tf.clip_by_value(stop - done, 0, size)
            return done + size, (done, block[first:last])
        blocks = blocks.scan(tf.constant(0, tf.int64), cut)
        if stop is not None and not sources.fits_in_memory(data):
            blocks = blocks.take_while(lambda done, _: done < stop)
        blocks = blocks.map(lambda _, block: block)
    if run.model.name == "gpt":
        return blocks.map(causal_example).unbatch()
    # Not cached: masks are a pure function of the window's index, cheap to draw again,
    # and three int32 copies would take 12 bytes a token.
    return blocks.unbatch().enumerate(start).map(denoising_example(data.seed))


def _held_out(run: config_lib.RunConfig) -> Tuple[int, int]:
    """(windows of one pass over the source, the last of them `--eval_fraction` holds out)."""
    windows = sources.windows_per_pass(run.data, _window_length(run))
    return windows, int(windows * run.data.eval_fraction + 1e-9)  # 3300 * 0.29 = 956.99...


def _split_windows(run: config_lib.RunConfig, limit: int) -> int:
    """The windows of the source's --eval_split, counted by reading it (up to about
    `limit` of them; 0: all)."""
    def count(done, block):  # -> (windows to the block's end, (windows before it, to its end))
        end = done + tf.shape(block, out_type=tf.int64)[0]
        return end, (done, end)
    blocks = window_blocks(run.data, _window_length(run), run.data.eval_split)
    ends = blocks.scan(tf.constant(0, tf.int64), count)
    if limit:
        ends = ends.take_while(lambda done, _: done < limit)
    return int(ends.reduce(tf.constant(0, tf.int64), lambda _, before_and_end: before_and_end[1]))


def evaluated_batches(run: config_lib.RunConfig) -> int:
    """The held-out global batches evaluated after each epoch (0 without --eval_fraction
    or --eval_split).

    Raises:
      ValueError: if fewer windows are held out than one global batch, or than --eval_steps asks.
    """
    data = run.data
    if data.eval_split:
        held_out = _split_windows(run, run.eval_steps * data.global_batch_size)
        what, received = f"--eval_split holds {held_out} windows", f"eval_split={data.eval_split!r}"
    elif data.eval_fraction:
        _, held_out = _held_out(run)
        what, received = f"--eval_fraction holds out {held_out} windows", f"eval_fraction={data.eval_fraction}"
    else:
        return 0
    batches = held_out // data.global_batch_size
    if not batches or run.eval_steps > batches:
        raise ValueError(
            f"{what}, {batches} global batches of {data.global_batch_size}. Received: {received}, "
            f"eval_steps={run.eval_steps}; accepted: {'a split' if data.eval_split else 'an --eval_fraction'} "
            f"holding at least {max(run.eval_steps, 1) * data.global_batch_size} windows.")
    return run.eval_steps or batches


def _per_replica_batches(ds: tf.data.Dataset, ctx: tf.distribute.InputContext,
                         global_batch_size: int) -> tf.data.Dataset:
    """This input pipeline's share of `ds`, in batches of one replica."""
    if ctx.num_input_pipelines > 1:
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    # A fixed pipeline gains nothing from autotuning, and its thread made deleting a
    # distributed iterator wait up to a minute (BUILD_NOTES.md).
    options = tf.data.Options()
    options.autotune.enabled = False
    return (ds.batch(ctx.get_per_replica_batch_size(global_batch_size), drop_remainder=True)
            .prefetch(2).with_options(options))


def make_eval_dataset_fn(run: config_lib.RunConfig, batches: int = 0) -> Callable:
    """Returns `dataset_fn(input_context=None)` giving per-replica batches of the held-out
    windows (or the --eval_split's), in order: `batches` global batches (default
    `evaluated_batches(run)`, which may read the whole split), repeated, so that every
    evaluation reads the same ones however Keras iterates."""
    batches, split, first = batches or evaluated_batches(run), run.data.eval_split or "train", 0
    if not run.data.eval_split:
        windows, held_out = _held_out(run)
        first = windows - held_out

    def dataset_fn(input_context: Optional[tf.distribute.InputContext] = None):
        ds = _examples(run, first, first + batches * run.data.global_batch_size, split).repeat()
        return _per_replica_batches(ds, input_context or tf.distribute.InputContext(), run.data.global_batch_size)

    return dataset_fn


def make_dataset_fn(run: config_lib.RunConfig, skip_steps: int = 0) -> Callable:
    """Returns `dataset_fn(input_context=None)` giving per-replica (x, y) batches of the
    training windows (those `--eval_fraction` does not hold out).

    `skip_steps` global batches are skipped first (to resume a run exactly).
    """
    data = run.data
    # Whole passes are skipped by starting at a later one (a skip reads every element it
    # skips: 7.5 s for 10,000 steps of `small`); the rest element by element.
    first_pass, skip_windows = 0, skip_steps * data.global_batch_size
    per_pass = None
    if data.eval_fraction:
        windows, held_out = _held_out(run)
        per_pass = windows - held_out
        examples = _examples(run, stop=per_pass)
    else:
        examples = _examples(run)
        if skip_windows:
            per_pass = sources.windows_per_pass(data, _window_length(run))
    if skip_windows and per_pass:
        first_pass, skip_windows = divmod(skip_windows % (per_pass * _PASSES), per_pass)

    def dataset_fn(input_context: Optional[tf.distribute.InputContext] = None):
        ctx = input_context or tf.distribute.InputContext()
        # Each pass over the data has its own fixed permutation, seeded by
        # (seed, pass), so every new iterator replays the same order. (Keras
        # opens the iterator twice under a strategy; with
        # reshuffle_each_iteration the order would then differ from default.)
        passes = [examples.shuffle(data.shuffle_buffer, seed=data.seed * _SEED_STRIDE + p,
                                   reshuffle_each_iteration=False) for p in range(_PASSES)]
        passes = passes[first_pass:] + passes[:first_pass]
        ds = functools.reduce(lambda a, b: a.concatenate(b), passes).repeat()
        if skip_windows:
            ds = ds.skip(skip_windows)
        return _per_replica_batches(ds, ctx, data.global_batch_size)

    return dataset_fn
