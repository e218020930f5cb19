"""Checkpoints: full training state for exact resume, and a consumable model for later stages.

Training state (`save_checkpoint` / `load_checkpoint`) is a torch.distributed.checkpoint
(DCP) folder per step: model and optimizer state sharded as each process holds it, which
DCP reshards on load, so a run saved by 2 processes resumes on 1 (or 4). Everything that is
not a tensor (step, data-loader state, RNG, the config it was built from) sits beside it in
`train_state.json`. A checkpoint is written to a temporary folder and renamed when complete.
DCP's own metadata is pickled: a checkpoint folder is the run's own state, meant to be
resumed by the run that wrote it, never a file to take from someone else.

The consumable model (`export_model`; `load_model` is fm.models.pretrained.load_decoder) is
`model.safetensors` + `config.json` (the recipe adds `tokenizer.json`): what every later stage
reads. Loading it never unpickles anything.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from fm.io import atomic_path
from fm.models.decoder import ModelConfig
from fm.models.pretrained import load_decoder as load_model  # noqa: F401  what later stages call
from fm.train.parallel import Dist, barrier, gather_pipeline_state, unwrap

STEP_DIR = re.compile(r"^step-(\d{8})$")


@contextmanager
def _single_process_quiet():
    """DCP warns that it runs without a process group; for a single process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under root (temporary ones never match)."""
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "train_state.json").is_file())
    return steps[-1] if steps else None


def set_aside(root: Path, tag: str) -> Path | None:
    """Move root's checkpoints (step folders, unfinished ones, metrics.jsonl) into a new sibling folder
    `<root>.old-<tag>-<YYYYmmdd-HHMMSS>` and return it; None when root holds no checkpoint. Nothing is deleted:
    another run's state is out of this run's way (its step numbers would outrank and prune this run's own)
    and can still be looked at, resumed by moving it back, or removed by hand."""
    if not root.is_dir() or not any(STEP_DIR.match(p.name) for p in root.iterdir()):
        return None
    aside = root.with_name(f"{root.name}.old-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two set-asides in one second
        aside, n = root.with_name(f"{root.name}.old-{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    aside.mkdir()
    for p in root.iterdir():
        if p.name != "launch.json":  # the current launch's config, not the old run's state
            os.replace(p, aside / p.name)
    return aside


def newest_train_state(root: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under root and its train_state.json, or None."""
    latest = latest_checkpoint(root)
    if latest is None:
        return None
    return latest, json.loads((latest / "train_state.json").read_text())


def rng_state() -> dict:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, d: Dist, keep: int = 2) -> Path:
    """Write step `step`'s full training state to root/step-XXXXXXXX (collective: every rank calls)."""
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if d.is_main:
        (tmp / "train_state.json").write_text(json.dumps({**train_state, "step": step, "rng": rng_state()}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer state from a DCP folder (any process count); return train_state.json."""
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train_state = json.loads((path / "train_state.json").read_text())
    set_rng_state(train_state["rng"])
    return train_state


def export_model(model: nn.Module, cfg: ModelConfig, out_dir: Path, d: Dist, meta: dict | None = None) -> Path | None:
    """Gather the full weights and write model.safetensors + config.json (collective; rank 0 writes)."""
    # cpu_offload keeps the full state on rank 0 only; a pipeline's other stages must keep theirs to send it.
    options = StateDictOptions(full_state_dict=True, cpu_offload=d.pp_size == 1)
    sd = gather_pipeline_state(get_model_state_dict(unwrap(model), options=options), d)
    if not d.is_main:
        return None
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight; safetensors stores it once
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "fm_model": "decoder"})
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps({"model": cfg.to_dict(), **(meta or {})}, indent=2))
    return out_dir
