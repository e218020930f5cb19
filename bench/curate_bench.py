"""Near-duplicate removal: fm (rensa MinHash LSH) vs datatrove's MinHash pipeline vs the exact truth.

    .venv/bin/python bench/curate_bench.py [--workdir data] [--raw data/01_raw] [--repeats 3] [--processes 2]

Corpus: the documents curate dedups, text + code of `<workdir>/03_validated/{text,code}.parquet`
if present, else the raw sample's text (`text` of text/*.jsonl, text/*.txt) and code (code
files, `content` of code/*.jsonl); it stops with a message if neither exists. Text and code
are deduplicated as one list (cross-modality duplicates are none here; curate runs per modality).

In one process, `--repeats` times each, medians reported:
  fm         fm.data.curate.find_near_duplicates as curate calls it (processes chosen by input
             size: one below 20M characters), and with `--processes` processes forced
  datatrove  MinhashDedupSignature -> Buckets -> Cluster -> Filter, default MinhashConfig (5-grams,
             14 bands x 8 hashes, no candidate check), LocalPipelineExecutor with `--processes`
             workers and with 1 (in-process, no worker start-up), documents handed over in
             memory, fresh temporary folders each run; the faster of the two is the baseline
and once:
  exact      fm.data.curate.exact_near_duplicates: the truth on fm's shingles, every pair that
             can reach the threshold compared exactly (prefix filtering)

The definition of a duplicate to remove, for fm and the truth: a document whose shingle set
(word 5-grams of lowercased whitespace tokens; character 5-grams for text without spaces) has
Jaccard >= curate.jaccard_threshold with an *earlier kept* document. datatrove has its own
definition (its own text normalisation and word tokenizer, union-find clusters of LSH
collisions, one kept per cluster); its removals are scored against the same truth.

Prints MB/s (UTF-8 bytes of the documents per wall second), removal counts, agreement with the
truth, and fm / datatrove throughput. JSON goes to bench/results/curate.json (gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from fm.config import load_params  # noqa: E402
from fm.data.curate import exact_near_duplicates, find_near_duplicates  # noqa: E402


def load_corpus(workdir: Path, raw: Path) -> tuple[list[str], str]:
    """(documents, where they came from): validated text + code, else the raw sample's."""
    validated = [workdir / "03_validated" / f"{m}.parquet" for m in ("text", "code")]
    if any(p.exists() for p in validated):
        texts = [
            t or "" for p in validated if p.exists() for t in pq.read_table(p, columns=["text"])["text"].to_pylist()
        ]
        return texts, ", ".join(str(p) for p in validated if p.exists())
    texts: list[str] = []
    for folder, field in (("text", "text"), ("code", "content")):
        for path in sorted((raw / folder).rglob("*")):
            if path.suffix == ".jsonl":
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip() and isinstance(rec := json.loads(line), dict) and isinstance(rec.get(field), str):
                        texts.append(rec[field])
            elif path.is_file() and (folder == "code" or path.suffix == ".txt"):
                with contextlib.suppress(UnicodeDecodeError):
                    texts.append(path.read_text(encoding="utf-8"))
    if not texts:
        sys.exit(f"curate_bench: no corpus: neither {validated[0].parent}/{{text,code}}.parquet "
                 f"nor text or code under {raw} (run `fm ingest` and `fm validate`, or build the sample)")  # fmt: skip
    return texts, f"{raw}/text, {raw}/code (raw files)"


class InMemoryDocuments:
    """A datatrove pipeline step yielding this rank's share of the documents (doc i goes to rank
    i % world_size), so signature and filter steps see the same documents in the same order."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document

        for i in range(rank, len(self.texts), world_size):
            yield Document(text=self.texts[i], id=str(i))


def run_datatrove(texts: list[str], processes: int) -> set[int]:
    """One run of datatrove's four MinHash steps with the default config and `processes` workers
    (and as many signature and filter tasks); the indices of the documents it removes."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )

    config = MinhashConfig()
    documents = InMemoryDocuments(texts)
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "console.log", "w") as console:
        sigs, buckets, clusters, logs = (f"{tmp}/{name}" for name in ("sigs", "buckets", "clusters", "logs"))
        stages = [
            ([documents, MinhashDedupSignature(output_folder=sigs, config=config)], processes),
            ([MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config)], config.num_buckets),
            ([MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=config)], 1),
            ([documents, MinhashDedupFilter(input_folder=clusters)], processes),
        ]
        # datatrove logs every task to stderr: send that to a file while it runs
        saved_stderr = os.dup(2)
        os.dup2(console.fileno(), 2)
        try:
            for i, (pipeline, tasks) in enumerate(stages):
                LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(processes, tasks),
                                      logging_dir=f"{logs}/{i}").run()  # fmt: skip
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        removed = set()
        for path in Path(clusters).glob("*.remove"):  # uint32 local indices, per signature rank
            rank = int(path.stem)
            data = path.read_bytes()
            removed |= {rank + local * processes for (local,) in struct.iter_unpack("<I", data)}
        return removed


