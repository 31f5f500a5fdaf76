"""One training process per run folder.

Two processes training into the same folder overwrite each other's checkpoint, best model and
metrics rows; a lock file holding the PID of the process that trains there stops the second one
with a clear error. A lock left by a process that no longer runs is taken over.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

LOCK_FILE = "train.lock"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/train.lock`` while the block runs; raise :class:`InputError` when another
    running process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _running(pid):
                raise InputError(folder, f"is being trained into by another process (PID {pid})",
                                 "wait for it to finish or stop it, or train into another folder") from None
            path.unlink(missing_ok=True)  # stale: its process ended without removing it
    else:
        raise InputError(folder, "its training lock could not be taken", f"delete {path} if no training runs there")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        yield path
    finally:
        path.unlink(missing_ok=True)
