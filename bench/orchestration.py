"""What orchestration costs: a no-change `fm run`, and a full `fm run` against the bare stage functions.

    .venv/bin/python bench/orchestration.py [--repeats 3] [--max-steps N]

In a throwaway copy of the project (git + DVC, the bundled sample, params.yaml as committed
unless --max-steps shortens pretraining), interleaved `--repeats` times:

- direct:    a fresh process that calls every stage function in order (fm.stages.run_stage): no
             Prefect, no DVC, no lock, no registry: the work itself, plus the imports it needs;
- fm run:    `fm run --force` in a fresh process (ephemeral Prefect API, tasks, DVC status and
             dvc.lock records, lock, registry, artifacts): the same work through the orchestration;
- no-change: `fm run` right after, every stage up to date (skipped) — what a scheduled run
             costs when nothing changed.

Reports medians, the overhead ratio (fm run / direct - 1; target <= 10%) and the no-change time
(target <= 30 s). Both paths are timed as whole processes, imports included, as a user's command
is. Results go to bench/results/orchestration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_project(root: Path, max_steps: int) -> Path:
    proj = root / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, proj / name)
    for package in ("fm", "flows", "tasks"):  # the code as it is now: both paths import this copy (cwd first)
        shutil.copytree(REPO / package, proj / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data" / "01_raw", proj / "data" / "01_raw")
    if max_steps:
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["pretrain"].update(max_steps=max_steps, warmup_steps=min(params["pretrain"]["warmup_steps"], max_steps // 4),
                                  eval_every=max_steps, ckpt_every=max_steps)
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    return proj


DIRECT = """
import sys
from pathlib import Path
from fm.config import load_params
from fm.paths import Paths
from fm.stages import STAGES, run_stage
params = load_params("params.yaml")
paths = Paths("data/01_raw", sys.argv[1])
for name in STAGES:
    run_stage(name, params, paths, fresh=True)
"""


def direct(proj: Path, workdir: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", DIRECT, str(workdir)], cwd=proj, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"direct stage calls failed:\n{result.stderr[-4000:]}")
    return seconds


def fm_run(proj: Path, *args: str) -> float:
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1",
               PREFECT_HOME=str(proj / ".prefect"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fm", "run", *args], cwd=proj, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"fm run {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=0, help="shorten pretrain.max_steps in the copy (0: as params.yaml says)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/orchestration.json")
    args = ap.parse_args()

    times: dict[str, list[float]] = {"direct": [], "fm_run": [], "no_change": []}
    with tempfile.TemporaryDirectory() as tmp:
        proj = make_project(Path(tmp), args.max_steps)
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory() as work:
                times["direct"].append(direct(proj, Path(work)))
            times["fm_run"].append(fm_run(proj, "--force"))
            times["no_change"].append(fm_run(proj))
            print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()),
                  file=sys.stderr)

    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["fm_run"] / med["direct"] - 1
    steps = args.max_steps or "as params.yaml"
    print(f"\nbundled sample, pretrain.max_steps {steps}, {args.repeats} repeats, load avg {os.getloadavg()[0]:.2f}")
    print(f"direct stage calls   {med['direct']:7.1f} s")
    print(f"fm run --force       {med['fm_run']:7.1f} s   overhead {overhead:+.1%} (target <= 10%)")
    print(f"fm run, no change    {med['no_change']:7.1f} s   (target <= 30 s, every stage skipped)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs_s": times, "median_s": med, "overhead": round(overhead, 4),
                                    "max_steps": args.max_steps,
                                    "load_avg": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
