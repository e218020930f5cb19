"""The evaluation report: one self-contained HTML page (inline SVG plots, no scripts, no URLs).

    from fm.eval.report import render_report, write_report
    html = render_report(Path("data"))                               # the page as a string
    write_report(Path("data"), Path("data/08_reports/report.html"))  # atomically, beside metrics.json

It reads what the stages left in the work dir, never a model: 08_reports/metrics.json (the evaluate
stage), 06_models/*/loss.csv and summary.json (training curves, distillation latency) and
07_export/report.json. Each section renders from what it finds; a missing input makes that section
say "not run" instead of failing, so a partial pipeline still gets a page. Every quality number
stands beside its chance level or baseline where one exists (chance accuracy of the multiple-choice
sets, k / N for retrieval, zero for a bias gap, the closed-book score for retrieval-augmented QA).

Plots are matplotlib figures saved as SVG with text kept as text (svg.fonttype "none"), so the
page stays small and opens offline in any browser.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from fm.io import atomic_path  # noqa: E402

# Section titles in page order; tests check the page holds each one.
SECTIONS = (
    "Run overview",
    "Training loss curves",
    "Per-domain perplexity",
    "In-context learning and retrieval",
    "Knowledge injection",
    "Quality against size and latency",
    "CLIP retrieval",
    "Captioning",
    "Bias probes",
    "Export gates",
)

# Training stages with a loss.csv, in pipeline order: (title, folder under 06_models).
LOSS_STAGES = (("pretrain", "pretrain"), ("pretrain_clip", "clip"), ("caption", "caption"),
               ("sft", "sft"), ("distill", "student"))

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1rem; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #bbb; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: right; }
th { background: #f0f0f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #555; }
.missing { color: #a33; font-style: italic; }
.pass { color: #176b2c; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
p.note { font-size: .85rem; color: #555; }
"""


# ---- reading -------------------------------------------------------------------------------

