"""The `fm` command line.

    fm ingest | validate | curate | tokenize | shard | pretrain   run one stage (what dvc.yaml calls)
    fm run                                       the pipeline as a Prefect flow (ephemeral API)
    fm serve                                     Prefect server + deployments (UI reruns, schedule)
    fm stages                                    the stages, their upstream stages and params sections
    fm plan                                      rank map and memory per rank of the pretrain layout
    fm dvc-yaml                                  write (or --check) dvc.yaml from the stage table
    fm registry                                  rebuild the run registry (fm.duckdb) from the outputs
    fm runs                                      the runs the registry recorded
    fm compare RUN_A RUN_B                       metric differences between two evaluated runs

Every command takes --raw DIR, --workdir DIR, --params FILE and repeatable --set
section.key=value overrides; params.yaml stays the single source of settings. Default paths
are those of the project (the folder holding dvc.yaml) around the current directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fm.config import describe_section
from fm.dvcstate import DVC_PARAMS, DVC_RAW, DVC_WORKDIR, RunContext, find_root
from fm.summary import print_summary

app = typer.Typer(
    help="fm: a foundation-model factory. Raw corpora in; curated data, tokenizer, token shards and a "
         "pretrained model out, through one pipeline that Prefect (fm run, fm serve) and DVC (dvc repro) both run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

RawOpt = Annotated[Optional[Path], typer.Option("--raw", help=f"Raw corpus folder (text/, code/, image_text/, triples/). (default: <project>/{DVC_RAW})", show_default=False)]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", help=f"Where layers 02_ingested .. 08_reports are written. (default: <project>/{DVC_WORKDIR})", show_default=False)]
ParamsOpt = Annotated[Optional[Path], typer.Option("--params", help=f"The params file: one section per stage. (default: <project>/{DVC_PARAMS})", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a setting for this run, e.g. --set curate.jaccard_threshold=0.7 or "
                               "--set pretrain.model.n_layer=2 (repeatable)."),
]


def run_context(raw: Path | None, workdir: Path | None, params: Path | None, overrides: list[str] | None) -> RunContext:
    """Fill unset paths from the project around the current directory (else the current directory)."""
    root = find_root(Path.cwd()) or Path.cwd()
    rel = lambda p: os.path.relpath(p) if Path(p).is_absolute() and Path(p).is_relative_to(Path.cwd()) else str(p)  # noqa: E731
    return RunContext(rel(raw or root / DVC_RAW), rel(workdir or root / DVC_WORKDIR), rel(params or root / DVC_PARAMS),
                      tuple(overrides or ()))


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error (errors are one line otherwise).")] = False,
) -> None:
    if debug:
        os.environ["FM_DEBUG"] = "1"


def _user_errors() -> tuple[type[BaseException], ...]:
    from fm.runner import USER_ERRORS

    return USER_ERRORS


def fail(where: str, e: BaseException) -> typer.Exit:
    """One line naming what failed (the path and the cause for an OSError); the traceback with --debug."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        text = str(e) or type(e).__name__
    console.print(f"[red]error[/] ({where}): {escape(text)}", soft_wrap=True, highlight=False)
    if os.environ.get("FM_DEBUG"):
        console.print_exception()
    elif isinstance(e, OSError):
        console.print("  (fm --debug ... shows the traceback)", style="dim")
    return typer.Exit(1)


def _params_epilog(stage) -> str:
    """The params keys a stage reads, with their values and comments from params.yaml."""
    root = find_root(Path.cwd()) or Path.cwd()
    lines = []
    for section in stage.sections:
        try:
            described = describe_section(section, root / DVC_PARAMS)
        except ValueError:  # a broken params.yaml must not break --help
            described = describe_section(section, Path("/nonexistent"))
        for key, value, comment in described:
            lines.append(f"  {section}.{key} = {value!r}" + (f"   # {comment}" if comment else ""))
    ups = ", ".join(stage.upstream) or "none"
    return (f"Upstream stages: {ups}.  Settings read (params.yaml; override with --set section.key=value):\n\n"
            + "\n".join(lines))


