"""The wiring: one stage table agreed on by params.yaml, dvc.yaml, the CLI and the flow; a real
Prefect run of the whole data pipeline; and DVC seeing a Prefect-run stage as up to date."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fm.cli import app
from fm.config import Params, load_params
from fm.stages import STAGES, select_stages
from tests.conftest import make_good_corpus

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_stage_names_agree_everywhere():
    from flows.pipeline import PIPELINE

    names = list(STAGES)
    assert names == ["ingest", "validate", "curate", "tokenize", "shard", "pretrain"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert list(params) == names
    assert [f for f in Params.__dataclass_fields__] == names
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == names
    for name, stage in dvc["stages"].items():
        assert stage["cmd"] == f"fm {name}" and stage["params"] == [name]
    commands = {c.name for c in app.registered_commands}
    assert set(names) <= commands
    assert [t.name for t in PIPELINE] == names


def test_params_yaml_loads_and_matches_code_defaults():
    # params.yaml spells out every setting; it must equal the dataclass defaults it documents.
    assert load_params(REPO / "params.yaml") == Params()


def test_overrides_and_bad_values():
    p = load_params(REPO / "params.yaml", ["curate.jaccard_threshold=0.7", "validate.allowed_langs=[en]"])
    assert p.curate.jaccard_threshold == 0.7 and p.validate.allowed_langs == ("en",)
    with pytest.raises(ValueError, match="unknown key.*curate"):
        load_params(REPO / "params.yaml", ["curate.jacard=0.7"])
    with pytest.raises(ValueError, match="unknown section 'pretrian'"):
        load_params(REPO / "params.yaml", ["pretrian.lr=1"])
    with pytest.raises(ValueError, match="num_perm .* divisible"):
        load_params(REPO / "params.yaml", ["curate.num_bands=7"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_params(REPO / "params.yaml", ["jaccard=0.7"])


def test_select_stages():
    assert select_stages(from_stage="curate") == ["curate", "tokenize", "shard", "pretrain"]
    assert select_stages(["shard", "ingest"]) == ["ingest", "shard"]
    with pytest.raises(ValueError, match="unknown stage 'pretrian'"):
        select_stages(["pretrian"])


def test_cli_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["ingest", "--raw", str(tmp_path / "missing"), "--workdir", str(tmp_path)])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["curate", "--workdir", str(tmp_path), "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 1 and "fm validate" in result.output


def test_cli_stage_runs_with_overrides(tmp_path):
    raw = make_good_corpus(tmp_path / "raw")
    result = runner.invoke(app, ["ingest", "--raw", str(raw), "--workdir", str(tmp_path / "w"),
                                 "--params", str(REPO / "params.yaml"), "--set", "ingest.image_size=12"])
    assert result.exit_code == 0, result.output
    images = pq.read_table(tmp_path / "w" / "02_ingested" / "image_text.parquet")
    assert set(images["image_width"].to_pylist()) == {12}


def _project(tmp_path: Path) -> Path:
    """A throwaway fm project: git + DVC, the repo's dvc.yaml/params.yaml and code deps, a tiny corpus."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, proj / name)
    shutil.copytree(REPO / "fm", proj / "fm", ignore=shutil.ignore_patterns("__pycache__"))
    make_good_corpus(proj / "data" / "01_raw")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    return proj


def test_prefect_flow_runs_the_pipeline_and_dvc_agrees(tmp_path, monkeypatch):
    """fm run (Prefect) on a tiny corpus: every layer written, and dvc sees every stage as current."""
    proj = _project(tmp_path)
    monkeypatch.chdir(proj)
    # A tiny corpus needs a tiny vocabulary; overrides would make the run differ from dvc.yaml,
    # so the settings go into this project's params.yaml instead.
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["tokenize"]["vocab_size"] = 300
    params["tokenize"]["min_frequency"] = 1
    params["validate"]["min_pass_rate"] = 0.5
    params["pretrain"].update(preset="tiny", model={"n_layer": 1, "d_model": 32, "n_head": 2}, seq_len=16,
                              batch_size=2, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=1,
                              ckpt_every=2, peak_tflops=1.0, threads=1)
    Path("params.yaml").write_text(yaml.safe_dump(params))

    result = runner.invoke(app, ["run"])
    assert result.exit_code == 0, result.output
    for layer in ("02_ingested", "03_validated", "04_curated", "05_tokens/shards"):
        assert (proj / "data" / layer).is_dir(), layer
    assert (proj / "data" / "05_tokens" / "tokenizer.json").is_file()
    manifest = json.loads((proj / "data" / "05_tokens" / "shards" / "manifest.json").read_text())
    assert manifest["shards"]
    assert (proj / "data" / "06_models" / "pretrain" / "model.safetensors").is_file()

    from fm.dvcstate import stage_is_current

    for name in STAGES:
        assert stage_is_current(name), name
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout

    # ...and a second `fm run` skips every stage, because DVC records them all as current
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 0, result.output
    assert result.output.count("up to date in dvc.lock") == len(STAGES), result.output
