"""A user's mistake gets one clear line, not a traceback; a killed run's leftovers are cleaned and
its partial outputs never pass for done."""

from __future__ import annotations

import base64
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fm.cli import app
from fm.config import load_params
from fm.paths import Paths
from fm.runner import recover
from tests.conftest import make_good_corpus

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.mark.parametrize("override, message", [
    ("pretrain.lr=abc", "pretrain.lr = 'abc' must be a number"),
    ("pretrain.max_steps=1.5", "pretrain.max_steps = 1.5 must be an integer"),
    ("curate.near_dup=3", "curate.near_dup = 3 must be true or false"),
    ("validate.allowed_langs=en", "validate.allowed_langs = 'en' must be a list"),
    ("pretrain.ckpt_every=0", "pretrain.ckpt_every must be positive, got 0"),
])
def test_wrong_setting_types_are_one_line(override, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_params(REPO / "params.yaml", [override])
    result = runner.invoke(app, ["ingest", "--workdir", str(tmp_path), "--set", override])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest:\n  max_text_bytes: 10\ncurate:\n  num_perm: [128\n")
    result = runner.invoke(app, ["ingest", "--params", str(bad), "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{bad}, line 5" in result.output and "not valid YAML" in result.output


def test_os_errors_name_the_path_and_the_cause(tmp_path):
    raw = make_good_corpus(tmp_path / "raw")
    blocker = tmp_path / "work"
    blocker.write_text("a file where the work dir should be")
    result = runner.invoke(app, ["ingest", "--raw", str(raw), "--workdir", str(blocker / "sub")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(blocker) in result.output and ("Not a directory" in result.output or "File exists" in result.output)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_full_disk_is_one_line_and_leaves_no_partial_output(tmp_path):
    """A file-size limit stands in for a full disk: the stage fails with one line naming the file,
    leaves no output that looks done, and a rerun with room succeeds."""
    raw = make_good_corpus(tmp_path / "raw")
    (raw / "text" / "big.txt").write_text(base64.b64encode(os.urandom(60_000)).decode())  # does not compress
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "fm", "ingest", "--raw", str(raw), "--workdir", str(work),
           "--params", str(REPO / "params.yaml")]
    result = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size, cwd=tmp_path,
                            env=dict(os.environ, COLUMNS="200"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "File too large" in result.stderr, result.stderr
    assert not (work / "02_ingested" / "text.parquet").exists()
    assert (work / ".fm-running-ingest").exists()  # the interrupted stage is known as such
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (work / "02_ingested" / "text.parquet").exists() and not (work / ".fm-running-ingest").exists()


def test_recover_removes_a_killed_stages_outputs_and_stale_temporaries(tmp_path):
    paths = Paths(tmp_path / "data" / "01_raw", tmp_path / "data")
    raw_tmp = paths.raw / "text" / ".tmp-0123abcd-user-file.txt"  # the user's corpus is never touched
    raw_tmp.parent.mkdir(parents=True)
    raw_tmp.write_text("mine")
    curated = paths.curated / "text.parquet"
    curated.parent.mkdir(parents=True)
    curated.write_text("half of a new layer")
    paths.quarantine.write_text("old")
    (paths.workdir / ".fm-running-curate").write_text("123 0\n")
    (paths.tokens / "shards").mkdir(parents=True)
    (paths.tokens / "shards" / ".tmp-89abcdef-shard-00000.bin").write_text("partial")
    (paths.checkpoints / "pretrain" / ".tmp-step-00000050").mkdir(parents=True)
    tokenizer = paths.tokens / "tokenizer.json"
    tokenizer.write_text("{}")
    done = recover(paths)
    assert len(done) == 2 and "curate" in done[0]
    assert not paths.curated.exists() and not paths.quarantine.exists()  # curate will run again
    assert not (paths.tokens / "shards" / ".tmp-89abcdef-shard-00000.bin").exists()
    assert not (paths.checkpoints / "pretrain" / ".tmp-step-00000050").exists()
    assert tokenizer.exists() and raw_tmp.exists()
    assert recover(paths) == []


def test_fm_run_reports_a_failing_stage_in_one_line(tmp_path):
    result = runner.invoke(app, ["run", "--stage", "ingest", "--raw", str(tmp_path / "missing"),
                                 "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
