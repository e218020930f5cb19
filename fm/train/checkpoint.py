"""Checkpoints: full training state for exact resume, and a consumable model for later stages.

Training state (`save_checkpoint` / `load_checkpoint`) is a torch.distributed.checkpoint
(DCP) folder per step: model and optimizer state sharded as each process holds it, which
DCP reshards on load, so a run saved by 2 processes resumes on 1 (or 4). Everything that is
not a tensor (step, data-loader state, the config it was built from) sits beside it in
`train_state.json`, and every rank's RNG state (its dropout stream, CPU and CUDA) in its own `rng-RRRRR.json`
(R: the global rank), restored by the same rank when the layout is the same. A checkpoint is written to a
temporary folder and renamed when complete.
DCP's own metadata is pickled: a checkpoint folder is the run's own state, meant to be
resumed by the run that wrote it, never a file to take from someone else.

Nothing is resumed unchecked. Each checkpoint carries `checksums.json` (size and sha256 of every
file in it, train_state.json included), written last; `newest_intact_checkpoint` walks the step
folders newest first and takes the first that matches it. A damaged or incomplete one is renamed
`step-XXXXXXXX.corrupt` (kept for inspection, never loaded, never counted or pruned) and the
next older one is tried. A checkpoint saved before checksums existed (train_state.json without
`"checksums"`) is resumed with a note that it is unverified. Pruning to `keep` only happens after
the new checkpoint is complete and hashed, so the newest intact one is never pruned.

The consumable model (`export_model`; `load_model` is fm.models.pretrained.load_decoder) is
`model.safetensors` + `config.json` (the recipe adds `tokenizer.json`): what every later stage
reads. config.json records the weights' size and sha256 (`"weights"`), which loading checks.
Loading it never unpickles anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

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
from fm.io import sha256_file
from fm.train.parallel import Dist, all_gather_object, barrier, gather_pipeline_state, unwrap

STEP_DIR = re.compile(r"^step-(\d{8})$")
CHECKSUMS = "checksums.json"
RNG_FILE = "rng-{rank:05d}.json"  # one per global rank


@contextmanager
def _single_process_quiet():
    """DCP warns that it runs without a process group; for a single process that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def step_dirs(root: Path) -> list[Path]:
    """root's step-XXXXXXXX folders, oldest first (temporary and damaged `.corrupt` ones never match)."""
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint folder under root that has its train_state.json (not verified: see newest_intact_checkpoint)."""
    steps = [p for p in step_dirs(root) if (p / "train_state.json").is_file()]
    return steps[-1] if steps else None


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint folder ("train_state.json is missing", "__0_0.distcp does not match its
    sha256", ...), or None when every file matches its checksums.json (or it predates checksums)."""
    # DCP unpickles .metadata: only a folder this run wrote is ever loaded, never a link to one from elsewhere
    # (its checksums.json would vouch for it: it comes with the folder).
    if path.is_symlink():
        return f"the folder is a symbolic link to {os.readlink(path)}, not one this run wrote"
    links = sorted(p.name for p in path.iterdir() if p.is_symlink()) if path.is_dir() else []
    if links:
        return f"{links[0]} is a symbolic link, not a file this run wrote"
    try:
        state = json.loads((path / "train_state.json").read_text())
    except FileNotFoundError:
        return "train_state.json is missing"
    except (ValueError, UnicodeDecodeError):
        return "train_state.json is not valid JSON"
    if "checksums" not in state:
        return None  # saved by an fm without checksums: nothing to check against
    try:
        files = json.loads((path / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        return f"{CHECKSUMS} is missing"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"{CHECKSUMS} is not readable"
    if not isinstance(files, dict):
        return f"{CHECKSUMS} is not readable"
    if ".metadata" not in files or "train_state.json" not in files:
        return f"{CHECKSUMS} does not list .metadata and train_state.json"
    if not all(isinstance(w, dict) and {"bytes", "sha256"} <= w.keys() for w in files.values()):
        return f"{CHECKSUMS} is not readable"
    for name, want in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {CHECKSUMS} says {want['bytes']}"
        if sha256_file(file) != want["sha256"]:
            return f"{name} does not match its sha256 in {CHECKSUMS}"
    return None


def move_damaged(path: Path) -> Path:
    """Rename a damaged checkpoint folder to `<name>.corrupt` (or `.corrupt-N`): kept for inspection, never
    loaded, pruned or outranking a good one."""
    target, n = path.with_name(f"{path.name}.corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
    os.replace(path, target)
    return target


def newest_intact_checkpoint(root: Path) -> tuple[tuple[Path, dict] | None, list[tuple[Path, str, Path]]]:
    """The newest checkpoint under root that passes its checksums, with its train_state.json (None if there is
    none), and the newer ones passed over on the way as (folder, problem, where it was moved). Run by one
    process (rank 0): a damaged folder is renamed by move_damaged, never loaded and never deleted."""
    skipped = []
    for path in reversed(step_dirs(root)):
        problem = checkpoint_problem(path)
        if problem is None:
            return (path, json.loads((path / "train_state.json").read_text())), skipped
        skipped.append((path, problem, move_damaged(path)))
    return None, skipped


def set_aside(root: Path, tag: str, leave: tuple[str, ...] = ("launch.json",)) -> Path | None:
    """Move root's checkpoints (step folders, unfinished and damaged ones, metrics.jsonl) into a new sibling folder
    `<root>.old-<tag>-<YYYYmmdd-HHMMSS>` and return it; None when root holds no checkpoint. Nothing is deleted:
    another run's state is out of this run's way (its step numbers would outrank and prune this run's own)
    and can still be looked at, resumed by moving it back, or removed by hand. `leave`: names that stay
    (the current launch's config; the new run's own files when it sets the old run aside at its first save)."""
    if not root.is_dir() or not any(STEP_DIR.match(p.name.split(".")[0]) for p in root.iterdir()):
        return None
    aside = root.with_name(f"{root.name}.old-{tag}-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():  # two set-asides in one second
        aside, n = root.with_name(f"{root.name}.old-{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    aside.mkdir()
    for p in root.iterdir():
        if p.name not in leave:
            os.replace(p, aside / p.name)
    return aside


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(device: torch.device = torch.device("cpu")) -> dict:
    """This process's torch RNG state: CPU, and `device`'s when it is a GPU."""
    state = {"torch": _encode(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(_decode(state["cuda"]), device)


def dropout_seed(seed: int, dp_rank: int, step: int = 0) -> int:
    """The seed of a data-parallel rank's dropout stream from step `step` on: one per (seed, dp_rank, step),
    hashed so that it is not the stream of another run's seed (nor of the initial weights, drawn with `seed`)."""
    digest = hashlib.sha256(f"dropout {seed} {dp_rank} {step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes up to 2**63 - 1


def seed_rng(seed: int, d: Dist, step: int = 0) -> None:
    """Seed this process's torch RNG (CPU and every GPU) for the training loop, by data-parallel rank.

    Called after the model is built from the shared seed, so the initial weights stay the same on every rank.
    Ranks that differ only in their tp or pp coordinate get the same seed: tensor parallel needs the same
    dropout mask on the replicated activations of a tp group, and pipeline stages of one replica may share it.
    """
    torch.manual_seed(dropout_seed(seed, d.dp_rank, step))


def _layout(d: Dist) -> dict:
    return {"world_size": d.world_size, "dp": d.dp_size, "tp": d.tp_size, "pp": d.pp_size}


def load_rng_state(path: Path, train_state: dict, d: Dist) -> bool:
    """Restore this rank's RNG state from checkpoint `path` (train_state: its train_state.json). False when the
    checkpoint was saved under another layout (or without per-rank states): the caller re-seeds instead."""
    if train_state.get("rng_layout") == _layout(d):
        set_rng_state(json.loads((path / RNG_FILE.format(rank=d.rank)).read_text()), d.device)
        return True
    if "rng_layout" not in train_state and "rng" in train_state and d.world_size == 1:
        set_rng_state(train_state["rng"], d.device)  # saved by an fm that kept rank 0's CPU state only
        return True
    return False


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict, d: Dist, keep: int = 2, before_publish: Callable[[Path], None] | None = None) -> Path:
    """Write step `step`'s full training state to root/step-XXXXXXXX (collective: every rank calls).

    Order: DCP files and train_state.json into a temporary folder; every file hashed (the ranks share the
    work) into checksums.json; `before_publish(temporary folder)` on rank 0; rename into place; prune to the
    newest `keep`.
    """
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    (tmp / RNG_FILE.format(rank=d.rank)).write_text(json.dumps(rng_state(d.device)))
    if d.is_main:
        (tmp / "train_state.json").write_text(json.dumps({**train_state, "step": step, "rng_layout": _layout(d),
                                                          "checksums": CHECKSUMS}, indent=1))
    barrier()
    # Every process hashes a share of the files (read back from disk, as a resume will read them).
    names = sorted(p.name for p in tmp.iterdir())
    mine = {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in names[d.rank::d.world_size]}
    files = {n: v for part in all_gather_object(mine) for n, v in part.items()}
    if d.is_main:
        (tmp / CHECKSUMS).write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=1))
        if before_publish is not None:
            before_publish(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in step_dirs(root)[:-keep]:  # the one just written is complete and hashed: never zero left
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, verify: bool = True) -> dict:
    """Load model and optimizer state from a DCP folder (any process count); return train_state.json.
    verify: check the folder against its checksums.json first (ValueError naming the problem); the recipe
    passes False for a folder newest_intact_checkpoint has just checked. The RNG is load_rng_state's."""
    if verify and (problem := checkpoint_problem(path)):
        raise ValueError(f"checkpoint {path} is damaged or incomplete: {problem}")
    model_sd, optim_sd = get_state_dict(unwrap(model), optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(unwrap(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "train_state.json").read_text())


def export_model(model: nn.Module, cfg: ModelConfig, out_dir: Path, d: Dist, meta: dict | None = None) -> Path | None:
    """Gather the full weights and write model.safetensors + config.json (collective; rank 0 writes).
    cfg: the model's config (a ModelConfig, or any config with to_dict(), e.g. fm.models.clip.ClipConfig),
    written as config.json's "model"."""
    # cpu_offload keeps the full state on rank 0 only; a pipeline's other stages must keep theirs to send it.
    options = StateDictOptions(full_state_dict=True, cpu_offload=d.pp_size == 1)
    sd = gather_pipeline_state(get_model_state_dict(unwrap(model), options=options), d)
    if not d.is_main:
        return None
    if getattr(cfg, "tie_embeddings", False):  # a Decoder's config; other models (CLIP) store every tensor
        sd.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight; safetensors stores it once
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    with atomic_path(out_dir / "model.safetensors") as tmp:
        # One metadata key: safetensors writes several in a random order, and the same weights must give the
        # same bytes (their sha256 is in every downstream run identity: a re-export must not look like new data).
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        weights = {"path": "model.safetensors", "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
    with atomic_path(out_dir / "config.json") as tmp:
        tmp.write_text(json.dumps({"model": cfg.to_dict(), "weights": weights, **(meta or {})}, indent=2))
    return out_dir
