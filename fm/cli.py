"""The `fm` command line.

    fm ingest | validate | curate | tokenize | shard   run one stage (what dvc.yaml calls)
    fm run                                            the whole pipeline as a Prefect flow
    fm stages                                         list the stages in order
    fm plan                                           rank map and memory per rank of the pretrain layout

Every command takes --raw DIR, --workdir DIR, --params FILE and repeatable
--set section.key=value overrides; params.yaml stays the single source of settings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fm.config import load_params
from fm.paths import Paths

app = typer.Typer(
    help="fm: a foundation-model factory. Raw corpora in; tokenizer and token shards out (more stages to come).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

RawOpt = Annotated[Path, typer.Option("--raw", help="Raw corpus folder (text/, code/, image_text/, triples/).")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Where layers 02_ingested .. 08_reports are written.")]
ParamsOpt = Annotated[Path, typer.Option("--params", help="The params file: one section per stage.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a setting, e.g. --set curate.jaccard_threshold=0.7 (repeatable)."),
]


def _user_errors() -> tuple[type[BaseException], ...]:
    from fm.data.ingest import CorpusError
    from fm.data.validate import ValidationGateError

    return (CorpusError, ValidationGateError, FileNotFoundError, ValueError)


def print_summary(summary: dict) -> None:
    """Per-modality counts of one stage as a table, then its other figures on one line."""
    counts = summary.get("counts") or {}
    if counts:
        columns = list(dict.fromkeys(k for c in counts.values() for k in c))
        table = Table(title=f"{summary['stage']} ({summary.get('seconds', 0):.1f} s)", title_justify="left")
        table.add_column("modality")
        for col in columns:
            table.add_column(col, justify="right")
        for modality, c in counts.items():
            table.add_row(modality, *(f"{c.get(col, '')}" for col in columns))
        console.print(table)
    else:
        console.print(f"[bold]{summary['stage']}[/] ({summary.get('seconds', 0):.1f} s)")
    extras = {k: v for k, v in summary.items() if k not in ("stage", "counts", "seconds", "outputs", "stats")}
    if extras:
        console.print("  " + "  ".join(f"{k}={v}" for k, v in extras.items()))
    for out in summary.get("outputs", []):
        console.print(f"  -> {out}", style="dim")


def _stage_command(name: str, help_text: str):
    def command(
        raw: RawOpt = Path("data/01_raw"),
        workdir: WorkdirOpt = Path("data"),
        params: ParamsOpt = Path("params.yaml"),
        overrides: SetOpt = None,
    ) -> None:
        from fm.stages import run_stage

        try:
            summary = run_stage(name, load_params(params, overrides or []), Paths(raw, workdir))
        except _user_errors() as e:
            console.print(f"[red]error[/] ({name}): {e}", soft_wrap=True)
            raise typer.Exit(1)
        print_summary(summary)

    command.__doc__ = help_text
    return command


def _register_stage_commands() -> None:
    from fm.stages import STAGES

    for stage in STAGES.values():
        app.command(name=stage.name, help=stage.help)(_stage_command(stage.name, stage.help))


@app.command("stages")
def list_stages() -> None:
    """List the pipeline stages in order."""
    from fm.stages import STAGES

    for stage in STAGES.values():
        typer.echo(f"{stage.name:10s} {stage.help}")


@app.command("run")
def run(
    raw: RawOpt = Path("data/01_raw"),
    workdir: WorkdirOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    stages: Annotated[Optional[list[str]], typer.Option("--stage", help="Run only these stages (repeatable).")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Run from this stage to the end.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages that dvc.lock records as up to date.")] = False,
) -> None:
    """Run the pipeline as a Prefect flow (ephemeral local API: no server to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.pipeline import pipeline

    try:
        load_params(params, overrides or [])  # fail on a bad setting before Prefect starts
        summaries = pipeline(raw=str(raw), workdir=str(workdir), params_file=str(params),
                             overrides=list(overrides or []), stages=stages, from_stage=from_stage, force=force)
    except _user_errors() as e:
        console.print(f"[red]error[/]: {e}", soft_wrap=True)
        raise typer.Exit(1)
    for summary in summaries:
        print_summary(summary)


@app.command("plan")
def plan(
    raw: RawOpt = Path("data/01_raw"),
    workdir: WorkdirOpt = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Print the pretrain layout's rank map (dp, pp, tp), weight shards and estimated memory per rank."""
    import json

    from fm.models.decoder import PRESETS
    from fm.plan import plan as make_plan, print_plan
    from fm.recipes.pretrain import model_config

    try:
        cfg = load_params(params, overrides or []).pretrain
        manifest = Paths(raw, workdir).tokens / "shards" / "manifest.json"
        if manifest.is_file():
            vocab = json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
        else:  # before `fm shard`: the preset's vocabulary
            vocab = PRESETS[cfg.preset].vocab_size if cfg.preset in PRESETS else 0
            console.print(f"[dim]{manifest} not found: vocab_size {vocab} from preset {cfg.preset}[/]")
        print_plan(make_plan(cfg, model_config(cfg, vocab)), Console())
    except _user_errors() as e:
        console.print(f"[red]error[/] (plan): {e}", soft_wrap=True)
        raise typer.Exit(1)


_register_stage_commands()


def main() -> None:  # python -m fm
    app(prog_name="fm")


if __name__ == "__main__":
    sys.exit(main())
