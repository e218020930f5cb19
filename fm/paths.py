"""Where each layer lives: the raw corpus folder and the numbered layers under the work dir.

Stages talk only through these paths (DESIGN.md, "The pipeline").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    raw: Path = Path("data/01_raw")
    workdir: Path = Path("data")

    def __post_init__(self):
        object.__setattr__(self, "raw", Path(self.raw))
        object.__setattr__(self, "workdir", Path(self.workdir))

    @property
    def ingested(self) -> Path:
        return self.workdir / "02_ingested"

    @property
    def validated(self) -> Path:
        return self.workdir / "03_validated"

    @property
    def curated(self) -> Path:
        return self.workdir / "04_curated"

    @property
    def tokens(self) -> Path:
        return self.workdir / "05_tokens"

    @property
    def instructions(self) -> Path:
        """The instruction set (train.parquet, heldout.parquet, card.json)."""
        return self.workdir / "05_instructions"

    @property
    def models(self) -> Path:
        return self.workdir / "06_models"

    @property
    def checkpoints(self) -> Path:
        """Training state for resume (DCP folders); kept across reruns, not a stage's product."""
        return self.workdir / "06_models" / "checkpoints"

    @property
    def quarantine(self) -> Path:
        """The one quarantine table of the run (written by curate, the last stage that drops records)."""
        return self.workdir / "quarantine.parquet"

    @property
    def duckdb(self) -> Path:
        return self.workdir / "fm.duckdb"
