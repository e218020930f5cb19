"""What MLP-channel pruning (fm/export/prune.py) costs the distilled student in quality, and what it buys in speed.

    .venv/bin/python bench/prune_bench.py [--student data/06_models/student] [--keeps 0.75,0.5]
        [--steps 50] [--batch-size 4] [--lr 1e-4] [--alpha 1.0] [--temperature 1.0] [--repeats 7] [--calls 10] [--threads 1,2]

Models, all from the same student: the unpruned student; for every keep fraction, the pruned model
(importance-ranked channels, multiple of 16), the same after `--steps` recovery steps (KD towards the
unpruned student), and a random-channel baseline of the same width (no recovery), which tells whether
the importance score is worth anything.

Quality, on the same held-out windows for every model (`--heldout` windows of `--window-len` tokens from the
validation split of the pretraining shards, as the export stage draws them): perplexity, top-1 agreement
with the unpruned student over every position, mean KL(student || model) in nats. Calibration
(`--calib` windows) and recovery batches (`--batch-size` windows per step, a fresh batch every step) come
from the training split.

The deployable models (the recovered ones; the pruned ones with --steps 0) are exported as ONNX prefill
graphs, fp32 and int8; the int8 graph's quality is measured on the same windows against the torch student.

Speed, per architecture (pruning with or without recovery has the same shapes): parameter count, the
matmul multiply-adds per token (weights a token multiplies by, LM head included: the bound on what a
narrower MLP can save), and the latency of one batch-1 forward of --window-len tokens (full logits), in
torch fp32 and in onnxruntime fp32 and int8 (fm.export.onnx.export_prefill + quantize_int8, load_session),
at each of `--threads` intra-op threads. Timing is interleaved: every repeat runs each (model, backend)
for 2 untimed and `--calls` timed calls, in an order rotated by one each repeat; reported are medians
over all timed calls and their ratio to the unpruned model at the same backend and threads, and the
fastest call (the least disturbed by other jobs) with its ratio; at 1 thread also the median CPU time of
the calling thread (torch and onnxruntime compute in it then), which leaves out time spent descheduled. The machine is shared: compare within
one run, not across runs. JSON goes to bench/results/prune.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fm.data.loader import TokenLoader  # noqa: E402
from fm.export.onnx import export_prefill, load_session, quantize_int8  # noqa: E402
from fm.export.prune import evaluate, prune_mlp, recover, slice_mlp  # noqa: E402
from fm.models.decoder import Decoder  # noqa: E402
from fm.models.pretrained import load_decoder  # noqa: E402


def loaders(workdir: Path, window_len: int, seed: int) -> tuple[TokenLoader, TokenLoader]:
    """(train, val) loaders of single windows over the pretraining shards with the pretrain mix, as the export stage."""
    pretrain = json.loads((workdir / "06_models" / "pretrain" / "config.json").read_text())["pretrain"]
    mix, val_fraction = pretrain.get("mix") or None, pretrain.get("val_fraction", 0.02) or 0.02
    shards = workdir / "05_tokens" / "shards"
    return tuple(TokenLoader(shards, window_len, 1, mix, seed, split=split, val_fraction=val_fraction)
                 for split in ("train", "val"))


def windows(loader: TokenLoader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) (n, T) each: the loader's next n windows and their next-token targets."""
    batches = [loader.next_batch()[:2] for _ in range(n)]
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


