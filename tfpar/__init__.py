"""tfpar: parallel training of Keras 3 Transformer language models on TensorFlow.

Import-light on purpose: `import tfpar` does not import TensorFlow, so entry
points can check flags and set environment variables before it starts.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
