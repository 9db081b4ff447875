"""A TFDS dataset with a train and a validation split, built offline (`tfds:tfpar_test_splits`)."""

import tensorflow_datasets as tfds

WINDOW = 33  # the tiny GPT's window: seq_len 32 + 1
RECORD = 100  # bytes per example: windows straddle examples

# Validation: 40 windows, each its number then 32 zero bytes; train: letters only.
VALIDATION = b"".join(bytes([i]) + bytes(WINDOW - 1) for i in range(40))
TRAIN = bytes(range(ord("a"), ord("z") + 1)) * 200


def records(text: bytes):
    return [text[i:i + RECORD] for i in range(0, len(text), RECORD)]


class TfparTestSplits(tfds.core.GeneratorBasedBuilder):
    """Two splits of byte text, in order."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {"train": self._generate_examples(TRAIN), "validation": self._generate_examples(VALIDATION)}

    def _generate_examples(self, text):
        for i, record in enumerate(records(text)):
            yield i, {"text": record}
