"""Token datasets through tensorflow-datasets, with a byte-level tokenizer.

Sources (`DataConfig.dataset`):
  builtin     the `tfpar_text` TFDS builder over CPython's bundled documentation
              text (`pydoc_data.topics`, about 465 KB): works offline.
  text:PATH   the same builder over a user's text file.
  tfds:NAME   any TFDS dataset with a text feature, through its `tfds.builder`.

The pipeline is deterministic for a seed: windows of bytes are shuffled with
the seed (a new permutation per pass), split between input pipelines (`tf.distribute.InputContext`)
after the shuffle, so that the union of the workers' k-th batches is exactly
the k-th global batch of a single pipeline, then batched per replica.
"""

import contextlib
import fcntl
import functools
import hashlib
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Callable, Optional, Tuple

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from tfpar import config as config_lib

_RECORD_BYTES = 4096
_PASSES = 16  # distinct permutations before the order repeats
_SEED_STRIDE = 1_000_003
_CACHE_MAX_BYTES = 256 << 20  # of text (tokens): larger sources are read from disk on each pass
_VERSION = "1.1.0"  # of the tfpar_text builder and its configs


class TextConfig(tfds.core.BuilderConfig):
    """A text corpus: `path` to a file, or None for the bundled documentation."""

    def __init__(self, *, path: Optional[str] = None, **kwargs):
        super().__init__(version=_VERSION, **kwargs)
        self.path = path


@functools.lru_cache(maxsize=1)
def _builtin_digest() -> str:
    """The builtin text's content hash: pydoc's topics change between Python releases."""
    return hashlib.sha1(_builtin_text().encode("utf-8")).hexdigest()[:16]


def _builtin_text() -> str:
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel
    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))


class TfparText(tfds.core.GeneratorBasedBuilder):
    """Plain text cut into records of 4 KB; one `train` split."""

    VERSION = tfds.core.Version(_VERSION)
    # Prepared once per content, in a directory named by its hash: another Python's pydoc
    # text (it changes between releases), or an edited file, is prepared again.
    BUILDER_CONFIGS = [TextConfig(name=f"builtin_{_builtin_digest()}", description="pydoc_data.topics")]
    RELEASE_NOTES = {"1.1.0": "Records in file order (TFDS shuffled them on write, so about 1 window "
                              "in 32 joined two unrelated 4 KB records)."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            description="Plain text for byte-level language modelling.",
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing is downloaded.
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        if self.builder_config.path:
            with open(self.builder_config.path, "rb") as f:
                data = f.read()
        else:
            data = _builtin_text().encode("utf-8")
        for i in range(0, len(data), _RECORD_BYTES):
            yield i, {"text": data[i:i + _RECORD_BYTES]}


@contextlib.contextmanager
def _tfds_warnings_off():
    """absl warnings (TFDS logs through absl) off within the block."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _prepared(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
    """A prepared builder; processes sharing a data_dir prepare it one at a time.

    TFDS prepares into a temporary directory and renames it, but two workers
    preparing at once still race on the rename. The builder is made again
    under the lock so that it reads what another process prepared.
    """
    lock_dir = os.path.dirname(make_builder().data_dir)
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make_builder()
        builder.download_and_prepare()
    return builder


def source_version(data: config_lib.DataConfig) -> str:
    """What the data source holds now: the content hash of a text file or of this
    Python's builtin text, the TFDS name otherwise (a resume compares it)."""
    kind, _, arg = data.dataset.partition(":")
    if kind == "text":
        return f"text sha1:{_file_digest(arg)}"
    return f"tfpar_text {_VERSION} sha1:{_builtin_digest()}" if kind == "builtin" else data.dataset


def _file_digest(path: str) -> str:
    """The content hash of a text file, computed once per version of the file."""
    stat = os.stat(path)
    return _content_digest(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _text_builder(data: config_lib.DataConfig) -> TfparText:
    """The prepared `tfpar_text` builder of a builtin or text:PATH source."""
    kind, _, arg = data.dataset.partition(":")
    builder_config = TfparText.BUILDER_CONFIGS[0]
    if kind == "text":
        if not os.path.getsize(arg):  # TFDS refuses to prepare a split without examples
            raise ValueError(
                f"--dataset holds no text. Received: dataset={data.dataset!r}, an empty file; "
                f"accepted: a file with at least --seq_len + 1 bytes.")
        builder_config = TextConfig(name=f"file_{_file_digest(arg)}", path=arg)
    with _tfds_warnings_off():  # "Using custom data configuration" for every text file
        return _prepared(lambda: TfparText(data_dir=data.data_dir, config=builder_config))


def text_dataset(data: config_lib.DataConfig) -> tf.data.Dataset:
    """A dataset of scalar `tf.string` texts for `data.dataset`.

    Raises:
      ValueError: for an unknown TFDS name, one not prepared in `data.data_dir`,
        or a dataset without a text feature.
    """
    kind, _, arg = data.dataset.partition(":")
    if kind in ("builtin", "text"):
        return _text_builder(data).as_dataset(split="train", shuffle_files=False).map(lambda ex: ex["text"])
    try:
        with _tfds_warnings_off():  # TFDS warns about each version folder it cannot read
            builder = tfds.builder(arg, data_dir=data.data_dir)
            prepared = builder.is_prepared()
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"--dataset: unknown TFDS dataset. Received: dataset={data.dataset!r}; "
            "accepted: a name from tfds.list_builders().") from None
    except (ValueError, AssertionError) as e:  # e.g. an unknown config or version
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"--dataset: TFDS cannot build it ({reason}). Received: dataset={data.dataset!r}; "
            "accepted: tfds:NAME[/CONFIG][:VERSION] that TFDS knows.") from None
    if data.data_dir and not prepared:  # with --data_dir nothing is downloaded
        raise ValueError(
            f"--dataset: TFDS dataset not prepared in --data_dir. Received: "
            f"dataset={data.dataset!r}, data_dir={data.data_dir!r}; accepted: a dataset prepared "
            f"there (`tfds build {arg} --data_dir=...` where there is network), or no --data_dir.")
    keys = [k for k, f in builder.info.features.items() if getattr(f, "tf_dtype", None) == tf.string]
    if not keys:  # known before anything is downloaded
        raise ValueError(
            f"--dataset: TFDS dataset has no text feature. Received: dataset={data.dataset!r}; "
            "accepted: a dataset with a string feature such as 'text'.")
    if not prepared:
        _check_reachable(builder.url_infos or {})
        builder.download_and_prepare()
    key = "text" if "text" in keys else keys[0]
    return builder.as_dataset(split="train").map(lambda ex: ex[key])


