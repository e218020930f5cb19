"""The data stages at scale: seconds and peak RSS per stage on the sample and N-times corpora, and the loader.

    .venv/bin/python bench/scale_bench.py [--factors 1 10 30] [--repeats 3] [--cache /tmp/fm-scale]

For each factor, scripts/scale_corpus.py makes the corpus once (cached under --cache); then, --repeats
times, ingest -> validate -> curate -> tokenize -> shard run into a fresh work dir, each stage in a process of
its own so that its peak resident memory (VmHWM) is its own. Reported per factor and stage: the
median seconds of the stage's own work (timed inside the process, imports excluded) and the median peak RSS,
each also as a ratio to the sample's (factor 1): the targets are seconds <= factor x the sample's and RSS
<= 1.5 x the sample's. tokenize trains on --max-train-bytes (tokenize.max_train_bytes, 8 MB by default) at
every factor, so its training sample is the same size whatever the corpus. The loader: milliseconds per next_batch() of the pretraining
TokenLoader on each factor's shards (pretrain's seq_len, batch size and mix), median over --batches calls.
Writes bench/results/scale_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "validate", "curate", "tokenize", "shard")
CHILD = """
import json, re, sys, time
from fm.config import load_params
from fm.paths import Paths
from fm.stages import run_stage
params = load_params(sys.argv[1])
paths = Paths(sys.argv[2], sys.argv[3])
start = time.perf_counter()
run_stage(sys.argv[4], params, paths)
seconds = time.perf_counter() - start
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"seconds": seconds, "rss_mb": peak_kb / 1024}))
"""


def run_child(stage: str, raw: Path, workdir: Path, params: Path) -> dict:
    """One stage in its own process: {"seconds": its own work, "rss_mb": the process's peak resident set}.

    The peak is the child's VmHWM, read by itself: wait4's ru_maxrss would also hold the high-water mark of the
    memory the child shared with this process before exec."""
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1")
    result = subprocess.run([sys.executable, "-c", CHILD, str(params), str(raw), str(workdir), stage],
                            capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode:
        raise RuntimeError(f"{stage} failed on {raw} (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def loader_ms(shard_dir: Path, params_path: Path, batches: int) -> float:
    from fm.config import load_params
    from fm.data.loader import TokenLoader

    cfg = load_params(params_path).pretrain
    loader = TokenLoader(shard_dir, cfg.seq_len, cfg.batch_size, cfg.mix, cfg.seed, val_fraction=cfg.val_fraction)
    loader.next_batch()  # the first batch reads cold pages
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        loader.next_batch()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", type=Path, default=REPO / "data" / "01_raw")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 10, 30])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=200, help="loader batches timed per factor")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fm-scale",
                    help="where the scaled corpora are kept between runs")
    ap.add_argument("--max-train-bytes", type=int, default=8_000_000,
                    help="tokenize.max_train_bytes for every factor: the same tokenizer training sample (below the "
                         "sample corpus's text, so the cap is what decides it)")
    ap.add_argument("--dask-factors", type=int, nargs="*", default=[10],
                    help="factors on which ingest and validate also run with partitions.runner=dask (2 local workers)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale_bench.json")
    args = ap.parse_args()
    params = yaml.safe_load(args.params.read_text())
    params["tokenize"]["max_train_bytes"] = args.max_train_bytes
    args.cache.mkdir(parents=True, exist_ok=True)
    args.params = args.cache / "params.yaml"
    args.params.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))

    results: dict = {"factors": {}, "max_train_bytes": args.max_train_bytes, "load_start": os.getloadavg()}
    for factor in args.factors:
        raw = args.raw if factor == 1 else args.cache / f"raw{factor}"
        if not raw.is_dir():
            subprocess.run([sys.executable, str(REPO / "scripts" / "scale_corpus.py"), "--raw", str(args.raw),
                            "--out", str(raw), "--factor", str(factor)], check=True, stdout=subprocess.DEVNULL)
        runs: dict[str, list[dict]] = {s: [] for s in STAGES}
        loader = []
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory(dir=args.cache if args.cache.is_dir() else None) as tmp:
                for stage in STAGES:
                    runs[stage].append(run_child(stage, raw, Path(tmp), args.params))
                loader.append(loader_ms(Path(tmp) / "05_tokens" / "shards", args.params, args.batches))
            print(f"factor {factor} repeat {rep + 1}: " + ", ".join(
                f"{s} {r[-1]['seconds']:.1f}s/{r[-1]['rss_mb']:.0f}MB" for s, r in runs.items())
                + f", loader {loader[-1]:.2f} ms", file=sys.stderr, flush=True)
        if factor in args.dask_factors:  # ingest's files and validate's row ranges as Prefect tasks on 2 Dask workers
            dask_params = yaml.safe_load(args.params.read_text())
            dask_params["partitions"] = {"runner": "dask", "dask_address": "", "dask_workers": 2}
            dask_path = args.cache / "params-dask.yaml"
            dask_path.write_text(yaml.safe_dump(dask_params, sort_keys=False, allow_unicode=True))
            on_dask: dict[str, list[dict]] = {"ingest_dask": [], "validate_dask": []}
            same = []
            for rep in range(args.repeats):
                with tempfile.TemporaryDirectory(dir=args.cache) as a, tempfile.TemporaryDirectory(dir=args.cache) as b:
                    local = {}
                    for stage in ("ingest", "validate"):
                        on_dask[f"{stage}_dask"].append(run_child(stage, raw, Path(a), dask_path))
                        local[stage] = run_child(stage, raw, Path(b), args.params)
                    same.append(all((Path(a) / layer / f.name).read_bytes() == f.read_bytes()
                                    for layer in ("02_ingested", "03_validated") for f in (Path(b) / layer).iterdir()))
                print(f"factor {factor} repeat {rep + 1}: on dask ingest {on_dask['ingest_dask'][-1]['seconds']:.1f}s "
                      f"(local {local['ingest']['seconds']:.1f}s), validate {on_dask['validate_dask'][-1]['seconds']:.1f}s "
                      f"(local {local['validate']['seconds']:.1f}s), same outputs {same[-1]}", file=sys.stderr, flush=True)
            runs.update(on_dask)
            results.setdefault("dask_same_outputs", {})[factor] = all(same)
        results["factors"][factor] = {
            "raw_mb": round(sum(p.stat().st_size for p in raw.rglob("*") if p.is_file()) / 1e6, 1),
            "stages": {s: {"seconds": statistics.median(r["seconds"] for r in rs),
                           "rss_mb": statistics.median(r["rss_mb"] for r in rs),
                           "runs": rs} for s, rs in runs.items()},
            "loader_ms": statistics.median(loader), "loader_runs": loader}
    results["load_end"] = os.getloadavg()
    base = results["factors"].get(1) or results["factors"][min(results["factors"])]
    print(f"\n| factor | raw MB | stage | median s | s / (factor x sample) | peak RSS MB | RSS / sample |")
    print("|---|---|---|---|---|---|---|")
    for factor, res in results["factors"].items():
        for s, r in res["stages"].items():
            b = base["stages"].get(s) or base["stages"][s.removesuffix("_dask")]
            print(f"| {factor} | {res['raw_mb']} | {s} | {r['seconds']:.2f} | {r['seconds'] / (factor * b['seconds']):.2f} "
                  f"| {r['rss_mb']:.0f} | {r['rss_mb'] / b['rss_mb']:.2f} |")
        total = sum(res["stages"][s]["seconds"] for s in STAGES)
        print(f"| {factor} | | total | {total:.1f} | | | |")
        print(f"| {factor} | | loader ms/batch | {res['loader_ms']:.3f} | {res['loader_ms'] / base['loader_ms']:.2f} x sample | | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} (load average {results['load_start']} -> {results['load_end']})")


if __name__ == "__main__":
    main()
