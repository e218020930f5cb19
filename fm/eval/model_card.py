"""MODEL_CARD.md for the exported student: a Hugging Face style card written from the run's own files.

    from fm.eval.model_card import write_model_card
    write_model_card(Path("data"), Path("data/07_export/hf/MODEL_CARD.md"))

It reads data/README.md (the sources table: data and licenses), 06_models/*/config.json (sizes and
training settings), 08_reports/metrics.json (metrics, bias probes) and 07_export/report.json. The
"Known limits" section is derived from the numbers (accuracy within a margin of chance, perplexity
against the vocabulary size, k-shot curve, bias intervals that exclude zero), not written by hand,
so it changes when the run does. A missing input leaves its section saying so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fm.eval.report import _fmt, _load_json, bias_rows
from fm.io import atomic_path

# Training stages and the config.json section holding their settings: (stage, folder, section).
TRAIN_STAGES = (("pretrain", "pretrain", "pretrain"), ("pretrain_clip", "clip", "pretrain_clip"),
                ("caption", "caption", "caption"), ("sft", None, "sft"), ("distill", "student", "distill"))
SETTING_KEYS = ("method", "max_steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup_steps", "min_lr_ratio",
                "weight_decay", "grad_clip", "dtype", "temperature", "alpha", "n_prefix", "seed", "nproc", "parallel")
# Accuracy within this many points of chance is reported as near chance.
NEAR_CHANCE = 0.10


def parse_sources(readme: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table under a "Sources" heading, as {column: cell}."""
    m = re.search(r"^#+\s*Sources\s*$(.*?)(?=^#)", readme + "\n#", flags=re.M | re.S)
    if not m:
        return []
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return []
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    header, body = cells[0], [r for r in cells[1:] if not all(set(c) <= set("-: ") for c in r)]
    return [dict(zip(header, r)) for r in body]


def _licenses(sources: list[dict[str, str]]) -> list[str]:
    """Distinct license names in the License column, without their qualifiers ("font: ", "(see ...)")."""
    out: list[str] = []
    for s in sources:
        for part in re.split(r"[;,]", s.get("License", "")):
            name = re.sub(r"\([^)]*\)", "", re.sub(r"^[\w ]+:\s*", "", part.strip())).strip()
            if name and name not in out:
                out.append(name)
    return out


def _config(workdir: Path, folder: str) -> dict:
    return _load_json(workdir / "06_models" / folder / "config.json") or {}


def _model_line(cfg: dict) -> str:
    m = cfg.get("model") or {}
    if not m:
        return "not recorded"
    keys = ("n_layer", "d_model", "n_head", "n_kv_head", "ffn_hidden", "vocab_size", "seq_len")
    return ", ".join(f"{k} {m[k]}" for k in keys if k in m)


def _settings(workdir: Path) -> list[list]:
    rows = []
    teacher = (_load_json(workdir / "06_models" / "sft" / "summary.json") or {}).get("teacher")
    for stage, folder, section in TRAIN_STAGES:
        folder = folder or (f"sft/models/{teacher}" if teacher else "sft")
        cfg = _config(workdir, folder)
        s = cfg.get(section)
        if not isinstance(s, dict):
            rows.append([stage, "not run"])
            continue
        items = [f"{k} {s[k]}" for k in SETTING_KEYS if k in s and not isinstance(s[k], (dict, list))]
        if stage == "sft" and isinstance(s.get(s.get("method")), dict):
            items.append(f"{s['method']}: " + ", ".join(f"{k} {v}" for k, v in s[s["method"]].items()
                                                        if not isinstance(v, (dict, list))))
        rows.append([stage, f"step {cfg.get('step')}; " + ", ".join(items)])
    return rows


