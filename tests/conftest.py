"""pytest runs absltest cases without absl's main: mark the flags as parsed."""

from absl import flags

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
