"""The two doors agree, end to end, in a throwaway copy of the project (git + DVC + a tiny corpus):
a real Prefect run of the whole DAG, then edits of each kind of dependency (a helper module, a
param, an input file, a --set override): exactly the stale stages rerun, by `fm run` and by
`dvc repro`; and `dvc push`, a fresh clone and `dvc pull` restore every output."""

from __future__ import annotations

import dataclasses

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fm.cli import app
from fm.stages import STAGES
from tests.conftest import make_good_corpus

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
DATA_STAGES = ["ingest", "validate", "curate", "tokenize", "shard"]


def tiny_params(path: Path) -> None:
    """A tiny corpus needs a tiny vocabulary and model; set in params.yaml (overrides would be untracked)."""
    params = yaml.safe_load(path.read_text())
    params["tokenize"].update(vocab_size=300, min_frequency=1)
    params["validate"]["min_pass_rate"] = 0.5
    params["pretrain"].update(preset="tiny", model={"n_layer": 1, "d_model": 32, "n_head": 2}, seq_len=64, val_fraction=0.2,
                              batch_size=2, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=1,
                              ckpt_every=2, peak_tflops=1.0, threads=1)
    params["sft"].update(methods=["lora", "prompt"], batch_size=1, max_steps=2, warmup_steps=0, eval_every=2,
                         eval_batches=1, ckpt_every=2, mc_items=4, threads=1, prompt={"n_virtual": 2})
    params["distill"].update(student={"n_layer": 1, "d_model": 16}, batch_size=1, max_steps=2, warmup_steps=0,
                             eval_every=2, eval_batches=1, ckpt_every=2, mc_items=8, threads=1)
    params["pretrain_clip"].update(model={"patch_size": 16, "vision_layers": 1, "vision_width": 32, "vision_heads": 2,
                                          "text_layers": 1, "text_width": 32, "text_heads": 2, "context_length": 16,
                                          "embed_dim": 16},
                                   heldout_fraction=0.01, augment=2, batch_size=1, max_steps=2, warmup_steps=0,
                                   eval_every=2, eval_batches=1, ckpt_every=2, threads=1)
    params["caption"].update(n_prefix=2, batch_size=1, max_steps=2, warmup_steps=0, eval_every=2, eval_batches=1,
                             ckpt_every=2, retrieval_images=2, threads=1)
    # an untrained tiny student's next-token choices are near ties: int8 agreement is not a gate here
    params["export"].update(windows=2, window_len=16, prompts=1, generate_tokens=4, min_int8_agreement=0.0,
                            calibration_windows=2, prune={"enabled": True, "calibration_windows": 2, "recovery_steps": 2,
                                                          "batch_size": 1})
    params["evaluate"].update(qa_items=4, icl_items=4, kshot=[0, 1], ppl_window=16, ppl_windows_per_group=1, batch_size=8,
                              knowledge_items=2)
    path.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))


def make_project(tmp_path: Path) -> Path:
    """A copy of the project: dvc.yaml, params.yaml (tiny), fm/ (the code deps), .dvc/config, a tiny corpus."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(REPO / "dvc.yaml", proj / "dvc.yaml")
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    tiny_params(proj / "params.yaml")
    shutil.copytree(REPO / "fm", proj / "fm", ignore=shutil.ignore_patterns("__pycache__"))
    make_good_corpus(proj / "data" / "01_raw")
    shutil.copy(REPO / "data" / ".gitignore", proj / "data" / ".gitignore")
    env = dvc_env()
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    (proj / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())  # the repo's remote setup
    return proj


def dvc_env() -> dict:
    # `dvc repro` runs `fm <stage>`: the venv's bin must be on PATH (the README says: activate the venv)
    return dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def dvc(proj: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, capture_output=True, text=True, env=dvc_env())
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def stale(proj: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    out = json.loads(dvc(proj, "status", "--json"))
    return {key.split(":")[-1] for key in out}


LAST_OUTPUT: list[str] = [""]  # what the latest fm_run printed


def fm_run(*args: str) -> dict[str, dict]:
    """`fm run` in-process; returns each stage's status from the registry rows of this run."""
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    LAST_OUTPUT[0] = result.output
    statuses = {}
    for line in result.output.splitlines():
        m = re.match(r"^(\w+)\s+(ran|skipped)\b", line)
        if m and m.group(1) in STAGES:
            statuses[m.group(1)] = m.group(2)
    return statuses


def ran(statuses: dict) -> set[str]:
    return {name for name, status in statuses.items() if status == "ran"}


