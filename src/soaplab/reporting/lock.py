"""One writer per run folder: ``<folder>/.lock`` holds the writing process's id.

A command takes the lock before it writes anything into a folder and releases it when it ends
(:func:`release_all`, also run at exit). A lock whose process has died (kill -9, a crash) is
taken over; one whose process still runs refuses the second writer in one line.
"""

from __future__ import annotations

import atexit
import os
import time
from pathlib import Path

NAME = ".lock"
FRESH = 5.0  # seconds: a lock file this new may not hold its process id yet
_held: set[Path] = set()


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_free(folder: Path) -> None:
    """Refuse (ValueError) if another living process holds ``folder``'s lock (or is taking
    it: a lock file made in the last seconds whose process id is not written yet)."""
    path = folder / NAME
    pid = _holder(path)
    try:
        taking = pid is None and time.time() - path.stat().st_mtime < FRESH
    except OSError:
        taking = False
    if taking or (pid is not None and pid != os.getpid() and _alive(pid)):
        who = f"process {pid}" if pid is not None else "another process"
        raise ValueError(f"{folder} is being written by {who} (see {path}); wait for it to "
                         "end, or stop it, then run this again")


def acquire(folder: Path) -> None:
    """Take ``folder``'s lock (the folder exists), taking it over from a dead process."""
    path = folder / NAME
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_free(folder)
            if _holder(path) == os.getpid():
                _held.add(path)
                return
            path.unlink(missing_ok=True)  # its process has ended
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        _held.add(path)
        return


def release_all() -> None:
    """Release every lock this process holds."""
    for path in list(_held):
        if _holder(path) == os.getpid():
            path.unlink(missing_ok=True)
        _held.discard(path)


atexit.register(release_all)