def _check_reachable(urls, timeout: float = 3.0) -> None:
    """Fails in seconds when none of a download's hosts can be reached: TFDS retries each
    download 10 times with a growing backoff, over 3 minutes without a network.

    Raises:
      ConnectionError: naming the hosts tried.
    """
    if urllib.request.getproxies():  # as requests reads them: environment or system settings
        return  # requests goes through the proxy; a direct connection says nothing
    ports = {"http": 80, "ftp": 21}
    addresses = list(dict.fromkeys((u.hostname, u.port or ports.get(u.scheme, 443))
                                   for u in map(urllib.parse.urlsplit, urls) if u.hostname))[:3]
    if not addresses:
        return
    for address in [*addresses, ("storage.googleapis.com", 443)]:  # TFDS's prepared copies
        if _connects(address, timeout):
            return
    raise ConnectionError(f"cannot connect to {', '.join(f'{h}:{p}' for h, p in addresses)} "
                          f"or storage.googleapis.com:443")


def _connects(address, timeout: float) -> bool:
    """Whether a TCP connection to `address` opens within `timeout` seconds, name lookup
    included (`create_connection`'s timeout does not bound `getaddrinfo`, which can hang
    on a broken resolver). A lookup still hanging is left to its daemon thread."""
    opened = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=connect, name="tfpar-reachability", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def fits_in_memory(data: config_lib.DataConfig) -> bool:
    """Whether the source's windows are cached in memory (one byte a token): the builtin
    corpus and text files up to `_CACHE_MAX_BYTES`; TFDS datasets are read from their
    prepared files on every pass (lm1b alone holds ~4 GB of text)."""
    kind, _, arg = data.dataset.partition(":")
    return kind == "builtin" or (kind == "text" and os.path.getsize(arg) <= _CACHE_MAX_BYTES)


def windows_per_pass(data: config_lib.DataConfig, length: int) -> Optional[int]:
    """How many windows of `length` tokens one pass over the source holds, where that is
    known without reading it all: from the prepared `tfpar_text` split (every record but
    the last holds `_RECORD_BYTES`), which may predate this Python's builtin text. None
    for TFDS datasets."""
    if data.dataset.partition(":")[0] not in ("builtin", "text"):
        return None
    builder = _text_builder(data)
    records = builder.info.splits["train"].num_examples
    last = next(iter(builder.as_dataset(split="train[-1:]", shuffle_files=False)))["text"]
    return ((records - 1) * _RECORD_BYTES + len(last.numpy())) // length


