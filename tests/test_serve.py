"""`fm serve` against a real Prefect server on a free loopback port: the deployments are served,
the single-stage `curate` deployment runs through the API (as is, then with a changed
parameter), and each run's state, artifact and what `dvc status` says afterwards are checked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flows.serve import start_server, stop_server
from tests.test_pipeline import dvc_env, make_project, stale


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_deployment(client, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.read_deployment_by_name(name)
            return
        except Exception:  # not registered yet
            time.sleep(1)
    raise TimeoutError(f"deployment {name} never appeared")


@pytest.fixture
def server(tmp_path, monkeypatch):
    # the server's database lives in PREFECT_HOME: a fresh one, so no deployment of an earlier run answers
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    proc, api_url = start_server("127.0.0.1", free_port(), log_path=tmp_path / "server.log")
    try:
        yield api_url
    finally:
        stop_server(proc)


def test_serve_runs_a_stage_deployment_through_the_api(tmp_path, server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proj = make_project(tmp_path)
    env = dict(dvc_env(), PREFECT_API_URL=server)
    # the upstream stages first, through the same server (no ephemeral API)
    result = subprocess.run([sys.executable, "-m", "fm", "run", "--stage", "ingest", "--stage", "validate"],
                            cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    serve_log = open(tmp_path / "serve.log", "w")
    serving = subprocess.Popen([sys.executable, "-m", "fm", "serve"], cwd=proj, env=env, stdout=serve_log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as client:
            _wait_for_deployment(client, "fm-pipeline/curate")
            assert client.read_deployment_by_name("fm-pipeline/pipeline").schedules == []  # schedule off by default
            schema = client.read_deployment_by_name("fm-pipeline/curate").parameter_openapi_schema
            assert "curate" in str(schema["properties"]["stages"]) and schema["properties"]["overrides"]["description"]

            def run_and_check(parameters: dict, state: str = "Completed") -> str:
                flow_run = run_deployment("fm-pipeline/curate", parameters=parameters, timeout=300)
                assert flow_run.state.is_completed(), (flow_run.state, (tmp_path / "serve.log").read_text()[-3000:])
                task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
                assert [t.name for t in task_runs] == ["curate"]
                assert task_runs[0].state.name == state
                artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fm-curate"])))
                latest = max(artifacts, key=lambda a: a.created)
                assert latest.flow_run_id == flow_run.id and flow_run.parameters["workdir"] == str(proj / "data")
                if state == "Completed":  # a skipped stage's artifact says so instead of repeating old counts
                    assert "| modality |" in latest.data and "| text |" in latest.data
                return latest.data

            first = run_and_check({})
            assert "not recorded" not in first
            assert "curate" not in stale(proj)  # recorded: current for DVC
            lock_before = (proj / "dvc.lock").read_text()
            # nothing changed: the stage is skipped, and the UI says so by the state's name
            assert "skipped" in run_and_check({}, state="Skipped")

            second = run_and_check({"overrides": ["curate.min_chars=100000"]})
            assert "not recorded in dvc.lock" in second and "curate" in second
            assert (proj / "dvc.lock").read_text() == lock_before  # never recorded as params.yaml's
            assert "curate" in stale(proj)  # stale against params.yaml
    finally:
        os.killpg(serving.pid, signal.SIGINT)  # Ctrl-C
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
        serve_log.close()
    assert "Prefect UI: http://127.0.0.1" in (tmp_path / "serve.log").read_text()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
