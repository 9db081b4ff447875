"""Where training text comes from, and how much of it there is.

Sources (`DataConfig.dataset`):
  builtin     the `tfpar_text` TFDS builder over CPython's bundled documentation
              text (`pydoc_data.topics`, about 465 KB): works offline.
  text:PATH   the same builder over a user's text file.
  tfds:NAME   any TFDS dataset with a text feature, through its `tfds.builder`.

`text_dataset` gives a source's texts in order; `tfpar.data` cuts them into
windows and batches.
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
from typing import Callable, Optional

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from tfpar import config as config_lib

_RECORD_BYTES = 4096
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


def text_dataset(data: config_lib.DataConfig, split: str = "train") -> tf.data.Dataset:
    """A dataset of scalar `tf.string` texts for `data.dataset`: its `split` (a TFDS split
    name, sliced or not; builtin and text:PATH sources have only "train").

    Raises:
      ValueError: for an unknown TFDS name, one not prepared in `data.data_dir`,
        a dataset without a text feature, or a split it does not have.
    """
    kind, _, arg = data.dataset.partition(":")
    if kind in ("builtin", "text"):
        return _text_builder(data).as_dataset(split=split, shuffle_files=False).map(lambda ex: ex["text"])
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
    # An evaluation reads the split's first batches only: TFDS's cache of a small dataset
    # would be dropped, unfinished, every time (and warn so).
    read_config = tfds.ReadConfig(try_autocache=split == "train")
    try:  # an unknown split, a bad slice or an empty one fails here
        texts = builder.as_dataset(split=split, read_config=read_config)
    except (KeyError, ValueError, AssertionError) as e:
        reason = (str(e).strip().strip('"').splitlines() or [type(e).__name__])[0].rstrip(".")
        if split == "train":
            raise ValueError(
                f"--dataset: TFDS dataset has no train split to train on ({reason}). Received: "
                f"dataset={data.dataset!r}; accepted: a dataset with a 'train' split.") from None
        raise ValueError(
            f"--eval_split: TFDS cannot read that split ({reason}). Received: dataset={data.dataset!r}, "
            f"eval_split={split!r}; accepted: one of {sorted(builder.info.splits)}, or a slice of "
            f"one such as validation[:10%].") from None
    return texts.map(lambda ex: ex[key])


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
