"""pytest runs absltest cases without absl's main: mark the flags as parsed.

The suite runs as pytest-xdist processes sharing the machine's cores, so TF's
intra-op pool gets one thread per process (test_mirrored and test_dtensor on 2
cores: 175 s against 188 s with pools as wide as the machine, 2026-11-27). TF
reads the variable when its context starts; subprocesses inherit it; the tests
of tfpar's own thread split unset it. A user's value is kept.
"""

import os

from absl import flags

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