class OrtLogits(torch.nn.Module):
    """An onnxruntime prefill session behind Decoder's call signature, for evaluate: ids (B, T) -> (logits,)."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def forward(self, ids):
        return (torch.from_numpy(self.session.run(["logits"], {"ids": ids.numpy().astype(np.int64)})[0]),)


def random_channels(model: Decoder, width: int, seed: int) -> Decoder:
    g = torch.Generator().manual_seed(seed)
    return slice_mlp(model, [torch.randperm(model.cfg.ffn_hidden, generator=g)[:width].sort().values
                             for _ in model.layers])


def matmul_macs_per_token(model: Decoder) -> int:
    """Multiply-adds of the weight matmuls per token: non-embedding weights + the LM head (attention's QK^T/AV aside)."""
    cfg = model.cfg
    return cfg.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model


def time_interleaved(runners: dict[tuple[str, str], Callable[[int], Callable[[], object]]], repeats: int, calls: int,
                     threads: list[int]) -> dict:
    """({(name, threads): [wall seconds of every timed call]}, the same in CPU seconds of this thread);
    runners[name](threads) returns a no-argument call."""
    calls_of = {(name, t): make(t) for t in threads for name, make in runners.items()}
    times: dict = {key: [] for key in calls_of}
    cpu_times: dict = {key: [] for key in calls_of}
    for rep in range(repeats):
        for t in threads:
            torch.set_num_threads(t)
            names = list(runners)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                fn = calls_of[(name, t)]
                for _ in range(2):
                    fn()
                for _ in range(calls):
                    start, cpu_start = time.perf_counter(), time.thread_time()
                    fn()
                    times[(name, t)].append(time.perf_counter() - start)
                    cpu_times[(name, t)].append(time.thread_time() - cpu_start)
        print(f"  timing repeat {rep + 1}/{repeats}, load {os.getloadavg()[0]:.2f}", flush=True)
    return times, cpu_times


def torch_forward(model: Decoder, ids: torch.Tensor):
    """threads -> a call of model on ids (B, T); threads are set by the caller (torch's are per process)."""
    def make(threads: int):
        def call():
            with torch.inference_mode():
                model(ids)
        return call
    return make


def ort_forward(path: Path, sha256: str, ids: torch.Tensor):
    """threads -> a call of the prefill graph at path on ids (B, T), in a session of that many intra-op threads."""
    feed = {"ids": ids.numpy().astype(np.int64)}

    def make(threads: int):
        session = load_session(path, sha256, intra_op_threads=threads)
        return lambda: session.run(["logits"], feed)
    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=Path("data/06_models/student"))
    ap.add_argument("--workdir", type=Path, default=Path("data"))
    ap.add_argument("--keeps", default="0.75,0.5")
    ap.add_argument("--multiple-of", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/prune.json"))
    args = ap.parse_args()
    keeps = [float(k) for k in args.keeps.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_flush_denormal(True)
    torch.set_num_threads(max(threads))
    start = time.perf_counter()
    load_before = os.getloadavg()

    student = load_decoder(args.student).eval()
    train, val = loaders(args.workdir, min(args.window_len, student.cfg.seq_len), args.seed)
    heldout, _ = windows(val, args.heldout)  # (N, T): the same windows for every model
    calib, _ = windows(train, args.calib)
    recovery = [windows(train, args.batch_size) for _ in range(args.steps)]  # a fresh batch every step
    print(f"student {args.student}: {student.cfg.n_layer} layers x d_model {student.cfg.d_model}, ffn_hidden "
          f"{student.cfg.ffn_hidden}; held-out {tuple(heldout.shape)}, calibration {tuple(calib.shape)}, "
          f"recovery {args.steps} x {args.batch_size} windows", flush=True)

    rows = {"student": {"model": student, "keep": 1.0, "recovery_steps": 0}}
    for keep in keeps:
        pruned, info = prune_mlp(student, keep, [calib], multiple_of=args.multiple_of)
        width = pruned.cfg.ffn_hidden
        rows[f"keep {keep}"] = {"model": pruned, "keep": keep, "recovery_steps": 0, "prune": info}
        rows[f"keep {keep} random"] = {"model": random_channels(student, width, args.seed), "keep": keep,
                                       "recovery_steps": 0, "channels": "random"}
        if args.steps:
            recovered = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            curve = recover(recovered, student, recovery, args.steps, args.lr, args.temperature, args.alpha, seed=args.seed)
            rows[f"keep {keep} +rec"] = {"model": recovered, "keep": keep, "recovery_steps": args.steps,
                                         "recovery_seconds": round(time.perf_counter() - t0, 1),
                                         "recovery_loss": {"first": round(curve[0], 5), "last10": round(float(np.mean(curve[-10:])), 5)}}
            print(f"  keep {keep}: ffn_hidden {width}, recovery {rows[f'keep {keep} +rec']['recovery_seconds']} s, "
                  f"loss {curve[0]:.4f} -> {np.mean(curve[-10:]):.4f} (mean of the last 10)", flush=True)
    for name, row in rows.items():
        row["quality"] = {k: round(v, 5) for k, v in evaluate(row["model"], heldout, reference=student).items()}

    # The deployable models (the recovered ones, when there is recovery) as ONNX fp32 and int8: the int8 graph's
    # held-out quality, and speed. Recovery changes values, not shapes, so one model per width is timed.
    suffix = " +rec" if args.steps else ""
    archs = {"student": student, **{f"keep {k}{suffix}": rows[f"keep {k}{suffix}"]["model"] for k in keeps}}
    runners, onnx_bytes, int8_quality = {}, {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="prune-bench-"))  # the graphs: a few MB each, removed at the end
    ids = heldout[:1]  # (1, T)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's "consider pre-processing" note (see quantize_int8)
    for name, model in archs.items():
        fp32, int8 = tmp / f"{name.replace(' ', '_')}.onnx", tmp / f"{name.replace(' ', '_')}.int8.onnx"
        fp32_sha = export_prefill(model, fp32)
        int8_sha = quantize_int8(fp32, int8)
        onnx_bytes[name] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
        quality = evaluate(OrtLogits(load_session(int8, int8_sha)), heldout, reference=student)
        int8_quality[name] = {k: round(v, 5) for k, v in quality.items()}
        runners[(name, "torch fp32")] = torch_forward(model, ids)
        runners[(name, "ort fp32")] = ort_forward(fp32, fp32_sha, ids)
        runners[(name, "ort int8")] = ort_forward(int8, int8_sha, ids)
    times, cpu_times = time_interleaved(runners, args.repeats, args.calls, threads)
    speed = {}
    for arch, backend in runners:
        for t in threads:
            ms, base = times[((arch, backend), t)], times[(("student", backend), t)]
            speed.setdefault(arch, {})[f"{backend} {t}t"] = {
                "ms": round(1e3 * statistics.median(ms), 3), "vs_student": round(statistics.median(ms) / statistics.median(base), 3),
                "fastest_ms": round(1e3 * min(ms), 3), "fastest_vs_student": round(min(ms) / min(base), 3)}
            if t == 1:  # one thread computes in the calling thread: its CPU time ignores time spent descheduled
                cpu, cpu_base = cpu_times[((arch, backend), t)], cpu_times[(("student", backend), t)]
                speed[arch][f"{backend} {t}t"] |= {"cpu_ms": round(1e3 * statistics.median(cpu), 3),
                                                   "cpu_vs_student": round(statistics.median(cpu) / statistics.median(cpu_base), 3)}

    # Table
    print(f"\nquality on {tuple(heldout.shape)} held-out windows (recovery: {args.steps} steps x {args.batch_size} windows, "
          f"lr {args.lr}, alpha {args.alpha}, T {args.temperature})")
    print(f"{'model':<20} {'ffn':>4} {'params':>9} {'ppl':>8} {'top1 agr':>8} {'KL nats':>8}")
    for name, row in rows.items():
        q, cfg = row["quality"], row["model"].cfg
        print(f"{name:<20} {cfg.ffn_hidden:>4} {cfg.num_params():>9,} {q['perplexity']:>8.3f} "
              f"{q['top1_agreement']:>8.4f} {q['kl_to_reference']:>8.4f}")
    print("\nint8 prefill graph (onnxruntime) on the same windows, against the torch fp32 student")
    print(f"{'model':<20} {'ppl':>8} {'top1 agr':>8} {'KL nats':>8}")
    for name, q in int8_quality.items():
        print(f"{name:<20} {q['perplexity']:>8.3f} {q['top1_agreement']:>8.4f} {q['kl_to_reference']:>8.4f}")
    columns = [f"{b} {t}t" for b in ("torch fp32", "ort fp32", "ort int8") for t in threads]
    for stat, key, ratio in (("median", "ms", "vs_student"), ("fastest", "fastest_ms", "fastest_vs_student")):
        print(f"\nbatch-1 forward of {ids.shape[1]} tokens, {stat} ms of {args.repeats} x {args.calls} interleaved calls "
              f"(ratio to the student)")
        print(f"{'model':<16} {'MACs/tok':>9} " + " ".join(f"{c:>17}" for c in columns))
        for arch, model in archs.items():
            cells = [f"{speed[arch][c][key]:>8.2f} ({speed[arch][c][ratio]:.2f})" for c in columns]
            print(f"{arch:<16} {matmul_macs_per_token(model):>9,} " + " ".join(f"{c:>17}" for c in cells))
    if 1 in threads:
        columns = [f"{b} 1t" for b in ("torch fp32", "ort fp32", "ort int8")]
        print("\n1 thread, median CPU ms of the calling thread (ratio to the student): steadier than wall time on a busy machine")
        print(f"{'model':<16} {'MACs/tok':>9} " + " ".join(f"{c:>17}" for c in columns))
        for arch, model in archs.items():
            cells = [f"{speed[arch][c]['cpu_ms']:>8.2f} ({speed[arch][c]['cpu_vs_student']:.2f})" for c in columns]
            print(f"{arch:<16} {matmul_macs_per_token(model):>9,} " + " ".join(f"{c:>17}" for c in cells))

    result = {
        "student": str(args.student), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "heldout_windows": list(heldout.shape),
        "models": {name: {k: v for k, v in row.items() if k != "model"} | {
            "ffn_hidden": row["model"].cfg.ffn_hidden, "params": row["model"].cfg.num_params()} for name, row in rows.items()},
        "speed": {arch: {"ffn_hidden": model.cfg.ffn_hidden, "params": model.cfg.num_params(),
                         "matmul_macs_per_token": matmul_macs_per_token(model),
                         "onnx_bytes": onnx_bytes[arch],
                         "int8_quality": int8_quality[arch], "latency": speed[arch]} for arch, model in archs.items()},
        "load_average": {"before": load_before, "after": os.getloadavg()}, "cpu_count": os.cpu_count(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    shutil.rmtree(tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']} s, load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
