"""The stage table drives everything: dvc.yaml is generated from it, code deps are complete,
every setting has its params.yaml key, overrides (nested too) and stage selection behave, the
work-dir lock refuses a second run, and summaries render for the Prefect UI."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fm.cli import app
from fm.codedeps import module_files
from fm.config import Params, load_params
from fm.dvcstate import RunContext, dvc_yaml_dict, render_dvc_yaml
from fm.stages import STAGES, ancestors, check_table, downstream, select_stages

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_stage_table_is_a_dag_and_names_agree():
    check_table()
    names = list(STAGES)
    assert names[:7] == ["ingest", "validate", "curate", "tokenize", "instructions", "shard", "pretrain"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(names) <= set(params) and set(params) == {f.name for f in dataclasses.fields(Params)}
    commands = {c.name for c in app.registered_commands}
    assert set(names) <= commands
    from flows.pipeline import StageName
    from tasks.stages import STAGE_TASKS

    assert list(STAGE_TASKS) == names and [t.name for t in STAGE_TASKS.values()] == names
    assert list(StageName.__args__) == names


def test_committed_dvc_yaml_is_generated_from_the_table():
    committed = (REPO / "dvc.yaml").read_text()
    assert committed == render_dvc_yaml(), "dvc.yaml is stale: run `fm dvc-yaml`"
    for name, entry in dvc_yaml_dict()["stages"].items():
        assert entry["cmd"] == f"fm {name}" and entry["params"] == list(STAGES[name].sections)


def test_code_deps_follow_the_imports():
    # the helper modules the issue found missing are deps of the stages that run them
    deps = {name: set(stage.code_deps()) for name, stage in STAGES.items()}
    for name in ("ingest", "validate", "curate"):
        assert {"fm/data/quarantine.py", "fm/config.py", "fm/data/schema.py", "fm/io.py"} <= deps[name], name
    assert "fm/data/tokenizer.py" in deps["shard"]
    assert {"fm/data/shards.py", "fm/data/loader.py", "fm/models/decoder.py", "fm/train/loop.py"} <= deps["pretrain"]
    assert "fm/recipes/pretrain.py" not in deps["ingest"]  # a stage is not stale for another's code
    # every fm module a stage's module imports (at any depth, function-level imports too) is listed
    import ast

    for name, stage in STAGES.items():
        for rel in deps[name]:
            tree = ast.parse((REPO / rel).read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("fm."):
                    target = node.module.replace(".", "/")
                    assert f"{target}.py" in deps[name] or f"{target}/__init__.py" in deps[name], (name, rel, node.module)


def test_code_deps_handle_relative_and_submodule_imports(tmp_path, monkeypatch):
    import fm.codedeps as cd

    pkg = tmp_path / "fm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\nfrom .c import f\n\ndef g():\n    from fm import helper\n")
    (pkg / "sub" / "b.py").write_text("import os\n")
    (pkg / "sub" / "c.py").write_text("def f(): pass\n")
    (pkg / "helper.py").write_text("import fm.sub.b\n")
    (pkg / "unused.py").write_text("")
    monkeypatch.setattr(cd, "ROOT", tmp_path)
    cd.module_files.cache_clear()
    try:
        assert cd.module_files("fm.sub.a") == ("fm/__init__.py", "fm/helper.py", "fm/sub/__init__.py", "fm/sub/a.py",
                                               "fm/sub/b.py", "fm/sub/c.py")
    finally:
        cd.module_files.cache_clear()


def test_every_setting_has_its_key_in_params_yaml():
    # params.yaml spells out every setting (a key it leaves out would hide a code default from DVC)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for f in dataclasses.fields(Params):
        keys = {g.name for g in dataclasses.fields(f.default_factory())}
        assert set(raw[f.name]) == keys, (f.name, keys ^ set(raw[f.name]))
    assert load_params(REPO / "params.yaml") == Params()


def test_overrides_nested_and_bad_values():
    p = load_params(REPO / "params.yaml", ["curate.jaccard_threshold=0.7", "validate.allowed_langs=[en]",
                                           "pretrain.model.tie_embeddings=false", "pretrain.mix.text=0.9"])
    assert p.curate.jaccard_threshold == 0.7 and p.validate.allowed_langs == ("en",)
    assert p.pretrain.model == {"n_layer": 4, "d_model": 256, "n_head": 4, "tie_embeddings": False}
    assert p.pretrain.mix["text"] == 0.9 and p.pretrain.mix["code"] == 0.3  # the other weights stay
    with pytest.raises(ValueError, match="unknown key.*curate"):
        load_params(REPO / "params.yaml", ["curate.jacard=0.7"])
    with pytest.raises(ValueError, match="unknown section 'pretrian'"):
        load_params(REPO / "params.yaml", ["pretrian.lr=1"])
    with pytest.raises(ValueError, match="not a mapping"):
        load_params(REPO / "params.yaml", ["pretrain.lr.x=1"])
    with pytest.raises(ValueError, match="num_perm .* divisible"):
        load_params(REPO / "params.yaml", ["curate.num_bands=7"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_params(REPO / "params.yaml", ["jaccard=0.7"])
    # a short run (dvc exp run -S pretrain.max_steps=10) is not refused for its default warmup
    assert load_params(REPO / "params.yaml", ["pretrain.max_steps=10"]).pretrain.warmup_steps == 20


def test_select_stages_follows_the_dag():
    assert downstream("curate") == ["curate", "tokenize", "instructions", "shard", "pretrain", "pretrain_clip", "caption",
                                    "sft", "distill", "export", "evaluate"]
    assert downstream("pretrain") == ["pretrain", "caption", "sft", "distill", "export", "evaluate"]
    assert downstream("pretrain_clip") == ["pretrain_clip", "caption", "export", "evaluate"]  # the multimodal branch; export has its towers
    # the shard stage leaves out the facts the instruction set withholds (knowledge injection), so the DAG runs
    # through it; dvc.yaml makes shard depend on withheld.parquet alone, so only a changed withheld set re-pretrains
    assert downstream("instructions") == ["instructions", "shard", "pretrain", "pretrain_clip", "caption", "sft", "distill",
                                          "export", "evaluate"]
    assert ancestors("sft") == ["ingest", "validate", "curate", "tokenize", "instructions", "shard", "pretrain"]
    assert ancestors("ingest") == []
    assert select_stages(["shard", "ingest"]) == ["ingest", "shard"]
    with pytest.raises(ValueError, match="unknown stage 'pretrian'"):
        select_stages(["pretrian"])


def test_overridden_sections_decide_what_is_tracked(tmp_path):
    proj = tmp_path / "p"
    (proj / ".dvc").mkdir(parents=True)
    (proj / "dvc.yaml").write_text("stages: {}\n")
    (proj / "params.yaml").write_text((REPO / "params.yaml").read_text())
    ctx = RunContext(str(proj / "data/01_raw"), str(proj / "data"), str(proj / "params.yaml"), ("pretrain.max_steps=10",))
    assert ctx.root == proj.resolve()
    assert ctx.tracked("curate") == (True, "")
    tracked, why = ctx.tracked("pretrain")
    assert not tracked and "pretrain" in why
    tracked, why = ctx.tracked("sft")  # its own section is params.yaml's, but it reads an overridden pretrain's model
    assert not tracked and "reads the outputs of pretrain" in why
    assert ctx.tracked("instructions") == (True, "")  # a sibling branch of the DAG
    # an override equal to params.yaml changes nothing
    same = RunContext(ctx.raw, ctx.workdir, ctx.params_file, ("pretrain.max_steps=200",))
    assert same.tracked("pretrain") == (True, "")
    elsewhere = RunContext(str(tmp_path / "raw"), ctx.workdir, ctx.params_file)
    assert not elsewhere.tracked("ingest")[0]


def test_cli_refuses_a_bad_stage_before_prefect_starts():
    start = time.perf_counter()
    result = runner.invoke(app, ["run", "--stage", "bogus"])
    assert result.exit_code == 1 and "unknown stage 'bogus'" in result.output
    assert time.perf_counter() - start < 5  # no Prefect server was started for it


def test_stage_help_lists_its_settings():
    result = runner.invoke(app, ["curate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for key in ("curate.jaccard_threshold", "curate.num_perm", "curate.min_chars"):
        assert key in result.output
    result = runner.invoke(app, ["pretrain", "--help"], terminal_width=200)
    assert "pretrain.max_steps" in result.output and "--force" in result.output
    assert "--force" not in runner.invoke(app, ["curate", "--help"], terminal_width=200).output


def test_summary_renders_as_markdown_and_text():
    from fm.summary import as_markdown, as_text

    summary = {"stage": "curate", "seconds": 1.5, "counts": {"text": {"in": 3, "kept": 2, "quarantined": 1}},
               "outputs": ["data/04_curated/text.parquet"], "status": "ran", "note": "not recorded in dvc.lock: x"}
    md = as_markdown(summary)
    assert "| text | 3 | 2 | 1 |" in md and "not recorded" in md and "`data/04_curated/text.parquet`" in md
    text = as_text(summary)
    assert "text" in text and "quarantined" in text
    assert "skipped" in as_markdown({"stage": "tokenize", "status": "skipped", "note": "up to date"})


HOLD = """
import sys, time
from fm.lock import workdir_lock
with workdir_lock(sys.argv[1], "holder under test"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_workdir_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    from fm.lock import WorkdirBusy, workdir_lock

    work = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=f"pid {holder.pid} on .*holder under test"):
            with workdir_lock(work, "second"):
                pass
        # the CLI says it in one line
        result = runner.invoke(app, ["ingest", "--workdir", str(work), "--raw", str(tmp_path)])
        assert result.exit_code == 1 and f"pid {holder.pid}" in result.output and "Traceback" not in result.output
        with workdir_lock(tmp_path / "other", "another work dir"):  # other work dirs proceed
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with workdir_lock(work, "third") as info:  # the dead holder's lock is taken over
            assert info["pid"] == os.getpid()
        assert not (work / ".fm.lock.json").exists()
    finally:
        holder.kill()


