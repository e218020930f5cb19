"""Validate: run a Great Expectations suite per modality on the ingested tables.

    fm validate --workdir data

The suites live in code (`build_suite`). Each `02_ingested/{modality}.parquet` is read one
partition (a row range of at most GX_BATCH_BYTES of text, `partition_ranges`) at a time, so memory
does not grow with the corpus: GX is set up once per modality, then validates each partition as
its own pandas batch; partitions run here in order or as Prefect tasks on Dask (`partitions.runner`). Rows that fail
any expectation go to quarantine with the expectations they broke (GX's per-row unexpected
index); the rest are written as they come, a row group per partition, to
`03_validated/{modality}.parquet`. `03_validated/report.json` holds every expectation's result
summed over the partitions (it passed only if it passed on every one; its examples are the
first five over all of them). A validation gate, decided once every partition is counted: when
a modality's pass rate drops below `validate.min_pass_rate`, the stage fails, publishes no
validated output (and removes a stale one), and leaves the report of the failure in
`<workdir>/validate_failed.json`.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fm.config import PartitionsConfig, ValidateConfig
from fm.data.quarantine import check_counts, read_quarantine, write_quarantine
from fm.data.schema import MODALITIES, PARTITION_ROWS, SCHEMAS, read_batches, release_memory, rows_per_batch
from fm.io import atomic_dir, write_json
from fm.paths import Paths

ROW = "_row"  # the column GX reports failing rows by
GX_BATCH_PARTITIONS = 8  # GX costs ~0.1 s per batch whatever its size: up to 8 partitions of rows a batch...
# ...and about this much text: GX holds several times a batch's text at once (pandas, its expectations' results). A
# 57 MB batch of long documents at 30x the sample raised the stage's peak by 300 MB; rows counts cannot bound that.
GX_BATCH_BYTES = 8 << 20
ROW_BYTES = 256  # a row's columns besides its text, as counted against GX_BATCH_BYTES (the image bytes stay behind)
# Text that is not clean (see fm.data.ingest.unclean_reason): a control character other than tab,
# newline and carriage return (source code may hold form feeds), or U+FFFD. Escapes that Python's
# re and RE2 (pandas' pyarrow-backed strings) read alike, so the suite means the same on both.
UNCLEAN_TEXT_REGEX = "[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\ufffd]"
UNCLEAN_CODE_REGEX = "[\\x00-\\x08\\x0b\\x0e-\\x1f\ufffd]"


class ValidationGateError(RuntimeError):
    """A modality's pass rate fell below validate.min_pass_rate."""


def build_suite(modality: str, cfg: ValidateConfig):
    """The expectation suite for one modality: a list of GX expectations."""
    import great_expectations.expectations as gxe

    natural_langs = list(cfg.allowed_langs)
    exps = [
        gxe.ExpectColumnValuesToNotBeNull(column="id"),
        gxe.ExpectColumnValuesToMatchRegex(column="id", regex=r"^[0-9a-f]{32}$"),
        gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=[modality]),
        gxe.ExpectColumnValuesToNotBeNull(column="source_file"),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=1),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=UNCLEAN_CODE_REGEX if modality == "code" else UNCLEAN_TEXT_REGEX),
    ]
    if modality == "text":
        exps += [
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars),
            gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=natural_langs),
        ]
    elif modality == "code":
        exps += [
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=cfg.min_text_chars, max_value=cfg.max_text_chars),
            gxe.ExpectColumnValuesToNotBeNull(column="lang"),  # the programming language
        ]
    elif modality == "image_text":
        exps += [
            gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1, max_value=cfg.max_caption_chars),
            gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=natural_langs),
            gxe.ExpectColumnValuesToNotBeNull(column="image"),
            gxe.ExpectColumnValuesToBeBetween(column="image_width", min_value=cfg.min_image_side, max_value=cfg.max_image_side),
            gxe.ExpectColumnValuesToBeBetween(column="image_height", min_value=cfg.min_image_side, max_value=cfg.max_image_side),
        ]
    elif modality == "triples":
        for col in ("subject", "relation", "object"):
            exps += [
                gxe.ExpectColumnValuesToNotBeNull(column=col),
                gxe.ExpectColumnValueLengthsToBeBetween(column=col, min_value=1, max_value=cfg.max_triple_field_chars),
            ]
        exps.append(gxe.ExpectColumnValuesToBeInSet(column="lang", value_set=natural_langs))
    return exps


