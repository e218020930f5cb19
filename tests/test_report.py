"""The evaluation report and the model card, rendered from a hand-made fixture run (no pipeline).

    .venv/bin/python -m pytest tests/test_report.py

The browser test drives headless Chromium (Debian's chromium-headless-shell) over the DevTools
protocol on a pipe: it loads report.html from disk, collects console errors and exceptions, and
checks in a full-page screenshot that every figure's box holds a drawn plot, not a blank area.
"""

import base64
import fcntl
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fm.eval.model_card import parse_sources, write_model_card
from fm.eval.report import SECTIONS, render_report, write_report

HOSTILE = '<script>alert("x")</script>&'
FIGURES = ("loss", "perplexity", "kshot", "rag", "knowledge", "quality", "clip", "caption", "bias")

README = """# Sample corpus

## Sources

| Output | Records | Source (package, version) | License |
|---|---|---|---|
| `text/fortunes.jsonl` | 4,500, en | fortune cookies, Debian `fortunes` | BSD (fortune-mod) |
| `text/tang-poems.jsonl` | 8,000, zh | npm `chinese-poetry` 2.0.1 | MIT |
| `image_text/noto-emoji/` | 400 images | Noto Color Emoji | font: SIL OFL 1.1; names: BSD |

### What was taken

Nothing else.
"""


def _model(params: int, qa: float, ppl: float, icl: bool = False, gap: float = 0.3) -> dict:
    groups = {"text/fortunes/en": ("text", "fortunes", "en"), "text/tang-poems/zh": ("text", "tang-poems", "zh"),
              "code/cpython/python": ("code", "cpython", "python"), f"text/{HOSTILE}/en": ("text", HOSTILE, "en")}
    per = {k: {"tokens": 100, "nll": 5.0, "perplexity": ppl * (1 + i / 4)} for i, k in enumerate(groups)}
    def by(axis):
        return {v[axis]: {"tokens": 100, "nll": 5.0, "perplexity": per[k]["perplexity"]} for k, v in groups.items()}
    bias_cell = {"n_pairs": 8, "n_items": 4, "mean_gap": gap, "std_gap": 0.2, "ci95": [gap - 0.1, gap + 0.1],
                 "share_prefers_a": 0.6, "stereotype_effect": -0.02, "stereotype_ci95": [-0.1, 0.06],
                 "share_stereotype": 0.5, "aligned_share": 1.0}
    metrics = {
        "instruction_qa": {"accuracy": qa, "accuracy_norm": qa - 0.02, "chance": 0.25, "n": 60,
                           "by_task": {"capital": {"accuracy": 0.1, "n": 6}, "hypernym": {"accuracy": qa, "n": 54}}},
        "perplexity": {"overall": {"tokens": 400, "nll": 5.0, "perplexity": ppl},
                       "modality": by(0), "source": by(1), "lang": by(2),
                       "groups": {k: {**per[k], "modality": v[0], "source": v[1], "lang": v[2]} for k, v in groups.items()}},
        "bias": {"gender": {"en": bias_cell, "zh": {**bias_cell, "mean_gap": -gap, "ci95": [-gap - 0.1, -gap + 0.1]}},
                 "age": {"en": bias_cell}},
        "knowledge": {fmt: {"chance": 0.25, "seen": {"n": 50, "accuracy": qa + 0.1, "by_group": {}},
                            "unseen": {"n": 50, "accuracy": qa - 0.05, "by_group": {}}, "gap": 0.15,
                            "gap_ci": [0.02, 0.28]} for fmt in ("cloze", "qa")},
    }
    if icl:
        shot = {k: {"n": 40, "accuracy": 0.40 - 0.01 * int(k), "accuracy_norm": 0.35, "chance": 0.25, "groups": {},
                    "per_task": {}, "shots_mean": float(k)} for k in ("0", "1", "4")}
        metrics["icl"] = shot
        metrics["rag"] = {"n": 40, "accuracy": 0.5, "accuracy_norm": 0.45, "chance": 0.25, "top_k": 3,
                          "recall_at_k": 0.9, "closed_book": shot["0"],
                          "by_exposure": {"unseen": {"n": 20, "accuracy": 0.55, "closed_book_accuracy": 0.3}}}
    return {"kind": "torch", "params": params, "seconds": 1.5, "metrics": metrics}


