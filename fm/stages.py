"""The stage table: every pipeline stage, once, with everything the wiring needs.

Each `Stage` names the one function that does its work, `run(*sections, paths) -> summary`,
the stages it needs first, the params.yaml sections it reads (passed to it in that order),
and its inputs and outputs under the work dir. Everything else follows from this table:

    the Prefect flow (flows/pipeline.py)     a DAG: each stage waits for its upstream stages
    the Prefect tasks (tasks/stages.py)      one generated task per stage
    dvc.yaml (fm dvc-yaml)                   generated; code deps are the import closure of `run`
    the CLI (fm <stage>)                     one command per stage; --help lists its params keys

so adding a stage is one entry here, its function and its params section.

Paths in `deps` / `outs` are relative to the work dir, except `raw` (the raw corpus folder).
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fm.config import Params
from fm.data.curate import curate
from fm.data.ingest import ingest_stage
from fm.data.instructions import instructions
from fm.data.schema import returned_memory
from fm.data.shards import write_shards
from fm.data.tokenizer import train_tokenizer
from fm.data.validate import validate_stage
from fm.eval.stage import evaluate
from fm.export.stage import export
from fm.paths import Paths
from fm.recipes.pretrain import pretrain
from fm.recipes.caption import caption
from fm.recipes.clip import pretrain_clip
from fm.recipes.distill import distill
from fm.recipes.sft import sft


@dataclass(frozen=True)
class Stage:
    name: str  # also its params.yaml section, dvc.yaml stage, CLI command, Prefect task
    run: Callable[..., dict]  # run(*sections, paths) -> summary dict
    help: str
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads
    sections: tuple[str, ...] = ()  # params sections it reads, in the order `run` takes them
    deps: tuple[str, ...] = ()  # inputs: "raw" or paths under the work dir
    outs: tuple[str, ...] = ()  # products, versioned by DVC
    metrics: tuple[str, ...] = ()  # DVC metrics files (JSON) among its products
    plots: dict = field(default_factory=dict)  # DVC plots: CSV/JSON file -> its x and y columns
    retries: int = 0  # retries on I/O errors (stages that read user files)
    trains: bool = False  # a training stage: --force trains from scratch (run(..., fresh=True))
    tables: dict = field(default_factory=dict)  # registry tables (fm.duckdb) rebuilt from its outputs
    run_metrics: str = ""  # a CSV of model, metric, split, value, baseline rows kept per run (fm runs / fm compare)

    @property
    def module(self) -> str:
        return self.run.__module__

    def code_deps(self) -> tuple[str, ...]:
        """The project-relative fm source files this stage executes (see fm/codedeps.py)."""
        from fm.codedeps import module_files

        return module_files(self.module)

    def settings(self, params: Params) -> list:
        return [getattr(params, s) for s in self.sections]


MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("ingest", ingest_stage, "Read the raw corpus (text, code, image-caption pairs, triples) into Arrow tables.",
              sections=("ingest", "partitions"), deps=("raw",), outs=("02_ingested",), retries=2),
        Stage("validate", validate_stage, "Run Great Expectations suites; failing rows go to quarantine.",
              upstream=("ingest",), sections=("validate", "partitions"), deps=("02_ingested",), outs=("03_validated",)),
        Stage("curate", curate, "Exact and MinHash near-duplicate removal, quality filters, corpus statistics.",
              upstream=("validate",), sections=("curate",), deps=("03_validated",),
              outs=("04_curated", "quarantine.parquet"), tables={"corpus_stats": "04_curated/stats.parquet"}),
        Stage("tokenize", train_tokenizer, "Train the byte-level BPE tokenizer on the curated corpus.",
              upstream=("curate",), sections=("tokenize",), deps=("04_curated",), outs=("05_tokens/tokenizer.json",)),
        Stage("instructions", instructions, "Build the FLAN-style instruction set from the curated records, split by fact.",
              upstream=("curate",), sections=("instructions",), deps=("04_curated",), outs=("05_instructions",)),
        Stage("shard", write_shards, "Write token shards, Arrow document shards and the manifest.",
              upstream=("tokenize", "instructions"), sections=("shard",),
              deps=("04_curated", "05_tokens/tokenizer.json", "05_instructions/withheld.parquet"),
              outs=("05_tokens/shards",), tables={"shard_catalog": "05_tokens/shards/manifest.json"}),
        Stage("pretrain", pretrain, "Pretrain the decoder LM on the token shards (torchrun when pretrain.nproc > 1).",
              upstream=("shard",), sections=("pretrain",), deps=("05_tokens/shards", "05_tokens/tokenizer.json"),
              outs=tuple(f"06_models/pretrain/{f}" for f in MODEL_FILES),
              metrics=("06_models/pretrain/summary.json",), plots={"06_models/pretrain/loss.csv": {"x": "step", "y": "loss"}},
              trains=True, tables={"pretrain_loss": "06_models/pretrain/loss.csv"}),
        Stage("pretrain_clip", pretrain_clip, "Train a CLIP dual encoder on the image-caption pairs; retrieval and zero-shot.",
              upstream=("shard",), sections=("pretrain_clip",), deps=("05_tokens/shards", "05_tokens/tokenizer.json"),
              outs=tuple(f"06_models/clip/{f}" for f in MODEL_FILES),
              metrics=("06_models/clip/summary.json",), plots={"06_models/clip/loss.csv": {"x": "step", "y": "loss"}},
              trains=True, tables={"clip_loss": "06_models/clip/loss.csv"}),
        Stage("caption", caption, "Frozen-style captioning: train a vision prefix for the frozen pretrained LM.",
              upstream=("pretrain", "pretrain_clip"), sections=("caption",),
              deps=(*(f"06_models/pretrain/{f}" for f in MODEL_FILES), *(f"06_models/clip/{f}" for f in MODEL_FILES),
                    "05_tokens/shards"),
              outs=("06_models/caption/model.safetensors", "06_models/caption/prefix.safetensors",
                    "06_models/caption/config.json", "06_models/caption/tokenizer.json"),
              metrics=("06_models/caption/summary.json",), plots={"06_models/caption/loss.csv": {"x": "step", "y": "loss"}},
              trains=True, tables={"caption_loss": "06_models/caption/loss.csv"}),
        Stage("sft", sft, "Instruction-tune the pretrained model (full, LoRA, prefix, prompt) and score held-out QA.",
              upstream=("pretrain", "instructions"), sections=("sft",),
              deps=(*(f"06_models/pretrain/{f}" for f in MODEL_FILES), "05_instructions"), outs=("06_models/sft/models",),
              metrics=("06_models/sft/summary.json",), plots={"06_models/sft/loss.csv": {"x": "step", "y": "loss"}},
              trains=True, tables={"sft_loss": "06_models/sft/loss.csv"}),
        Stage("distill", distill, "Distill the tuned teacher into a smaller student (KD + CE); compare size, speed, QA.",
              upstream=("sft", "shard"), sections=("distill", "sft"),
              deps=("06_models/sft/models", "05_instructions", "05_tokens/shards", "06_models/pretrain/config.json"),
              outs=tuple(f"06_models/student/{f}" for f in MODEL_FILES),
              metrics=("06_models/student/summary.json",), plots={"06_models/student/loss.csv": {"x": "step", "y": "loss"}},
              trains=True, tables={"distill_loss": "06_models/student/loss.csv"}),
        Stage("export", export, "Export the student, teacher and CLIP towers to ONNX (fp32, int8) and transformers "
              "weights; parity gates.",
              upstream=("distill", "pretrain_clip"), sections=("export", "sft"),
              deps=(*(f"06_models/student/{f}" for f in MODEL_FILES), "06_models/sft/models", "06_models/clip/model.safetensors",
                    "06_models/clip/config.json", "06_models/clip/tokenizer.json", "05_tokens/shards",
                    "06_models/pretrain/config.json"),
              outs=("07_export/onnx", "07_export/hf", "07_export/teacher", "07_export/clip", "07_export/pruned"),
              metrics=("07_export/report.json",)),
        Stage("evaluate", evaluate, "Score every model of the run on held-out data, chance levels beside; 08_reports/.",
              upstream=("export", "caption"), sections=("evaluate",),
              deps=(*(f"06_models/pretrain/{f}" for f in MODEL_FILES), "06_models/sft/models",
                    *(f"06_models/student/{f}" for f in MODEL_FILES), "07_export/onnx", "07_export/hf", "07_export/teacher",
                    "07_export/pruned", "07_export/report.json", "06_models/clip/summary.json",
                    "06_models/caption/summary.json", "05_instructions", "05_tokens/shards"),
              outs=("08_reports/metrics.csv", "08_reports/report.html", "07_export/MODEL_CARD.md"),
              metrics=("08_reports/metrics.json",),
              tables={"eval_metrics": "08_reports/metrics.csv"}, run_metrics="08_reports/metrics.csv"),
    )
}


def resolve(rel: str, paths: Paths) -> Path:
    """A stage's dep/out name -> its path ("raw" is the raw corpus folder, the rest the work dir)."""
    if rel == "raw" or rel.startswith("raw/"):
        return paths.raw / rel[4:] if rel != "raw" else paths.raw
    return paths.workdir / rel