def _md_table(headers: list[str], rows: list[list]) -> str:
    def cell(x) -> str:
        return _fmt(x).replace("|", "\\|").replace("\n", " ")
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def _limits(workdir: Path, metrics: dict, student_cfg: dict) -> list[str]:
    """Known limits read off the numbers."""
    out = []
    models = metrics.get("models") or {}
    student = models.get("student") or {}
    params = student.get("params")
    if params:
        steps = (student_cfg.get("distill") or {}).get("max_steps")
        out.append(f"Tiny model: {params / 1e6:.1f} M parameters" + (f", distilled for {steps} steps" if steps else "")
                   + "; read its numbers as a check of the pipeline, not as a capable assistant.")
    qa = (student.get("metrics") or {}).get("instruction_qa") or {}
    if qa.get("accuracy") is not None and qa.get("chance") is not None:
        gap = qa["accuracy"] - qa["chance"]
        if gap < NEAR_CHANCE:
            out.append(f"Instruction QA accuracy {qa['accuracy']:.1%} is within {NEAR_CHANCE:.0%} of chance "
                       f"({qa['chance']:.0%}): answers are close to guessing.")
        for task, t in sorted((qa.get("by_task") or {}).items()):
            if t.get("accuracy") is not None and t["accuracy"] < qa["chance"]:
                out.append(f"On {task} ({t.get('n')} items) accuracy {t['accuracy']:.1%} is below chance.")
    ppl = ((student.get("metrics") or {}).get("perplexity") or {})
    vocab = (student_cfg.get("model") or {}).get("vocab_size")
    if (ppl.get("overall") or {}).get("perplexity") and vocab:
        out.append(f"Held-out perplexity {ppl['overall']['perplexity']:.0f} against a vocabulary of {vocab} "
                   "(the uniform-guess baseline): the model predicts text only loosely.")
    langs = {k: v["perplexity"] for k, v in (ppl.get("lang") or {}).items() if v.get("perplexity")}
    if len(langs) > 1:
        worst = max(langs, key=langs.get)
        out.append("Perplexity differs by language: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(langs.items()))
                   + f"; weakest on {worst}.")
    icl = (student.get("metrics") or {}).get("icl") or {}
    if len(icl) > 1:
        ks = sorted(icl, key=int)
        first, last = icl[ks[0]].get("accuracy"), icl[ks[-1]].get("accuracy")
        if first is not None and last is not None and last <= first:
            out.append(f"No in-context learning: {ks[-1]}-shot accuracy {last:.1%} is not above "
                       f"{ks[0]}-shot {first:.1%}.")
    rag = (student.get("metrics") or {}).get("rag") or {}
    closed = (rag.get("closed_book") or {}).get("accuracy")
    if rag.get("accuracy") is not None and closed is not None and rag["accuracy"] <= closed:
        out.append(f"Retrieved facts do not help: {rag['accuracy']:.1%} with retrieval vs {closed:.1%} closed book.")
    cloze = ((student.get("metrics") or {}).get("knowledge") or {}).get("cloze") or {}
    ci = cloze.get("gap_ci")
    if ci and ci[0] <= 0 <= ci[1]:
        out.append(f"No measurable knowledge injection: facts seen only as triples in pretraining are answered "
                   f"{_fmt((cloze.get('seen') or {}).get('accuracy'))} against {_fmt((cloze.get('unseen') or {}).get('accuracy'))} "
                   f"for matched unseen facts (gap 95% interval [{ci[0]:.2f}, {ci[1]:.2f}]).")
    for r in bias_rows(metrics):
        ci = r.get("ci95")
        if r["model"] == "student" and ci and (ci[0] > 0 or ci[1] < 0):
            out.append(f"Bias probe {r['probe']}: the mean gap {r['mean_gap']:.2f} has a 95% interval "
                       f"[{ci[0]:.2f}, {ci[1]:.2f}] that excludes 0.")
    return out