def _context():
    """An ephemeral GX context with its progress bars off (they would flood the stage's log)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def _describe(exp_result) -> str:
    cfg = exp_result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id") and v is not None}
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "value_set") or ""
    return f"{cfg.type}({cfg.kwargs.get('column')}{', ' + shown if shown else ''})"


def prepare_suite(ctx, modality: str, cfg: ValidateConfig):
    """Set up GX once per modality (slow): -> (a batch definition that takes a DataFrame, the suite)."""
    import great_expectations as gx

    asset = ctx.data_sources.add_or_update_pandas(f"fm_{modality}").add_dataframe_asset(modality)
    batch_definition = asset.add_batch_definition_whole_dataframe("all")
    suite = gx.ExpectationSuite(name=f"fm_{modality}", expectations=build_suite(modality, cfg))
    return batch_definition, suite


def _to_pandas(table: pa.Table):
    """The partition as GX reads it: pandas, with the row index in ROW and image bytes reduced to a present flag."""
    # The image bytes are not expected against, so they stay behind.
    df = table.drop_columns([c for c in ("image",) if c in table.column_names]).to_pandas()
    if "image" in table.column_names:
        df["image"] = [None if missing else True for missing in table["image"].is_null().to_pylist()]
    df[ROW] = range(len(df))
    return df


def validate_partition(batch_definition, suite, table: pa.Table):
    """Run the suite on one partition -> (failure reasons per row index in `table`, report list)."""
    batch = batch_definition.get_batch(batch_parameters={"dataframe": _to_pandas(table)})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]})

    failures: dict[int, list[str]] = defaultdict(list)
    report = []
    for r in result.results:
        name = _describe(r)
        unexpected = r.result.get("unexpected_index_list") or []
        for item in unexpected:
            failures[int(item[ROW])].append(name)
        report.append({"expectation": name, "success": bool(r.success), "unexpected_count": len(unexpected),
                       "unexpected_examples": [str(v) for v in (r.result.get("partial_unexpected_list") or [])[:5]]})
    return failures, report


def merge_reports(total: list[dict], part: list[dict]) -> list[dict]:
    """Fold one partition's report into the modality's: every partition must pass, counts add up,
    and the examples are the first 5 over the partitions in order."""
    if not total:
        return part
    return [{"expectation": t["expectation"], "success": t["success"] and p["success"],
             "unexpected_count": t["unexpected_count"] + p["unexpected_count"],
             "unexpected_examples": (t["unexpected_examples"] + p["unexpected_examples"])[:5]}
            for t, p in zip(total, part, strict=True)]


def partition_ranges(path: Path) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of the ingested table at `path` (none if absent) that GX validates one at a time,
    in order: at most GX_BATCH_PARTITIONS x PARTITION_ROWS rows, fewer when the table's rows are large on average
    (rows_per_batch: images), and about GX_BATCH_BYTES of text and ROW_BYTES a row (a larger row alone). From the
    table's n_bytes column, so the same on every runner and every run."""
    if not path.exists():
        return []
    sizes = [np.maximum(batch["n_bytes"].fill_null(0).to_numpy(), 0) for batch in read_batches(path, ["n_bytes"], 1 << 16)]
    ends = np.cumsum(np.concatenate(sizes or [np.zeros(0, np.int64)]) + ROW_BYTES)  # (N,) bytes up to each row's end
    max_rows = rows_per_batch(path, GX_BATCH_PARTITIONS * PARTITION_ROWS)  # ~16 MB of rows, images included, on average
    ranges, start = [], 0
    while start < len(ends):
        before = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, before + GX_BATCH_BYTES, side="right"))  # the rows that fit
        stop = min(max(stop, start + 1), start + max_rows)
        ranges.append((start, stop))
        start = stop
    return ranges