def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_loss_csv(path: Path) -> dict[str, dict[str, list[float]]]:
    """A loss.csv as {series: {"step", "loss", "val_step", "val_loss"}}; series is the `method`
    column where there is one (sft writes one file for every method), else "loss"."""
    series: dict[str, dict[str, list[float]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                s = series.setdefault(row.get("method") or "loss",
                                      {"step": [], "loss": [], "val_step": [], "val_loss": []})
                step = float(row["step"])
                if row.get("loss") not in (None, ""):
                    s["step"].append(step)
                    s["loss"].append(float(row["loss"]))
                if row.get("val_loss") not in (None, ""):
                    s["val_step"].append(step)
                    s["val_loss"].append(float(row["val_loss"]))
    except (OSError, KeyError, ValueError):
        return {}
    return series


# ---- formatting ----------------------------------------------------------------------------

def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e6):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}" if abs(x) < 100 else f"{x:,.1f}"
    return str(x)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _e(_fmt(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """Table cell HTML that is already escaped (a pass/fail badge)."""


def _missing(what: str) -> str:
    return f'<p class="missing">not run: {_e(what)}</p>'


def _svg(fig, name: str, caption: str) -> str:
    """A figure as an inline <svg> inside <figure>, without the XML prolog (invalid inside HTML)."""
    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fm-report"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)  # RDF boilerplate, not a picture
    return (f'<figure class="plot" id="fig-{_e(name)}">{svg}'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _models(metrics: dict) -> dict[str, dict]:
    return (metrics or {}).get("models") or {}


def _qa(model: dict) -> dict:
    return (model.get("metrics") or {}).get("instruction_qa") or {}


def _ppl(model: dict) -> dict:
    return (model.get("metrics") or {}).get("perplexity") or {}


# ---- sections ------------------------------------------------------------------------------

def _overview(workdir: Path, metrics: dict | None) -> str:
    models = _models(metrics)
    if not models:
        return _missing("the evaluate stage (08_reports/metrics.json)")
    rows = []
    for name, m in models.items():
        qa = _qa(m)
        rows.append([name, m.get("kind"), m.get("params"), _pct(qa.get("accuracy")), _pct(qa.get("accuracy_norm")),
                     _pct(qa.get("chance")), qa.get("n"), (_ppl(m).get("overall") or {}).get("perplexity"),
                     m.get("seconds")])
    parts = [_table(["model", "kind", "parameters", "QA accuracy", "QA acc. (length-norm.)", "chance", "QA items",
                     "perplexity (all domains)", "eval seconds"], rows)]
    sets = []
    if metrics.get("perplexity_set"):
        p = metrics["perplexity_set"]
        sets.append(f"perplexity set: {p.get('windows')} windows of {p.get('seq_len')} tokens over "
                    f"{len(p.get('groups') or [])} domain groups")
    if metrics.get("icl_set"):
        s = metrics["icl_set"]
        sets.append(f"in-context set: {s.get('items')} items, k-shot {s.get('kshot')}, "
                    f"demonstration pool {s.get('demonstration_pool')}")
    if metrics.get("seconds") is not None:
        sets.append(f"evaluation took {_fmt(metrics['seconds'])} s")
    parts += [f'<p class="note">{_e(s)}</p>' for s in sets]
    return "".join(parts)


def _loss_curves(workdir: Path) -> str:
    found = [(title, read_loss_csv(workdir / "06_models" / folder / "loss.csv")) for title, folder in LOSS_STAGES]
    found = [(t, s) for t, s in found if s]
    missing = [t for t, folder in LOSS_STAGES if t not in {f[0] for f in found}]
    if not found:
        return _missing("no training stage left a loss.csv under 06_models/")
    cols = min(3, len(found))
    rows = math.ceil(len(found) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, found):
        for i, (label, s) in enumerate(series.items()):
            color = f"C{i}"
            ax.plot(s["step"], s["loss"], color=color, lw=1.2, label=f"{label} train" if len(series) > 1 else "train")
            if s["val_loss"]:
                ax.plot(s["val_step"], s["val_loss"], "o--", color=color, ms=4, lw=0.8,
                        label=f"{label} val" if len(series) > 1 else "validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(found):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = _svg(fig, "loss", "Training loss (line) and validation loss (dots) per step, one panel per stage.")
    if missing:
        out += _missing("no loss.csv for " + ", ".join(missing))
    return out


def _domain_perplexity(metrics: dict | None) -> str:
    models = {n: _ppl(m) for n, m in _models(metrics).items() if _ppl(m)}
    if not models:
        return _missing("no perplexity in metrics.json")
    axes_keys = [k for k in ("modality", "source", "lang") if any(p.get(k) for p in models.values())]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(4.4 * len(axes_keys), 4.2), squeeze=False)
    width = 0.8 / len(models)
    for ax, key in zip(axes.flat, axes_keys):
        domains = sorted({d for p in models.values() for d in (p.get(key) or {})})
        for i, (name, p) in enumerate(models.items()):
            vals = [((p.get(key) or {}).get(d) or {}).get("perplexity", float("nan")) for d in domains]
            ax.barh([j + i * width for j in range(len(domains))], vals, height=width, color=f"C{i % 10}", label=name)
        ax.set_yticks([j + width * (len(models) - 1) / 2 for j in range(len(domains))], domains)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a narrow log range overlap
        ax.set_xlabel("perplexity (log scale, lower is better)")
        ax.set_title(f"by {key}")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(models), 5), frameon=False)
    fig.tight_layout(rect=(0, 0.07 * math.ceil(len(models) / 5), 1, 1))
    out = _svg(fig, "perplexity", "Held-out perplexity per domain and model (bars grouped by domain).")
    mods = sorted({d for q in models.values() for d in (q.get("modality") or {})})
    rows = [[name, (p.get("overall") or {}).get("perplexity"), (p.get("overall") or {}).get("tokens")]
            + [((p.get("modality") or {}).get(d) or {}).get("perplexity") for d in mods] for name, p in models.items()]
    out += _table(["model", "perplexity (all)", "tokens"] + [f"ppl {m}" for m in mods], rows)
    out += ('<p class="note">Baseline: a model that guesses uniformly over its vocabulary scores a perplexity '
            'equal to the vocabulary size; lower is better.</p>')
    return out


def _icl(metrics: dict | None) -> str:
    icl = {n: m["metrics"]["icl"] for n, m in _models(metrics).items() if (m.get("metrics") or {}).get("icl")}
    rag = {n: m["metrics"]["rag"] for n, m in _models(metrics).items() if (m.get("metrics") or {}).get("rag")}
    if not icl and not rag:
        return _missing("no in-context (icl) or retrieval (rag) results in metrics.json")
    out = ""
    if icl:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        chance = None
        for i, (name, by_k) in enumerate(icl.items()):
            ks = sorted(by_k, key=lambda k: int(k))
            ax.plot([int(k) for k in ks], [by_k[k]["accuracy"] for k in ks], "o-", color=f"C{i}", label=name)
            chance = next((by_k[k].get("chance") for k in ks if by_k[k].get("chance") is not None), chance)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", label=f"chance {chance:.2f}")
        ax.set_xlabel("demonstrations in the prompt (k)")
        ax.set_ylabel("accuracy")
        ax.set_xticks(sorted({int(k) for by_k in icl.values() for k in by_k}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out += _svg(fig, "kshot", "k-shot curve: multiple-choice accuracy against the number of demonstrations.")
        rows = [[name, k, by_k[k].get("n"), _pct(by_k[k].get("accuracy")), _pct(by_k[k].get("accuracy_norm")),
                 _pct(by_k[k].get("chance"))]
                for name, by_k in icl.items() for k in sorted(by_k, key=lambda k: int(k))]
        out += _table(["model", "k", "items", "accuracy", "acc. (length-norm.)", "chance"], rows)
    else:
        out += _missing("no k-shot results")
    if rag:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = list(rag)
        closed = [(r.get("closed_book") or {}).get("accuracy", float("nan")) for r in rag.values()]
        opened = [r.get("accuracy", float("nan")) for r in rag.values()]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], closed, width=0.4, color="C7", label="closed book")
        ax.bar([x + 0.2 for x in xs], opened, width=0.4, color="C2", label="with retrieved facts")
        chance = next((r.get("chance") for r in rag.values() if r.get("chance") is not None), None)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", label=f"chance {chance:.2f}")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        out += _svg(fig, "rag", "Retrieval-augmented QA against the same questions closed book.")
        rows = [[n, r.get("n"), _pct((r.get("closed_book") or {}).get("accuracy")), _pct(r.get("accuracy")),
                 _pct(r.get("chance")), r.get("top_k"), _pct(r.get("recall_at_k"))] for n, r in rag.items()]
        out += _table(["model", "items", "closed book (baseline)", "with retrieval", "chance", "top k",
                       "retriever recall@k"], rows)
        unseen = [[n, u["n"], _pct(u["closed_book_accuracy"]), _pct(u["accuracy"])]
                  for n, r in rag.items() if (u := (r.get("by_exposure") or {}).get("unseen"))]
        if unseen:
            out += ('<p class="note">The same run on the items whose fact no stage trained on (withheld from '
                    'pretraining and the instruction set): what retrieval adds where the weights cannot know.</p>')
            out += _table(["model", "unseen-fact items", "closed book (baseline)", "with retrieval"], unseen)
    else:
        out += _missing("no retrieval-augmented results")
    return out


def _knowledge(metrics: dict | None) -> str:
    known = {n: m["metrics"]["knowledge"] for n, m in _models(metrics).items() if (m.get("metrics") or {}).get("knowledge")}
    info = (metrics or {}).get("knowledge_set") or {}
    if not known:
        return _missing(f"no knowledge-injection results in metrics.json ({info.get('skipped', 'not run')})")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    names = list(known)
    xs = range(len(names))
    for ax, fmt, title in zip(axes, ("cloze", "qa"), ("triple cloze (the pretraining format)", "instruction (chat)")):
        res = [known[n].get(fmt) or {} for n in names]
        ax.bar([x - 0.2 for x in xs], [(r.get("seen") or {}).get("accuracy") or float("nan") for r in res], 0.4,
               color="C0", label="seen only as triples")
        ax.bar([x + 0.2 for x in xs], [(r.get("unseen") or {}).get("accuracy") or float("nan") for r in res], 0.4,
               color="C7", label="never seen (baseline)")
        chance = next((r.get("chance") for r in res if r.get("chance") is not None), None)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", label=f"chance {chance:.2f}")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = _svg(fig, "knowledge", "Held-out facts pretraining saw only as linearized triples against matched facts "
                                 "no stage saw, per model and format.")
    exposure = info.get("exposure") or {}
    if exposure:
        out += (f'<p class="note">{info.get("seen")} seen and {info.get("unseen")} matched unseen facts '
                f'(the same number per task and language). Pretraining drew about '
                f'{_fmt(exposure.get("triple_tokens_drawn"))} triple tokens of the {_fmt(exposure.get("triple_tokens"))} '
                f'in its shards: each seen triple {_fmt(exposure.get("passes"))} times on average.</p>')
    rows = [[n, fmt, (r.get("seen") or {}).get("n"), _pct((r.get("seen") or {}).get("accuracy")),
             _pct((r.get("unseen") or {}).get("accuracy")), _fmt(r.get("gap")), _interval(r.get("gap_ci")),
             _pct(r.get("chance"))]
            for n, by_fmt in known.items() for fmt, r in by_fmt.items()]
    out += _table(["model", "format", "facts per group", "seen only as triples", "never seen (baseline)",
                   "gap", "95% interval", "chance"], rows)
    return out


