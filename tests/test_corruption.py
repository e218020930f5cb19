"""Damaged inputs and outputs never pass for good ones: each is detected, named (its path in a one-line
error, no traceback) and never used.

- A stage refuses to start on an input that cannot be what its stage wrote (fm.runner.check_inputs): a
  Parquet table cut short, overwritten or without its columns, a JSON file that does not parse, a shard
  manifest that does not parse or lists a file that is missing or differs from its sha256. Its own last
  outputs stay as they were.
- Model weights are checked against config.json when a later stage loads them.
- dvc.lock that DVC cannot read is refused by name; one cut short only ever makes stages stale.
- A damaged registry (fm.duckdb) is set aside with a note and rebuilt from the outputs: a run never stops on it.

Damage that tests/test_trust.py, test_registry.py, test_sft.py, test_clip_recipe.py, test_export_onnx.py
and test_generate.py already prove is refused (token shards, checkpoints, weights of every model kind, ONNX
graphs) is listed in docs/reliability.md, not repeated here.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from fm.cli import app
from fm.dvcstate import DVC_PARAMS, DVC_RAW, DVC_WORKDIR, RunContext, stage_is_current
from fm.eval.stage import load_models
from fm.io import sha256_file
from fm.paths import Paths
from fm.registry import content_hash, list_runs, log_run
from fm.runner import check_inputs, execute_stage
from fm.stages import STAGES, resolve
from tests.test_pipeline import make_project

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
BUILT = ("ingest", "validate", "curate", "tokenize", "instructions", "shard", "pretrain")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A DVC project (test_pipeline's: tiny params, a tiny corpus of every modality) in which the data stages
    and a tiny pretrain ran as `fm <stage>` runs them: recorded in dvc.lock and in the registry."""
    proj = make_project(tmp_path_factory.mktemp("corruption"))
    ctx = RunContext(str(proj / DVC_RAW), str(proj / DVC_WORKDIR), str(proj / DVC_PARAMS))
    for name in BUILT:
        execute_stage(name, ctx, skip_current=False)
    return proj


def outside_dvc(project: Path, tmp_path: Path) -> tuple[Paths, list[str]]:
    """A private copy of the corpus, the layers and params.yaml outside any DVC project (nothing is checked
    against or recorded in dvc.lock); the paths and the CLI's --raw/--workdir/--params."""
    root = tmp_path / "copy"
    shutil.copytree(project / "data", root / "data", symlinks=True)
    shutil.copy(project / "params.yaml", root / "params.yaml")
    paths = Paths(root / "data" / "01_raw", root / "data")
    return paths, ["--raw", str(paths.raw), "--workdir", str(paths.workdir), "--params", str(root / "params.yaml")]


def inside_dvc(project: Path, tmp_path: Path) -> tuple[RunContext, list[str]]:
    root = tmp_path / "proj"
    shutil.copytree(project, root, symlinks=True)
    ctx = RunContext(str(root / DVC_RAW), str(root / DVC_WORKDIR), str(root / DVC_PARAMS))
    return ctx, ["--raw", ctx.raw, "--workdir", ctx.workdir, "--params", ctx.params_file]


def outputs(name: str, paths: Paths) -> dict:
    spec = STAGES[name]
    return {out: content_hash(resolve(out, paths)) for out in spec.outs + spec.metrics}