def render_model_card(workdir: Path) -> str:
    """The model card text (Markdown with a YAML header) for the run in `workdir`."""
    workdir = Path(workdir)
    metrics = _load_json(workdir / "08_reports" / "metrics.json") or {}
    readme = workdir / "README.md"
    sources = parse_sources(readme.read_text(encoding="utf-8")) if readme.exists() else []
    student_cfg = _config(workdir, "student")
    distill = _load_json(workdir / "06_models" / "student" / "summary.json") or {}
    export = _load_json(workdir / "07_export" / "report.json") or {}
    models = metrics.get("models") or {}
    langs = sorted({k for m in models.values()
                    for k in (((m.get("metrics") or {}).get("perplexity") or {}).get("lang") or {}) if len(k) == 2})
    licenses = _licenses(sources)

    yaml = ["---", "license: other", "license_name: mixed-sample-data",
            "license_details: trained on data under " + json.dumps(", ".join(licenses) or "unknown licenses",
                                                                     ensure_ascii=False),
            "language:"] + [f"  - {lang}" for lang in langs or ["en"]] + [
            "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", "  - fm", "  - causal-lm", "  - knowledge-distillation", "  - onnx", "  - int8", "---", ""]
    md = ["# fm student model", ""]
    s_params = distill.get("student_params") or (models.get("student") or {}).get("params")
    md += ["## Model description", "",
           "A small decoder-only causal language model (Llama architecture) distilled from an instruction-tuned "
           "teacher by the fm pipeline, exported to Hugging Face safetensors (`07_export/hf/`) and to ONNX "
           "(`07_export/onnx/`, fp32 and int8).", "",
           _md_table(["", "student", "teacher"],
                     [["parameters", s_params, distill.get("teacher_params")],
                      ["architecture", _model_line(student_cfg),
                       _model_line(_load_json(Path(distill["teacher"]) / "config.json") or {}) if distill.get("teacher")
                       else "not recorded"],
                      ["source", "06_models/student", Path(distill["teacher"]).name if distill.get("teacher") else None]]),
           ""]
    files = export.get("files") or {}
    if files:
        md += ["Exported files: " + ", ".join(f"`{k}` ({v.get('bytes', 0) / 1e6:.1f} MB)" for k, v in files.items()
                                              if not k.startswith(("teacher/", "clip/"))) + ".", ""]

    md += ["## Data", ""]
    if sources:
        md += [_md_table(["data", "records", "source", "license"],
                         [[s.get("Output"), s.get("Records"), s.get("Source (package, version)", s.get("Source")),
                           s.get("License")] for s in sources]), "",
               "Licenses: " + "; ".join(licenses) + ". Details and transformations: data/README.md.", ""]
    else:
        md += ["not recorded: no Sources table in data/README.md", ""]

    md += ["## Training", "", _md_table(["stage", "settings"], _settings(workdir)), ""]

    md += ["## Metrics", ""]
    rows = []
    for name, m in models.items():
        mm = m.get("metrics") or {}
        qa = mm.get("instruction_qa") or {}
        icl = mm.get("icl") or {}
        rag = mm.get("rag") or {}
        cloze = (mm.get("knowledge") or {}).get("cloze") or {}
        rows.append([name, m.get("params"), qa.get("accuracy"), qa.get("chance"),
                     ((mm.get("perplexity") or {}).get("overall") or {}).get("perplexity"),
                     " / ".join(f"{k}: {_fmt(v.get('accuracy'))}" for k, v in sorted(icl.items(), key=lambda kv: int(kv[0])))
                     or None, rag.get("accuracy"), (rag.get("closed_book") or {}).get("accuracy"),
                     f"{_fmt((cloze.get('seen') or {}).get('accuracy'))} / {_fmt((cloze.get('unseen') or {}).get('accuracy'))}"
                     if cloze else None])
    if rows:
        md += [_md_table(["model", "parameters", "QA accuracy", "QA chance", "perplexity", "k-shot accuracy",
                          "RAG accuracy", "closed book", "facts seen / unseen (triple cloze)"], rows), "",
               f"Perplexity baseline: the vocabulary size ({(student_cfg.get('model') or {}).get('vocab_size', '?')}) "
               "for a uniform guess.", ""]
    else:
        md += ["not run: no 08_reports/metrics.json", ""]
    clip = metrics.get("clip") or {}
    if clip:
        zs = clip.get("zero_shot") or {}
        md += [f"CLIP (`07_export/clip/`): image→text R@1/5/10 {_fmt(clip.get('image_to_text_R@1'))} / "
               f"{_fmt(clip.get('image_to_text_R@5'))} / {_fmt(clip.get('image_to_text_R@10'))} over "
               f"{clip.get('heldout_images')} held-out images (chance R@1 ≈ {_fmt(1 / clip['heldout_images']) if clip.get('heldout_images') else '?'}); "
               f"zero-shot accuracy en {_fmt(zs.get('accuracy_en'))}, zh {_fmt(zs.get('accuracy_zh'))} "
               f"(chance {_fmt(zs.get('chance'))}).", ""]

    md += ["## Known limits", ""] + [f"- {x}" for x in _limits(workdir, metrics, student_cfg)] + [""]

    md += ["## Bias probes", "",
           "Log-probability gap between paired sentences that differ only in a gendered or age word (a − b), "
           "averaged over templates, with a 95% bootstrap interval; 0 is no preference. The stereotype effect is the "
           "part of the gap that follows the occupation's stereotype.", ""]
    brows = [[r["model"], r["probe"], r.get("n_pairs"), r.get("mean_gap"),
              f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]" if r.get("ci95") else None, r.get("stereotype_effect"),
              f"[{_fmt(r['stereotype_ci95'][0])}, {_fmt(r['stereotype_ci95'][1])}]" if r.get("stereotype_ci95") else None]
             for r in bias_rows(metrics) if r["model"] in ("student", "student_int8")]
    md += [_md_table(["model", "probe", "pairs", "mean gap", "95% interval", "stereotype effect", "95% interval"], brows)
           if brows else "not run: no bias results for the student", ""]

    md += ["## How to use", "", "With transformers:", "", "```python",
           "from transformers import AutoModelForCausalLM, AutoTokenizer",
           'tok = AutoTokenizer.from_pretrained("07_export/hf")',
           'model = AutoModelForCausalLM.from_pretrained("07_export/hf")',
           'ids = tok("The capital of France is", return_tensors="pt").input_ids',
           "print(tok.decode(model.generate(ids, max_new_tokens=20)[0]))", "```", "",
           "With onnxruntime (KV-cached prefill and decode graphs; int8 beside the fp32 ones):", "", "```python",
           "import onnxruntime as ort",
           'prefill = ort.InferenceSession("07_export/onnx/prefill.int8.onnx")',
           'logits, keys, values = prefill.run(None, {"ids": ids.numpy()})   # ids (B, T) int64', "```", "",
           "With fm (checks each file's sha256 against 07_export/report.json):", "", "```sh",
           'fm generate "Name the capital of France." --onnx          # or --int8', "```", ""]
    return "\n".join(yaml + md)


def write_model_card(workdir: Path, out_path: Path) -> Path:
    """Write MODEL_CARD.md for the run in `workdir` to `out_path` atomically; returns out_path."""
    text = render_model_card(workdir)
    with atomic_path(out_path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(out_path)