def token_windows(data: config_lib.DataConfig, length: int) -> tf.data.Dataset:
    """Consecutive, non-overlapping windows of `length` byte tokens (int32), cached in
    memory when the source `fits_in_memory`.

    Raises:
      ValueError: if the whole dataset holds fewer than `length` tokens.
    """
    return window_blocks(data, length).unbatch()


def window_blocks(data: config_lib.DataConfig, length: int) -> tf.data.Dataset:
    """The windows of `token_windows`, one block [n, length] per record of the source.

    Work done per block instead of per window is ~100 times cheaper in tf.data: cutting
    the byte stream byte by byte (`unbatch().batch(length)`), or mapping each window,
    took ~0.25 s for every 10,000 windows, and a new iterator fills its 10,000-window
    shuffle buffer before the first batch.
    """
    texts = text_dataset(data)
    tokens_seen = 0
    for text in texts:  # stops at the first record for any real corpus
        tokens_seen += len(text.numpy())
        if tokens_seen >= length:
            break
    else:
        raise ValueError(
            f"--dataset holds too little text for one training window. Received: "
            f"dataset={data.dataset!r} with {tokens_seen} tokens (bytes); accepted: at least "
            f"{length} tokens for --seq_len={data.seq_len}.")
    blocks = texts.scan(tf.zeros([0], tf.uint8), _cut_windows(length))
    if fits_in_memory(data):
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


def _examples(run: config_lib.RunConfig, start: int = 0, stop: Optional[int] = None) -> tf.data.Dataset:
    """The source's windows [start, stop) (all by default) as (x, y) examples of the run's
    model, in order.

    The range is cut block by block and every block is read, so that `window_blocks`'s
    cache is completed (a partly read cache is dropped, and the source read again).
    """
    data = run.data
    blocks = window_blocks(data, _window_length(run))
    if start or stop is not None:
        def cut(done, block):  # (windows before the block, block) -> (windows to its end, those in range)
            size = tf.shape(block, out_type=tf.int64)[0]
            first = tf.clip_by_value(start - done, 0, size)
            last = size if stop is None else tf.clip_by_value(stop - done, 0, size)
            return done + size, block[first:last]
        blocks = blocks.scan(tf.constant(0, tf.int64), cut)
    if run.model.name == "gpt":
        return blocks.map(causal_example).unbatch()
    # Not cached: masks are a pure function of the window's index, cheap to draw again,
    # and three int32 copies would take 12 bytes a token.
    return blocks.unbatch().enumerate(start).map(denoising_example(data.seed))


def _held_out(run: config_lib.RunConfig) -> Tuple[int, int]:
    """(windows of one pass over the source, the last of them `--eval_fraction` holds out)."""
    windows = windows_per_pass(run.data, _window_length(run))
    return windows, int(windows * run.data.eval_fraction + 1e-9)  # 3300 * 0.29 = 956.99...


def evaluated_batches(run: config_lib.RunConfig) -> int:
    """The held-out global batches evaluated after each epoch (0 without --eval_fraction).

    Raises:
      ValueError: if fewer windows are held out than one global batch, or than --eval_steps asks.
    """
    if not run.data.eval_fraction:
        return 0
    _, held_out = _held_out(run)
    batches = held_out // run.data.global_batch_size
    if not batches or run.eval_steps > batches:
        raise ValueError(
            f"--eval_fraction holds out {held_out} windows, {batches} global batches of "
            f"{run.data.global_batch_size}. Received: eval_fraction={run.data.eval_fraction}, "
            f"eval_steps={run.eval_steps}; accepted: an --eval_fraction holding at least "
            f"{max(run.eval_steps, 1) * run.data.global_batch_size} windows.")
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


def make_eval_dataset_fn(run: config_lib.RunConfig) -> Callable:
    """Returns `dataset_fn(input_context=None)` giving per-replica batches of the held-out
    windows, in order: `evaluated_batches(run)` global batches, repeated, so that every
    evaluation reads the same ones however Keras iterates."""
    (windows, held_out), batches = _held_out(run), evaluated_batches(run)
    first = windows - held_out

    def dataset_fn(input_context: Optional[tf.distribute.InputContext] = None):
        ds = _examples(run, first, first + batches * run.data.global_batch_size).repeat()
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
            per_pass = windows_per_pass(data, _window_length(run))
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