def _roles(workdir: Path, metrics: dict | None) -> list[tuple[str, str, dict]]:
    """(role, model name, its metrics entry) for teacher, student, pruned and the int8 graphs."""
    models = _models(metrics)
    summary = _load_json(workdir / "06_models" / "student" / "summary.json") or {}
    teacher = f"sft_{Path(summary['teacher']).name}" if summary.get("teacher") else None
    roles = [("teacher", teacher), ("student", "student"), ("pruned", "pruned"),
             ("teacher int8", "teacher_int8"), ("student int8", "student_int8"), ("pruned int8", "pruned_int8")]
    return [(role, name, models[name]) for role, name in roles if name in models]


def _quality_vs_cost(workdir: Path, metrics: dict | None) -> str:
    roles = _roles(workdir, metrics)
    if not roles:
        return _missing("no teacher, student, pruned or int8 model in metrics.json")
    export = (metrics or {}).get("export") or {}
    latency = (_load_json(workdir / "06_models" / "student" / "summary.json") or {}).get("latency_ms") or {}

    def size_mb(role: str, m: dict) -> float | None:
        # fp32 weights; the int8 graphs are the fp32 size times the export's measured size ratio.
        if not m.get("params"):
            return None
        base = role.split()[0]
        ratio = (((export.get(base) or {}).get("int8") or {}).get("size_ratio")) if role.endswith("int8") else 1.0
        return None if ratio is None else m["params"] * 4 / 1e6 * ratio

    points = []
    for role, name, m in roles:
        points.append({"role": role, "name": name, "params": m.get("params"), "size": size_mb(role, m),
                       "latency": latency.get(role), "qa": _qa(m).get("accuracy"), "chance": _qa(m).get("chance"),
                       "ppl": (_ppl(m).get("overall") or {}).get("perplexity")})
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 7))
    for col, (xkey, xlabel) in enumerate((("size", "weights (MB; int8 scaled by its size ratio)"),
                                          ("latency", "latency (ms per forward, batch 1)"))):
        for row, (ykey, ylabel) in enumerate((("qa", "QA accuracy"), ("ppl", "perplexity (lower is better)"))):
            ax = axes[row][col]
            for i, p in enumerate(points):
                if p[xkey] is not None and p[ykey] is not None:
                    ax.scatter([p[xkey]], [p[ykey]], s=50, color=f"C{i}", label=p["role"])
                    ax.annotate(p["role"], (p[xkey], p[ykey]), textcoords="offset points", xytext=(5, 4), fontsize=7)
            ax.margins(x=0.15, y=0.15)
            chance = next((p["chance"] for p in points if p["chance"] is not None), None)
            if ykey == "qa" and chance is not None:
                ax.axhline(chance, color="grey", ls=":", label=f"chance {chance:.2f}")
            if not ax.collections:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="#a33")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = _svg(fig, "quality", "QA accuracy and perplexity against model size (left) and latency (right).")
    out += _table(["role", "model", "parameters", "weights MB", "latency ms", "QA accuracy", "chance", "perplexity"],
                  [[p["role"], p["name"], p["params"], p["size"], p["latency"], _pct(p["qa"]), _pct(p["chance"]),
                    p["ppl"]] for p in points])
    if latency:
        out += (f'<p class="note">Latency from the distill stage: batch {_e(latency.get("batch"))}, '
                f'{_e(latency.get("seq_len"))} tokens, {_e(latency.get("threads"))} thread(s); '
                "the int8 and pruned graphs have no latency measurement.</p>")
    if not any(r[0].startswith("pruned") for r in roles):
        out += _missing("no pruned model was evaluated (export.pruned is off)")
    return out


