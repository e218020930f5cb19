"""Step time of each 3D layout against the single-process step at the same global batch, on CPU.

    .venv/bin/python bench/parallel_bench.py [--workdir data] [--steps 10] [--repeats 2] [--seq-len 128]

Runs the real pretrain recipe under torchrun (gloo; the single process too, so all start alike)
for each layout, interleaved, `--repeats` times, in temporary work dirs that read
`<workdir>/05_tokens/shards` (run `fm shard` first). The model is params.yaml's default shape
(4 layers, d_model 256, 4 heads) with untied embeddings (pipeline stages need them untied), the
global batch 8 sequences for every layout. Reported per layout: the median step seconds over all
steps after the first two of every repeat (warm-up: allocation, DTensor dispatch caches, pipeline
shape inference), tokens per second, and the overhead against the single process. The single
process gets as many threads as the machine has cores; a layout of N processes 1 thread each
(on a 2-core machine the 4-process layout is oversubscribed, 2 processes per core).
JSON goes to bench/results/parallel.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fm.config import PretrainConfig  # noqa: E402
from fm.paths import Paths  # noqa: E402

GLOBAL_BATCH = 8
LAYOUTS = {  # name -> settings; batch_size is per dp rank, so batch_size * dp = GLOBAL_BATCH
    "single": dict(nproc=1, batch_size=GLOBAL_BATCH),
    "dp2 (ddp)": dict(nproc=2, batch_size=GLOBAL_BATCH // 2),
    "dp2 (fsdp)": dict(nproc=2, batch_size=GLOBAL_BATCH // 2, parallel="fsdp"),
    "tp2": dict(nproc=2, tp=2, batch_size=GLOBAL_BATCH),
    "pp2 1f1b m4": dict(nproc=2, pp=2, pp_microbatches=4, pp_schedule="1f1b", batch_size=GLOBAL_BATCH),
    "pp2 gpipe m4": dict(nproc=2, pp=2, pp_microbatches=4, pp_schedule="gpipe", batch_size=GLOBAL_BATCH),
    "dp2 x tp2 (fsdp, 4 procs)": dict(nproc=4, tp=2, parallel="fsdp", batch_size=GLOBAL_BATCH // 2),
}


def launch(cfg: PretrainConfig, paths: Paths) -> None:
    """torchrun for every layout, the single process included, so each starts the same way."""
    config = paths.workdir / "launch.json"
    config.write_text(json.dumps(dataclasses.asdict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
           "-m", "fm.recipes.pretrain", "--config", str(config), "--raw", str(paths.raw), "--workdir", str(paths.workdir)]
    subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(cfg.threads)), check=True, stdout=subprocess.DEVNULL)


def step_seconds(paths: Paths, skip: int) -> list[float]:
    lines = (paths.checkpoints / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step_s"] for line in lines][skip:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="data")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", action="append", help="layout names to run (repeatable); default all")
    args = ap.parse_args()
    shards = Path(args.workdir).resolve() / "05_tokens"
    if not (shards / "shards" / "manifest.json").is_file():
        sys.exit(f"{shards}/shards has no manifest.json: run `fm shard` first")
    cores = os.cpu_count() or 1
    layouts = {k: v for k, v in LAYOUTS.items() if not args.only or k in args.only or k == "single"}
    common = dict(model={"n_layer": 4, "d_model": 256, "n_head": 4, "tie_embeddings": False}, seq_len=args.seq_len,
                  max_steps=args.steps, warmup_steps=1, eval_every=args.steps, ckpt_every=args.steps, val_fraction=0.0,
                  peak_tflops=1.0, log_every=0)
    times: dict[str, list[float]] = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory(prefix="fm-parallel-bench-") as tmp:
        for rep in range(args.repeats):
            for name, layout in layouts.items():  # interleaved: every layout sees the same background load
                wd = Path(tmp) / f"{rep}-{list(layouts).index(name)}"
                wd.mkdir()
                (wd / "05_tokens").symlink_to(shards, target_is_directory=True)
                threads = cores if layout["nproc"] == 1 else 1
                cfg = PretrainConfig(**common, **layout, threads=threads)
                start = time.perf_counter()
                launch(cfg, Paths(Path("data/01_raw"), wd))
                times[name] += step_seconds(Paths(Path("data/01_raw"), wd), skip=2)
                print(f"repeat {rep + 1} {name}: {time.perf_counter() - start:.1f} s wall, median step "
                      f"{statistics.median(times[name][-(args.steps - 2):]):.3f} s", file=sys.stderr, flush=True)
    base = statistics.median(times["single"])
    tokens = GLOBAL_BATCH * args.seq_len
    rows = []
    print(f"\nglobal batch {GLOBAL_BATCH} x {args.seq_len} tokens, {args.steps} steps x {args.repeats} repeats, "
          f"{cores} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'layout':28s} {'median step s':>14s} {'tokens/s':>10s} {'vs single':>10s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"layout": name, "median_step_s": round(med, 4), "tokens_per_s": round(tokens / med, 1),
                     "overhead_vs_single": round(med / base, 3), "steps": len(ts)})
        print(f"{name:28s} {med:14.3f} {tokens / med:10.0f} {med / base:9.2f}x")
    out = Path(__file__).resolve().parent / "results" / "parallel.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "global_batch": GLOBAL_BATCH, "seq_len": args.seq_len, "steps": args.steps,
                               "repeats": args.repeats, "cores": cores, "load_average": os.getloadavg(),
                               "machine": platform.platform()}, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
