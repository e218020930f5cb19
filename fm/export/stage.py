"""The `export` stage: the student as deployable files, with parity gates that fail the stage when broken.

    fm export                       # after distill: 06_models/student -> 07_export/

Writes (all or nothing: into a temporary folder that replaces 07_export/ only when every gate passes,
so a failed export leaves the previous one intact):
    07_export/onnx/prefill.onnx, decode.onnx             fp32 graphs with an explicit KV cache (fm.export.onnx)
    07_export/onnx/prefill.int8.onnx, decode.int8.onnx   onnxruntime dynamic int8, beside the fp32 files
    07_export/hf/                                        weights transformers loads as LlamaForCausalLM (fm.export.hf)
    07_export/report.json                                the gates and their figures, every file's size and sha256

Gates, on held-out pretraining windows (the validation split of the token shards):
    fp32 ONNX vs torch       max abs logit difference <= export.max_logit_diff
    int8 vs fp32 ONNX        top-1 next-token agreement >= export.min_int8_agreement (the change in held-out
                             perplexity is reported beside it)
    cached decode            the ONNX generator's greedy tokens (prefill, then the decode graph with its cache)
                             equal the torch model's full-recompute greedy tokens, for export.prompts prompts
Consumers check each file against the sha256 in report.json (fm.export.onnx.load_session refuses a file
that differs, naming it).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fm.config import ExportConfig
from fm.data.loader import TokenLoader
from fm.io import atomic_dir, sha256_file, write_json
from fm.models.pretrained import load_pretrained
from fm.paths import Paths


def _windows(paths: Paths, cfg: ExportConfig, seq_len: int) -> torch.Tensor:
    """(N, L) held-out token windows: the validation split of the pretraining shards."""
    shard_dir = paths.tokens / "shards"
    pretrain = json.loads((paths.models / "pretrain" / "config.json").read_text())["pretrain"]
    loader = TokenLoader(shard_dir, min(cfg.window_len, seq_len), cfg.windows, pretrain.get("mix") or None, cfg.seed,
                         split="val", val_fraction=pretrain.get("val_fraction", 0.02) or 0.02)
    x, _, _ = loader.next_batch()
    return x  # (N, L)


def export(cfg: ExportConfig, paths: Paths) -> dict:
    """Export 06_models/student to 07_export/ and check it; ValueError naming the broken gate (nothing published)."""
    from fm.export.hf import export_hf
    from fm.export.onnx import OnnxGenerator, export_decode, export_prefill, load_session, quantize_int8

    start = time.perf_counter()
    student_dir = paths.models / "student"
    if not (student_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{student_dir} has no model: run `fm distill` first")
    if not (paths.tokens / "shards" / "manifest.json").is_file():
        raise FileNotFoundError(f"{paths.tokens / 'shards'} has no manifest.json: run `fm shard` first")
    model, tokenizer = load_pretrained(student_dir)
    model.eval()
    windows = _windows(paths, cfg, model.cfg.seq_len)  # (N, L)
    out = paths.workdir / "07_export"
    report: dict = {"stage": "export", "source": str(student_dir),
                    "source_sha256": json.loads((student_dir / "config.json").read_text())["weights"]["sha256"],
                    "heldout_windows": list(windows.shape)}
    with atomic_dir(out) as tmp:
        onnx_dir = tmp / "onnx"
        onnx_dir.mkdir()
        sha = {"prefill.onnx": export_prefill(model, onnx_dir / "prefill.onnx"),
               "decode.onnx": export_decode(model, onnx_dir / "decode.onnx")}
        root = logging.getLogger()  # onnxruntime's quantizer warns through the root logger about a step it does not need
        level, root.level = root.level, logging.ERROR
        try:
            for name in ("prefill", "decode"):
                sha[f"{name}.int8.onnx"] = quantize_int8(onnx_dir / f"{name}.onnx", onnx_dir / f"{name}.int8.onnx")
        finally:
            root.setLevel(level)

        with torch.no_grad():
            torch_logits = model(windows)[0].float()  # (N, L, V)
        fp32 = load_session(onnx_dir / "prefill.onnx", sha["prefill.onnx"])
        int8 = load_session(onnx_dir / "prefill.int8.onnx", sha["prefill.int8.onnx"])
        feed = {"ids": windows.numpy().astype(np.int64)}
        fp32_logits = torch.from_numpy(fp32.run(["logits"], feed)[0])  # (N, L, V)
        int8_logits = torch.from_numpy(int8.run(["logits"], feed)[0])
        targets = windows[:, 1:]

        def perplexity(logits: torch.Tensor) -> float:
            return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten()).item())

        gates = {
            "fp32_max_abs_logit_diff": {"value": float((fp32_logits - torch_logits).abs().max()),
                                        "limit": cfg.max_logit_diff, "pass": None},
            "int8_top1_agreement": {"value": float((int8_logits.argmax(-1) == fp32_logits.argmax(-1)).float().mean()),
                                    "limit": cfg.min_int8_agreement, "pass": None},
        }
        gates["fp32_max_abs_logit_diff"]["pass"] = gates["fp32_max_abs_logit_diff"]["value"] <= cfg.max_logit_diff
        gates["int8_top1_agreement"]["pass"] = gates["int8_top1_agreement"]["value"] >= cfg.min_int8_agreement
        report["heldout_perplexity"] = {"torch": round(perplexity(torch_logits), 4), "onnx_fp32": round(perplexity(fp32_logits), 4),
                                        "onnx_int8": round(perplexity(int8_logits), 4)}

        # Cached decode against full recompute: greedy tokens from the ONNX generator and from torch.
        prompt_len = min(16, windows.shape[1] // 2)
        new_tokens = min(cfg.generate_tokens, model.cfg.seq_len - prompt_len)
        mismatches = 0
        for generator_files in (("prefill.onnx", "decode.onnx"),):
            gen = OnnxGenerator(onnx_dir / generator_files[0], onnx_dir / generator_files[1],
                                prefill_sha256=sha[generator_files[0]], decode_sha256=sha[generator_files[1]])
            for row in windows[:cfg.prompts, :prompt_len]:
                ids = row.tolist()
                onnx_ids = gen.generate(ids, new_tokens)
                full = list(ids)
                with torch.no_grad():
                    for _ in range(new_tokens):  # full recompute, no cache: the reference
                        full.append(int(model(torch.tensor([full]))[0][0, -1].argmax()))
                mismatches += onnx_ids != full
        gates["cached_decode_equals_recompute"] = {"value": cfg.prompts - mismatches, "limit": cfg.prompts,
                                                   "pass": mismatches == 0}
        report["gates"] = gates

        hf = export_hf(student_dir, tmp / "hf")
        files = {f"onnx/{k}": {"bytes": (onnx_dir / k).stat().st_size, "sha256": v} for k, v in sha.items()}
        files.update({f"hf/{name}": entry for name, entry in hf["files"].items()})
        report["files"] = files
        report["int8_size_ratio"] = round(files["onnx/prefill.int8.onnx"]["bytes"] / files["onnx/prefill.onnx"]["bytes"], 4)
        report["seconds"] = round(time.perf_counter() - start, 2)
        failed = [name for name, g in gates.items() if not g["pass"]]
        if failed:
            # Nothing is published: the atomic folder is discarded and the previous export stays.
            raise ValueError("export: gate(s) failed: " + "; ".join(
                f"{n} = {gates[n]['value']} (limit {gates[n]['limit']})" for n in failed)
                + f"; the previous {out} is left as it was")
        write_json(report, tmp / "report.json")
    summary = {"stage": "export", "fp32_max_abs_logit_diff": round(gates["fp32_max_abs_logit_diff"]["value"], 8),
               "int8_top1_agreement": round(gates["int8_top1_agreement"]["value"], 4),
               "heldout_perplexity": report["heldout_perplexity"], "int8_size_ratio": report["int8_size_ratio"],
               "cached_decode": f"{cfg.prompts - mismatches}/{cfg.prompts} prompts equal", "seconds": report["seconds"],
               "outputs": [str(out)]}
    return summary


def verify_export(out_dir: Path) -> None:
    """Every file report.json lists is present with its size and sha256 (ValueError naming the first that is not)."""
    report = json.loads((out_dir / "report.json").read_text())
    for rel, want in report["files"].items():
        path = out_dir / rel
        if not path.is_file() or path.stat().st_size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise ValueError(f"{path} is missing, damaged or changed since export (size or sha256 differs from "
                             f"{out_dir / 'report.json'}): rerun `fm export`")
