"""One-line checks of single flag values, shared by the config and the entry points.

Each raises `ValueError` with one line: what is wrong, what was received and what
is accepted. No TensorFlow: entry points check flags before it starts.
"""

import difflib
import os
from typing import Optional


def choice(flag: str, value: str, accepted) -> str:
    """Returns `value` if it is one of `accepted`, else raises a one-line error."""
    if value in accepted:
        return value
    close = difflib.get_close_matches(str(value), list(accepted), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(
        f"--{flag}: unknown value. Received: {flag}={value!r}; accepted: "
        f"{', '.join(accepted)}.{hint}")


def shown(value):
    """A flag value as the command line writes it (sequences comma-joined) for error messages."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def valid_seed(flag: str, value: int) -> int:
    """Returns `value` if it is a valid random seed, else raises a one-line error."""
    if 0 <= value < 2**32:
        return value
    raise ValueError(f"--{flag} out of range. Received: {flag}={value}; accepted: an integer in "
                     "[0, 2**32).")


def writable_path(flag: str, path: Optional[str], *, directory: bool) -> None:
    """Raises a one-line error unless `path` can be written: a directory (created if missing)
    or a file (created, or replaced, in a directory that can be written)."""
    if not path:
        return
    kind = "a directory" if directory else "a file path"
    wrong = (os.path.exists(path) and not os.path.isdir(path)) if directory else (
        os.path.isdir(path) or path.endswith(os.sep))
    if wrong:
        what = "a file" if directory else "a directory"
        raise ValueError(f"--{flag} is {what}. Received: {flag}={path!r}; accepted: {kind}, "
                         "created if missing.")
    nearest = os.path.abspath(path if directory else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest) or not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag} cannot be written. Received: {flag}={path!r}; accepted: {kind} "
                         "this user can write.")


def positive(flag: str, value, *, allow_zero: bool = False):
    """Returns `value` if it is > 0 (or >= 0), else raises a one-line error."""
    if value > 0 or (allow_zero and value == 0):
        return value
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(
        f"--{flag} must be {bound}. Received: {flag}={value}; accepted: a "
        f"number {bound}.")