def _gates() -> dict:
    return {"gates": {"fp32_max_abs_logit_diff": {"value": 1e-5, "limit": 1e-3, "pass": True},
                      "int8_top1_agreement": {"value": 0.85, "limit": 0.9, "pass": False}},
            "heldout_perplexity": {"torch": 300.0, "onnx_fp32": 300.0, "onnx_int8": 301.0},
            "int8": {"chosen": "dynamic", "size_ratio": 0.4, "greedy_prompts_equal_to_fp32": "3/4"},
            "parameters": 3_000_000}


def _loss_csv(path: Path, steps: int, methods=(None,)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["step,loss,val_loss,lr" + (",method" if methods[0] else "")]
    for method in methods:
        for s in range(1, steps + 1):
            val = f"{6 - s / steps:.3f}" if s % 5 == 0 else ""
            lines.append(f"{s},{7 - 2 * s / steps:.4f},{val},0.001" + (f",{method}" if method else ""))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("run")
    (w / "README.md").write_text(README)
    for folder in ("pretrain", "clip", "caption", "student"):
        _loss_csv(w / "06_models" / folder / "loss.csv", 20)
    _loss_csv(w / "06_models" / "sft" / "loss.csv", 10, methods=("lora", "full"))
    model_cfg = {"n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 4, "ffn_hidden": 192, "vocab_size": 512,
                 "seq_len": 64}
    (w / "06_models" / "student" / "config.json").write_text(json.dumps(
        {"model": model_cfg, "distill": {"max_steps": 20, "lr": 1e-3, "batch_size": 4, "temperature": 2.0}, "step": 20}))
    (w / "06_models" / "pretrain" / "config.json").write_text(json.dumps(
        {"model": {**model_cfg, "n_layer": 4}, "pretrain": {"max_steps": 20, "lr": 2e-3, "batch_size": 4}, "step": 20}))
    (w / "06_models" / "sft" / "models" / "lora").mkdir(parents=True)
    (w / "06_models" / "sft" / "models" / "lora" / "config.json").write_text(json.dumps(
        {"model": {**model_cfg, "n_layer": 4}, "sft": {"method": "lora", "max_steps": 10, "lora": {"rank": 8}},
         "step": 10}))
    (w / "06_models" / "sft" / "summary.json").write_text(json.dumps({"teacher": "lora"}))
    (w / "06_models" / "student" / "summary.json").write_text(json.dumps(
        {"teacher": str(w / "06_models" / "sft" / "models" / "lora"), "student_params": 3_000_000,
         "teacher_params": 5_000_000, "latency_ms": {"teacher": 18.0, "student": 12.0, "batch": 1, "seq_len": 64,
                                                     "threads": 1}}))
    models = {"pretrained": _model(5_000_000, 0.30, 280.0, icl=True), "sft_lora": _model(5_000_000, 0.31, 400.0),
              "student": _model(3_000_000, 0.29, 450.0, icl=True), "pruned": _model(2_500_000, 0.28, 480.0),
              "student_int8": {**_model(3_000_000, 0.29, 451.0, icl=True), "kind": "onnx"},
              "teacher_int8": {**_model(5_000_000, 0.31, 401.0), "kind": "onnx"}}
    clip = {"heldout_images": 50, "heldout_captions": 80, "image_to_text_R@1": 0.06, "text_to_image_R@1": 0.07,
            "image_to_text_R@5": 0.2, "text_to_image_R@5": 0.22, "image_to_text_R@10": 0.35, "text_to_image_R@10": 0.4,
            "zero_shot": {"images": 20, "classes": 10, "chance": 0.1, "accuracy_en": 0.35, "accuracy_zh": 0.3}}
    caption = {"heldout_captions": 80, "perplexity_with_image": 130.0, "perplexity_without_image": 180.0,
               "retrieval_images": 50, "image_to_caption_R@1": 0.04, "image_to_caption_R@5": 0.12,
               "retrieval_chance_R@1": 0.02, "lm_unchanged": True, "trainable_params": 1000, "lm_params": 5_000_000}
    metrics = {"stage": "evaluate", "models": models, "clip": clip, "caption": caption,
               "export": {"student": _gates(), "teacher": _gates(), "pruned": _gates()},
               "icl_set": {"items": 40, "kshot": [0, 1, 4], "demonstration_pool": 100},
               "knowledge_set": {"items": 100, "seen": 50, "unseen": 50, "withheld_facts": 60,
                                 "exposure": {"triple_tokens": 485_426, "triple_tokens_drawn": 81_920, "passes": 0.1688,
                                              "withheld": {"facts": 60, "triples": 70}}},
               "perplexity_set": {"windows": 10, "seq_len": 64, "groups": ["a", "b"]}, "seconds": 3.0}
    (w / "08_reports").mkdir(parents=True)
    (w / "08_reports" / "metrics.json").write_text(json.dumps(metrics))
    return w


def test_report_holds_every_section_and_figure(run_dir):
    page = render_report(run_dir)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    for name in FIGURES:
        assert f'id="fig-{name}"' in page, name
    assert page.count("<svg") == len(FIGURES)
    assert "not run" not in page          # the fixture has every input
    # self-contained: nothing to fetch (the only URLs are SVG namespace names)
    assert "<?xml" not in page and "src=" not in page and not re.search(r'href="(?!#)|url\((?!#)', page)
    assert "<script" not in page.lower()  # the hostile domain name is escaped, in tables and in plot labels
    assert "&lt;script&gt;" in page
    # numbers stand beside their chance level; a failed gate shows as FAIL
    assert "chance" in page and "closed book (baseline)" in page and "FAIL" in page
    assert "never seen (baseline)" in page and "[0.020, 0.280]" in page and "unseen-fact items" in page
    assert "each seen triple 0.169 times" in page  # the exposure note


def test_report_says_not_run_for_missing_inputs(tmp_path):
    page = render_report(tmp_path)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert page.count("not run") >= len(SECTIONS) - 1 and "<svg" not in page


def test_write_report_is_atomic_and_complete(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "08_reports" / "report.html")
    assert out.read_text(encoding="utf-8") == render_report(run_dir)
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_model_card_sections_and_licenses(run_dir, tmp_path):
    out = write_model_card(run_dir, tmp_path / "MODEL_CARD.md")
    card = out.read_text(encoding="utf-8")
    assert card.startswith("---\nlicense: other\n")
    header = card.split("---")[1]
    assert "  - en" in header and "  - zh" in header and "tags:" in header
    for section in ("## Model description", "## Data", "## Training", "## Metrics", "## Known limits",
                    "## Bias probes", "## How to use"):
        assert section in card, section
    for license_name in ("BSD", "MIT", "SIL OFL 1.1"):
        assert license_name in header
    assert "| `text/tang-poems.jsonl` |" in card
    assert "3,000,000" in card and "n_layer 2, d_model 64" in card and "temperature 2.0" in card
    # limits come from the numbers: QA near chance, capital below chance, k-shot not rising
    assert "within 10% of chance" in card and "On capital" in card and "No in-context learning" in card
    assert "gender/en" in card and "excludes 0" in card
    assert "AutoModelForCausalLM" in card and "onnxruntime" in card and "fm generate" in card


def test_parse_sources_reads_the_first_table_only():
    rows = parse_sources(README)
    assert [r["License"] for r in rows] == ["BSD (fortune-mod)", "MIT", "font: SIL OFL 1.1; names: BSD"]
    assert parse_sources("# no table here\n") == []


# ---- a real browser ----------------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium-headless-shell", "/usr/lib/chromium/chromium-headless-shell", "chromium", "chromium-browser"):
        path = shutil.which(name) or (name if os.path.isfile(name) else None)
        if path:
            return path
    if os.environ.get("CI") or shutil.which("apt-get"):
        pytest.fail("chromium-headless-shell is missing: apt-get install -y chromium-headless-shell (.ci/run does)")
    pytest.skip("no chromium-headless-shell and no apt-get to install it")


class _DevTools:
    """The smallest DevTools client: JSON messages, NUL-terminated, over --remote-debugging-pipe (fds 3, 4)."""

    def __init__(self, binary: str, profile: Path):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"]

        def to_fds_3_and_4():
            # via fds >= 10 first, so that neither dup2 clobbers the other pipe end
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        # subprocess closes every fd outside pass_fds after preexec_fn, so 3 and 4 are named there
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=to_fds_3_and_4)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._next(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def test_report_opens_in_chromium_without_errors_and_draws_every_figure(run_dir, tmp_path):
    binary = _chromium()
    page_path = write_report(run_dir, tmp_path / "report.html")
    browser = _DevTools(binary, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page_path.as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired")
        boxes = browser.send("Runtime.evaluate", {"returnByValue": True, "expression": """
            [...document.querySelectorAll('figure.plot svg')].map(s => {
                const r = s.getBoundingClientRect();
                return {id: s.parentElement.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
            })"""}, session=session)["result"]["value"]
        shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)  # drain late console events
    finally:
        browser.close()
    errors = [e for e in browser.events
              if (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "assert"))
              or e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")]
    assert errors == []
    assert sorted(b["id"] for b in boxes) == sorted(f"fig-{n}" for n in FIGURES)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    (tmp_path / "report.png").write_bytes(base64.b64decode(shot["data"]))
    for b in boxes:
        assert b["w"] > 200 and b["h"] > 100, b
        region = image.crop((int(b["x"]), int(b["y"]), int(b["x"] + b["w"]), int(b["y"] + b["h"])))
        pixels = np.asarray(region).reshape(-1, 3).astype(int)  # (H * W, RGB)
        ink = float((pixels.min(axis=1) < 200).mean())
        saturated = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 60]  # plot lines, bars, markers
        colours = {tuple(p) for p in saturated}
        assert ink > 0.01 and len(colours) >= 3, (b["id"], ink, len(colours))


