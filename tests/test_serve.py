"""`fm serve` against a real Prefect server on a free loopback port (listening there and nowhere else):
the deployments are served, the single-stage `curate` deployment runs through the API (as is, then with
a changed parameter), and each run's state, artifact and what `dvc status` says afterwards are checked.
A served run and a person's run on the same work dir: whichever comes second is refused, naming the
holder, and the first completes untouched. One server and one `fm serve` for the module (each costs
tens of seconds to start)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.serve import start_server, stop_server
from fm.lock import LOCK_NAME, workdir_lock
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


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux /proc/net/tcp and tcp6, hex as there)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    # the server's database lives in PREFECT_HOME: a fresh one, so no deployment of an earlier run answers
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        port = free_port()
        proc, api_url = start_server("127.0.0.1", port, log_path=home / "server.log")
        try:
            if sys.platform.startswith("linux"):  # 127.0.0.1 and nothing else, IPv4 or IPv6
                assert listening_addresses(port) == {"0100007F"}, listening_addresses(port)
            yield api_url
        finally:
            stop_server(proc)


@dataclass
class Served:
    proj: Path
    api_url: str
    env: dict
    log: Path


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """A tiny project whose ingest and validate ran (through the server: no ephemeral API), served by `fm serve`;
    Ctrl-C ends the serving without a traceback."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    tmp = tmp_path_factory.mktemp("served")
    proj = make_project(tmp)
    env = dict(dvc_env(), PREFECT_API_URL=server)
    result = subprocess.run([sys.executable, "-m", "fm", "run", "--stage", "ingest", "--stage", "validate"],
                            cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = tmp / "serve.log"
    with open(log, "w") as serve_log:
        # the runner looks for scheduled runs every second, not every 10 s: each served run starts sooner
        serving = subprocess.Popen([sys.executable, "-m", "fm", "serve"], cwd=proj, stdout=serve_log,
                                   env=dict(env, PREFECT_RUNNER_POLL_FREQUENCY="1"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            with temporary_settings(updates={PREFECT_API_URL: server}), get_client(sync_client=True) as client:
                _wait_for_deployment(client, "fm-pipeline/curate")
                _wait_for_deployment(client, "fm-pipeline/ingest")
            yield Served(proj, server, env, log)
        finally:
            served_part = log.read_text()
            os.killpg(serving.pid, signal.SIGINT)  # Ctrl-C
            try:
                serving.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serving.pid, signal.SIGKILL)
    assert "Prefect UI: http://127.0.0.1" in served_part
    assert "Traceback" not in log.read_text()[len(served_part):]  # stopping: no traceback
    # While serving, the only traceback is Prefect's engine reporting a failed run (the refused one: its state
    # message is the one line); any other would be fm's or a crash.
    lines = served_part.splitlines()
    assert all("Engine execution exited with unexpected exception" in lines[i - 1]
               for i, line in enumerate(lines) if line.startswith("Traceback")), served_part[-3000:]


def test_serve_runs_a_stage_deployment_through_the_api(served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proj = served.proj
    with temporary_settings(updates={PREFECT_API_URL: served.api_url}), get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("fm-pipeline/pipeline").schedules == []  # schedule off by default
        schema = client.read_deployment_by_name("fm-pipeline/curate").parameter_openapi_schema
        assert "curate" in str(schema["properties"]["stages"]) and schema["properties"]["overrides"]["description"]

        def run_and_check(parameters: dict, state: str = "Completed") -> str:
            flow_run = run_deployment("fm-pipeline/curate", parameters=parameters, timeout=300)
            assert flow_run.state.is_completed(), (flow_run.state, served.log.read_text()[-3000:])
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


# ------------------------------------------------------------------ a served run and a person's run, one work dir


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def holder_of(work: Path) -> dict:
    try:
        return json.loads((work / f"{LOCK_NAME}.json").read_text())
    except (OSError, ValueError):
        return {}


def pause_holder(work: Path, flow_run_id, client, timeout: float = 180) -> int | None:
    """Wait until the served run holds the work dir's lock, then SIGSTOP it there (mid-run, lock held) and return its
    pid; None when the run ended before it could be caught holding the lock."""
    deadline, next_state_check = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        pid = holder_of(work).get("pid")
        if pid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            if holder_of(work).get("pid") == pid:  # still written: a stopped process cannot release the lock
                return pid
            os.kill(pid, signal.SIGCONT)
        if time.monotonic() > next_state_check:  # an API call: not on every poll
            if client.read_flow_run(flow_run_id).state.is_final():
                return None
            next_state_check = time.monotonic() + 0.5
        time.sleep(0.005)
    raise TimeoutError(f"the served run never took the lock of {work} within {timeout:.0f} s")


def wait_final(client, flow_run_id, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
        assert time.monotonic() < deadline, f"flow run still {flow_run.state.name} after {timeout:.0f} s"
        time.sleep(0.5)
    return flow_run


@pytest.mark.slow
def test_a_served_run_and_a_persons_run_on_one_work_dir_the_second_is_refused_naming_the_first(served):
    """A person's run holds the work dir: the served `ingest` run fails at once, its state naming the holder, and
    leaves the holder's work alone (a stage marker and a half-written file: no recovery runs without the lock).
    Then a served run holds it (stopped mid-run): a person's `fm run` is refused in one line naming it and changes
    nothing; resumed, the served run completes, its outputs whole and recorded in dvc.lock."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    proj, work = served.proj, served.proj / "data"
    with temporary_settings(updates={PREFECT_API_URL: served.api_url}), get_client(sync_client=True) as client:
        with workdir_lock(work, "a person's fm run"):
            (work / ".fm-running-ingest").write_text("a stage of the person's run, under way\n")
            (work / "02_ingested" / ".tmp-0123abcd-text.parquet").write_bytes(b"half of a table")
            before = snapshot(work)
            refused = run_deployment("fm-pipeline/ingest", parameters={"force": True}, timeout=300, poll_interval=1)
            assert refused.state.is_failed(), refused.state
            message = refused.state.message
            assert f"{work} is in use by pid {os.getpid()}" in message and "a person's fm run" in message, message
            assert "\n" not in message
            assert snapshot(work) == before  # nothing recovered, nothing written
            (work / ".fm-running-ingest").unlink()
            (work / "02_ingested" / ".tmp-0123abcd-text.parquet").unlink()

        for _ in range(3):  # a run quicker than the poll is started again
            flow_run = run_deployment("fm-pipeline/ingest", parameters={"force": True}, timeout=0)
            pid = pause_holder(work, flow_run.id, client)
            if pid is not None:
                break
        else:
            pytest.fail("three served runs ended before they could be caught holding the lock")
        try:
            before = snapshot(work)
            person = subprocess.run([sys.executable, "-m", "fm", "run", "--stage", "ingest"], cwd=proj, env=served.env,
                                    capture_output=True, text=True, timeout=300)
            output = person.stdout + person.stderr
            assert person.returncode == 1 and "Traceback" not in output, output[-3000:]
            refusal = [line for line in output.splitlines() if line.startswith("error (run):")]
            assert len(refusal) == 1 and f"in use by pid {pid} " in refusal[0] and "'fm run (stages: ingest) served as deployment fm-pipeline/ingest, flow run " in refusal[0], output
            assert snapshot(work) == before
        finally:
            os.kill(pid, signal.SIGCONT)
        done = wait_final(client, flow_run.id)
        assert done.state.is_completed(), (done.state, served.log.read_text()[-3000:])
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        assert [(t.name, t.state.name) for t in task_runs] == [("ingest", "Completed")]  # it ran (forced), not skipped

    rows = {m: pq.read_table(work / "02_ingested" / f"{m}.parquet").num_rows for m in ("text", "code", "image_text", "triples")}
    assert rows == {"text": 6, "code": 2, "image_text": 2, "triples": 3}  # tests/conftest.py make_good_corpus
    assert "ingest" not in stale(proj)  # recorded in dvc.lock with exactly these outputs
    assert not list(work.glob(".fm-running-*")) and not list(work.rglob(".tmp-*")) and not holder_of(work)