def repro_ran(proj: Path) -> set[str]:
    out = dvc(proj, "repro")
    return set(re.findall(r"Running stage '(\w+)'", out))


@pytest.fixture
def project(tmp_path, monkeypatch):
    proj = make_project(tmp_path)
    monkeypatch.chdir(proj)
    return proj


def _without_seconds(x):
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_without_seconds(v) for v in x]
    return x


def _assert_close(a, b, path="metrics"):
    """Equal structure and strings; numbers to 1e-5 relative (a batch's shape changes float summation order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def assert_summary_printed_published_and_batch_size_free(project: Path, metrics: dict, started: float) -> None:
    """The evaluation summary is printed at the end of `fm run` and published as the Prefect markdown artifact
    fm-evaluation; and the whole evaluate stage gives the same figures at another batch size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from fm.config import load_params
    from fm.eval.stage import evaluate, summary_markdown
    from fm.paths import Paths

    table = summary_markdown(metrics)
    assert table in LAST_OUTPUT[0] and "facts seen / unseen" in table
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fm-evaluation"])))
    latest = max(artifacts, key=lambda a: a.created)
    assert latest.created.timestamp() > started and latest.type == "markdown" and table in latest.data

    copy = project.parent / "batch-size"
    shutil.copytree(project / "data", copy, ignore=shutil.ignore_patterns("01_raw", "fm.duckdb*"))
    tiny = load_params(project / "params.yaml").evaluate
    assert tiny.batch_size != 3
    evaluate(dataclasses.replace(tiny, batch_size=3), Paths(project / "data" / "01_raw", copy))
    other = json.loads((copy / "08_reports" / "metrics.json").read_text())
    _assert_close(_without_seconds(metrics), _without_seconds(other))


def assert_a_killed_export_and_evaluate_rerun_to_the_uninterrupted_outputs(project: Path) -> None:
    """`fm export`, then `fm evaluate`, SIGKILLed at a seeded random point in a copy of the work dir (one of the
    first changes each makes a random delay, up to its uninterrupted run's length, after writing its marker: see
    tests/test_kill_stages.py's hook): dead, it leaves its marker, no process, no model file in TMPDIR; `fm <stage>`
    again says it was interrupted and ends with the uninterrupted run's outputs (export: every file's size and
    sha256 and the gates; evaluate: metrics.csv, metrics.json but its timings, the model card) and no `.tmp-*`."""
    from tests.test_kill_stages import SEED, gone, leftovers, reap, run_killed

    wd = project.parent / "killed" / "data"
    shutil.copytree(project / "data", wd, ignore=shutil.ignore_patterns("fm.duckdb*", ".fm.lock*"))
    report = json.loads((project / "data" / "07_export" / "report.json").read_text())
    metrics = json.loads((project / "data" / "08_reports" / "metrics.json").read_text())
    rng = random.Random(f"{SEED}:export-evaluate")
    for stage, seconds in (("export", report["seconds"]), ("evaluate", metrics["seconds"])):
        delay, skip = round(rng.uniform(0, seconds), 2), rng.randrange(8)  # evaluate writes everything at its end
        argv = [stage, "--raw", str(wd / "01_raw"), "--workdir", str(wd), "--params", str(project / "params.yaml")]
        folder = project.parent / "killed" / stage
        pid, code, change = run_killed(argv, wd, folder, delay, skip)
        where = f"seed {SEED}: fm {stage} killed {delay} s (+{skip} changes) after writing its marker, before {change}"
        left = gone(pid)
        reap(left)
        assert code == -9 and left == [], f"{where}: exit {code}, processes left {left}"
        assert (wd / f".fm-running-{stage}").is_file(), where
        stray = [p for p in (folder / "tmp").rglob("*") if p.suffix in (".onnx", ".safetensors", ".data")]
        assert stray == [], f"{where}: model files left in TMPDIR, where no rerun finds them"
        result = runner.invoke(app, argv)
        assert result.exit_code == 0 and f"stage {stage} was interrupted" in result.output, f"{where}\n{result.output}"
        assert leftovers(wd) == [] and not (wd / f".fm-running-{stage}").exists(), where
    rerun = json.loads((wd / "07_export" / "report.json").read_text())
    assert (rerun["files"], rerun["gates"]) == (report["files"], report["gates"])
    assert _without_seconds(json.loads((wd / "08_reports" / "metrics.json").read_text())) == _without_seconds(metrics)
    for rel in ("08_reports/metrics.csv", "07_export/MODEL_CARD.md"):
        assert (wd / rel).read_bytes() == (project / "data" / rel).read_bytes(), rel


