"""One run per work dir: an OS file lock (filelock, flock on POSIX) on `<workdir>/.fm.lock`.

    with workdir_lock(paths.workdir, "fm run"):
        ...   # a second `fm run`, `fm <stage>`, `dvc repro` or served run on this work dir is refused

Two runs on one work dir would delete each other's checkpoints and interleave layer renames.
The lock is the kernel's: it dies with its process, so the lock of a killed run is taken over
by the next one (which says so). Who holds it (pid, host, command, start time) is written
beside it in `.fm.lock.json`, for the refusal message. Runs on different work dirs proceed together.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from fm.io import write_json

LOCK_NAME = ".fm.lock"


class WorkdirBusy(RuntimeError):
    """Another fm process holds the work dir."""


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    if not holder:
        return "another process (no holder details)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')!r}, started {started})"


@contextmanager
def workdir_lock(workdir: str | os.PathLike, command: str = "") -> Iterator[dict]:
    """Hold the work dir's lock for the block; WorkdirBusy (naming the holder) if another run has it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info_path = workdir / f"{LOCK_NAME}.json"
    lock = FileLock(workdir / LOCK_NAME, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise WorkdirBusy(f"{workdir} is in use by {describe(_holder(info_path))}; "
                          f"wait for it to finish or stop it (the lock is {workdir / LOCK_NAME})") from None
    try:
        previous = _holder(info_path)
        if previous and previous.get("host") == socket.gethostname() and not _alive(int(previous.get("pid", 0))):
            print(f"fm: took over the lock of a run that ended without releasing it: {describe(previous)}", file=sys.stderr)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv),
                  "started": time.time()}
        write_json(holder, info_path)
        yield holder
    finally:
        Path(info_path).unlink(missing_ok=True)
        lock.release()