def read_rows(path: Path, modality: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the ingested table at `path`, cast to its schema: the row groups that hold them,
    sliced: one partition (partition_ranges), read on its own; only its row groups are in memory."""
    file = pq.ParquetFile(path, pre_buffer=False)
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
    firsts = list(itertools.accumulate(sizes, initial=0))[:-1]
    groups = [i for i, (first, size) in enumerate(zip(firsts, sizes)) if first < stop and first + size > start]
    table = file.read_row_groups(groups).slice(start - firsts[groups[0]], stop - start)
    return table.cast(SCHEMAS[modality])


def _validate_rows(batch_definition, suite, modality: str, src: Path, start: int, stop: int) -> tuple:
    """Validate rows [start, stop) of a modality's ingested table -> (kept rows, quarantine rows, report, rows in).
    The partition's GX objects are freed and their heap handed back before it returns."""
    table = read_rows(src, modality, start, stop)
    failures, report = validate_partition(batch_definition, suite, table)
    quarantined = [{
        "modality": modality, "source_file": table["source_file"][i].as_py(), "position": table["position"][i].as_py(),
        "stage": "validate", "reason": "; ".join(failures[i]), "id": table["id"][i].as_py(),
    } for i in sorted(failures)]  # fmt: skip
    kept = table.filter(pa.array([i not in failures for i in range(table.num_rows)], type=pa.bool_()))
    n_in = table.num_rows
    del table, failures
    release_memory()  # GX's many small objects, freed, would otherwise stay resident
    return kept, quarantined, report, n_in


_worker_suites: dict = {}  # in a Dask worker: the GX context, and (modality, settings) -> its suite, set up once


def validate_rows(job: tuple) -> dict:
    """One partition on a Dask worker (fm.data.partitions): validate rows [start, stop) of a modality's ingested
    table, write the kept rows to `part` (Arrow IPC, atomically) -> its quarantine rows, report and counts."""
    from fm.io import atomic_path

    modality, src, start, stop, cfg, part = job
    key = (modality, repr(cfg))
    if key not in _worker_suites:
        if "context" not in _worker_suites:
            _worker_suites["context"] = _context()
        _worker_suites[key] = prepare_suite(_worker_suites["context"], modality, cfg)
    kept, quarantined, report, n_in = _validate_rows(*_worker_suites[key], modality, Path(src), start, stop)
    with atomic_path(part) as tmp, pa.ipc.new_file(tmp, kept.schema) as writer:
        writer.write_table(kept)
    return {"quarantined": quarantined, "report": report, "in": n_in}


def _partitions_on_dask(cfg: ValidateConfig, src: Path, parts: Path, partitions: PartitionsConfig) -> dict:
    """Validate every modality's partitions as Prefect tasks on Dask, all modalities in one map (one cluster)
    -> {modality: [(part file, result)] in row order}."""
    from fm.data.partitions import map_partitions

    jobs = []
    for modality in MODALITIES:
        path = src / f"{modality}.parquet"
        if not path.exists():
            continue
        jobs += [(modality, str(path), start, stop, cfg, str(parts / f"{modality}-{k:06d}.arrow"))
                 for k, (start, stop) in enumerate(partition_ranges(path))]
    done: dict[str, list] = {m: [] for m in MODALITIES}
    for job, result in zip(jobs, map_partitions(validate_rows, jobs, partitions, name="validate"), strict=True):
        done[job[0]].append((Path(job[5]), result))
    return done


def validate_modality(ctx, modality: str, cfg: ValidateConfig, src: Path, dst: Path, mapped: list | None = None):
    """Validate one modality partition by partition, writing its kept rows to `dst` as it goes
    -> (counts, report, quarantine rows). With `mapped` ([(part file, result)] from the Dask runner), the
    partitions were validated already: their kept rows are joined in order, a row group each, as here."""
    batch_definition, suite = None, None
    n_in = n_kept = 0
    report: list[dict] = []
    quarantined: list[dict] = []
    with pq.ParquetWriter(dst, SCHEMAS[modality], compression="zstd") as writer:
        if mapped is None:
            for start, stop in partition_ranges(src):
                if suite is None:  # no GX setup for a modality with no rows
                    batch_definition, suite = prepare_suite(ctx, modality, cfg)
                kept, rows, part_report, part_in = _validate_rows(batch_definition, suite, modality, src, start, stop)
                writer.write_table(kept)
                report = merge_reports(report, part_report)
                quarantined += rows
                n_in, n_kept = n_in + part_in, n_kept + kept.num_rows
        for part, result in mapped or ():
            with pa.memory_map(str(part)) as source:
                kept = pa.ipc.open_file(source).read_all()
            writer.write_table(kept)
            part.unlink()
            report = merge_reports(report, result["report"])
            quarantined += result["quarantined"]
            n_in, n_kept = n_in + result["in"], n_kept + kept.num_rows
    pass_rate = 1.0 if n_in == 0 else n_kept / n_in
    counts = {"in": n_in, "kept": n_kept, "quarantined": len(quarantined), "pass_rate": round(pass_rate, 4)}
    return counts, report, quarantined


def fail_gate(full_report: dict, failing: dict[str, float], min_pass_rate: float, paths: Paths) -> None:
    """Roll back what the gate guards (no validated output survives a failed validation), leave the
    report in validate_failed.json, and raise ValidationGateError."""
    shutil.rmtree(paths.validated, ignore_errors=True)
    write_json(full_report, paths.workdir / "validate_failed.json")
    worst = ", ".join(f"{m} {rate:.1%}" for m, rate in failing.items())
    raise ValidationGateError(
        f"validation failed: pass rate below validate.min_pass_rate={min_pass_rate:.0%} for {worst}; "
        f"see {paths.workdir / 'validate_failed.json'}"
    )


def validate(cfg: ValidateConfig, paths: Paths, partitions: PartitionsConfig | None = None) -> dict:
    """Run the validate stage: 02_ingested -> 03_validated + quarantine, gated on the pass rate. Partitions are
    validated here, in order, or as Prefect tasks on Dask (partitions.runner): the outputs are the same."""
    start = time.perf_counter()
    src = paths.ingested
    partitions = partitions or PartitionsConfig()
    if not (src / "quarantine.parquet").exists():
        raise FileNotFoundError(f"{src} has no ingested tables: run `fm ingest` first")
    ctx = _context() if partitions.runner == "local" else None
    previous = read_quarantine(src / "quarantine.parquet")
    quarantined: list[dict] = []
    counts, report = {}, {}
    # The kept rows stream into the temporary folder; any exception (the gate's included) discards it.
    with atomic_dir(paths.validated) as tmp:
        mapped = None
        if partitions.runner != "local":
            (tmp / "partitions").mkdir()
            mapped = _partitions_on_dask(cfg, src, tmp / "partitions", partitions)
        for modality in MODALITIES:
            counts[modality], report[modality], rows = validate_modality(
                ctx, modality, cfg, src / f"{modality}.parquet", tmp / f"{modality}.parquet",
                None if mapped is None else mapped[modality])
            quarantined += rows
        if mapped is not None:
            (tmp / "partitions").rmdir()  # every part was joined and removed
        check_counts("validate", counts)
        full_report = {"min_pass_rate": cfg.min_pass_rate, "counts": counts, "expectations": report}
        failing = {m: c["pass_rate"] for m, c in counts.items() if c["pass_rate"] < cfg.min_pass_rate}
        if failing:
            fail_gate(full_report, failing, cfg.min_pass_rate, paths)
        (paths.workdir / "validate_failed.json").unlink(missing_ok=True)
        write_quarantine(previous, quarantined, tmp / "quarantine.parquet")
        write_json(full_report, tmp / "report.json")
    outputs = [str(paths.validated)]
    return {"stage": "validate", "counts": counts, "outputs": outputs, "seconds": round(time.perf_counter() - start, 3)}


def validate_stage(cfg: ValidateConfig, partitions: PartitionsConfig, paths: Paths) -> dict:
    """The validate stage as the stage table runs it: its own settings, then where its partitions run."""
    return validate(cfg, paths, partitions)
