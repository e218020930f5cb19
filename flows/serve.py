"""`fm serve`: the pipeline's deployments, served from this process, in a Prefect server's UI.

    fm serve                                   # starts a Prefect server on 127.0.0.1:4200, prints the UI address
    PREFECT_API_URL=http://host:4200/api fm serve    # or serve into a server that already runs

Deployments (flow `fm-pipeline`):
    pipeline        the whole DAG; on params.yaml's `schedule.cron` when `schedule.enabled`
    <stage>         one per stage (`stages: [<stage>]`): rerun one stage from the UI, with
                    `overrides` (section.key=value) and `force` as run parameters

Served runs execute in subprocesses of this process, with the project's paths made absolute,
and take the work dir's lock like any other run. Ctrl-C stops serving and the server fm started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from fm.config import ScheduleConfig
from fm.dvcstate import RunContext
from fm.stages import STAGES


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(host: str, port: int, timeout: float = 120.0, log_path: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` on host:port; return the process and its API URL once healthy."""
    api_url = f"http://{host}:{port}/api"
    if _healthy(api_url):
        raise RuntimeError(f"a server already answers at {api_url}: set PREFECT_API_URL={api_url} to serve into it")
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} while starting"
                               + (f" (log: {log_path})" if log_path else ""))
        if _healthy(api_url):
            return proc, api_url
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the Prefect server did not answer at {api_url} within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def deployments(ctx: RunContext, schedule: ScheduleConfig) -> list:
    """The pipeline deployment and one per stage, with the run's paths as absolute defaults."""
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    base = {"raw": str(Path(ctx.raw).resolve()), "workdir": str(Path(ctx.workdir).resolve()),
            "params_file": str(Path(ctx.params_file).resolve())}
    schedules = [Cron(schedule.cron, timezone=schedule.timezone)] if schedule.enabled else None
    found = [pipeline.to_deployment(name="pipeline", parameters=base, schedules=schedules, tags=["fm"],
                                    description="The whole fm pipeline over its DAG; current stages are skipped.")]
    for name, stage in STAGES.items():
        found.append(pipeline.to_deployment(name=name, parameters={**base, "stages": [name]}, tags=["fm", "stage"],
                                            description=f"fm stage `{name}` alone: {stage.help}"))
    return found


def serve_deployments(ctx: RunContext, schedule: ScheduleConfig, host: str = "127.0.0.1", port: int = 4200,
                      say: Callable[[str], None] = print, server_log: Path | None = None) -> None:
    """Serve the deployments until interrupted; start (and later stop) a server unless PREFECT_API_URL is set."""
    from prefect import serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api_url = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    proc = None
    if not api_url:
        say(f"starting a Prefect server on {host}:{port} ...")
        proc, api_url = start_server(host, port, log_path=server_log)
    try:
        ui = api_url.removesuffix("/api")
        say(f"Prefect UI: {ui}  (deployments of flow fm-pipeline: pipeline, {', '.join(STAGES)})")
        say("schedule: " + (f"{schedule.cron} ({schedule.timezone})" if schedule.enabled else "off (params.yaml schedule.enabled)"))
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            serve(*deployments(ctx, schedule), print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        if proc is not None:
            stop_server(proc)
            say("stopped the Prefect server")