def score(removed: set[int], truth: set[int]) -> dict:
    return {"removed": len(removed), "agree": len(removed & truth), "false_removals": len(removed - truth),
            "missed": len(truth - removed), "off_by": abs(len(removed) - len(truth))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("data"))
    ap.add_argument("--raw", type=Path, default=Path("data/01_raw"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=Path("bench/results/curate.json"))
    args = ap.parse_args()

    cfg = load_params(args.params).curate
    texts, origin = load_corpus(args.workdir, args.raw)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {megabytes:.2f} MB from {origin}; {args.processes} processes, "
          f"load avg {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip

    start = time.perf_counter()
    truth = set(exact_near_duplicates(texts, cfg))
    exact_seconds = time.perf_counter() - start

    try:
        import datatrove  # noqa: F401  (a bench-only extra)

        datatrove_version, datatrove_error = importlib.metadata.version("datatrove"), None
    except ImportError as error:
        datatrove_version, datatrove_error = None, f"datatrove not installed ({error}); pip install datatrove==0.10.1"

    forced = f"fm ({args.processes} proc)"
    methods = {"fm": lambda: set(find_near_duplicates(texts, cfg)),
               forced: lambda: set(find_near_duplicates(texts, cfg, processes=args.processes))}  # fmt: skip
    if datatrove_error is None:
        methods[f"datatrove ({args.processes} proc)"] = lambda: run_datatrove(texts, args.processes)
        methods["datatrove (1 proc)"] = lambda: run_datatrove(texts, 1)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    removed: dict[str, set[int]] = {}
    for repeat in range(args.repeats):  # interleaved, so a noisy neighbour hits every method alike
        for name, run in list(methods.items()):
            start = time.perf_counter()
            try:
                removed[name] = run()
            except Exception as error:  # datatrove is an optional extra: report, keep fm's figures
                if name.startswith("fm"):
                    raise
                datatrove_error = f"{name} failed: {type(error).__name__}: {error}"
                del methods[name], seconds[name]
                continue
            seconds[name].append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {s[-1]:.2f}s" for n, s in seconds.items()),
              file=sys.stderr, flush=True)  # fmt: skip

    results = {}
    for name in methods:
        median = statistics.median(seconds[name])
        results[name] = {"median_s": round(median, 3), "runs_s": [round(s, 3) for s in seconds[name]],
                         "mb_per_s": round(megabytes / median, 2), **score(removed[name], truth)}  # fmt: skip
    results["exact"] = {"median_s": round(exact_seconds, 3), "runs_s": [round(exact_seconds, 3)],
                        "mb_per_s": round(megabytes / exact_seconds, 2), **score(truth, truth)}  # fmt: skip

    print(f"\n{'method':20s} {'median s':>9s} {'MB/s':>8s} {'removed':>8s} {'agree':>6s} {'false':>6s} {'missed':>7s}")
    for name, r in results.items():
        print(f"{name:20s} {r['median_s']:9.2f} {r['mb_per_s']:8.2f} {r['removed']:8d} {r['agree']:6d} "
              f"{r['false_removals']:6d} {r['missed']:7d}")  # fmt: skip
    ratio = None
    datatrove_runs = [name for name in results if name.startswith("datatrove")]
    if datatrove_runs:
        baseline = max(datatrove_runs, key=lambda name: results[name]["mb_per_s"])
        ratio = round(results["fm"]["mb_per_s"] / results[baseline]["mb_per_s"], 1)
        fm_off, baseline_off = results["fm"]["off_by"], results[baseline]["off_by"]
        print(
            f"\nfm / {baseline}: {ratio}x throughput (target >= 10x); removal count off the truth by "
            f"{fm_off} (fm) vs {baseline_off} (datatrove): fm {'closer' if fm_off < baseline_off else 'NOT closer'}"
        )
    if datatrove_error:
        print(f"\n{datatrove_error}" + ("" if datatrove_runs else ": fm is compared with the exact truth only"))

    settings = ("num_perm", "num_bands", "shingle_size", "jaccard_threshold", "seed")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "corpus": origin, "documents": len(texts), "megabytes": round(megabytes, 3), "processes": args.processes,
        "repeats": args.repeats, "load_avg": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "curate_config": {k: getattr(cfg, k) for k in settings},
        "datatrove": {"version": datatrove_version, "error": datatrove_error, "config": "MinhashConfig() defaults"},
        "methods": results, "fm_over_best_datatrove_throughput": ratio,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
