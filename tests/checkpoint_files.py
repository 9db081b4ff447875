"""Reads backup directories without importing TensorFlow (multi-worker tests never do)."""

import os
import re


def latest_backup_step(backup_dir: str) -> int:
    """The step of the newest committed backup in `backup_dir` (0 if none).

    CheckpointManager writes a backup's files first and then, atomically, the
    `checkpoint` file that names it: a process killed in between resumes from
    the backup before, so tests that kill a run wait for this file, not for
    `ckpt-N.index`.
    """
    try:
        with open(os.path.join(backup_dir, "checkpoint")) as f:
            match = re.search(r'^model_checkpoint_path: "(?:.*/)?ckpt-(\d+)"$', f.read(), re.M)
    except FileNotFoundError:
        return 0
    return int(match.group(1)) if match else 0
