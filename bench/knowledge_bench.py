"""Knowledge injection against pretraining exposure: does the probe see facts go into the weights?

    .venv/bin/python bench/knowledge_bench.py [--workdir data] [--steps 200 600] [--triples-share 0.2 1.0]

The default run pretrains 200 steps with triples a fifth of the mix: each seen triple is drawn about 0.17
times, and the probe (fm.eval.knowledge) finds no gap between seen and unseen facts. This bench pretrains
the same model on the same shards (the run's own: its withheld facts are out of them) with more exposure, in
a scratch work dir beside the run's, and probes each model: for every (max_steps, triples share) setting,
the passes over the triples, cloze accuracy on seen and on matched unseen facts, and the gap with its 95%
bootstrap interval. The unseen facts are the control: a gap that grows with exposure is injected knowledge.
Writes bench/results/knowledge_bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from fm.config import load_params
from fm.eval.choice import model_max_len
from fm.eval.knowledge import knowledge_injection, pretraining_exposure, probe_items
from fm.models.inference import cpu_inference_copy
from fm.models.pretrained import load_pretrained
from fm.paths import Paths
from fm.recipes.pretrain import pretrain


def probe(workdir: Path, run_paths: Paths, items: list[dict], batch_size: int) -> dict:
    model, tokenizer = load_pretrained(workdir / "06_models" / "pretrain")
    res = knowledge_injection(cpu_inference_copy(model), tokenizer, items, model_max_len(model), batch_size,
                              formats=("cloze",))["cloze"]
    manifest = json.loads((run_paths.tokens / "shards" / "manifest.json").read_text())
    return {"exposure": pretraining_exposure(workdir / "06_models" / "pretrain", manifest),
            "seen": res["seen"]["accuracy"], "unseen": res["unseen"]["accuracy"], "gap": res["gap"],
            "gap_ci": res["gap_ci"], "chance": res["chance"], "n_per_group": res["seen"]["n"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="data", help="the run whose shards and instruction set to use")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, nargs="+", default=[200, 600])
    ap.add_argument("--triples-share", type=float, nargs="+", default=[0.2, 1.0],
                    help="the triples' weight in the pretraining mix (the rest keeps the params file's proportions)")
    ap.add_argument("--per-stratum", type=int, default=100, help="probe facts per (task, language) and group")
    args = ap.parse_args()

    params = load_params(args.params)
    run = Paths(Path(args.workdir) / "01_raw", Path(args.workdir))
    held = pq.read_table(run.instructions / "heldout.parquet").to_pylist()
    triples = pq.read_table(run.curated / "triples.parquet").to_pylist()
    withheld = set(pq.read_table(run.instructions / "withheld.parquet", columns=["fact_id"])["fact_id"].to_pylist())
    items = probe_items(held, triples, withheld, args.per_stratum, params.evaluate.seed)
    results = []
    for share in args.triples_share:
        others = {m: w for m, w in params.pretrain.mix.items() if m != "triples"}
        scale = (1 - share) / sum(others.values()) if share < 1 else 0.0
        mix = {**{m: w * scale for m, w in others.items() if w * scale > 0}, "triples": share}
        for steps in args.steps:
            scratch = Path(tempfile.mkdtemp(prefix="knowledge-", dir=run.workdir.parent))
            try:
                (scratch / "05_tokens").mkdir()
                os.symlink((run.tokens / "shards").resolve(), scratch / "05_tokens" / "shards")
                shutil.copy(run.tokens / "tokenizer.json", scratch / "05_tokens" / "tokenizer.json")
                cfg = dataclasses.replace(params.pretrain, max_steps=steps, mix=mix, eval_every=steps, ckpt_every=steps,
                                          warmup_steps=min(params.pretrain.warmup_steps, steps // 10))
                began = time.perf_counter()
                pretrain(cfg, Paths(scratch / "01_raw", scratch), fresh=True)
                row = {"steps": steps, "mix": mix, "pretrain_seconds": round(time.perf_counter() - began, 1),
                       **probe(scratch, run, items, params.evaluate.batch_size)}
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            results.append(row)
            e = row["exposure"] or {}
            print(f"steps {steps:5d} triples {share:.2f}: passes {e.get('passes')}  seen {row['seen']:.3f}  "
                  f"unseen {row['unseen']:.3f}  gap {row['gap']:+.3f} [{row['gap_ci'][0]:+.3f}, {row['gap_ci'][1]:+.3f}]"
                  f"  ({row['pretrain_seconds']} s)", flush=True)
    out = Path("bench/results/knowledge_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"items": len(items), "load": os.getloadavg(), "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
