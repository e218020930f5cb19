"""The `export` stage: the student (and the teacher, and the CLIP towers) as deployable files, with
parity gates that fail the stage when broken.

    fm export                       # after distill: 06_models/student -> 07_export/

Writes (all or nothing: into a temporary folder that replaces 07_export/ only when every gate passes,
so a failed export leaves the previous one intact):
    07_export/onnx/prefill.onnx, decode.onnx             the student: fp32 graphs with an explicit KV cache,
                                                         standard ONNX ops (fm.export.onnx)
    07_export/onnx/prefill.int8.onnx, decode.int8.onnx   int8 beside them, onnxruntime's fusions applied
    07_export/hf/                                        weights transformers loads as LlamaForCausalLM (fm.export.hf)
    07_export/teacher/{onnx,hf}/                         the same for the tuned teacher (export.teacher)
    07_export/clip/image.onnx, text.onnx                 the CLIP towers (export.clip; fm.export.clip)
    07_export/pruned/onnx/                               the student with MLP channels pruned (export.prune.enabled,
                                                         off by default; fm.export.prune), its graphs and figures
    (a folder of something switched off holds disabled.json saying so: dvc.yaml declares it)
    07_export/report.json                                the gates and their figures, every file's size and sha256

int8: with export.int8 "auto" both onnxruntime methods are built, dynamic (activations quantized per
call) and static (activation ranges calibrated on export.calibration_windows held-out windows drawn
apart from the gate windows), and the one with the higher top-1 agreement with fp32 on the gate
windows is kept (dynamic on a tie); report.json holds both figures. "dynamic" or "static" builds one.

Gates, on held-out pretraining windows (the validation split of the token shards), for each model:
    fp32 ONNX vs torch       max abs logit difference <= export.max_logit_diff
    int8 vs fp32 ONNX        top-1 next-token agreement >= export.min_int8_agreement (the change in held-out
                             perplexity is reported beside it)
    cached decode            the ONNX generator's greedy tokens (prefill, then the decode graph with its cache)
                             equal the torch model's full-recompute greedy tokens, for export.prompts prompts
    CLIP towers              max abs embedding difference, ONNX vs torch, on held-out images and captions,
                             <= export.max_logit_diff
Consumers check each file against the sha256 in report.json (fm.export.onnx.load_session and
`fm generate --onnx` refuse a file that differs, naming it; verify_export checks them all).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fm.config import ExportConfig, SftConfig
from fm.data.loader import TokenLoader
from fm.io import atomic_dir, scratch_dir, sha256_file, write_json
from fm.models.decoder import Decoder
from fm.models.pretrained import load_pretrained
from fm.paths import Paths


def _loader(paths: Paths, cfg: ExportConfig, seq_len: int, batch_size: int, seed: int, split: str) -> TokenLoader:
    """A loader of the pretraining shards' `split` (val: held out), split as pretraining split them."""
    pretrain = json.loads((paths.models / "pretrain" / "config.json").read_text())["pretrain"]
    return TokenLoader(paths.tokens / "shards", min(cfg.window_len, seq_len), batch_size, pretrain.get("mix") or None,
                       seed, split=split, val_fraction=pretrain.get("val_fraction", 0.02) or 0.02)


def _windows(paths: Paths, cfg: ExportConfig, seq_len: int, n: int | None = None, seed: int | None = None) -> torch.Tensor:
    """(N, L) held-out token windows: the validation split of the pretraining shards."""
    return _loader(paths, cfg, seq_len, n or cfg.windows, cfg.seed if seed is None else seed, "val").next_batch()[0]


