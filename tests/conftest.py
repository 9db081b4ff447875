"""pytest setup: absl flags marked parsed (pytest runs absltest cases without absl's main), one
TF intra-op thread per process, and a temporary directory of each process's own.

The suite runs as pytest-xdist processes sharing the machine's cores, so TF's
intra-op pool gets one thread per process (test_mirrored and test_dtensor on 2
cores: 175 s against 188 s with pools as wide as the machine, 2026-11-27). TF
reads the variable when its context starts; subprocesses inherit it; the tests
of tfpar's own thread split unset it. A user's value is kept.
"""

import atexit
import os
import shutil
import tempfile

from absl import flags

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

# Temporary files of each test process and its subprocesses go into a directory of its own,
# deleted at exit: TFDS leaves an empty `tmp*tfds` directory for every builder of a dataset it
# has not prepared (DatasetInfo.initialize_from_bucket). absl's test directory, where the
# builtin corpus is prepared once for every process and run, stays where it was.
os.environ.setdefault("TEST_TMPDIR", os.path.join(tempfile.gettempdir(), "absl_testing"))
tempfile.tempdir = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="tfpar_tests_")
atexit.register(shutil.rmtree, tempfile.tempdir, ignore_errors=True)

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
