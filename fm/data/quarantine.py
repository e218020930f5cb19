"""The quarantine: every record a stage does not keep, with where it came from and why.

Each data stage that drops records writes the quarantine so far (its own rows added to the
rows of the stages before it) beside its output, `<layer>/quarantine.parquet`, so each file
has one owner for DVC; curate, the last stage that drops records, writes the run's one table,
`<workdir>/quarantine.parquet`.

Every stage accounts for each record it read: `check_counts` fails the stage when, for some
modality, records in != kept + quarantined.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fm.data.schema import QUARANTINE_SCHEMA, quarantine_table
from fm.io import write_parquet


def read_quarantine(path: Path) -> pa.Table:
    """The quarantine table at `path`, or an empty one if the earlier stage quarantined nothing."""
    if not Path(path).exists():
        return QUARANTINE_SCHEMA.empty_table()
    return pq.read_table(path).cast(QUARANTINE_SCHEMA)


def write_quarantine(previous: pa.Table, rows: list[dict], path: Path) -> pa.Table:
    """Append this stage's rows to the earlier quarantine and write the whole table atomically."""
    table = pa.concat_tables([previous.cast(QUARANTINE_SCHEMA), quarantine_table(rows)])
    write_parquet(table, path)
    return table


def counts_by_modality(table: pa.Table, stage: str | None = None) -> dict[str, int]:
    """How many quarantined rows per modality (optionally only those of one stage)."""
    if stage is not None:
        table = table.filter(pc.equal(table["stage"], stage))
    out: dict[str, int] = {}
    for m in table["modality"].to_pylist():
        out[m] = out.get(m, 0) + 1
    return out


class RecordCountError(RuntimeError):
    """A stage lost or invented records (in != kept + quarantined): a bug in fm, not in the data."""


def check_counts(stage: str, counts: dict[str, dict]) -> None:
    """Raise RecordCountError unless in = kept + quarantined for every entry of `counts`
    (one per modality, each with "in", "kept" and "quarantined")."""
    for name, c in counts.items():
        n_in, kept, quarantined = c["in"], c["kept"], c["quarantined"]
        if n_in != kept + quarantined:
            raise RecordCountError(
                f"{stage}: {name}: records in ({n_in}) != kept ({kept}) + quarantined ({quarantined}); "
                f"{abs(n_in - kept - quarantined)} record(s) {'unaccounted for' if n_in > kept + quarantined else 'too many'}"
            )
