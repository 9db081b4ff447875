"""Data: the builtin corpus through TFDS, determinism, disjoint shards, sources."""

import dataclasses
import os
import socket
import threading
import time
import urllib.request
from unittest import mock

import tensorflow_datasets as tfds

from tests import tfds_splits
from tests.testbase import TestCase, absltest, np, tf, tiny_run
from tfpar import config as config_lib
from tfpar import data as data_lib
from tfpar import sources


def first_batches(run, n, context=None, skip_steps=0):
    dataset = data_lib.make_dataset_fn(run, skip_steps=skip_steps)(context)
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset.take(n)]


class DataTest(TestCase):

    def run_config(self, **data_changes):
        run = tiny_run("default")
        fields = {**run.data.__dict__, "data_dir": self.data_dir, **data_changes}
        return run.replace(data=config_lib.DataConfig(**fields))

    def test_builtin_corpus_is_bytes_of_the_python_docs(self):
        x, y = first_batches(self.run_config(), 1)[0]
        self.assertEqual(x.shape, (8, 32))
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        self.assertTrue(((x >= 0) & (x < 256)).all())
        text = bytes(x[0].tolist()).decode("utf-8", errors="replace")
        self.assertGreater(sum(c.isalpha() or c.isspace() for c in text), 20)

    def test_same_seed_same_batches_other_seed_other_batches(self):
        a = first_batches(self.run_config(seed=3), 3)
        b = first_batches(self.run_config(seed=3), 3)
        c = first_batches(self.run_config(seed=4), 3)
        for (xa, _), (xb, _) in zip(a, b):
            np.testing.assert_array_equal(xa, xb)
        self.assertFalse(np.array_equal(a[0][0], c[0][0]))

    def test_input_pipelines_get_disjoint_examples_covering_the_global_batch(self):
        run = self.run_config()
        whole = first_batches(run, 4)
        shards = [first_batches(run, 4, tf.distribute.InputContext(2, i, 2)) for i in range(2)]
        for step in range(4):
            worker_rows = [set(map(tuple, shards[i][step][0].tolist())) for i in range(2)]
            self.assertLen(shards[0][step][0], 4)
            self.assertEmpty(worker_rows[0] & worker_rows[1])
            self.assertEqual(worker_rows[0] | worker_rows[1], set(map(tuple, whole[step][0].tolist())))

    def test_pipeline_runs_without_autotuning(self):
        # tf.data's autotuning thread made deleting a distributed iterator wait
        # up to a minute at the end of fit (BUILD_NOTES.md).
        ds = data_lib.make_dataset_fn(self.run_config())(tf.distribute.InputContext())
        self.assertIs(ds.options().autotune.enabled, False)

    def test_text_file_source(self):
        path = os.path.join(self.create_tempdir().full_path, "corpus.txt")
        with open(path, "w") as f:
            f.write("abcdefgh" * 500)
        x, _ = first_batches(self.run_config(dataset=f"text:{path}"), 1)[0]
        self.assertTrue(set(np.unique(x)) <= set(b"abcdefgh"))
        with open(path, "w") as f:  # the same file edited: its new text, not the prepared old one
            f.write("xyz" * 1000)
        x, _ = first_batches(self.run_config(dataset=f"text:{path}"), 1)[0]
        self.assertTrue(set(np.unique(x)) <= set(b"xyz"))

    def test_text_records_keep_the_files_order(self):
        """Windows cut across the 4 KB records join text that was adjacent in the file."""
        path = os.path.join(self.create_tempdir().full_path, "numbers.txt")
        text = "".join(f"{i:07d}\n" for i in range(20_000)).encode()  # 160 KB, 40 records
        with open(path, "wb") as f:
            f.write(text)
        data = self.run_config(dataset=f"text:{path}").data
        self.assertEqual(b"".join(r.numpy() for r in sources.text_dataset(data)), text)
        # Windows are the text's consecutive 33-byte pieces, across records; the last 16 bytes
        # (160,000 = 4,848 x 33 + 16), short of a window, are dropped.
        windows = next(iter(data_lib.token_windows(data, 33).batch(10_000))).numpy()
        self.assertEqual(windows.shape, (4848, 33))
        self.assertEqual(windows.astype(np.uint8).tobytes(), text[:4848 * 33])

    def test_too_little_text_for_one_window_is_a_value_error(self):
        path = os.path.join(self.create_tempdir().full_path, "short.txt")
        with open(path, "w") as f:
            f.write("hello world\n")
        with self.assertRaisesRegex(ValueError, "too little text.*12 tokens.*at least 33"):
            first_batches(self.run_config(dataset=f"text:{path}"), 1)
        with open(path, "w"):
            pass
        with self.assertRaisesRegex(ValueError, "holds no text.*an empty file"):
            first_batches(self.run_config(dataset=f"text:{path}"), 1)

    def test_each_pass_is_a_new_permutation_of_every_window(self):
        path = os.path.join(self.create_tempdir().full_path, "corpus.txt")
        with open(path, "wb") as f:  # 40 windows of 33 bytes, each starting with its number
            f.write(b"".join(bytes([i]) + bytes(32) for i in range(40)))
        run = self.run_config(dataset=f"text:{path}", global_batch_size=4)
        firsts = [int(t) for x, y in first_batches(run, 20) for t in x[:, 0]]
        passes = [firsts[:40], firsts[40:]]
        for order in passes:
            self.assertEqual(sorted(order), list(range(40)))
        self.assertNotEqual(passes[0], passes[1])

    def test_held_out_windows_are_the_sources_end_and_never_trained_on(self):
        path = os.path.join(self.create_tempdir().full_path, "corpus.txt")
        with open(path, "wb") as f:  # 40 windows of 33 bytes, each starting with its number
            f.write(b"".join(bytes([i]) + bytes(32) for i in range(40)))
        run = self.run_config(dataset=f"text:{path}", global_batch_size=4, eval_fraction=0.25)
        firsts = [int(t) for x, y in first_batches(run, 30) for t in x[:, 0]]
        passes = [firsts[:30], firsts[30:60], firsts[60:90], firsts[90:]]
        for order in passes[:3]:  # each pass a permutation of the 30 windows before the last 10
            self.assertEqual(sorted(order), list(range(30)))
        resumed = [int(t) for x, y in first_batches(run, 10, skip_steps=20) for t in x[:, 0]]
        self.assertEqual(resumed, firsts[80:])  # a resume skips training windows only
        self.assertEqual(data_lib.evaluated_batches(run), 2)  # 10 windows: 2 whole batches of 4
        held_out = data_lib.make_eval_dataset_fn(run)(None).take(4)  # repeated: the same each time
        self.assertEqual([[int(t) for t in x[:, 0]] for x, y in held_out], [[30, 31, 32, 33], [34, 35, 36, 37]] * 2)
        # Held-out windows for one batch per pipeline, in order: 2 pipelines, 2 windows each.
        for i, expected in enumerate(([30, 32], [31, 33])):
            first = next(iter(data_lib.make_eval_dataset_fn(run)(tf.distribute.InputContext(2, i, 2))))
            self.assertEqual([int(t) for t in first[0][:, 0]], expected)
        for fraction, steps, text in [(0.05, 0, "holds out 2 windows, 0 global batches of 4"),
                                      (0.25, 3, "holds out 10 windows, 2 global batches.*at least 12 windows")]:
            with self.assertRaisesRegex(ValueError, text):
                data_lib.evaluated_batches(self.run_config(dataset=f"text:{path}", global_batch_size=4,
                                                    eval_fraction=fraction).replace(eval_steps=steps))

    def test_a_tfds_sources_eval_split_is_evaluated_in_order_and_never_trained_on(self):
        data_dir = self.create_tempdir().full_path
        tfds_splits.TfparTestSplits(data_dir=data_dir).download_and_prepare()
        run = self.run_config(dataset="tfds:tfpar_test_splits", data_dir=data_dir, global_batch_size=4,
                              eval_split="validation")
        trained = {int(t) for x, y in first_batches(run, 20) for t in x.flat}
        self.assertTrue(trained <= set(tfds_splits.TRAIN), trained - set(tfds_splits.TRAIN))
        self.assertEqual(data_lib.evaluated_batches(run), 10)  # 40 windows in batches of 4
        two = run.replace(eval_steps=2)
        self.assertEqual(data_lib.evaluated_batches(two), 2)
        evaluated = data_lib.make_eval_dataset_fn(two)(None).take(4)  # repeated: the same each time
        self.assertEqual([[int(t) for t in x[:, 0]] for x, y in evaluated], [[0, 1, 2, 3], [4, 5, 6, 7]] * 2)
        for i, expected in enumerate(([0, 2], [1, 3])):  # 2 input pipelines
            first = next(iter(data_lib.make_eval_dataset_fn(two)(tf.distribute.InputContext(2, i, 2))))
            self.assertEqual([int(t) for t in first[0][:, 0]], expected)
        half = self.run_config(dataset="tfds:tfpar_test_splits", data_dir=data_dir, global_batch_size=4,
                               eval_split="validation[:50%]")  # 7 of 14 records: 700 bytes, 21 windows
        self.assertEqual(data_lib.evaluated_batches(half), 5)
        with self.assertRaisesRegex(ValueError, r"^--eval_split holds 40 windows, 10 global batches of 4\. "
                                                r"Received: eval_split='validation', eval_steps=11;"):
            data_lib.evaluated_batches(run.replace(eval_steps=11))
        unknown = self.run_config(dataset="tfds:tfpar_test_splits", data_dir=data_dir, eval_split="valdation")
        with self.assertRaisesRegex(ValueError, r"^--eval_split: TFDS cannot read that split .*"
                                                r"accepted: one of \['train', 'validation'\]"):
            data_lib.evaluated_batches(unknown)
        empty = self.run_config(dataset="tfds:tfpar_test_splits", data_dir=data_dir, eval_split="validation[100%:]")
        with self.assertRaisesRegex(ValueError, r"^--eval_split: TFDS cannot read that split \(Instruction \[\] "
                                                r"corresponds to no data!\)\. Received: .*'validation\[100%:\]'"):
            data_lib.evaluated_batches(empty)
        short = self.run_config(dataset="tfds:tfpar_test_splits", data_dir=data_dir, eval_split="validation[:1]")
        with self.assertRaisesRegex(ValueError, r"^--eval_split holds too little text for one window\. Received: "
                                                r".*eval_split='validation\[:1\]' with 100 tokens"):  # 1 record
            data_lib.window_blocks(short.data, 128, short.data.eval_split)
        with self.assertRaisesRegex(ValueError, "^--eval_split names a split of a tfds:NAME source"):
            self.run_config(eval_split="validation")
        for trained_on in ("train", "test+train[:5%]"):
            with self.assertRaisesRegex(ValueError, "^--eval_split must not hold windows tfpar trains on"):
                self.run_config(dataset="tfds:tfpar_test_splits", eval_split=trained_on)

    def test_tfds_source_with_mock_data(self):
        # No --data_dir: the download path, which mock_data replaces (nothing is fetched); tfpar's
        # reachability probe runs before it and is answered here too.
        with tfds.testing.mock_data(num_examples=64), mock.patch.object(socket, "create_connection"):
            x, _ = first_batches(self.run_config(dataset="tfds:imdb_reviews", data_dir=None), 1)[0]
        self.assertEqual(x.shape, (8, 32))

    def test_tfds_dataset_not_prepared_in_data_dir_is_a_value_error(self):
        with self.assertRaisesRegex(ValueError, "not prepared in --data_dir.*imdb_reviews"):
            first_batches(self.run_config(dataset="tfds:imdb_reviews"), 1)

    def test_a_download_from_unreachable_hosts_fails_before_tfds_retries(self):
        """Offline, TFDS retries a download for over 3 minutes; tfpar tries each host once."""
        imdb = config_lib.DataConfig(dataset="tfds:imdb_reviews", data_dir=None)
        not_prepared = mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=False)
        prepare = mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                                    side_effect=RuntimeError("downloading"))
        no_proxy = mock.patch.object(urllib.request, "getproxies", return_value={})
        with mock.patch.object(socket, "create_connection", side_effect=OSError("unreachable")) as connect, \
                not_prepared, prepare as download:
            with no_proxy, self.assertRaisesRegex(ConnectionError, "^cannot connect to ai.stanford.edu:80 or "
                                                                   "storage.googleapis.com:443$"):
                sources.text_dataset(imdb)
            download.assert_not_called()
            self.assertEqual([c.args[0] for c in connect.call_args_list],
                             [("ai.stanford.edu", 80), ("storage.googleapis.com", 443)])
            with mock.patch.object(urllib.request, "getproxies", return_value={"https": "http://proxy:3128"}):
                with self.assertRaisesRegex(RuntimeError, "downloading"):  # through the proxy: no probe
                    sources.text_dataset(imdb)
        with mock.patch.object(socket, "create_connection"), no_proxy, not_prepared, prepare, \
                self.assertRaisesRegex(RuntimeError, "downloading"):  # a host answers
            sources.text_dataset(imdb)

    def test_a_hanging_name_lookup_is_under_the_probes_timeout(self):
        """getaddrinfo, which create_connection's timeout does not bound, can hang."""
        release = threading.Event()
        self.addCleanup(release.set)

        def hang(*args, **kwargs):
            release.wait(30)
            raise OSError("name lookup timed out")
        no_proxy = mock.patch.object(urllib.request, "getproxies", return_value={})
        with mock.patch.object(socket, "create_connection", side_effect=hang), no_proxy:
            start = time.monotonic()
            with self.assertRaisesRegex(ConnectionError, "^cannot connect to example.org:443 or"):
                sources._check_reachable(["https://example.org/x"], timeout=0.2)  # pylint: disable=protected-access
            self.assertLess(time.monotonic() - start, 2.0)  # 2 hosts x 0.2 s, not 2 x 30 s

    def assertResumedBatchesEqual(self, run, skips, context=None):
        """Batches after skipping `skips` steps are those `skips` steps into the unskipped run."""
        every = first_batches(run, max(skips) + 3, context)
        for skip in skips:
            with self.subTest(dataset=run.data.dataset, model=run.model.name, skip=skip, context=context):
                resumed = first_batches(run, 3, context, skip_steps=skip)
                tf.nest.map_structure(np.testing.assert_array_equal, every[skip:skip + 3], resumed)

    def test_resumed_data_skips_whole_passes_to_the_same_batches(self):
        text = ("naïve café " * 820).encode("utf-8")[:9000]  # 3 records of 4 KB, multi-byte characters
        corpus = self.create_tempfile(content=text, mode="wb").full_path
        for model, length in (("gpt", 33), ("seq2seq", 32)):
            run = tiny_run(model=model, global_batch_size=8)
            run = run.replace(data=dataclasses.replace(run.data, dataset=f"text:{corpus}", data_dir=self.data_dir,
                                                       shuffle_buffer=16))
            self.assertEqual(sources.windows_per_pass(run.data, length), 9000 // length)
            per_pass_steps = 9000 // length / 8  # 34.1 and 35.1
            skips = (1, 34, 35, 36, 300, 16 * int(per_pass_steps) + 5)  # within, across passes, past 16
            self.assertResumedBatchesEqual(run, skips)
            if model == "gpt":  # two input pipelines (workers) skip alike
                for i in range(2):
                    self.assertResumedBatchesEqual(run, (35, 300), tf.distribute.InputContext(2, i, 2))
        # The builtin corpus counts the prepared windows, not this Python's pydoc text (which
        # another Python may have changed since the data_dir was prepared).
        run = tiny_run(global_batch_size=8)
        run = run.replace(data=dataclasses.replace(run.data, data_dir=self.data_dir))
        per_pass = sources.windows_per_pass(run.data, 33)
        with mock.patch.object(sources, "_builtin_text", return_value="other text " * 100):
            self.assertResumedBatchesEqual(run, (per_pass // 8 + 2,))

    def test_only_sources_that_fit_in_memory_are_cached(self):
        corpus = self.create_tempfile(content="some text " * 100).full_path
        self.assertTrue(sources.fits_in_memory(config_lib.DataConfig()))
        self.assertTrue(sources.fits_in_memory(config_lib.DataConfig(dataset=f"text:{corpus}")))
        self.assertFalse(sources.fits_in_memory(config_lib.DataConfig(dataset="tfds:lm1b")))
        with mock.patch.object(os.path, "getsize", return_value=(256 << 20) + 1):
            self.assertFalse(sources.fits_in_memory(config_lib.DataConfig(dataset=f"text:{corpus}")))

    def test_unknown_tfds_name_is_a_value_error(self):
        with self.assertRaisesRegex(ValueError, "unknown TFDS dataset.*no_such_dataset"):
            first_batches(self.run_config(dataset="tfds:no_such_dataset"), 1)

    def test_seq2seq_examples_mask_spans_and_shift_the_decoder(self):
        run = tiny_run("default", model="seq2seq")
        run = run.replace(data=config_lib.DataConfig(**{**run.data.__dict__, "data_dir": self.data_dir}))
        x, y = first_batches(run, 1)[0]
        masked = x["encoder_tokens"] == config_lib.MASK_ID
        self.assertBetween(masked.mean(), 0.08, 0.3)  # spans of 3 starting at rate 0.05
        for row in masked:  # runs of masked tokens are whole spans, and rows differ
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
            runs = [(end - start, end) for start, end in zip(edges[::2], edges[1::2])]
            self.assertTrue(all(length >= 3 or end == len(row) for length, end in runs), row)
        self.assertGreater(len({row.tobytes() for row in masked}), 1)
        np.testing.assert_array_equal(x["encoder_tokens"][~masked], y[~masked])
        np.testing.assert_array_equal(x["decoder_tokens"][:, 0], config_lib.BOS_ID)
        np.testing.assert_array_equal(x["decoder_tokens"][:, 1:], y[:, :-1])


if __name__ == "__main__":
    absltest.main()