def check_table() -> None:
    """The table is a DAG whose edges name real stages and real params sections (a test runs this)."""
    sections = {f.name for f in dataclasses.fields(Params)}
    for stage in STAGES.values():
        for up in stage.upstream:
            if up not in STAGES or list(STAGES).index(up) >= list(STAGES).index(stage.name):
                raise ValueError(f"stage {stage.name}: upstream {up!r} must be a stage listed before it")
        for s in stage.sections:
            if s not in sections:
                raise ValueError(f"stage {stage.name}: unknown params section {s!r}")
        n_args = len(inspect.signature(stage.run).parameters)
        if n_args < len(stage.sections) + 1:
            raise ValueError(f"stage {stage.name}: {stage.run.__qualname__} must take {len(stage.sections)} sections and paths")


def downstream(name: str) -> list[str]:
    """`name` and every stage that (transitively) reads its outputs, in table order."""
    out = {name}
    for stage in STAGES.values():  # table order is a topological order
        if out & set(stage.upstream):
            out.add(stage.name)
    return [n for n in STAGES if n in out]


def ancestors(name: str) -> list[str]:
    """Every stage whose outputs `name` reads, directly or through others, in table order."""
    out: set[str] = set()
    todo = list(STAGES[name].upstream)
    while todo:
        up = todo.pop()
        if up not in out:
            out.add(up)
            todo.extend(STAGES[up].upstream)
    return [n for n in STAGES if n in out]


def validate_names(names: list[str] | None) -> None:
    for name in names or []:
        if name not in STAGES:
            raise ValueError(f"unknown stage '{name}' (stages: {', '.join(STAGES)})")


def select_stages(stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    """The stages to run, in table order: a subset, or one stage and everything downstream of it."""
    validate_names(list(stages or []) + ([from_stage] if from_stage else []))
    names = downstream(from_stage) if from_stage else list(STAGES)
    if stages:
        names = [n for n in names if n in stages]
    return names


DATA_STAGES = ("ingest", "validate", "curate", "tokenize", "instructions", "shard")


def run_stage(name: str, params: Params, paths: Paths, fresh: bool = False) -> dict:
    """Run one stage with the params sections it reads; `fresh` retrains a training stage from scratch."""
    stage = STAGES[name]
    kwargs = {"fresh": True} if (fresh and stage.trains) else {}
    if name in DATA_STAGES:  # their memory must stay flat as the corpus grows (issue 13)
        with returned_memory():
            return stage.run(*stage.settings(params), paths, **kwargs)
    return stage.run(*stage.settings(params), paths, **kwargs)
