"""Validate: run a Great Expectations suite per modality on the ingested tables.

    fm validate --workdir data

The suites live in code (`build_suite`). Rows that fail any expectation go to quarantine
with the expectations they broke (GX's per-row unexpected index); the rest are written to
`03_validated/{modality}.parquet`, with `03_validated/report.json` holding every
expectation's result. A validation gate: when a modality's pass rate drops below
`validate.min_pass_rate`, the stage fails, writes no validated output (and removes a stale
one), and leaves the report of the failure in `<workdir>/validate_failed.json`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from fm.config import ValidateConfig
from fm.data.quarantine import check_counts, read_quarantine, write_quarantine
from fm.data.schema import MODALITIES, SCHEMAS
from fm.io import atomic_dir, write_json
from fm.paths import Paths

ROW = "_row"  # the column GX reports failing rows by
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


def validate_table(ctx, modality: str, table: pa.Table, cfg: ValidateConfig):
    """Run the modality's suite on `table` -> (failure reasons per row index, report dict)."""
    import great_expectations as gx

    # GX reads pandas; the image bytes are not expected against, so they stay behind.
    df = table.drop_columns([c for c in ("image",) if c in table.column_names]).to_pandas()
    if "image" in table.column_names:
        df["image"] = [None if v is None else True for v in table["image"].to_pylist()]
    df[ROW] = range(len(df))
    asset = ctx.data_sources.add_or_update_pandas(f"fm_{modality}").add_dataframe_asset(modality)
    batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": df})
    suite = gx.ExpectationSuite(name=f"fm_{modality}", expectations=build_suite(modality, cfg))
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


def validate(cfg: ValidateConfig, paths: Paths) -> dict:
    """Run the validate stage: 02_ingested -> 03_validated + quarantine, gated on the pass rate."""
    start = time.perf_counter()
    src = paths.ingested
    if not (src / "quarantine.parquet").exists():
        raise FileNotFoundError(f"{src} has no ingested tables: run `fm ingest` first")
    ctx = _context()
    previous = read_quarantine(src / "quarantine.parquet")
    kept_tables: dict[str, pa.Table] = {}
    quarantined: list[dict] = []
    counts, report = {}, {}
    for modality in MODALITIES:
        path = src / f"{modality}.parquet"
        table = pq.read_table(path).cast(SCHEMAS[modality]) if path.exists() else SCHEMAS[modality].empty_table()
        if table.num_rows:
            failures, report[modality] = validate_table(ctx, modality, table, cfg)
        else:
            failures, report[modality] = {}, []
        bad = sorted(failures)
        for i in bad:
            quarantined.append({
                "modality": modality, "source_file": table["source_file"][i].as_py(), "position": table["position"][i].as_py(),
                "stage": "validate", "reason": "; ".join(failures[i]), "id": table["id"][i].as_py(),
            })
        keep_mask = pa.array([i not in failures for i in range(table.num_rows)], type=pa.bool_())
        kept_tables[modality] = table.filter(keep_mask)
        n_in = table.num_rows
        pass_rate = 1.0 if n_in == 0 else kept_tables[modality].num_rows / n_in
        counts[modality] = {"in": n_in, "kept": kept_tables[modality].num_rows, "quarantined": len(bad), "pass_rate": round(pass_rate, 4)}

    check_counts("validate", counts)
    full_report = {"min_pass_rate": cfg.min_pass_rate, "counts": counts, "expectations": report}
    failing = {m: c["pass_rate"] for m, c in counts.items() if c["pass_rate"] < cfg.min_pass_rate}
    if failing:
        # The gate rolls back what it guards: no validated output survives a failed validation.
        shutil.rmtree(paths.validated, ignore_errors=True)
        write_json(full_report, paths.workdir / "validate_failed.json")
        worst = ", ".join(f"{m} {rate:.1%}" for m, rate in failing.items())
        raise ValidationGateError(
            f"validation failed: pass rate below validate.min_pass_rate={cfg.min_pass_rate:.0%} for {worst}; "
            f"see {paths.workdir / 'validate_failed.json'}"
        )
    (paths.workdir / "validate_failed.json").unlink(missing_ok=True)
    with atomic_dir(paths.validated) as tmp:
        for modality, table in kept_tables.items():
            pq.write_table(table, tmp / f"{modality}.parquet", compression="zstd")
        write_quarantine(previous, quarantined, tmp / "quarantine.parquet")
        write_json(full_report, tmp / "report.json")
    outputs = [str(paths.validated)]
    return {"stage": "validate", "counts": counts, "outputs": outputs, "seconds": round(time.perf_counter() - start, 3)}