def _stage_command(name: str):
    from fm.stages import STAGES

    stage = STAGES[name]

    def command(
        raw: RawOpt = None,
        workdir: WorkdirOpt = None,
        params: ParamsOpt = None,
        overrides: SetOpt = None,
        force: bool = False,
    ) -> None:
        from fm.lock import workdir_lock
        from fm.runner import execute_stage, recover

        ctx = run_context(raw, workdir, params, overrides)
        try:
            ctx.params()
            with workdir_lock(ctx.workdir, f"fm {name}"):
                recover(ctx.paths)
                summary = execute_stage(name, ctx, force=force, skip_current=False)
        except _user_errors() as e:
            raise fail(name, e)
        print_summary(summary, console)

    command.__doc__ = stage.help
    # --force only means something for a training stage (a data stage run by hand always runs)
    command.__annotations__["force"] = Annotated[bool, typer.Option(
        "--force", help="Train from scratch (existing checkpoints are set aside).", hidden=not stage.trains)]
    return command


def _register_stage_commands() -> None:
    from fm.stages import STAGES

    for stage in STAGES.values():
        app.command(name=stage.name, help=stage.help, epilog=_params_epilog(stage),
                    context_settings={"max_content_width": 160})(_stage_command(stage.name))


@app.command("stages")
def list_stages() -> None:
    """List the pipeline stages in order, with their upstream stages and params sections."""
    from fm.stages import STAGES

    rows = [(s.name, ",".join(s.upstream) or "-", ",".join(s.sections), s.help) for s in STAGES.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for name, ups, sections, text in rows:
        typer.echo(f"{name:{widths[0]}s}  after {ups:{widths[1]}s}  params {sections:{widths[2]}s}  {text}")


@app.command("run")
def run(
    raw: RawOpt = None,
    workdir: WorkdirOpt = None,
    params: ParamsOpt = None,
    overrides: SetOpt = None,
    stages: Annotated[Optional[list[str]], typer.Option("--stage", help="Run only these stages (repeatable).")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Run this stage and everything downstream of it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun stages that dvc.lock records as up to date; training stages start from scratch.")] = False,
) -> None:
    """Run the pipeline as a Prefect flow (ephemeral local API: no server to start).

    Stages that dvc.lock records as up to date (same code, params and inputs) are skipped; a --set
    override reruns only the stages whose params sections it changes (and what is downstream of them)."""
    from fm.stages import validate_names

    ctx = run_context(raw, workdir, params, overrides)
    try:  # fail on a bad stage name or setting before Prefect starts
        validate_names(list(stages or []) + ([from_stage] if from_stage else []))
        ctx.params()
    except ValueError as e:
        raise fail("run", e)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.pipeline import pipeline

    try:
        summaries = pipeline(raw=ctx.raw, workdir=ctx.workdir, params_file=ctx.params_file,
                             overrides=list(ctx.overrides), stages=stages, from_stage=from_stage, force=force)
    except _user_errors() as e:
        raise fail("run", e)
    for summary in summaries:
        line = f"{summary['stage']:10s} {summary.get('status', 'ran'):8s}"
        if summary.get("status") != "skipped":
            line += f" {summary.get('seconds', 0):7.1f} s"
        console.print(line + (f"  {summary['note']}" if summary.get("note") else ""), soft_wrap=True)
    metrics = ctx.paths.workdir / "08_reports" / "metrics.json"
    if metrics.is_file() and any(s["stage"] == "evaluate" for s in summaries):
        import json

        from fm.eval.stage import summary_markdown

        print("\n" + summary_markdown(json.loads(metrics.read_text())), end="")  # Markdown: readable, and pastes as a table
        console.print(f"report: {metrics.parent / 'report.html'}", soft_wrap=True)


@app.command("serve")
def serve(
    raw: RawOpt = None,
    workdir: WorkdirOpt = None,
    params: ParamsOpt = None,
    host: Annotated[str, typer.Option(help="Interface of the Prefect server fm starts (loopback unless you mean to expose it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the Prefect server fm starts.")] = 4200,
) -> None:
    """Serve the pipeline in the Prefect UI: one deployment for the whole pipeline (on the cron
    schedule of params.yaml's `schedule` section when enabled) and one per stage.

    Connects to PREFECT_API_URL when it is set; otherwise starts a Prefect server on HOST:PORT and
    prints the UI address. Ctrl-C stops the deployments (and the server fm started)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.serve import serve_deployments

    ctx = run_context(raw, workdir, params, None)
    try:
        schedule = ctx.params().schedule
        serve_deployments(ctx, schedule, host=host, port=port, say=lambda m: console.print(m, soft_wrap=True))
    except (ValueError, RuntimeError, OSError) as e:
        raise fail("serve", e)


@app.command("dvc-yaml")
def dvc_yaml(
    check: Annotated[bool, typer.Option("--check", help="Only compare: exit 1 when dvc.yaml differs from the stage table.")] = False,
) -> None:
    """Write dvc.yaml from the stage table (fm/stages.py): stages, code deps, params, outs, metrics, plots."""
    from fm.dvcstate import render_dvc_yaml
    from fm.io import atomic_path

    root = find_root(Path.cwd()) or Path.cwd()
    path, text = root / "dvc.yaml", render_dvc_yaml()
    current = path.read_text(encoding="utf-8") if path.is_file() else ""
    if check:
        if current != text:
            console.print(f"[red]{path} differs from the stage table[/]: run `fm dvc-yaml`")
            raise typer.Exit(1)
        console.print(f"{path} matches the stage table")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    console.print(f"wrote {path}" + (" (unchanged)" if current == text else ""))


@app.command("registry")
def registry_cmd(workdir: WorkdirOpt = None) -> None:
    """Rebuild the run registry (<workdir>/fm.duckdb) tables from the stage outputs, e.g. after `dvc pull`."""
    from fm.registry import refresh

    ctx = run_context(None, workdir, None, None)
    try:
        built = refresh(ctx.paths)
    except _user_errors() as e:  # an output it cannot read, named
        raise fail("registry", e)
    console.print(f"{ctx.paths.duckdb}: rebuilt {', '.join(built) or 'no tables (no outputs yet)'}")


@app.command("runs")
def runs_cmd(
    limit: Annotated[int, typer.Option(help="How many runs to list, newest first.")] = 20,
    stages: Annotated[Optional[str], typer.Option("--stages", metavar="RUN_ID", help="Instead, list the stages of this "
                      "run (an id, a unique prefix, `latest` or `latest~N`): status, seconds, output hashes.")] = None,
    workdir: WorkdirOpt = None,
) -> None:
    """List the runs recorded in the registry (<workdir>/fm.duckdb): id, seconds, stages ran/skipped/failed, metrics."""
    from fm.registry import list_runs, run_stages

    ctx = run_context(None, workdir, None, None)
    if stages is not None:
        try:
            rows = run_stages(ctx.paths, stages)
        except ValueError as e:
            raise fail("runs", e)
        table = Table(caption=f"run {rows[0]['run_id']}; outputs: the first 12 hex digits of their hashes")
        for name in ("stage", "status", "seconds", "recorded", "outputs"):
            table.add_column(name, no_wrap=name != "outputs", overflow="fold")
        for r in rows:
            outputs = "\n".join(f"{out} {(sha or 'missing')[:12]}" for out, sha in (r["outputs"] or {}).items()) or "-"
            table.add_row(r["stage"], r["status"], f"{r['seconds']:.1f}", "yes" if r["recorded"] else "no", outputs)
        console.print(table)
        return
    rows = list_runs(ctx.paths, limit)
    if not rows:
        console.print(f"no runs recorded in {ctx.paths.duckdb} yet: `fm run` records one")
        return
    table = Table(caption="run id = its UTC start (YYYYMMDD-HHMMSS) and 4 random hex digits")
    for name in ("run", "seconds", "ran", "skipped", "failed", "metrics"):
        table.add_column(name, no_wrap=True)
    for r in rows:
        table.add_row(r["run_id"], f"{r['seconds']:.1f}", str(r["ran"]), str(r["skipped"]), str(r["failed"]),
                      str(r["metrics"]))
    console.print(table)


@app.command("compare")
def compare_cmd(
    run_a: Annotated[str, typer.Argument(help="A run id (or a unique prefix), `latest` or `latest~N` (N evaluated runs back).")],
    run_b: Annotated[str, typer.Argument(help="The run to set against it, the same way.")],
    all_rows: Annotated[bool, typer.Option("--all", help="Also the metrics that did not change.")] = False,
    workdir: WorkdirOpt = None,
) -> None:
    """Print the metric differences between two evaluated runs (b - a), from the registry's run_metrics."""
    from fm.registry import compare_runs

    ctx = run_context(None, workdir, None, None)
    try:
        a, b, rows = compare_runs(ctx.paths, run_a, run_b)
    except ValueError as e:
        raise fail("compare", e)
    table = Table(caption=f"a = {a}, b = {b}")
    for name in ("model", "metric", "split", "a", "b", "b - a"):
        table.add_column(name, no_wrap=name != "metric", overflow="fold")
    shown = 0
    for r in rows:
        if not all_rows and r["a"] is not None and r["b"] is not None and abs(r["diff"]) < 1e-12:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
        table.add_row(r["model"], r["metric"], r["split"], fmt(r["a"]), fmt(r["b"]), fmt(r["diff"]))
        shown += 1
    console.print(table if shown else f"{a} and {b}: every metric is the same ({len(rows)} compared)")


def metrics_pivot(rows: list[dict], grep: str = "") -> str:
    """metrics.csv rows as one Markdown table: a row per (metric, split), a column per model, the baseline last
    (the one value every model shares, or "per model" when they differ)."""
    rows = [r for r in rows if grep in r["metric"]]
    models = list(dict.fromkeys(r["model"] for r in rows))  # those with a metric in the table
    keys = list(dict.fromkeys((r["metric"], r["split"]) for r in rows))
    cell = {(r["metric"], r["split"], r["model"]): r for r in rows}
    fmt = lambda v: "" if v in (None, "") else f"{float(v):.4g}"  # noqa: E731
    lines = ["| metric | split | " + " | ".join(models) + " | baseline |", "|---|---|" + "---|" * (len(models) + 1)]
    for metric, split in keys:
        got = [cell.get((metric, split, m)) for m in models]
        baselines = {fmt(r["baseline"]) for r in got if r is not None}
        base = baselines.pop() if len(baselines) == 1 else "per model"
        lines.append(f"| {metric} | {split} | " + " | ".join(fmt(r["value"]) if r else "" for r in got) + f" | {base} |")
    return "\n".join(lines) + "\n"


@app.command("metrics")
def metrics_cmd(
    grep: Annotated[str, typer.Option("--grep", help="Only the metrics whose name contains this text, e.g. knowledge.")] = "",
    workdir: WorkdirOpt = None,
) -> None:
    """Print the latest evaluation (08_reports/metrics.csv) as one Markdown table: every metric, every model."""
    import csv
    import json

    ctx = run_context(None, workdir, None, None)
    path = ctx.paths.workdir / "08_reports" / "metrics.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise fail("metrics", e)
    if not rows or not {"model", "metric", "split", "value", "baseline"} <= set(rows[0]):
        raise fail("metrics", ValueError(f"{path} holds no metric rows: rerun `fm evaluate`"))
    try:  # the evaluated models first, then the export's rows (gates, per-runtime perplexity) in a table of their own
        evaluated = set(json.loads((path.parent / "metrics.json").read_text())["models"])
    except (OSError, ValueError, KeyError):
        evaluated = {r["model"] for r in rows}
    tables = [metrics_pivot(part, grep) for part in ([r for r in rows if r["model"] in evaluated],
                                                     [r for r in rows if r["model"] not in evaluated]) if part]
    print("\n".join(t for t in tables if t.count("\n") > 2), end="")


@app.command("plan")
def plan(
    raw: RawOpt = None,
    workdir: WorkdirOpt = None,
    params: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Print the pretrain layout's rank map (dp, pp, tp), weight shards and estimated memory per rank."""
    import json

    from fm.models.decoder import PRESETS
    from fm.plan import plan as make_plan, print_plan
    from fm.recipes.pretrain import model_config

    ctx = run_context(raw, workdir, params, overrides)
    try:
        cfg = ctx.params().pretrain
        manifest = ctx.paths.tokens / "shards" / "manifest.json"
        if manifest.is_file():
            vocab = json.loads(manifest.read_text())["tokenizer"]["vocab_size"]
        else:  # before `fm shard`: the preset's vocabulary
            vocab = PRESETS[cfg.preset].vocab_size if cfg.preset in PRESETS else 0
            console.print(f"[dim]{manifest} not found: vocab_size {vocab} from preset {cfg.preset}[/]")
        print_plan(make_plan(cfg, model_config(cfg, vocab)), Console())
    except _user_errors() as e:
        raise fail("plan", e)


@app.command("generate")
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="An instruction for a tuned model (written with the chat template), or text to continue "
                                                         "(--plain, or a pretrained model).")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help="Caption this PNG or JPEG with the caption model instead (greedy; "
                                                                  "the text options below do not apply).")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Torch model folder. (default: <workdir>/06_models/caption with --image, "
                                                                   "else <workdir>/06_models/sft/models/<sft.teacher>)", show_default=False)] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Generate with the exported ONNX graphs on onnxruntime (CPU) instead of "
                                                      "a torch model: the student, a chat model. Each graph and the tokenizer "
                                                      "(07_export/hf/tokenizer.json) must have the sha256 that 07_export/report.json "
                                                      "lists: a missing or changed file is refused, by name.")] = False,
    onnx_dir: Annotated[Optional[Path], typer.Option("--onnx-dir", help="The folder of the ONNX graphs, beside report.json and hf/ (implies --onnx). "
                                                                        "(default: <workdir>/07_export/onnx)", show_default=False)] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Use the int8 graphs (prefill.int8.onnx, decode.int8.onnx): smaller and faster, "
                                                      "logits a little off the fp32 ones (implies --onnx).")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="The most tokens to write (fewer when the prompt leaves less room in the model's context).")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy, the most likely token every step (the same text every run). Above 0: sample "
                                                    "from softmax(logits / temperature); higher is more varied, below 1 more conservative.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample only among the k most likely tokens (with --temperature > 0).",
                                                 show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling: only among the fewest most likely tokens whose probabilities "
                                                                   "add up to p, in (0, 1]; applied after --top-k (with --temperature > 0).",
                                                   show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sampler: the same seed, model, prompt and options write the same text. "
                                                     "(default: a fresh seed, shown on stderr)", show_default=False)] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="End the text at this token (repeatable): a vocabulary entry such as "
                                                                     "'<|end|>', or text that is one token. The stop token is not written. "
                                                                     "(default: <|end|> and <|endoftext|>)", show_default=False)] = None,
    plain: Annotated[bool, typer.Option("--plain", help="Continue the prompt as plain text, without the chat template. (default: the chat "
                                                    "template for a tuned model (sft or distill in its config.json; --onnx: the student), "
                                                    "plain text for a pretrained one)")] = False,
    lang: Annotated[str, typer.Option(help="The caption's language (--image): en or zh.")] = "en",
    workdir: WorkdirOpt = None,
    params: ParamsOpt = None,
) -> None:
    """Write text for a prompt, streamed as it comes: a response to an instruction (chat template) or a continuation (--plain),
    with a torch model folder or the exported ONNX graphs (--onnx); greedy, or sampled with --temperature. Or caption an
    image (--image)."""
    import json

    import torch

    ctx = run_context(None, workdir, params, None)
    try:
        if (prompt is None) == (image is None):
            raise ValueError("give an instruction or --image PATH (one of them)")
        if image is not None:
            from fm.config import IngestConfig
            from fm.data.images import _decode
            from fm.data.ingest import Rejected, load_image
            from fm.recipes.caption import load_captioner, write_caption

            text_options = {"--onnx": onnx, "--onnx-dir": onnx_dir is not None, "--int8": int8, "--temperature": temperature != 0,
                            "--top-k": top_k is not None, "--top-p": top_p is not None, "--seed": seed is not None,
                            "--stop": bool(stop), "--plain": plain}
            if any(text_options.values()):
                raise ValueError(f"{', '.join(k for k, v in text_options.items() if v)}: for text; --image writes a greedy "
                                 f"caption with the caption model")
            captioner, tokenizer = load_captioner(model or ctx.paths.models / "caption")
            size = captioner.prefix.visual.cfg.image_size
            try:
                _, png, _ = load_image(image, IngestConfig(image_size=size))
            except Rejected as e:
                raise ValueError(f"{image}: {e}") from None
            print(write_caption(captioner, tokenizer, torch.from_numpy(_decode(png, size, str(image))), lang, max_new_tokens))
            return
        from fm.data.chat import END, ChatTemplate
        from fm.generation import TextStreamer, check_sampling

        check_sampling(temperature, top_k, top_p)
        if temperature == 0 and (top_k is not None or top_p is not None):
            raise ValueError("--top-k and --top-p shape sampling: give --temperature > 0 too (0 is greedy)")
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        onnx = onnx or onnx_dir is not None or int8
        if onnx:
            from fm.data.tokenizer import open_tokenizer
            from fm.export.onnx import OnnxGenerator
            from fm.io import sha256_file

            if model is not None:
                raise ValueError("--model is a torch model folder; --onnx reads the exported graphs (--onnx-dir DIR)")
            folder = Path(os.path.abspath(onnx_dir)) if onnx_dir else ctx.paths.workdir / "07_export" / "onnx"
            gen = OnnxGenerator.from_export(folder, int8=int8)  # each graph checked against report.json
            report, tokenizer_path = folder.parent / "report.json", folder.parent / "hf" / "tokenizer.json"
            listed = json.loads(report.read_text()).get("files", {}).get("hf/tokenizer.json", {}).get("sha256")
            if sha256_file(tokenizer_path) != listed:
                raise ValueError(f"{tokenizer_path} is not the tokenizer {report} lists (its sha256 differs): "
                                 f"it is damaged or was changed after export; rerun `fm export`")
            tokenizer, seq_len, chat_model = open_tokenizer(tokenizer_path), gen.seq_len, True  # fm export exports the student
        else:
            from fm.models.decoder import Decoder
            from fm.models.pretrained import load_tuned

            folder = model or ctx.paths.models / "sft" / "models" / ctx.params().sft.teacher
            lm, tokenizer = load_tuned(folder)
            if not isinstance(lm, Decoder):
                raise ValueError(f"{folder} is a prefix- or prompt-tuned model: generate with a full or LoRA model")
            config = json.loads((folder / "config.json").read_text())
            chat_model, seq_len = "sft" in config or "distill" in config, lm.cfg.seq_len  # tuned on the chat template
            try:  # the same logits (to ~1e-6) and tokens, faster on the CPU: fm/models/inference.py
                from fm.models.inference import cpu_inference_copy

                lm = cpu_inference_copy(lm)
            except ValueError:  # no oneDNN in this torch build: the model as it is
                pass

        def token_id(text: str) -> int:
            if (i := tokenizer.token_to_id(text)) is not None:
                return i
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"--stop {text!r} is {len(ids)} tokens: give one token, e.g. '{END}'")
            return ids[0]

        stops = ([token_id(s) for s in stop] if stop else
                 [i for i in (tokenizer.token_to_id(END), tokenizer.token_to_id("<|endoftext|>")) if i is not None])
        if plain or not chat_model:
            ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids = ChatTemplate(tokenizer).encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give some text to continue")
        if len(ids) >= seq_len:
            raise ValueError(f"the prompt is {len(ids)} tokens and the model reads at most {seq_len}: shorten it")
        new_tokens = min(max_new_tokens, seq_len - len(ids))
        generator = torch.Generator()
        if temperature > 0:
            if seed is None:
                seed = generator.seed()  # a fresh one, shown so that the text can be written again
                console.print(f"[dim]seed {seed}[/]", highlight=False)
            generator.manual_seed(seed)

        streamer, stop_set = TextStreamer(tokenizer), set(stops)

        def write(token: int) -> None:  # each token as it is chosen; only whole characters reach the terminal
            if token not in stop_set:
                print(streamer.put(token), end="", flush=True)

        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=stops, generator=generator)
        if onnx:
            gen.generate(ids, new_tokens, on_token=write, **sampling)
        else:
            lm.eval().generate(torch.tensor([ids]), new_tokens, on_token=lambda t: write(int(t[0, 0])), **sampling)
        print(streamer.end(), flush=True)
    except _user_errors() as e:
        raise fail("generate", e)
    except KeyboardInterrupt:  # Ctrl-C while the text streams: end its line, no traceback
        print(flush=True)
        raise typer.Exit(130) from None


_register_stage_commands()


def main() -> None:  # python -m fm
    app(prog_name="fm")


if __name__ == "__main__":
    sys.exit(main())