def _sleepy(name: str, log: list):
    def run(paths):
        start = time.monotonic()
        time.sleep(1.5)
        log.append((name, start, time.monotonic()))
        return {"stage": name, "seconds": 1.5}
    return run


def test_flow_runs_independent_branches_side_by_side(tmp_path, monkeypatch):
    """A DAG a -> (b, c, d, e): b and c overlap in time; all start after a ends; d and e, training stages,
    never overlap (they would share torch's global random state: see fm.runner.execute_stage)."""
    import fm.runner
    import fm.stages
    import flows.pipeline
    from fm.stages import Stage
    from tasks.stages import _make_task

    log: list = []
    table = {"a": Stage("a", _sleepy("a", log), "first"),
             "b": Stage("b", _sleepy("b", log), "left branch", upstream=("a",)),
             "c": Stage("c", _sleepy("c", log), "right branch", upstream=("a",)),
             "d": Stage("d", _sleepy("d", log), "trains", upstream=("a",), trains=True),
             "e": Stage("e", _sleepy("e", log), "trains too", upstream=("a",), trains=True)}
    monkeypatch.setattr(fm.stages, "STAGES", table)
    monkeypatch.setattr(fm.runner, "STAGES", table)
    monkeypatch.setattr(flows.pipeline, "STAGES", table)
    monkeypatch.setattr(flows.pipeline, "STAGE_TASKS", {n: _make_task(s) for n, s in table.items()})
    summaries = flows.pipeline.pipeline(raw=str(tmp_path / "raw"), workdir=str(tmp_path / "work"),
                                        params_file=str(REPO / "params.yaml"))
    assert [s["stage"] for s in summaries] == ["a", "b", "c", "d", "e"]
    spans = {name: (start, end) for name, start, end in log}
    assert all(spans[n][0] >= spans["a"][1] for n in "bcde")
    assert spans["b"][0] < spans["c"][1] and spans["c"][0] < spans["b"][1], spans  # overlap
    assert spans["d"][1] <= spans["e"][0] or spans["e"][1] <= spans["d"][0], spans  # one training stage at a time