def test_fm_metrics_prints_every_metric_of_every_model_as_one_table(tmp_path):
    from typer.testing import CliRunner

    from fm.cli import app

    (tmp_path / "08_reports").mkdir()
    (tmp_path / "08_reports" / "metrics.csv").write_text(
        "model,metric,split,value,baseline\n"
        "pretrained,instruction_qa_accuracy,heldout,0.3125,0.25\n"
        "student,instruction_qa_accuracy,heldout,0.30801,0.25\n"
        "student,knowledge_cloze_gap,probe,0.05,0.0\n"
        "pretrained,perplexity,heldout,273.24,\n"
        "student_export,int8_top1_agreement,heldout,0.988,0.9\n"
        "student,bias.gender.en.mean_gap,probe,-0.98,0.0\n"
        "pretrained,bias.gender.en.mean_gap,probe,0.25,0.1\n")
    result = CliRunner().invoke(app, ["metrics", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "| metric | split | pretrained | student | student_export | baseline |"
    assert "| instruction_qa_accuracy | heldout | 0.3125 | 0.308 |  | 0.25 |" in lines
    assert "| knowledge_cloze_gap | probe |  | 0.05 |  | 0 |" in lines
    assert "| perplexity | heldout | 273.2 |  |  |  |" in lines
    assert "| bias.gender.en.mean_gap | probe | 0.25 | -0.98 |  | per model |" in lines  # baselines differ
    (tmp_path / "08_reports" / "metrics.json").write_text(json.dumps({"models": {"pretrained": {}, "student": {}}}))
    split = CliRunner().invoke(app, ["metrics", "--workdir", str(tmp_path)]).output.splitlines()
    assert split[0] == "| metric | split | pretrained | student | baseline |"  # the evaluated models
    assert "| metric | split | student_export | baseline |" in split  # the export's rows in a table of their own
    only = CliRunner().invoke(app, ["metrics", "--workdir", str(tmp_path), "--grep", "knowledge"]).output.splitlines()
    assert only[0] == "| metric | split | student | baseline |" and len(only) == 3
    (tmp_path / "08_reports" / "metrics.csv").write_text("nothing here\n")
    broken = CliRunner().invoke(app, ["metrics", "--workdir", str(tmp_path)])
    assert broken.exit_code == 1 and "holds no metric rows" in broken.output