def test_fm_run_then_each_kind_of_edit_reruns_exactly_the_stale_stages(project):
    started = time.time()
    statuses = fm_run()
    assert ran(statuses) == set(STAGES), statuses
    for layer in ("02_ingested", "03_validated", "04_curated", "05_tokens/shards"):
        assert (project / "data" / layer).is_dir(), layer
    assert (project / "data" / "06_models" / "pretrain" / "model.safetensors").is_file()
    assert stale(project) == set(), "every stage fm run ran is recorded in dvc.lock"
    assert "up to date" in dvc(project, "status")

    # no change: every stage is skipped
    assert set(fm_run().values()) == {"skipped"}

    # a helper module that only the stages reading shards import (distill reads pretraining windows, CLIP and
    # caption the image shards); sft reads pretrain's model, which a rerun exports again byte for byte: it stays skipped
    with open(project / "fm" / "data" / "shards.py", "a") as f:
        f.write("\n# an edit\n")
    reads_shards = {"shard", "pretrain", "pretrain_clip", "caption", "distill", "export", "evaluate"}
    assert stale(project) == reads_shards
    assert ran(fm_run()) == reads_shards
    assert stale(project) == set()

    # a module every data stage imports (the issue found it missing from dvc.yaml)
    with open(project / "fm" / "data" / "quarantine.py", "a") as f:
        f.write("\n# an edit\n")
    assert {"ingest", "validate", "curate"} <= stale(project)
    assert ran(fm_run()) >= {"ingest", "validate", "curate"}
    assert stale(project) == set()

    # a param: its stage and what reads its (changed) outputs
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tokenize"]["vocab_size"] = 290
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    assert stale(project) == {"tokenize"}
    assert ran(fm_run()) == {"tokenize", "shard", "pretrain", "pretrain_clip", "caption", "sft", "distill", "export",
                             "evaluate"}
    assert stale(project) == set()

    # a --set override: only the stages whose sections it changes rerun, and nothing is recorded for them
    lock_before = (project / "dvc.lock").read_text()
    statuses = fm_run("--set", "pretrain.max_steps=3")
    reads_pretrain = {"pretrain", "caption", "sft", "distill", "export", "evaluate"}  # pretrain and what reads its weights
    assert ran(statuses) == reads_pretrain, statuses
    assert (project / "dvc.lock").read_text() == lock_before
    assert stale(project) == reads_pretrain  # the weights are not what params.yaml makes
    # ...and the next plain run trains to params.yaml's max_steps again (continuing the 3-step run)
    assert ran(fm_run()) == reads_pretrain
    assert stale(project) == set()

    # an input file: ingest and whatever its changed output reaches
    with open(project / "data" / "01_raw" / "text" / "en.jsonl", "a") as f:
        f.write(json.dumps({"text": "A brand new document about a lighthouse keeper and her cat on a stormy night."}) + "\n")
    assert stale(project) == {"ingest"}
    assert ran(fm_run()) == set(STAGES)

    # evaluate: every model of the run, each metric with its chance level; the registry holds the long table
    metrics = json.loads((project / "data" / "08_reports" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"pretrained", "sft_lora", "sft_prompt", "student", "student_int8", "teacher_int8",
                                      "pruned_int8"}
    import pyarrow.parquet as pq

    held_mc = [r for r in pq.read_table(project / "data" / "05_instructions" / "heldout.parquet").to_pylist() if r["options"]]
    for name, entry in metrics["models"].items():
        assert "overall" in entry["metrics"]["perplexity"] and set(entry["metrics"]["bias"]) == {"gender", "age"}, name
        assert ("instruction_qa" in entry["metrics"]) == bool(held_mc), name  # the tiny corpus may hold out no item
        assert ("knowledge" in entry["metrics"]) == bool(metrics["knowledge_set"].get("items")), name
    assert "export" in metrics and "clip" in metrics and "caption" in metrics
    assert (project / "data" / "08_reports" / "report.html").read_text().count("<svg") >= 4
    assert "## " in (project / "data" / "07_export" / "MODEL_CARD.md").read_text()
    import duckdb
    con = duckdb.connect(str(project / "data" / "fm.duckdb"), read_only=True)
    assert con.execute("select count(distinct model) from eval_metrics where metric = 'perplexity' "
                   "and split = 'heldout'").fetchone()[0] >= 7
    assert con.execute("select count(distinct run_id) from run_metrics").fetchone()[0] >= 1
    con.close()
    assert_summary_printed_published_and_batch_size_free(project, metrics, started)
    assert_a_killed_export_and_evaluate_rerun_to_the_uninterrupted_outputs(project)

    # export: a broken gate fails the stage and leaves the published export as it was; a tampered file is named
    from fm.config import load_params
    from fm.export.stage import export, verify_export
    from fm.paths import Paths

    paths = Paths(project / "data" / "01_raw", project / "data")
    report = (project / "data" / "07_export" / "report.json").read_bytes()
    models = json.loads(report)["models"]
    assert set(models) == {"student", "teacher", "pruned", "clip"}
    assert models["pruned"]["prune"]["ffn_hidden"] == {"before": 64, "after": 32}  # keep 0.5 of the tiny student's MLP
    assert models["pruned"]["recovery"]["steps"] == 2 and (project / "data" / "07_export" / "pruned" / "onnx" / "decode.int8.onnx").is_file()
    tiny = load_params(project / "params.yaml")
    with pytest.raises(ValueError, match="student.fp32_max_abs_logit_diff"):
        export(dataclasses.replace(tiny.export, max_logit_diff=1e-30), tiny.sft, paths)
    assert (project / "data" / "07_export" / "report.json").read_bytes() == report
    verify_export(project / "data" / "07_export")
    decode = project / "data" / "07_export" / "onnx" / "decode.int8.onnx"
    decode.write_bytes(decode.read_bytes()[:-1])
    with pytest.raises(ValueError, match="decode.int8.onnx is missing, damaged or changed"):
        verify_export(project / "data" / "07_export")

    # fm <stage> run directly records too
    result = runner.invoke(app, ["curate", "--set", "curate.min_chars=1"])
    assert result.exit_code == 0 and "not recorded" in result.output
    result = runner.invoke(app, ["curate"])
    assert result.exit_code == 0, result.output
    assert "curate" not in stale(project)


def test_dvc_repro_reruns_exactly_the_stale_stages_and_dvc_push_pull_restores_all(project, tmp_path):
    assert repro_ran(project) == set(STAGES)
    assert stale(project) == set()
    assert repro_ran(project) == set()
    with open(project / "fm" / "data" / "shards.py", "a") as f:
        f.write("\n# an edit\n")
    assert repro_ran(project) == {"shard", "pretrain", "pretrain_clip", "caption", "distill", "export", "evaluate"}
    with open(project / "data" / "01_raw" / "triples" / "facts.tsv", "a") as f:
        f.write("Rome\tcapital of\tItaly\ten\n")
    assert repro_ran(project) == set(STAGES)
    (project / "data" / "fm.duckdb").unlink(missing_ok=True)

    # version everything, push, clone, pull: every output back and DVC clean
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, env=dvc_env())
    subprocess.run(["git", "commit", "-qm", "run"], cwd=project, check=True, env=dvc_env())
    dvc(project, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, env=dvc_env())
    dvc(clone, "pull")
    assert stale(clone) == set()
    assert "up to date" in dvc(clone, "status")
    for rel in ("data/05_tokens/shards/manifest.json", "data/06_models/pretrain/model.safetensors",
                "data/06_models/pretrain/summary.json", "data/quarantine.parquet"):
        assert (clone / rel).read_bytes() == (project / rel).read_bytes(), rel
    # the registry is rebuilt from what DVC restored
    result = subprocess.run([sys.executable, "-m", "fm", "registry"], cwd=clone, capture_output=True, text=True, env=dvc_env())
    assert result.returncode == 0 and "corpus_stats" in result.stderr, result.stderr
    # dvc metrics / plots see pretrain's summary and loss curve
    assert "final_loss" in dvc(clone, "metrics", "show")

    # an experiment with another setting, compared with the committed run by pretrain's metrics
    dvc(project, "exp", "run", "-S", "pretrain.max_steps=6")
    rows = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=project,
                                     capture_output=True, text=True, env=dvc_env(), check=True).stdout)
    found = {}
    for row in rows:
        for rev in [row, *(row.get("experiments") or [])]:
            for r in rev.get("revs") or [rev]:
                data = r.get("data") or {}
                loss = data.get("metrics", {}).get("data/06_models/pretrain/summary.json", {}).get("data", {}).get("final_loss")
                steps = data.get("params", {}).get("params.yaml", {}).get("data", {}).get("pretrain", {}).get("max_steps")
                if loss is not None:
                    found[steps] = loss
    assert set(found) == {4, 6}, found