def refused(stage: str, args: list[str], paths: Paths, damaged: Path) -> str:
    """Run `fm <stage>`; it must fail in one line naming `damaged`, before it started: no marker, outputs as they were."""
    before = outputs(stage, paths)
    result = runner.invoke(app, [stage, *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith(f"error ({stage}): ")]
    assert len(errors) == 1 and str(damaged) in errors[0], result.output
    assert not (paths.workdir / f".fm-running-{stage}").exists()  # refused at the door: nothing to undo
    assert outputs(stage, paths) == before
    return errors[0]


# ------------------------------------------------------------------ ways to damage a file


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwritten(path: Path) -> None:
    path.write_bytes(random.Random(path.name).randbytes(path.stat().st_size))


def emptied(path: Path) -> None:
    path.write_bytes(b"")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def removed(path: Path) -> None:
    path.unlink()


def without(column: str) -> Callable[[Path], None]:
    def drop(path: Path) -> None:
        pq.write_table(pq.read_table(path).drop_columns([column]), path)
    drop.__name__ = f"without_{column}"
    return drop


def as_integers(column: str) -> Callable[[Path], None]:
    def retype(path: Path) -> None:
        table = pq.read_table(path)
        i = table.schema.get_field_index(column)
        pq.write_table(table.set_column(i, column, pa.array(range(len(table)), pa.int64())), path)
    retype.__name__ = f"{column}_as_integers"
    return retype


def without_shard_list(path: Path) -> None:
    manifest = json.loads(path.read_text())
    del manifest["shards"]
    path.write_text(json.dumps(manifest))


def another_token(path: Path) -> None:
    path.write_text(path.read_text().replace("<|endoftext|>", "<|endoftexT|>", 1))


# ------------------------------------------------------------------ every stage's inputs, at its door

DOOR = [  # (stage, the input damaged, how): each stage's reader would otherwise fail without naming it, or read it unchecked
    ("validate", "02_ingested/text.parquet", cut_short),
    ("validate", "02_ingested/image_text.parquet", without("image")),
    ("curate", "03_validated/code.parquet", overwritten),
    ("curate", "03_validated/triples.parquet", as_integers("subject")),
    ("tokenize", "04_curated/text.parquet", emptied),
    ("instructions", "04_curated/triples.parquet", without("object")),
    ("shard", "04_curated/image_text.parquet", cut_short),
    ("shard", "05_instructions/withheld.parquet", overwritten),
    ("sft", "05_instructions/train.parquet", cut_short),
    ("sft", "05_instructions/train.parquet", without("response")),
    ("evaluate", "05_instructions/heldout.parquet", overwritten),
    ("evaluate", "05_instructions/heldout.parquet", as_integers("prompt")),
    ("pretrain", "05_tokens/shards/manifest.json", cut_short),
    ("pretrain", "05_tokens/shards/manifest.json", overwritten),
    ("pretrain_clip", "05_tokens/shards/manifest.json", without_shard_list),
    ("pretrain", "05_tokens/shards/text-00000.bin", removed),  # listed in the manifest, gone
    ("pretrain_clip", "05_tokens/shards/image_text-00000.arrow", flip_byte),  # the image-caption pairs
    ("distill", "05_tokens/shards/code-00000.bin", flip_byte),  # its text loader
    ("evaluate", "05_tokens/shards/text-00000.idx.npy", flip_byte),  # perplexity's document spans
    ("caption", "05_tokens/tokenizer.json", another_token),  # the shards were made with another tokenizer
    ("sft", "06_models/pretrain/config.json", cut_short),
    ("caption", "06_models/pretrain/config.json", overwritten),
]


@pytest.mark.parametrize("stage, rel, damage", DOOR, ids=[f"{s}-{Path(r).name}-{d.__name__}" for s, r, d in DOOR])
def test_a_stage_refuses_a_damaged_input_by_name_before_it_starts(project, tmp_path, stage, rel, damage):
    paths, args = outside_dvc(project, tmp_path)
    damage(paths.workdir / rel)
    error = refused(stage, args, paths, paths.workdir / rel)
    producer = next(s.name for s in STAGES.values() if any(rel == o or rel.startswith(o + "/") for o in s.outs))
    if rel.endswith("tokenizer.json"):
        producer = "shard"  # the shards are what must be made again, with this tokenizer
    assert f"rerun `fm {producer}`" in error


def test_an_intact_work_dir_passes_the_door(project, tmp_path):
    """The door refuses only damage: every built stage's inputs pass it, and a stage reruns from them."""
    paths, args = outside_dvc(project, tmp_path)
    for name in STAGES:
        check_inputs(name, paths)
    before = outputs("curate", paths)
    result = runner.invoke(app, ["curate", *args])
    assert result.exit_code == 0, result.output
    assert outputs("curate", paths) == before  # the same bytes again


# ------------------------------------------------------------------ weights a later stage loads


@pytest.mark.parametrize("rel, damage, message", [
    ("06_models/pretrain/model.safetensors", flip_byte, "does not match its sha256 in config.json"),
    ("06_models/pretrain/model.safetensors", cut_short, "bytes, config.json says"),
    ("06_models/pretrain/tokenizer.json", another_token, "is not the tokenizer this model was trained with"),
])
def test_sft_refuses_damaged_pretrained_weights_by_name(project, tmp_path, rel, damage, message):
    paths, args = outside_dvc(project, tmp_path)
    damage(paths.workdir / rel)
    result = runner.invoke(app, ["sft", *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert f"error (sft): {paths.workdir / rel} " in result.output and message in result.output, result.output
    assert not (paths.models / "sft").exists()  # nothing was tuned from them


# ------------------------------------------------------------------ the exported graphs' report and tokenizer


def test_fm_generate_onnx_names_an_unreadable_export_report(tmp_path):
    export = tmp_path / "work" / "07_export"
    (export / "onnx").mkdir(parents=True)
    (export / "report.json").write_text('{"files": {"onnx/prefill.onnx": {"sha256": "ab')  # cut short
    result = runner.invoke(app, ["generate", "hello", "--onnx", "--workdir", str(tmp_path / "work")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"error (generate): {export / 'report.json'} is not an export report" in result.output
    assert "Traceback" not in result.output


def test_evaluate_refuses_an_export_tokenizer_the_report_does_not_list(project, tmp_path):
    """The int8 graphs are scored with 07_export/hf/tokenizer.json: it is checked like the graphs themselves."""
    paths, _ = outside_dvc(project, tmp_path)
    shutil.rmtree(paths.models)  # only the exported graphs are left to score
    export = paths.workdir / "07_export"
    (export / "hf").mkdir(parents=True)
    tokenizer = export / "hf" / "tokenizer.json"
    shutil.copy(paths.tokens / "tokenizer.json", tokenizer)
    graph = export / "onnx" / "prefill.int8.onnx"
    (export / "report.json").write_text(json.dumps({"files": {
        "hf/tokenizer.json": {"sha256": sha256_file(tokenizer)}, "onnx/prefill.int8.onnx": {"sha256": "0" * 64}}}))
    with pytest.raises(FileNotFoundError, match=str(graph)):  # an intact tokenizer: on to the (missing) graph
        load_models(paths)
    another_token(tokenizer)
    with pytest.raises(ValueError, match=f"{tokenizer} is not the tokenizer {export / 'report.json'} lists"):
        load_models(paths)


# ------------------------------------------------------------------ the registry (fm.duckdb)


def set_aside(paths: Paths) -> list[Path]:
    """The registries set aside as damaged (their write-ahead logs beside them are not counted)."""
    return sorted(p for p in paths.workdir.glob("fm.duckdb.damaged-*") if p.suffix != ".wal")


def first_line_naming(output: str, text: str) -> str:
    lines = [line for line in output.splitlines() if text in line]
    assert lines, output
    return lines[0]


def test_a_damaged_registry_is_set_aside_and_rebuilt_while_the_stage_runs(project, tmp_path):
    paths, args = outside_dvc(project, tmp_path)
    cut_short(paths.duckdb)
    damaged = paths.duckdb.read_bytes()
    result = subprocess.run([sys.executable, "-m", "fm", "tokenize", *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    note = first_line_naming(result.stderr, f"fm: {paths.duckdb} is damaged")
    (aside,) = set_aside(paths)
    assert f"set aside as {aside}" in note and aside.read_bytes() == damaged  # kept as it was, for inspection
    con = duckdb.connect(str(paths.duckdb), read_only=True)
    try:
        assert con.execute("select stage, status from stage_runs").fetchall() == [("tokenize", "ran")]
        # the product tables of every stage, rebuilt from the outputs
        assert con.execute("select count(*) from shard_catalog").fetchone()[0] == len(
            json.loads((paths.tokens / "shards" / "manifest.json").read_text())["shards"])
        assert con.execute("select count(*) from corpus_stats").fetchone()[0] == pq.read_metadata(
            paths.curated / "stats.parquet").num_rows
        assert con.execute("select count(*) from pretrain_loss").fetchone()[0] > 0
    finally:
        con.close()


def header_flipped(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01  # inside the first block: DuckDB's checksum of it fails
    path.write_bytes(bytes(data))


def cut_in_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])  # DuckDB's three header blocks are 12 KiB


REGISTRY_COMMANDS = [  # (command, exit code, what it says once the damaged registry is set aside)
    (["runs"], 0, "no runs recorded"),
    (["runs", "--stages", "latest"], 1, "error (runs): latest: only 0 run(s) in the registry"),
    (["compare", "latest", "latest~1"], 1, "error (compare): latest: only 0 run(s) with metrics in the registry"),
    (["registry"], 0, "rebuilt corpus_stats, shard_catalog, pretrain_loss"),
]


@pytest.mark.parametrize("damage", [emptied, overwritten, header_flipped, cut_in_header])
def test_every_registry_command_sets_a_damaged_registry_aside_with_a_note(project, tmp_path, damage):
    paths, _ = outside_dvc(project, tmp_path)
    damage(paths.duckdb)
    damaged = paths.duckdb.read_bytes()
    for i, (command, code, says) in enumerate(REGISTRY_COMMANDS):
        paths.duckdb.write_bytes(damaged)
        result = runner.invoke(app, [*command, "--workdir", str(paths.workdir)])
        assert result.exit_code == code and isinstance(result.exception, (SystemExit, type(None))), result.output
        assert "Traceback" not in result.output
        note = first_line_naming(result.output, f"fm: {paths.duckdb} is damaged")
        assert len(set_aside(paths)) == i + 1 and any(f"set aside as {a}" in note for a in set_aside(paths))
        assert says in result.output, result.output
    # the new registry works: a run is logged in it and listed
    log_run(paths, "curate", "skipped", 0.0, False, "", [], {}, "20250101-000000-aaaa")
    assert [r["run_id"] for r in list_runs(paths)] == ["20250101-000000-aaaa"]


def test_a_registry_cut_short_anywhere_is_set_aside_by_the_next_read_or_write(project, tmp_path, capsys):
    """Cut past its header, the file opens; the damage shows when a block past the cut is read, or when the
    write is checkpointed (closing would swallow that failure): either way the run row lands in a new registry."""
    paths, _ = outside_dvc(project, tmp_path)
    data = paths.duckdb.read_bytes()
    for i, keep in enumerate(range(len(data) // 2, len(data), len(data) // 8)):
        paths.duckdb.write_bytes(data[:keep])
        list_runs(paths)  # finds it if the blocks it reads lie past the cut
        log_run(paths, "curate", "skipped", 0.0, False, "", [], {}, f"20250101-000000-{i:04d}")
        assert len(set_aside(paths)) == i + 1, (keep, capsys.readouterr().err)
        assert [r["run_id"] for r in list_runs(paths)] == [f"20250101-000000-{i:04d}"], keep


def test_fm_registry_names_an_output_it_cannot_read(project, tmp_path):
    paths, _ = outside_dvc(project, tmp_path)
    stats = paths.curated / "stats.parquet"
    cut_short(stats)
    result = runner.invoke(app, ["registry", "--workdir", str(paths.workdir)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    line = first_line_naming(result.output, "error (registry): ")
    assert f"{stats} cannot be read into the registry's corpus_stats table" in line and "rerun `fm curate`" in line
    assert not set_aside(paths)  # the registry itself is fine: left alone


# ------------------------------------------------------------------ dvc.lock


def lock_garbage(path: Path) -> None:
    path.write_text("schema: '2.0'\nstages: [\n  ingest: {cmd: fm ingest\n")


def lock_not_utf8(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200] + b"\xff\xfe\x00garbage")


@pytest.mark.parametrize("damage", [lock_garbage, lock_not_utf8, emptied])
def test_a_dvc_lock_dvc_cannot_read_is_refused_by_name(project, tmp_path, damage):
    ctx, args = inside_dvc(project, tmp_path)
    lock = ctx.root / "dvc.lock"
    damage(lock)
    damaged = lock.read_bytes()
    error = refused("tokenize", args, ctx.paths, lock)  # `fm tokenize`: before it runs, not once it has
    assert "cannot be read" in error and "git checkout -- dvc.lock" in error
    with pytest.raises(ValueError, match=f"{lock} cannot be read"):  # `fm run`: its up-to-date check
        stage_is_current(ctx, "tokenize")
    assert lock.read_bytes() == damaged  # never rewritten on top of what it held


def test_a_dvc_lock_cut_short_only_makes_stages_stale(project, tmp_path):
    """dvc.lock cut at a seeded random point inside one stage's entry: the stages whose entries survived whole
    are still current, the cut one and those after it are stale (or, where the cut leaves no valid lock file,
    every stage is refused by name). A stage whose record is incomplete is never skipped."""
    ctx, _ = inside_dvc(project, tmp_path)
    lock = ctx.root / "dvc.lock"
    text = lock.read_text()
    full = yaml.safe_load(text)["stages"]
    names = ("ingest", "shard", "pretrain")
    assert all(stage_is_current(ctx, name) for name in names)
    seed = 14
    rng = random.Random(seed)
    for cut_in in names:
        start = text.index(f"\n  {cut_in}:\n")
        end = min([i for i in (text.find(f"\n  {s}:\n", start + 1) for s in full) if i > start] or [len(text)])
        cut = rng.randrange(start + len(cut_in) + 5, end)  # inside the entry, past its name
        lock.write_text(text[:cut])
        try:
            kept = yaml.safe_load(text[:cut])["stages"]
        except yaml.YAMLError:
            kept = None
        for name in names:
            try:
                current = stage_is_current(ctx, name)
            except ValueError as e:  # refused, naming the file
                assert str(lock) in str(e) and "git checkout -- dvc.lock" in str(e), (seed, cut, str(e))
                continue
            whole = kept is not None and kept.get(name) == full[name]
            assert current == whole, f"seed {seed}: dvc.lock cut at {cut} (in {cut_in}): {name} current={current}"
            assert current == (names.index(name) < names.index(cut_in)), f"seed {seed}: cut at {cut}: {name}"


def test_an_output_changed_in_place_makes_its_stage_stale(project, tmp_path):
    """Damage that keeps a Parquet file readable (a flipped byte in a data page) passes the door; under `fm run`
    and `dvc repro`, dvc.lock's hash of the output catches it: its stage is stale and reruns."""
    ctx, _ = inside_dvc(project, tmp_path)
    table = ctx.paths.validated / "text.parquet"
    column = pq.read_metadata(table).row_group(0).column(6)  # the text
    data = bytearray(table.read_bytes())
    data[column.data_page_offset + column.total_compressed_size // 2] ^= 0x01
    table.write_bytes(bytes(data))
    check_inputs("curate", ctx.paths)  # the footer reads, the columns are there: it passes the door
    assert not stage_is_current(ctx, "validate")
    assert stage_is_current(ctx, "ingest")
