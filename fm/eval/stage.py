"""The `evaluate` stage: every model of the run on held-out data, each figure with its chance level or baseline.

    fm evaluate                     # last in the DAG: reads 06_models/ and 07_export/, writes 08_reports/

Models (what exists of them): pretrained, each sft method, the student, and the exported int8 graphs
of the student, the teacher and the pruned student (scored through fm.export.onnx.OnnxLM, each file
checked against 07_export/report.json). Metrics:
    perplexity       fm.eval.perplexity: held-out documents of pretraining's validation split in windows of
                     evaluate.ppl_window tokens (evaluate.ppl_windows_per_group per group), token-weighted
                     perplexity overall and per modality, source and language; the same windows for every model
    in-context       fm.eval.icl: held-out knowledge (capital, currency, language) and definition (hypernym)
    learning         items as plain-text multiple choice with k demonstrations for each k of evaluate.kshot
                     (GPT-3's zero/one/few-shot), and with the top evaluate.rag_top_k triples BM25 retrieves
                     from the curated triples before the question, beside the closed-book score, also on the
                     facts no stage trained on (evaluate.icl_models only: it costs a pass per k)
    knowledge        fm.eval.knowledge: held-out facts pretraining saw only as triples against matched facts
    injection        it never saw (instructions.knowledge_probe withheld them), as a triple cloze and as the
                     instruction; the gap with its bootstrap interval, and how often pretraining drew the triples
    bias             fm.eval.bias: templated English and Chinese minimal pairs (occupation x gendered
                     pronoun, age), the log-likelihood gap per axis and language with its spread
                     (evaluate.bias)
    instruction QA   held-out multiple-choice items (05_instructions/heldout.parquet, evaluate.qa_items of
                     them, the same for every model), scored by log-likelihood with the chat template
                     (fm.eval.choice), overall and per task; chance beside it
    clip, caption    the held-out figures their stages measured (06_models/{clip,caption}/summary.json):
                     retrieval R@1/5/10, zero-shot accuracy, caption perplexity with and without the image
    export           parity gates, held-out perplexity and int8 agreement from 07_export/report.json
Torch models are scored through their oneDNN CPU copy (fm.models.inference; the same figures to ~1e-6).

Writes (atomically, all or nothing):
    08_reports/metrics.json   {"models": {name: {"params", "kind", "metrics": {...}}}, "clip", "caption", "export"}
    08_reports/metrics.csv    one row per (model, metric, split): value and chance/baseline (the registry's
                              `eval_metrics` table, fm.duckdb, and its per-run `run_metrics` for `fm compare`)
    08_reports/report.html    one self-contained page with every figure inline (fm.eval.report)
    07_export/MODEL_CARD.md   beside the exported model: data and licenses, sizes, settings, metrics (fm.eval.model_card)
Every score is batch-size independent (fm.eval.choice sorts, pads right and scores only real positions).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from fm.config import EvaluateConfig
from fm.data.shards import load_manifest
from fm.io import atomic_dir, sha256_file, write_json
from fm.paths import Paths


def load_models(paths: Paths) -> dict:
    """{name: (module, tokenizer, kind)} of every model the run produced that fm can score; kind is torch or onnx."""
    from fm.data.tokenizer import open_tokenizer
    from fm.export.onnx import OnnxLM
    from fm.models.pretrained import load_pretrained, load_tuned

    models: dict = {}
    if (paths.models / "pretrain" / "model.safetensors").is_file():
        models["pretrained"] = (*load_pretrained(paths.models / "pretrain"), "torch")
    sft_dir = paths.models / "sft" / "models"
    for folder in sorted(p for p in sft_dir.glob("*") if (p / "model.safetensors").is_file()) if sft_dir.is_dir() else []:
        models[f"sft_{folder.name}"] = (*load_tuned(folder), "torch")
    if (paths.models / "student" / "model.safetensors").is_file():
        models["student"] = (*load_pretrained(paths.models / "student"), "torch")
    export_dir = paths.workdir / "07_export"
    report_path = export_dir / "report.json"
    if report_path.is_file():
        files = json.loads(report_path.read_text())["files"]
        tokenizer_path = export_dir / "hf" / "tokenizer.json"
        tokenizer = open_tokenizer(tokenizer_path) if tokenizer_path.is_file() else None
        listed = files.get("hf/tokenizer.json", {}).get("sha256")
        if tokenizer is not None and sha256_file(tokenizer_path) != listed:  # the graphs' ids are this tokenizer's
            raise ValueError(f"{tokenizer_path} is not the tokenizer {report_path} lists (its sha256 differs): it is "
                             f"damaged or was changed after export; rerun `fm export`")
        for name, prefix in (("student_int8", ""), ("teacher_int8", "teacher/"), ("pruned_int8", "pruned/")):
            rel = f"{prefix}onnx/prefill.int8.onnx"
            if rel in files and tokenizer is not None:
                models[name] = (OnnxLM(export_dir / rel, files[rel]["sha256"]), tokenizer, "onnx")
    if not models:
        raise FileNotFoundError(f"{paths.models} holds no model: run the pipeline up to `fm export` first")
    return models


def _icl_summary(res: dict) -> dict:
    """The headline figures of a k-shot or retrieval result (not its per-item scores)."""
    return {k: res[k] for k in ("n", "accuracy", "accuracy_norm", "chance", "groups", "per_task", "shots_mean")
            if k in res}


def _rag_by_exposure(rag: dict, withheld: set[str]) -> dict:
    """Open- and closed-book accuracy of the retrieval run on the items whose fact no stage trained on (withheld)
    and on the rest: retrieval can supply what the weights never held."""
    out = {}
    for name, chosen in (("unseen", lambda fact: fact in withheld), ("seen_or_trained", lambda fact: fact not in withheld)):
        pairs = [(o, c) for o, c in zip(rag["items"], rag["closed_book"]["items"]) if chosen(o["fact_id"])]
        if pairs:
            out[name] = {"n": len(pairs),
                         "accuracy": sum(o["prediction"] == o["answer_index"] for o, _ in pairs) / len(pairs),
                         "closed_book_accuracy": sum(c["prediction"] == c["answer_index"] for _, c in pairs) / len(pairs)}
    return out


def fast_copy(module):
    """The oneDNN CPU copy of a torch model (fm.models.inference: the same scores to ~1e-6, 1.4-1.7x faster on
    batches), or the model itself where that copy cannot be made."""
    from fm.models.inference import cpu_inference_copy

    try:
        return cpu_inference_copy(module)
    except ValueError:
        return module


def _params(module, kind: str) -> int:
    if kind == "onnx":
        return module.cfg.num_params()
    return sum(p.numel() for p in module.parameters())


def evaluate(cfg: EvaluateConfig, paths: Paths) -> dict:
    """Score every model; write 08_reports/metrics.json and metrics.csv."""
    from fm.data.chat import ChatTemplate
    from fm.eval.bias import bias_probe
    from fm.eval.model_card import write_model_card
    from fm.eval.report import write_report
    from fm.eval.choice import model_max_len
    from fm.eval.icl import TASK_GROUPS, build_retriever, kshot_curve, rag_multiple_choice
    from fm.eval.knowledge import knowledge_injection, pretraining_exposure, probe_items
    from fm.eval.perplexity import build_eval_set, heldout_split, perplexity_by_group, torch_logits_fn
    from fm.recipes.sft import evaluate_qa, sample_items

    start = time.perf_counter()
    heldout_path = paths.instructions / "heldout.parquet"
    if not heldout_path.is_file():
        raise FileNotFoundError(f"{heldout_path} not found: run `fm instructions` first")
    heldout_rows = pq.read_table(heldout_path).to_pylist()
    items = sample_items(heldout_rows, cfg.qa_items, cfg.seed)  # every task, every model
    manifest = load_manifest(paths.tokens / "shards") if (paths.tokens / "shards" / "manifest.json").is_file() else None
    codes = manifest["codes"]["modality"] if manifest else []
    report: dict = {"stage": "evaluate", "models": {}}
    # In-context learning (GPT-3 style, plain text): held-out knowledge and definition items, demonstrations
    # from the training rows of the same task; retrieval over the curated triples.
    groups = {task for tasks in TASK_GROUPS.values() for task in tasks}
    icl_items = [item for tasks in TASK_GROUPS.values()  # the same number from each group (held-out is mostly hypernyms)
                 for item in sample_items([r for r in heldout_rows if r["task"] in tasks],
                                          cfg.icl_items // len(TASK_GROUPS), cfg.seed)] if cfg.icl_items else []
    demos = [r for r in pq.read_table(paths.instructions / "train.parquet").to_pylist()
             if r["task"] in groups and r.get("options")] if icl_items else []
    triples_path = paths.curated / "triples.parquet"
    triples = pq.read_table(triples_path).to_pylist() if triples_path.is_file() else []
    retriever = build_retriever(triples) if icl_items and triples else None
    # Knowledge injection: held-out facts pretraining saw only as triples against matched withheld ones.
    withheld_path = paths.instructions / "withheld.parquet"
    withheld = set(pq.read_table(withheld_path, columns=["fact_id"])["fact_id"].to_pylist()) \
        if withheld_path.is_file() else set()
    facts = probe_items(heldout_rows, triples, withheld, cfg.knowledge_items, cfg.seed) if withheld else []
    if facts:
        report["knowledge_set"] = {
            "items": len(facts), **{g: sum(i["group"] == g for i in facts) for g in ("seen", "unseen")},
            "withheld_facts": len(withheld),
            "exposure": pretraining_exposure(paths.models / "pretrain", manifest) if manifest else None}
    else:
        report["knowledge_set"] = {"skipped": "no withheld fact (instructions.knowledge_probe = 0 or no held-out "
                                              "triple fact)" if not withheld else "evaluate.knowledge_items = 0"}
    report["icl_set"] = {"items": len(icl_items), "demonstration_pool": len(demos), "kshot": list(cfg.kshot),
                         "groups": {g: list(t) for g, t in TASK_GROUPS.items()}}
    eval_set = None
    if cfg.ppl_windows_per_group and manifest and (paths.models / "pretrain" / "config.json").is_file():
        try:
            eval_set = build_eval_set(paths.tokens / "shards", **heldout_split(paths.models / "pretrain"),
                                      seq_len=cfg.ppl_window, max_windows_per_group=cfg.ppl_windows_per_group)
            report["perplexity_set"] = {"windows": int(len(eval_set.inputs)), "seq_len": eval_set.seq_len,
                                        "groups": eval_set.group_names, "sha256": eval_set.digest}
        except ValueError as e:  # a corpus too small to hold out a window: said in the report, not fatal
            report["perplexity_set"] = {"skipped": str(e)}
    for name, (module, tokenizer, kind) in load_models(paths).items():
        began = time.perf_counter()
        entry = {"kind": kind, "params": _params(module, kind), "metrics": {}}
        if kind == "torch":
            module = fast_copy(module)
        if items:  # domain ids route a domain-routed MoE; an ONNX graph (dense only) takes ids alone
            entry["metrics"]["instruction_qa"] = evaluate_qa(module, ChatTemplate(tokenizer), items,
                                                             codes if kind == "torch" else None)
        if eval_set is not None and model_max_len(module) >= eval_set.seq_len:
            ppl = perplexity_by_group(torch_logits_fn(module), eval_set, cfg.batch_size)
            entry["metrics"]["perplexity"] = {key: ppl[key] for key in ("overall", "modality", "source", "lang", "groups")}
        if facts:
            known = knowledge_injection(module, tokenizer, facts, model_max_len(module), cfg.batch_size, cfg.seed)
            entry["metrics"]["knowledge"] = {fmt: {k: v for k, v in known[fmt].items() if k != "predictions"}
                                             for fmt in ("cloze", "qa")}
        if name in cfg.icl_models and icl_items:
            curve = kshot_curve(module, tokenizer, icl_items, demos, list(cfg.kshot), model_max_len(module),
                                cfg.batch_size, cfg.seed)
            entry["metrics"]["icl"] = {str(k): _icl_summary(r) for k, r in curve.items()}
            if retriever is not None and cfg.rag_top_k:
                rag = rag_multiple_choice(module, tokenizer, icl_items, retriever, cfg.rag_top_k, model_max_len(module),
                                          cfg.batch_size, seed=cfg.seed, closed_book=curve.get(0))  # 0-shot = closed
                entry["metrics"]["rag"] = {**_icl_summary(rag), "top_k": cfg.rag_top_k,
                                           "recall_at_k": rag["recall_at_k"], "facts_mean": rag.get("facts_mean"),
                                           "closed_book": _icl_summary(rag["closed_book"]),
                                           "by_exposure": _rag_by_exposure(rag, withheld)}
        if cfg.bias:
            probe = bias_probe(module, tokenizer, model_max_len(module), cfg.batch_size)
            entry["metrics"]["bias"] = {axis: {lang: {k: v for k, v in figures.items() if k != "per_item"}
                                               for lang, figures in by_lang.items() if isinstance(figures, dict)}
                                        for axis, by_lang in probe["axes"].items()}
            entry["bias_per_item"] = {axis: {lang: figures["per_item"] for lang, figures in by_lang.items()
                                             if isinstance(figures, dict) and "per_item" in figures}
                                      for axis, by_lang in probe["axes"].items()}
        entry["seconds"] = round(time.perf_counter() - began, 2)
        report["models"][name] = entry
    for name in ("clip", "caption"):
        path = paths.models / name / "summary.json"
        if path.is_file():
            report[name] = json.loads(path.read_text())
    export_report = paths.workdir / "07_export" / "report.json"
    if export_report.is_file():
        exported = json.loads(export_report.read_text())
        report["export"] = {name: {k: entry[k] for k in ("gates", "heldout_perplexity", "int8", "parameters")
                                   if k in entry} for name, entry in exported["models"].items()}
    report["seconds"] = round(time.perf_counter() - start, 2)
    out = paths.workdir / "08_reports"
    with atomic_dir(out) as tmp:
        write_json(report, tmp / "metrics.json")
        (tmp / "metrics.csv").write_text(metrics_csv(report), encoding="utf-8")
    # The page and the card read what was just published (each written atomically; a failure here fails the
    # stage, which is then not recorded and reruns whole).
    write_report(paths.workdir, out / "report.html")
    _publish_artifact("# fm evaluate\n\n" + summary_markdown(report) + f"\nReport: {out / 'report.html'}\n")
    card = write_model_card(paths.workdir, paths.workdir / "07_export" / "MODEL_CARD.md")
    qa = {name: e["metrics"]["instruction_qa"]["accuracy"] for name, e in report["models"].items()
          if "instruction_qa" in e["metrics"]}
    chance = next(iter(e["metrics"]["instruction_qa"]["chance"] for e in report["models"].values()
                       if "instruction_qa" in e["metrics"]), None)
    return {"stage": "evaluate", "models": len(report["models"]), "qa_accuracy": qa, "qa_chance": chance,
            "seconds": report["seconds"], "outputs": [str(out), str(out / "report.html"), str(card)]}


def summary_markdown(report: dict) -> str:
    """The headline table of an evaluation as Markdown: per model its size, instruction QA (chance beside),
    held-out perplexity, k-shot accuracies and retrieval; what `fm run` prints at its end and the Prefect
    artifact holds."""
    shots = [str(k) for k in report.get("icl_set", {}).get("kshot", [])]
    head = ["model", "params", "QA (chance)", "held-out ppl", *[f"{k}-shot" for k in shots], "retrieval (closed book)",
            "facts seen / unseen (cloze)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in report["models"].items():
        m = entry["metrics"]
        qa = m.get("instruction_qa")
        ppl = m.get("perplexity", {}).get("overall", {}).get("perplexity")
        icl, rag = m.get("icl", {}), m.get("rag")
        cloze = m.get("knowledge", {}).get("cloze")
        cells = [name, f"{entry['params'] / 1e6:.2f}M",
                 f"{qa['accuracy']:.3f} ({qa['chance']:.2f})" if qa else "-", f"{ppl:.1f}" if ppl else "-",
                 *[f"{icl[k]['accuracy']:.3f}" if k in icl else "-" for k in shots],
                 f"{rag['accuracy']:.3f} ({rag['closed_book']['accuracy']:.3f})" if rag else "-",
                 f"{cloze['seen']['accuracy']:.3f} / {cloze['unseen']['accuracy']:.3f}"
                 if cloze and cloze["seen"]["accuracy"] is not None and cloze["unseen"]["accuracy"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _publish_artifact(markdown: str) -> None:
    """A Prefect markdown artifact of the summary when the stage runs as a Prefect task (fm run, fm serve)."""
    try:
        from prefect.artifacts import create_markdown_artifact
        from prefect.context import TaskRunContext
    except ImportError:
        return
    if TaskRunContext.get() is not None:
        create_markdown_artifact(markdown=markdown, key="fm-evaluation", description="fm evaluate: every model, held-out")


def metric_rows(report: dict) -> list[dict]:
    """The long table of metrics.json: model, metric, split, value, baseline (chance or the reference figure)."""
    rows = []
    for model, entry in report["models"].items():
        qa = entry["metrics"].get("instruction_qa")
        if qa:
            rows.append({"model": model, "metric": "instruction_qa_accuracy", "split": "heldout",
                         "value": qa["accuracy"], "baseline": qa["chance"]})
            rows.append({"model": model, "metric": "instruction_qa_accuracy_norm", "split": "heldout",
                         "value": qa["accuracy_norm"], "baseline": qa["chance"]})
            for task, t in qa["by_task"].items():
                rows.append({"model": model, "metric": f"instruction_qa_accuracy.{task}", "split": "heldout",
                             "value": t["accuracy"], "baseline": None})
        ppl = entry["metrics"].get("perplexity")
        if ppl:
            rows.append({"model": model, "metric": "perplexity", "split": "heldout", "value": ppl["overall"]["perplexity"],
                         "baseline": None})
            for key in ("modality", "lang"):
                for value, figures in ppl[key].items():
                    rows.append({"model": model, "metric": f"perplexity.{key}.{value}", "split": "heldout",
                                 "value": figures["perplexity"], "baseline": None})
        for k, res in entry["metrics"].get("icl", {}).items():
            rows.append({"model": model, "metric": f"icl_accuracy.{k}shot", "split": "heldout", "value": res["accuracy"],
                         "baseline": res["chance"]})
        for fmt, res in entry["metrics"].get("knowledge", {}).items():
            for group in ("seen", "unseen"):
                if res[group]["accuracy"] is not None:
                    rows.append({"model": model, "metric": f"knowledge_{fmt}_accuracy.{group}", "split": "probe",
                                 "value": res[group]["accuracy"], "baseline": res["chance"]})
            if res.get("gap") is not None:
                rows.append({"model": model, "metric": f"knowledge_{fmt}_gap", "split": "probe", "value": res["gap"],
                             "baseline": 0.0})
        rag = entry["metrics"].get("rag")
        if rag:
            rows.append({"model": model, "metric": f"rag_accuracy.top{rag['top_k']}", "split": "heldout",
                         "value": rag["accuracy"], "baseline": rag["closed_book"]["accuracy"]})
            unseen = rag.get("by_exposure", {}).get("unseen")
            if unseen:
                rows.append({"model": model, "metric": f"rag_accuracy.top{rag['top_k']}.unseen", "split": "heldout",
                             "value": unseen["accuracy"], "baseline": unseen["closed_book_accuracy"]})
            rows.append({"model": model, "metric": f"rag_recall.top{rag['top_k']}", "split": "heldout",
                         "value": rag["recall_at_k"], "baseline": None})
        for axis, by_lang in entry["metrics"].get("bias", {}).items():
            for lang, figures in by_lang.items():
                for key in ("mean_gap", "stereotype_effect"):
                    if key in figures:
                        rows.append({"model": model, "metric": f"bias.{axis}.{lang}.{key}", "split": "probe",
                                     "value": figures[key], "baseline": 0.0})
    for name, entry in report.get("export", {}).items():
        for gate, g in entry.get("gates", {}).items():
            rows.append({"model": f"{name}_export", "metric": gate, "split": "heldout", "value": g["value"],
                         "baseline": g["limit"]})
        for runtime, ppl in entry.get("heldout_perplexity", {}).items():
            rows.append({"model": f"{name}_{runtime}", "metric": "perplexity", "split": "heldout", "value": ppl,
                         "baseline": None})
    return rows


def metrics_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["model", "metric", "split", "value", "baseline"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(metric_rows(report))
    return buffer.getvalue()


def read_metrics(out_dir: Path) -> dict:
    """08_reports/metrics.json (ValueError naming it when missing or unreadable)."""
    path = out_dir / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is missing or unreadable ({e}): rerun `fm evaluate`") from None
