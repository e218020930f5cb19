"""A zygote for the kill tests (tests/test_kill_stages.py, tests/test_kill_training.py): a process that has imported
fm once and forks one `fm` command per request, so that each of their many runs costs its work, not the imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from string import Template

ZYGOTE = Template('''
"""Imports fm and the preloads once, then forks one `fm` command per request (JSON lines on stdin, replies out)."""
import importlib, json, os, resource, signal, sys, tempfile, traceback
import fm.cli, fm.lock, fm.registry, fm.runner, duckdb
$preload

for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "wait":
        _, status = os.waitpid(request["pid"], 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
        continue
    pid = os.fork()
    if pid:
        print(json.dumps({"pid": pid}), flush=True)
        continue
    code = 1
    try:
        os.setsid()  # a session of its own, as a terminal starts a command
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        tempfile.tempdir = None  # TMPDIR as the request gives it, not as the zygote found it
        if request["fsize"]:  # a file-size limit: a write past it fails with EFBIG (SIGXFSZ would kill)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        if request["hook"]:  # imported as a fresh interpreter would (sitecustomize), install() called if it has one
            sys.path.insert(0, request["hook_dir"])
            hook = importlib.import_module(request["hook"])
            if hasattr(hook, "install"):
                hook.install()
        fm.cli.app(args=request["argv"], prog_name="fm")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
os._exit(0)  # stdin closed: no interpreter teardown of what it imported (seconds, with torch)
''')


class Zygote:
    """A process that has imported fm and run `preload` (source: imports and warm-ups a fork then need not repeat),
    and forks `fm` commands on request. A run whose env sets `hook_env` first imports the module `hook` (written
    from `hook_source` into `hook_dir`, which a test may also put on PYTHONPATH for a run's other processes)."""

    def __init__(self, folder: Path, preload: str, hook: str, hook_source: str, hook_env: str):
        self.folder, self.hook, self.hook_env = folder, hook, hook_env
        self.hook_dir = folder / "hook"
        self.hook_dir.mkdir()
        (self.hook_dir / f"{hook}.py").write_text(hook_source)
        self._log = open(folder / "zygote.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE.substitute(preload=preload)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=folder)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert reply, f"the zygote died: {(self.folder / 'zygote.log').read_text()[-3000:]}"
        return json.loads(reply)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None, fsize: int = 0) -> int:
        """Fork `fm argv` (output to `log`, `env` added, writes limited to `fsize` bytes if set): its pid."""
        env = env or {}
        return self._ask({"op": "start", "argv": argv, "log": str(log), "cwd": str(self.folder), "env": env,
                          "hook": self.hook if env.get(self.hook_env) else None, "hook_dir": str(self.hook_dir),
                          "fsize": fsize})["pid"]

    def wait(self, pid: int) -> int:
        """The exit code of a started run (-9 when SIGKILLed)."""
        return self._ask({"op": "wait", "pid": pid})["exit"]

    def run(self, argv: list[str], log: Path, env: dict[str, str] | None = None, fsize: int = 0) -> tuple[int, int]:
        """Run `fm argv` to its end: (its pid, its exit code)."""
        pid = self.start(argv, log, env, fsize)
        return pid, self.wait(pid)

    def close(self) -> None:
        self.proc.kill()  # it only waits for requests; its interpreter's shutdown would cost seconds
        self.proc.wait()
        self._log.close()