def _clip(metrics: dict | None) -> str:
    clip = (metrics or {}).get("clip")
    if not clip:
        return _missing("the pretrain_clip stage (its summary.json)")
    ks = [k for k in (1, 5, 10) if f"image_to_text_R@{k}" in clip or f"text_to_image_R@{k}" in clip]
    n = clip.get("heldout_images")
    out = ""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    xs = range(len(ks))
    ax.bar([x - 0.2 for x in xs], [clip.get(f"image_to_text_R@{k}", float("nan")) for k in ks], 0.4, label="image → text")
    ax.bar([x + 0.2 for x in xs], [clip.get(f"text_to_image_R@{k}", float("nan")) for k in ks], 0.4, label="text → image")
    if n:
        ax.scatter(list(xs), [k / n for k in ks], marker="_", s=400, color="black", zorder=3, label="chance ≈ k / images")
    ax.set_xticks(list(xs), [f"R@{k}" for k in ks])
    ax.set_ylabel("recall")
    ax.set_title(f"held-out retrieval ({n} images, {clip.get('heldout_captions')} captions)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    zs = clip.get("zero_shot") or {}
    ax = axes[1]
    langs = [k.removeprefix("accuracy_") for k in zs if k.startswith("accuracy_")]
    if langs:
        ax.bar(langs, [zs[f"accuracy_{lang}"] for lang in langs], color="C2")
        if zs.get("chance") is not None:
            ax.axhline(zs["chance"], color="grey", ls=":", label=f"chance {zs['chance']:.2f}")
            ax.legend(fontsize=7)
        ax.set_title(f"zero-shot classification ({zs.get('classes')} classes)")
        ax.set_ylabel("accuracy")
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.set_visible(False)
    fig.tight_layout()
    out += _svg(fig, "clip", "CLIP retrieval recall at 1, 5 and 10 with chance marks; zero-shot accuracy by prompt language.")
    rows = [[f"R@{k}", clip.get(f"image_to_text_R@{k}"), clip.get(f"text_to_image_R@{k}"), k / n if n else None]
            for k in ks]
    out += _table(["recall", "image → text", "text → image", "chance ≈ k / images"], rows)
    if zs:
        out += _table(["zero-shot", "images", "classes", "chance"] + [f"accuracy ({lang})" for lang in langs],
                      [["fashion classes", zs.get("images"), zs.get("classes"), zs.get("chance")]
                       + [zs[f"accuracy_{lang}"] for lang in langs]])
    return out


def _caption(metrics: dict | None) -> str:
    cap = (metrics or {}).get("caption")
    if not cap:
        return _missing("the caption stage (its summary.json)")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ax = axes[0]
    ax.bar(["without image (baseline)", "with image"],
           [cap.get("perplexity_without_image", float("nan")), cap.get("perplexity_with_image", float("nan"))],
           color=["C7", "C1"])
    ax.set_ylabel("caption perplexity")
    ax.set_title(f"{cap.get('heldout_captions')} held-out captions")
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    keys = [k for k in ("image_to_caption_R@1", "image_to_caption_R@5", "image_to_caption_pmi_R@1",
                        "image_to_caption_pmi_R@5") if k in cap]
    ax.bar([k.removeprefix("image_to_caption_") for k in keys], [cap[k] for k in keys], color="C1")
    if cap.get("retrieval_chance_R@1") is not None:
        ax.axhline(cap["retrieval_chance_R@1"], color="grey", ls=":", label=f"chance R@1 {cap['retrieval_chance_R@1']:.2f}")
        ax.legend(fontsize=7)
    ax.set_title(f"caption retrieval ({cap.get('retrieval_images')} images)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = _svg(fig, "caption", "Caption perplexity with and without the image prefix; retrieval by caption likelihood.")
    out += _table(["measure", "value", "baseline"],
                  [["perplexity with image", cap.get("perplexity_with_image"), cap.get("perplexity_without_image")]]
                  + [[k, cap[k], cap.get("retrieval_chance_R@1") if k.endswith("R@1") else None] for k in keys]
                  + [["language model unchanged", cap.get("lm_unchanged"), None],
                     ["trainable parameters", cap.get("trainable_params"), cap.get("lm_params")]])
    return out


def bias_rows(metrics: dict | None) -> list[dict]:
    """One row per (model, axis, language) with the gap, the stereotype effect and their 95% intervals."""
    rows = []
    for name, m in _models(metrics).items():
        for axis, by_lang in ((m.get("metrics") or {}).get("bias") or {}).items():
            for lang, b in (by_lang or {}).items():
                rows.append({"model": name, "probe": f"{axis}/{lang}", **b})
    return rows


def _bias(metrics: dict | None) -> str:
    rows = bias_rows(metrics)
    if not rows:
        return _missing("no bias probe results in metrics.json")
    probes = sorted({r["probe"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.32 * len(rows) + 1.5), sharey=True)
    labels = []
    for ax, (key, ci_key, title) in zip(axes, (("mean_gap", "ci95", "mean log-prob gap (a − b)"),
                                               ("stereotype_effect", "stereotype_ci95", "stereotype effect"))):
        y = 0
        labels = []
        for probe in probes:
            for i, name in enumerate(models):
                r = next((r for r in rows if r["probe"] == probe and r["model"] == name), None)
                if r is None or r.get(key) is None:
                    continue
                lo, hi = (r.get(ci_key) or [r[key], r[key]])
                ax.errorbar([r[key]], [y], xerr=[[r[key] - lo], [hi - r[key]]], fmt="o", color=f"C{i}", ms=4, capsize=2)
                labels.append((y, f"{probe} {name}"))
                y += 1
            y += 0.6
        ax.axvline(0, color="grey", ls=":")
        ax.set_title(title + " (baseline 0)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    out = _svg(fig, "bias", "Bias probe gaps with 95% bootstrap intervals per model; an interval that excludes 0 is a "
                            "measured preference.")
    out += _table(["model", "probe", "pairs", "mean gap", "95% interval", "stereotype effect", "95% interval",
                   "share stereotype", "baseline"],
                  [[r["model"], r["probe"], r.get("n_pairs"), r.get("mean_gap"), _interval(r.get("ci95")),
                    r.get("stereotype_effect"), _interval(r.get("stereotype_ci95")), r.get("share_stereotype"),
                    "gap 0, share 0.5"] for r in rows])
    return out


def _interval(ci) -> str:
    return "–" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _gates(workdir: Path, metrics: dict | None) -> str:
    export = (metrics or {}).get("export")
    if not export:
        export = ((_load_json(workdir / "07_export" / "report.json") or {}).get("models")) or {}
    if not export:
        return _missing("the export stage (07_export/report.json)")
    rows = []
    for model, e in export.items():
        for gate, g in (e.get("gates") or {}).items():
            ok = g.get("pass")
            badge = _Raw(f'<span class="{"pass" if ok else "fail"}">{"pass" if ok else "FAIL"}</span>')
            rows.append([model, gate, g.get("value"), g.get("limit"), badge])
    out = _table(["model", "gate", "value", "limit", "result"], rows)
    ppl_rows = [[m, *(e["heldout_perplexity"].get(k) for k in ("torch", "onnx_fp32", "onnx_int8")),
                 (e.get("int8") or {}).get("chosen"), (e.get("int8") or {}).get("size_ratio"),
                 (e.get("int8") or {}).get("greedy_prompts_equal_to_fp32")]
                for m, e in export.items() if e.get("heldout_perplexity")]
    if ppl_rows:
        out += _table(["model", "held-out ppl torch (baseline)", "onnx fp32", "onnx int8", "int8 scheme",
                       "int8 size ratio", "greedy prompts equal to fp32"], ppl_rows)
    return out


# ---- page ----------------------------------------------------------------------------------

def render_report(workdir: Path) -> str:
    """The report page for the run in `workdir`, as one HTML string with every figure inline."""
    workdir = Path(workdir)
    metrics = _load_json(workdir / "08_reports" / "metrics.json")
    bodies = [
        _overview(workdir, metrics),
        _loss_curves(workdir),
        _domain_perplexity(metrics),
        _icl(metrics),
        _knowledge(metrics),
        _quality_vs_cost(workdir, metrics),
        _clip(metrics),
        _caption(metrics),
        _bias(metrics),
        _gates(workdir, metrics),
    ]
    toc = "".join(f'<li><a href="#s{i}">{_e(t)}</a></li>' for i, t in enumerate(SECTIONS))
    sections = "".join(f'<section id="s{i}"><h2>{_e(t)}</h2>{b}</section>' for i, (t, b) in enumerate(zip(SECTIONS, bodies)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>fm evaluation report</title>"
            f"<style>{_STYLE}</style></head><body><h1>fm evaluation report</h1>"
            f'<p class="note">work dir: {_e(workdir)}</p><nav><ol>{toc}</ol></nav>{sections}</body></html>\n')


def write_report(workdir: Path, out_path: Path) -> Path:
    """Render the report for `workdir` and write it to `out_path` atomically; returns out_path."""
    page = render_report(workdir)
    with atomic_path(out_path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return Path(out_path)
