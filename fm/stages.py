"""The stage table: every pipeline stage, once, in order.

Each entry maps a stage name to the one function that does its work,
`run(section_config, paths) -> summary dict`. The CLI (`fm <stage>`, what dvc.yaml runs) and
the Prefect tasks (tasks/stages.py, what `fm run` runs) both call through this table, and a
test checks that params.yaml, dvc.yaml, the CLI and the flow name the same stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fm.config import Params
from fm.data.curate import curate
from fm.data.ingest import ingest
from fm.data.shards import write_shards
from fm.data.tokenizer import train_tokenizer
from fm.data.validate import validate
from fm.paths import Paths
from fm.recipes.pretrain import pretrain


@dataclass(frozen=True)
class Stage:
    name: str  # also the params.yaml section, the dvc.yaml stage, the CLI command and the task
    run: Callable[..., dict]
    help: str


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("ingest", ingest, "Read the raw corpus (text, code, image-caption pairs, triples) into Arrow tables."),
        Stage("validate", validate, "Run Great Expectations suites; failing rows go to quarantine."),
        Stage("curate", curate, "Exact and MinHash near-duplicate removal, quality filters, corpus statistics."),
        Stage("tokenize", train_tokenizer, "Train the byte-level BPE tokenizer on the curated corpus."),
        Stage("shard", write_shards, "Write token shards, Arrow document shards and the manifest."),
        Stage("pretrain", pretrain, "Pretrain the decoder LM on the token shards (torchrun when pretrain.nproc > 1)."),
    )
}


def run_stage(name: str, params: Params, paths: Paths) -> dict:
    """Run one stage with its own params section."""
    stage = STAGES[name]
    return stage.run(getattr(params, name), paths)


def select_stages(stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    """The stage names to run, in pipeline order: a subset, or everything from one stage on."""
    names = list(STAGES)
    for name in (stages or []) + ([from_stage] if from_stage else []):
        if name not in STAGES:
            raise ValueError(f"unknown stage '{name}' (stages: {', '.join(names)})")
    if from_stage:
        names = names[names.index(from_stage):]
    if stages:
        names = [n for n in names if n in stages]
    return names
