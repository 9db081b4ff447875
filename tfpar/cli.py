"""What every tfpar entry point shares: bad input is one line on stderr and exit status 2."""

import sys
from typing import Callable, List

from absl import flags


def fail(message: str, program: str = "tfpar") -> None:
    """Prints `program: error: message` to stderr and exits with status 2."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def one_line_flags_parser(program: str = "tfpar") -> Callable[[List[str]], List[str]]:
    """An `app.run` flags_parser whose absl errors are one line and exit status 2."""
    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(str(e).splitlines()[0], program)
    return parse