def _gate(value: float, limit: float, at_least: bool = False) -> dict:
    return {"value": value, "limit": limit, "pass": bool(value >= limit if at_least else value <= limit)}


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of logits (N, L, V) over windows (N, L)."""
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())


def _decode_calibration(prefill_session, windows: torch.Tensor) -> list[dict]:
    """Feeds of the decode graph for static calibration: the fp32 prefill's cache of windows[:, :P], then the token at P."""
    feeds = []
    for P in sorted({1, windows.shape[1] // 4, windows.shape[1] // 2, windows.shape[1] - 1}):
        _, keys, values = prefill_session.run(None, {"ids": windows[:, :P].numpy()})
        feeds.append({"ids": windows[:, P:P + 1].numpy(), "past_keys": keys, "past_values": values})
    return feeds


def export_lm(model: Decoder, dest: Path, evaluation: torch.Tensor, calibration: torch.Tensor, cfg: ExportConfig) -> dict:
    """Export model's prefill/decode graphs (fp32 and int8) into dest/onnx and measure the gates on the
    evaluation windows; returns {"gates", "heldout_perplexity", "int8", "sha256": {file name: sha256}}."""
    from fm.export.onnx import OnnxGenerator, export_decode, export_prefill, load_session, quantize_int8

    onnx_dir = dest / "onnx"
    onnx_dir.mkdir(parents=True)
    sha = {"prefill.onnx": export_prefill(model, onnx_dir / "prefill.onnx"),
           "decode.onnx": export_decode(model, onnx_dir / "decode.onnx")}
    with torch.no_grad():
        torch_logits = model(evaluation)[0].float()  # (N, L, V)
    fp32 = load_session(onnx_dir / "prefill.onnx", sha["prefill.onnx"])
    feed = {"ids": evaluation.numpy().astype(np.int64)}
    fp32_logits = torch.from_numpy(fp32.run(["logits"], feed)[0])  # (N, L, V)
    gates = {"fp32_max_abs_logit_diff": _gate(float((fp32_logits - torch_logits).abs().max()), cfg.max_logit_diff)}
    ppl = {"torch": round(perplexity(torch_logits, evaluation), 4), "onnx_fp32": round(perplexity(fp32_logits, evaluation), 4)}

    # int8: each method's prefill graph scored against fp32 on the same windows; the best is kept.
    methods = ("dynamic", "static") if cfg.int8 == "auto" else (cfg.int8,)
    candidates = {}
    with scratch_dir(dest, "int8") as scratch:  # in the work dir: a killed run's candidates are found and removed
        for method in methods:
            path = Path(scratch) / f"prefill.{method}.onnx"
            calib = [{"ids": calibration.numpy().astype(np.int64)}] if method == "static" else None
            digest = quantize_int8(onnx_dir / "prefill.onnx", path, method, calib)
            logits = torch.from_numpy(load_session(path, digest).run(["logits"], feed)[0])
            candidates[method] = {"top1_agreement": float((logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean()),
                                  "heldout_perplexity": round(perplexity(logits, evaluation), 4), "path": path}
        chosen = max(methods, key=lambda m: (candidates[m]["top1_agreement"], m == "dynamic"))
        shutil.move(candidates[chosen]["path"], onnx_dir / "prefill.int8.onnx")
        sha["prefill.int8.onnx"] = sha256_file(onnx_dir / "prefill.int8.onnx")
    calib = _decode_calibration(fp32, calibration) if chosen == "static" else None
    sha["decode.int8.onnx"] = quantize_int8(onnx_dir / "decode.onnx", onnx_dir / "decode.int8.onnx", chosen, calib)
    for c in candidates.values():
        del c["path"]
    gates["int8_top1_agreement"] = _gate(candidates[chosen]["top1_agreement"], cfg.min_int8_agreement, at_least=True)
    ppl["onnx_int8"] = candidates[chosen]["heldout_perplexity"]

    # Cached decode against full recompute: greedy tokens from the ONNX generator and from torch.
    prompt_len = min(16, evaluation.shape[1] // 2)
    new_tokens = min(cfg.generate_tokens, model.cfg.seq_len - prompt_len)
    generators = {kind: OnnxGenerator(onnx_dir / f"prefill{suffix}.onnx", onnx_dir / f"decode{suffix}.onnx",
                                      prefill_sha256=sha[f"prefill{suffix}.onnx"], decode_sha256=sha[f"decode{suffix}.onnx"])
                  for kind, suffix in (("fp32", ""), ("int8", ".int8"))}
    mismatches, int8_same = 0, 0
    for row in evaluation[:cfg.prompts, :prompt_len]:
        ids = row.tolist()
        full = list(ids)
        with torch.no_grad():
            for _ in range(new_tokens):  # full recompute, no cache: the reference
                full.append(int(model(torch.tensor([full]))[0][0, -1].argmax()))
        mismatches += generators["fp32"].generate(ids, new_tokens) != full
        int8_same += generators["int8"].generate(ids, new_tokens) == full
    gates["cached_decode_equals_recompute"] = _gate(cfg.prompts - mismatches, cfg.prompts, at_least=True)
    return {"gates": gates, "heldout_perplexity": ppl, "sha256": sha,
            "int8": {"chosen": chosen, "candidates": candidates,
                     "greedy_prompts_equal_to_fp32": f"{int8_same}/{cfg.prompts}",
                     "size_ratio": round((onnx_dir / "prefill.int8.onnx").stat().st_size
                                         / (onnx_dir / "prefill.onnx").stat().st_size, 4)}}


def export_clip_towers(paths: Paths, dest: Path, cfg: ExportConfig) -> dict:
    """Export 06_models/clip's towers into dest and check them on held-out images and captions."""
    from fm.data.images import load_image_captions, normalise, pad_ids
    from fm.data.tokenizer import SPECIAL_IDS
    from fm.export.clip import export_clip
    from fm.export.onnx import load_session
    from fm.recipes.clip import load_clip

    clip_dir = paths.models / "clip"
    model, tokenizer = load_clip(clip_dir)
    config = json.loads((clip_dir / "config.json").read_text())
    held = config["heldout"]
    data = load_image_captions(paths.tokens / "shards", tokenizer, model.cfg.context_length, held["fraction"], held["seed"])
    split = "heldout" if data.heldout.images is not None else "train"  # a tiny corpus may hold out no image
    pairs = getattr(data, split)
    images = normalise(pairs.images[:cfg.windows])  # (N, 3, S, S)
    ids, lengths = pad_ids(pairs.ids[:cfg.windows], SPECIAL_IDS["<|pad|>"])  # (N, T), (N,)
    sha = export_clip(model, dest)
    with torch.no_grad():
        expected = {"image.onnx": model.encode_image(images), "text.onnx": model.encode_text(ids, lengths)}
    feeds = {"image.onnx": {"images": images.numpy()}, "text.onnx": {"ids": ids.numpy(), "lengths": lengths.numpy()}}
    diff = max(float((torch.from_numpy(load_session(dest / name, sha[name]).run(None, feeds[name])[0]) - expected[name])
                     .abs().max()) for name in sha)
    return {"source": str(clip_dir), "source_sha256": config["weights"]["sha256"], "sha256": sha,
            "checked_on": {"split": split, "images": int(images.shape[0]), "captions": int(ids.shape[0])},
            "gates": {"fp32_max_abs_embedding_diff": _gate(diff, cfg.max_logit_diff)}}


def _train_batches(paths: Paths, cfg: ExportConfig, seq_len: int, batch_size: int, batches: int, seed: int) -> list:
    """`batches` (x, y) batches of batch_size training windows (the train split of the pretraining shards)."""
    loader = _loader(paths, cfg, seq_len, batch_size, seed, "train")
    return [loader.next_batch()[:2] for _ in range(batches)]


def export_pruned(student: Decoder, paths: Paths, dest: Path, evaluation: torch.Tensor, calibration: torch.Tensor,
                  cfg: ExportConfig) -> dict:
    """Prune the student's MLP channels (export.prune), recover, export like the student; figures against it."""
    from fm.export.prune import evaluate, prune_mlp, recover

    opts = cfg.prune
    seq_len = student.cfg.seq_len
    calib = _train_batches(paths, cfg, seq_len, opts["calibration_windows"], 1, cfg.seed + 2)[0][0]  # (N, L)
    pruned, info = prune_mlp(student, opts["keep_fraction"], [calib], opts["multiple_of"])
    losses = []
    if opts["recovery_steps"]:
        batches = _train_batches(paths, cfg, seq_len, opts["batch_size"], opts["recovery_steps"], cfg.seed + 3)
        losses = recover(pruned, student, batches, opts["recovery_steps"], opts["lr"], seed=cfg.seed)
    pruned.eval()
    entry = export_lm(pruned, dest, evaluation, calibration, cfg)
    vs_student = evaluate(pruned, evaluation, reference=student)
    return {**entry, "prune": info, "recovery": {"steps": len(losses), "first_loss": losses[0] if losses else None,
                                                 "last_loss": losses[-1] if losses else None},
            "vs_student": vs_student, "parameters": sum(p.numel() for p in pruned.parameters())}


def export(cfg: ExportConfig, sft: SftConfig, paths: Paths) -> dict:
    """Export 06_models/student (and the teacher, and CLIP) to 07_export/ and check it; ValueError naming the
    broken gate (nothing published)."""
    from fm.export.hf import export_hf
    from fm.recipes.distill import teacher_dir

    start = time.perf_counter()
    sources = {"student": paths.models / "student"}
    if cfg.teacher:
        sources["teacher"] = teacher_dir(paths, sft)
    for name, folder in sources.items():
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} has no model: run `fm {'distill' if name == 'student' else 'sft'}` first")
    if cfg.clip and not (paths.models / "clip" / "model.safetensors").is_file():
        raise FileNotFoundError(f"{paths.models / 'clip'} has no model: run `fm pretrain_clip` first "
                                f"(or set export.clip: false)")
    if not (paths.tokens / "shards" / "manifest.json").is_file():
        raise FileNotFoundError(f"{paths.tokens / 'shards'} has no manifest.json: run `fm shard` first")
    out = paths.workdir / "07_export"
    report: dict = {"stage": "export", "models": {}}
    files: dict = {}
    with atomic_dir(out) as tmp:
        for name, folder in sources.items():
            began = time.perf_counter()
            model, _ = load_pretrained(folder)
            model.eval()
            seq_len = model.cfg.seq_len
            # Gate windows and calibration windows come from the held-out split with different seeds.
            evaluation = _windows(paths, cfg, seq_len)
            calibration = _windows(paths, cfg, seq_len, cfg.calibration_windows, cfg.seed + 1)
            prefix = "" if name == "student" else f"{name}/"
            dest = tmp / prefix if prefix else tmp
            entry = export_lm(model, dest, evaluation, calibration, cfg)
            hf = export_hf(folder, dest / "hf")
            files.update({f"{prefix}onnx/{k}": {"bytes": (dest / "onnx" / k).stat().st_size, "sha256": v}
                          for k, v in entry.pop("sha256").items()})
            files.update({f"{prefix}hf/{k}": v for k, v in hf["files"].items()})
            report["models"][name] = {"source": str(folder), "heldout_windows": list(evaluation.shape),
                                      "source_sha256": json.loads((folder / "config.json").read_text())["weights"]["sha256"],
                                      "parameters": sum(p.numel() for p in model.parameters()), **entry,
                                      "seconds": round(time.perf_counter() - began, 2)}
            if name == "student" and cfg.prune["enabled"]:
                began = time.perf_counter()
                entry = export_pruned(model, paths, tmp / "pruned", evaluation, calibration, cfg)
                files.update({f"pruned/onnx/{k}": {"bytes": (tmp / "pruned" / "onnx" / k).stat().st_size, "sha256": v}
                              for k, v in entry.pop("sha256").items()})
                report["models"]["pruned"] = {"source": f"{folder}, pruned by export.prune", **entry,
                                              "seconds": round(time.perf_counter() - began, 2)}
        for name, enabled in (("teacher", cfg.teacher), ("clip", cfg.clip), ("pruned", cfg.prune["enabled"])):
            if not enabled:  # the folder is a declared output (dvc.yaml): it says why it is empty
                setting = "export.prune.enabled" if name == "pruned" else f"export.{name}"
                write_json({"exported": False, "reason": f"{setting} is false"}, tmp / name / "disabled.json")
        if cfg.clip:
            began = time.perf_counter()
            entry = export_clip_towers(paths, tmp / "clip", cfg)
            entry["seconds"] = round(time.perf_counter() - began, 2)
            files.update({f"clip/{k}": {"bytes": (tmp / "clip" / k).stat().st_size, "sha256": v}
                          for k, v in entry.pop("sha256").items()})
            report["models"]["clip"] = entry
        report["gates"] = {f"{m}.{g}": v for m, e in report["models"].items() for g, v in e["gates"].items()}
        report["files"] = files
        report["seconds"] = round(time.perf_counter() - start, 2)
        failed = [name for name, g in report["gates"].items() if not g["pass"]]
        if failed:
            # Nothing is published: the atomic folder is discarded and the previous export stays.
            raise ValueError("export: gate(s) failed: " + "; ".join(
                f"{n} = {report['gates'][n]['value']} (limit {report['gates'][n]['limit']})" for n in failed)
                + f"; the previous {out} is left as it was")
        write_json(report, tmp / "report.json")
    student = report["models"]["student"]
    summary = {"stage": "export",
               "fp32_max_abs_logit_diff": round(student["gates"]["fp32_max_abs_logit_diff"]["value"], 8),
               "int8": student["int8"]["chosen"],
               "int8_top1_agreement": round(student["gates"]["int8_top1_agreement"]["value"], 4),
               "heldout_perplexity": student["heldout_perplexity"], "int8_size_ratio": student["int8"]["size_ratio"],
               "cached_decode": f"{student['gates']['cached_decode_equals_recompute']['value']}/{cfg.prompts} prompts equal"}
    if "teacher" in report["models"]:
        summary["teacher_int8_top1_agreement"] = round(report["models"]["teacher"]["gates"]["int8_top1_agreement"]["value"], 4)
    if "pruned" in report["models"]:
        pruned = report["models"]["pruned"]
        summary["pruned"] = {"ffn_hidden": pruned["prune"]["ffn_hidden"], "parameters": pruned["parameters"],
                             "heldout_perplexity": round(pruned["vs_student"]["perplexity"], 4),
                             "top1_agreement_with_student": round(pruned["vs_student"]["top1_agreement"], 4)}
    if "clip" in report["models"]:
        summary["clip_max_abs_embedding_diff"] = round(report["models"]["clip"]["gates"]["fp32_max_abs_embedding_diff"]["value"], 8)
    summary.update({"student_seconds": student["seconds"], "seconds": report["seconds"], "outputs": [str(out)]})
    return summary


def verify_export(out_dir: Path) -> None:
    """Every file report.json lists is present with its size and sha256 (ValueError naming the first that is not)."""
    report_path = out_dir / "report.json"
    try:
        report = json.loads(report_path.read_text())
        listed = report["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{report_path} is missing or unreadable ({e}): rerun `fm export`") from None
    for rel, want in listed.items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise ValueError(f"{path} is missing, damaged or changed since export (size or sha256 differs from "
                             f"{report_path}): rerun `fm export`")
