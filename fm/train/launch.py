"""torchrun as a child that never outlives the stage that started it.

    returncode = run_torchrun(cmd, env)      # in the stage: blocks until torchrun ends, whatever ends it
    die_with_parent()                        # first thing in each torchrun worker

A multi-process `fm pretrain` is three generations: the stage, torchrun, and torchrun's workers
(each in its own session, started by torchrun). Killing the stage must take all of them down,
or orphaned workers go on training, writing checkpoints and logging steps next to a rerun:
- the kernel sends torchrun SIGTERM when the stage dies (Linux PR_SET_PDEATHSIG, set between
  fork and exec); on SIGTERM torchrun stops its workers.
- called from the main thread (`fm pretrain`), torchrun runs in a session of its own and SIGINT
  and SIGTERM to the stage are forwarded to it as SIGTERM (a second one as SIGKILL); once it is
  down the stage restores its handlers and raises the signal again, so it ends as it would have
  without them (KeyboardInterrupt, or death by SIGTERM). From another thread (a Prefect task
  of `fm run`), where Python cannot handle signals, torchrun stays in the stage's process group,
  so a terminal's Ctrl-C reaches it directly, and SIGTERM or SIGKILL to the stage reach it by
  the death signal.
- each worker asks the kernel for SIGKILL when torchrun dies, so a torchrun killed with
  SIGKILL leaves no worker behind.
- in a finally, whatever happened: torchrun is stopped (SIGTERM, SIGKILL after a grace period)
  and every process that still carries this launch's FM_LAUNCH_ID in its environment is killed.
Outside Linux only the forwarding and the finally apply.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCH_ID = "FM_LAUNCH_ID"


def _prctl():
    """libc's prctl on Linux, else None (looked up before a fork: the child only calls it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent exits (Linux); False where it cannot."""
    prctl, parent = _prctl(), os.getppid()
    if prctl is None or prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # the parent died before the kernel was told: the signal will not come
        os.kill(os.getpid(), sig)
    return True


def _dies_with_this_process(sig: int):
    """A preexec_fn: the child gets `sig` when this process exits (it runs after fork, before exec)."""
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

    return preexec


def launched_processes(launch_id: str) -> list[int]:
    """Pids of the live processes whose environment carries FM_LAUNCH_ID=launch_id (Linux /proc; [] elsewhere)."""
    mark = f"{LAUNCH_ID}={launch_id}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0") and not _is_zombie(proc):
                found.append(int(proc.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return [pid for pid in found if pid != os.getpid()]


def _is_zombie(proc: Path) -> bool:
    stat = (proc / "stat").read_text()
    return stat[stat.rindex(")") + 2] == "Z"  # the state follows the parenthesised command name


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_launched(launch_id: str, timeout: float = 10.0) -> None:
    """SIGKILL what is left of a launch and wait (up to `timeout`) until it is gone."""
    deadline = time.monotonic() + timeout
    while (left := launched_processes(launch_id)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def run_torchrun(cmd: list[str], env: dict[str, str], grace_s: float = 30.0) -> int:
    """Run `cmd` (torchrun) to the end and return its exit code; never leave it or its workers running.

    grace_s: how long torchrun gets to stop its workers after SIGTERM before it is killed.
    """
    launch_id = uuid.uuid4().hex
    own_session = threading.current_thread() is threading.main_thread()  # only the main thread can handle signals
    proc = subprocess.Popen(cmd, env={**env, LAUNCH_ID: launch_id}, start_new_session=own_session,
                            preexec_fn=_dies_with_this_process(signal.SIGTERM))

    def stop(sig: int) -> None:
        if own_session:
            _signal_group(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)

    caught: list[int] = []

    def forward(signum, frame):
        caught.append(signum)
        stop(signal.SIGTERM if len(caught) == 1 else signal.SIGKILL)

    previous = {}
    if own_session:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            stop(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                stop(signal.SIGKILL)
                proc.wait()
        _kill_launched(launch_id)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


def launch_recipe(module: str, config: dict, config_path: Path, raw: Path, workdir: Path, nproc: int, threads: int = 0,
                  fresh: bool = False, extra: tuple[str, ...] = ()) -> None:
    """Run recipe `module` (fm.recipes.X) under `torchrun --standalone --nproc_per_node nproc`, handing it the
    resolved settings `config` as JSON in config_path (its --config), and wait; RuntimeError if it fails. The
    workers never outlive this process (run_torchrun); each gets threads (default: the cores / nproc)."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module, "--config", str(config_path), "--raw", str(raw), "--workdir", str(workdir),
           *extra, *(["--fresh"] if fresh else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, (os.cpu_count() or 1) // nproc)))
    returncode = run_torchrun(cmd, env)
    if returncode != 0:
        raise RuntimeError(f"torchrun exited with code {returncode}: {' '.join(cmd)}")
