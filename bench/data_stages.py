"""Seconds and MB/s per data stage on a corpus (the bundled sample by default).

    .venv/bin/python bench/data_stages.py [--raw data/01_raw] [--repeats 3]

Runs ingest -> validate -> curate -> tokenize -> shard into a temporary work dir, `--repeats`
times, and reports each stage's median seconds, the MB/s over the bytes the stage read, and
the total against the 60 s target for the bundled sample on 2 cores. Results also go to
bench/results/data_stages.json. Imports are done before timing, so a figure is the stage's
own work (GX's import, ~5 s cold, is paid once per process and is shown separately).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fm.config import load_params  # noqa: E402
from fm.paths import Paths  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=Path("data/01_raw"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/data_stages.json"))
    args = ap.parse_args()

    t = time.perf_counter()
    import great_expectations  # noqa: F401  (import cost reported, not timed per stage)
    gx_import = time.perf_counter() - t
    from fm.stages import run_stage

    params = load_params(args.params)
    # What each stage reads, to turn seconds into MB/s.
    inputs = {"ingest": lambda p: p.raw, "validate": lambda p: p.ingested, "curate": lambda p: p.validated,
              "tokenize": lambda p: p.curated, "shard": lambda p: p.curated}
    seconds: dict[str, list[float]] = {name: [] for name in inputs}
    read_bytes: dict[str, int] = {}
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            paths = Paths(args.raw, Path(tmp))
            for name in inputs:
                read_bytes[name] = folder_bytes(inputs[name](paths))
                start = time.perf_counter()
                run_stage(name, params, paths)
                seconds[name].append(time.perf_counter() - start)
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:.1f}s" for n, s in seconds.items()), file=sys.stderr)

    rows = []
    for name in inputs:
        med = statistics.median(seconds[name])
        rows.append({"stage": name, "median_s": round(med, 3), "runs_s": [round(s, 3) for s in seconds[name]],
                     "read_mb": round(read_bytes[name] / 1e6, 3), "mb_per_s": round(read_bytes[name] / 1e6 / med, 2)})
    total = sum(r["median_s"] for r in rows)
    print(f"\ncorpus {args.raw} ({folder_bytes(args.raw) / 1e6:.1f} MB), {args.repeats} repeats, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'stage':10s} {'median s':>9s} {'read MB':>8s} {'MB/s':>7s}")
    for r in rows:
        print(f"{r['stage']:10s} {r['median_s']:9.2f} {r['read_mb']:8.2f} {r['mb_per_s']:7.2f}")
    print(f"{'total':10s} {total:9.2f}   (target < 60 s on 2 cores; GX import {gx_import:.1f} s once per process)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"raw": str(args.raw), "stages": rows, "total_s": round(total, 2),
                                    "gx_import_s": round(gx_import, 2), "load_avg": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
