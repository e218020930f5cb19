"""Instruction tuning of the pretrained model: the `sft` stage, one run per method of `sft.methods`.

    fm sft                                              # the stage: every method, then held-out QA of each
    fm sft --set sft.methods=[lora] --set sft.max_steps=200
    torchrun --nproc_per_node 2 -m fm.recipes.sft       # data parallel (the stage does this when sft.nproc > 1)

Reads `06_models/pretrain/` (the model and its tokenizer) and `05_instructions/` (the instruction set).
Every exchange is written with the chat template (fm.data.chat), examples are packed into rows of
`seq_len` with per-example attention and positions (fm.data.packing), and the loss is on the
response tokens only. The methods (fm.models.adapters wraps the model from outside; the Decoder
knows nothing of them):

    full     every weight trains
    lora     low-rank updates of sft.lora.targets (rank, alpha, dropout); merged into the weights on export
    prefix   n_prefix learned key/value slots in front of every layer's attention
    prompt   n_virtual learned input embeddings in front of the prompt

Training is fm.train.loop.train with the same checkpoints, resume rules (fm.train.session) and process
layout as pretraining: a killed run resumes bit-identically, a finished one is only exported again.
Writes:
    06_models/checkpoints/sft-<method>/step-XXXXXXXX/   training state
    06_models/sft/models/<method>/     model.safetensors, config.json, tokenizer.json (full and lora: a plain
                                       model; prefix and prompt: the pretrained weights + adapter.safetensors),
                                       metrics.jsonl, summary.json; load with fm.models.load_tuned
    06_models/sft/summary.json         held-out multiple-choice accuracy of the pretrained model and each
                                       method (chance beside it), trainable parameters, losses
    06_models/sft/loss.csv             step, loss, val_loss, lr, method
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import torch
from safetensors.torch import save_file
from torch import nn

from fm.config import SftConfig, load_params
from fm.data.chat import ChatTemplate
from fm.data.packing import PackedLoader
from fm.data.tokenizer import SPECIAL_IDS
from fm.io import atomic_dir, sha256_file, write_json
from fm.models.adapters import PrefixTuning, PromptTuning, apply_lora, merge_lora
from fm.models.decoder import Decoder
from fm.models.pretrained import load_pretrained, load_tuned
from fm.paths import Paths
from fm.train.checkpoint import export_model, seed_rng
from fm.train.launch import die_with_parent, launch_recipe
from fm.train.loop import progress_bar, train
from fm.train.optim import build_optimizer
from fm.train.parallel import Dist, destroy_distributed, init_distributed, parallelize, unwrap
from fm.train.session import LOSS_CSV_HEADER, TrainingSession, loss_csv_row

# The pretraining modality each task's records come from: the domain a domain-routed MoE sends its tokens to.
TASK_MODALITY = {"hypernym": "triples", "capital": "triples", "currency": "triples", "language": "triples",
                 "caption_class": "image_text", "poem_next_line": "text", "code_docstring": "code"}
# Settings that change how a run executes, not what it computes (a checkpoint resumes under other values).
EXECUTION_ONLY = ("methods", "teacher", "batch_size", "grad_accum", "nproc", "parallel", "threads", "log_every",
                  "eval_every", "eval_batches", "ckpt_every", "keep_checkpoints", "mc_items")
SCHEDULE = ("max_steps", "warmup_steps", "min_lr_ratio")  # and the method's lr


def modality_codes(paths: Paths) -> list[str]:
    """The token shards' modality codes (manifest.json), which the chat examples' rows carry; [] before `fm shard`."""
    path = paths.tokens / "shards" / "manifest.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_bytes())["codes"]["modality"]
    except (ValueError, KeyError, TypeError) as e:  # cut short, overwritten, not UTF-8
        raise ValueError(f"{path} holds no modality codes ({type(e).__name__}: {e}): it was cut short or "
                         f"overwritten; rerun `fm shard`") from None


def load_examples(path: Path, chat: ChatTemplate, domain_codes: list[str]) -> tuple[list[tuple], list[dict]]:
    """(ids, labels, domain) per row of an instruction table, and the rows themselves."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `fm instructions` first")
    rows = pq.read_table(path).to_pylist()
    encoded = chat.encode_batch([r["prompt"] for r in rows], [r["response"] for r in rows])
    return [(ids, labels, task_domain(r["task"], domain_codes)) for (ids, labels), r in zip(encoded, rows)], rows


def task_domain(task: str, domain_codes: list[str]) -> int:
    """The domain id of a task's records: the index of its modality in the shard manifest's codes (0 if absent)."""
    modality = TASK_MODALITY.get(task, "text")
    return domain_codes.index(modality) if modality in domain_codes else 0


def adapt(model: Decoder, method: str, settings: dict, chat: ChatTemplate) -> nn.Module:
    """The module to train: the model itself (full), with LoRA inside, or behind a prefix or a soft prompt."""
    if method == "full":
        return model.requires_grad_(True)
    if method == "lora":
        return apply_lora(model, tuple(settings["targets"]), settings["rank"], settings["alpha"], settings["dropout"])
    if method == "prefix":
        # Li & Liang: start from the keys/values of real words (random slots barely move in a short run)
        return PrefixTuning(model, settings["n_prefix"], init_ids=init_tokens(chat, settings["n_prefix"]))
    if method == "prompt":
        # Lester et al.: start from the embeddings of real tokens rather than random vectors
        return PromptTuning(model, settings["n_virtual"], init_ids=init_tokens(chat, settings["n_virtual"]))
    raise ValueError(f"unknown sft method {method!r}")


INIT_TEXT = "Answer the question that follows with a short and correct answer. "


def init_tokens(chat: ChatTemplate, n: int) -> torch.Tensor:
    """n token ids to start a prefix or soft prompt from: an instruction in words, repeated as needed, (n,)."""
    ids = chat.tokenizer.encode(INIT_TEXT, add_special_tokens=False).ids
    return torch.tensor((ids * (n // len(ids) + 1))[:n])


def trainable_params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters() if p.requires_grad}.values())


def _wrap(module: nn.Module, d: Dist, cfg: SftConfig, method: str) -> nn.Module:
    """Lay the module out over the data-parallel ranks (DDP, or FSDP2 for full tuning)."""
    if d.dp_size == 1:
        return module
    if cfg.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if method != "full":
        raise ValueError(f"sft.parallel=fsdp shards full tuning only; {method} trains a small share of the parameters "
                         f"(its optimizer state is small): use sft.parallel=ddp")
    how = SimpleNamespace(parallel="fsdp", activation_checkpointing=False, compile=False, cpu_offload=False,
                          pp_microbatches=1, pp_schedule="1f1b", grad_accum=cfg.grad_accum)
    return parallelize(module, d, how)[0]


def _resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def train_method(cfg: SftConfig, method: str, paths: Paths, d: Dist, fresh: bool = False, progress: bool = True) -> dict:
    """Tune the pretrained model with one method in this process (one of torchrun's, or alone); rank 0 exports
    it to 06_models/sft/models/<method>/ and returns its summary."""
    start = time.perf_counter()
    settings = getattr(cfg, method)
    pretrained_dir = paths.models / "pretrain"
    torch.manual_seed(cfg.seed)  # adapter init: the same on every rank and every resume
    model, tokenizer = load_pretrained(pretrained_dir, d.device)
    mcfg = model.cfg
    seq_len = cfg.seq_len or mcfg.seq_len
    if seq_len > mcfg.seq_len:
        raise ValueError(f"sft.seq_len ({seq_len}) exceeds the pretrained model's seq_len ({mcfg.seq_len})")
    chat = ChatTemplate(tokenizer)
    shared = {"prefix": settings.get("n_prefix", 0), "prompt": settings.get("n_virtual", 0)}.get(method, 0)
    row_len = seq_len - shared  # a prefix or soft prompt fills the first positions of every row
    if row_len < 8:
        raise ValueError(f"sft.{method}: {shared} virtual positions leave {row_len} of seq_len {seq_len} for the examples")
    codes = modality_codes(paths)
    examples, _ = load_examples(paths.instructions / "train.parquet", chat, codes)
    heldout, _ = load_examples(paths.instructions / "heldout.parquet", chat, codes)
    loader = PackedLoader(examples, row_len, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size, pad_id=SPECIAL_IDS["<|pad|>"])
    val_loader = None
    try:
        val_loader = PackedLoader(heldout, row_len, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size,
                                  pad_id=SPECIAL_IDS["<|pad|>"])  # a fixed shuffle: every task in the eval batches
    except ValueError as e:
        if d.is_main:
            print(f"sft {method}: no held-out loss ({e})", file=sys.stderr)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = _resolve_dtype(cfg.dtype, d.device)
    module = adapt(model, method, settings, chat)
    n_trainable, n_total = trainable_params(module), sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    wrapped = _wrap(module, d, cfg, method)
    optimizer = build_optimizer(wrapped, settings["lr"], cfg.weight_decay, (cfg.beta1, cfg.beta2))
    seed_rng(cfg.seed, d)  # dropout (LoRA's too): a stream per data-parallel rank

    identity = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in EXECUTION_ONLY + SCHEDULE + tuple(m for m in ("full", "lora", "prefix", "prompt"))}
    identity.update(method=method, seq_len=seq_len, settings={k: v for k, v in settings.items() if k != "lr"},
                    global_batch=cfg.batch_size * cfg.grad_accum * d.dp_size,
                    data={"instructions": sha256_file(paths.instructions / "train.parquet"),
                          "pretrained": json.loads((pretrained_dir / "config.json").read_text())["weights"]["sha256"]})
    schedule = {**{k: getattr(cfg, k) for k in SCHEDULE}, "lr": settings["lr"]}
    session = TrainingSession(f"sft {method}", paths.checkpoints / f"sft-{method}", identity, schedule, d, fresh)
    start_step = session.start(wrapped, optimizer, loader, cfg.seed)

    def checkpoint(step: int) -> None:
        session.save(step, wrapped, optimizer, loader, {"config": dataclasses.asdict(cfg), "method": method},
                     keep=cfg.keep_checkpoints)

    loop_cfg = SimpleNamespace(**{k: getattr(cfg, k) for k in ("max_steps", "warmup_steps", "min_lr_ratio", "grad_accum",
                                                             "grad_clip", "batch_size", "eval_every", "eval_batches",
                                                             "ckpt_every", "log_every")},
                               lr=settings["lr"], seq_len=row_len, dtype=dtype)
    to_train = start_step < cfg.max_steps
    bar = progress_bar() if (progress and d.is_main and to_train) else nullcontext(None)
    with bar as prog:
        history = train(wrapped, optimizer, loader, loop_cfg, d, val_loader=val_loader, start_step=start_step,
                        checkpoint_fn=checkpoint, metrics_path=session.metrics_path, progress=prog, name=f"sft {method}")
    session.finish()

    summary = {"stage": "sft", "method": method, "resumed_from_step": start_step, **session.summary_extra,
               "steps": cfg.max_steps, "trainable_params": n_trainable, "total_params": n_total,
               "trainable_share": round(n_trainable / n_total, 6), "examples": len(loader.examples),
               "examples_skipped": loader.skipped, "rows_per_epoch": loader.rows_per_epoch, "dtype": dtype}
    if history:
        tail = history[-min(10, len(history)):]
        summary["tokens_per_s"] = round(sum(r["tokens_per_s"] for r in tail) / len(tail), 1)
    out = paths.models / "sft" / "models" / method
    inner = unwrap(wrapped)
    meta = {"tokenizer": json.loads((pretrained_dir / "config.json").read_text())["tokenizer"],
            "sft": {"method": method, **dataclasses.asdict(cfg)}, "step": cfg.max_steps,
            "schedule_history": session.schedule_history, "base": {"path": str(pretrained_dir), **identity["data"]}}
    with (atomic_dir(out) if d.is_main else nullcontext(None)) as tmp:
        if method in ("full", "lora"):
            if method == "lora":
                merge_lora(inner)  # a plain Decoder again: what every consumer loads
            export_model(inner, mcfg, tmp, d, meta)
        else:
            export_model(inner.model, mcfg, tmp, d, meta)  # the frozen pretrained weights, unchanged
            if d.is_main:
                _write_adapter(inner, method, tmp)
        if d.is_main:
            shutil.copyfile(pretrained_dir / "tokenizer.json", tmp / "tokenizer.json")
            summary.update(session.write_records(tmp)[1])
            summary["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["outputs"] = [str(out)]
    return summary


def _write_adapter(module: nn.Module, method: str, out_dir: Path) -> None:
    """adapter.safetensors (the prefix keys/values or the soft prompt) and its entry in config.json."""
    if method == "prefix":
        tensors, shape = {"prefix_k": module.prefix_k, "prefix_v": module.prefix_v}, {"n_prefix": module.n_prefix}
    else:
        tensors, shape = {"prompt": module.prompt}, {"n_virtual": module.n_virtual}
    path = out_dir / "adapter.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata={"fm_adapter": method})
    config = json.loads((out_dir / "config.json").read_text())
    config["adapter"] = {"method": method, **shape, "path": path.name, "bytes": path.stat().st_size,
                         "sha256": sha256_file(path)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def run(cfg: SftConfig, paths: Paths, fresh: bool = False, progress: bool = True) -> list[dict]:
    """Every method of cfg.methods in this process group (one of torchrun's processes, or alone)."""
    d = init_distributed()
    try:
        if d.device.type == "cpu":
            torch.set_flush_denormal(True)
        return [train_method(cfg, m, paths, d, fresh, progress) for m in cfg.methods]
    finally:
        destroy_distributed()


def sample_items(rows: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n multiple-choice rows, a fixed random sample across tasks and languages (all when n is 0)."""
    items = [r for r in rows if r.get("options")]
    random.Random(seed).shuffle(items)
    return items[:n] if n else items


def heldout_loss(model: nn.Module, examples: list[tuple], row_len: int, batch_size: int, batches: int, seed: int) -> float | None:
    """Mean response-token cross-entropy over `batches` packed batches of held-out examples: the same rows for
    every model given the same arguments (None when the held-out set is too small for one batch)."""
    from fm.train.loop import evaluate

    try:
        loader = PackedLoader(examples, row_len, batch_size, seed, pad_id=SPECIAL_IDS["<|pad|>"])
    except ValueError:
        return None
    return round(evaluate(model, loader, batches, torch.device("cpu"), "fp32"), 4)


def evaluate_qa(model: nn.Module, chat: ChatTemplate, items: list[dict], domain_codes: list[str] | None = None) -> dict:
    """Held-out multiple-choice accuracy, overall and per task, with chance beside it. domain_codes (the shard
    manifest's modality codes) route a domain-routed MoE by each task's modality."""
    from fm.eval.choice import model_max_len, multiple_choice

    if domain_codes:
        items = [{**item, "domain": task_domain(item["task"], domain_codes)} for item in items]
    res = multiple_choice(model, chat, items, model_max_len(model))
    by_task: dict[str, list[bool]] = {}
    for item, pred in zip(items, res["predictions"]):
        by_task.setdefault(item["task"], []).append(pred == item["answer_index"])
    return {"accuracy": round(res["accuracy"], 4), "accuracy_norm": round(res["accuracy_norm"], 4),
            "chance": round(res["chance"], 4), "n": res["n"],
            "by_task": {t: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for t, v in sorted(by_task.items())}}


def sft(cfg: SftConfig, paths: Paths, fresh: bool = False) -> dict:
    """The sft stage: tune with every method (torchrun when cfg.nproc > 1), then score the pretrained model and
    each tuned one on held-out multiple-choice items; write 06_models/sft/summary.json and loss.csv."""
    start = time.perf_counter()
    for name in ("train.parquet", "heldout.parquet"):
        if not (paths.instructions / name).is_file():
            raise FileNotFoundError(f"{paths.instructions / name} not found: run `fm instructions` first")
    if not (paths.models / "pretrain" / "model.safetensors").is_file():
        raise FileNotFoundError(f"{paths.models / 'pretrain'} has no model: run `fm pretrain` first")
    if cfg.nproc == 1:
        summaries = run(cfg, paths, fresh)
    else:
        launch_recipe("fm.recipes.sft", dataclasses.asdict(cfg), paths.checkpoints / "sft-launch.json", paths.raw,
                      paths.workdir, cfg.nproc, cfg.threads, fresh)
        summaries = [json.loads((paths.models / "sft" / "models" / m / "summary.json").read_text()) for m in cfg.methods]

    # Held-out QA and response loss: the same items and rows for the pretrained model and every method.
    heldout = pq.read_table(paths.instructions / "heldout.parquet").to_pylist()
    items = sample_items(heldout, cfg.mc_items, cfg.seed)
    base, tokenizer = load_pretrained(paths.models / "pretrain")
    chat = ChatTemplate(tokenizer)
    codes = modality_codes(paths)
    held_examples, _ = load_examples(paths.instructions / "heldout.parquet", chat, codes)
    shared = max([getattr(cfg, m).get("n_prefix", 0) + getattr(cfg, m).get("n_virtual", 0) for m in cfg.methods])
    row_len = (cfg.seq_len or base.cfg.seq_len) - shared  # rows every model takes
    loss_of = lambda model: heldout_loss(model, held_examples, row_len, cfg.batch_size, cfg.eval_batches, cfg.seed)  # noqa: E731
    qa = {"pretrained": evaluate_qa(base, chat, items, codes)} if items else {}
    losses = {"pretrained": loss_of(base)}
    methods = {}
    for s in summaries:
        m = s["method"]
        entry = {k: s[k] for k in ("trainable_params", "total_params", "trainable_share", "final_loss", "val_loss",
                                   "tokens_per_s") if k in s}
        model, _ = load_tuned(paths.models / "sft" / "models" / m)
        losses[m] = entry["heldout_loss"] = loss_of(model)
        if items:
            qa[m] = evaluate_qa(model, chat, items, codes)
            entry["qa_accuracy"] = qa[m]["accuracy"]
        methods[m] = entry
    rows = [LOSS_CSV_HEADER + ",method"]
    for m in cfg.methods:
        for line in (paths.models / "sft" / "models" / m / "metrics.jsonl").read_text().splitlines():
            rows.append(loss_csv_row(json.loads(line), m))
    out = paths.models / "sft"
    (out / "loss.csv").write_text("\n".join(rows) + "\n")
    summary = {"stage": "sft", "teacher": cfg.teacher, "steps": cfg.max_steps, "methods": methods,
               "heldout_loss": losses, "qa_items": len(items), "qa_chance": qa.get("pretrained", {}).get("chance"),
               "qa_accuracy": {k: v["accuracy"] for k, v in qa.items()}, "qa": qa,
               "seconds": round(time.perf_counter() - start, 2)}
    write_json(summary, out / "summary.json")
    # What the terminal and the task's artifact show; per-task accuracy and the rest stay in summary.json.
    shown = {k: v for k, v in summary.items() if k not in ("qa", "methods")}
    shown["trainable_params"] = {m: e["trainable_params"] for m, e in methods.items()}
    shown["outputs"] = [str(out / "models"), str(out / "summary.json")]
    return shown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Instruction-tune the pretrained model with each method of sft.methods "
                                             "(run under torchrun for several processes; `fm sft` also scores them).")
    ap.add_argument("--params", default="params.yaml", help="params file; its `sft` section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. sft.max_steps=50")
    ap.add_argument("--config", help="a resolved SftConfig as JSON (what the stage passes to torchrun)")
    ap.add_argument("--raw", default="data/01_raw")
    ap.add_argument("--workdir", default="data")
    ap.add_argument("--fresh", action="store_true", help="set existing checkpoints aside and train from step 0")
    args = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: never outlive torchrun
        die_with_parent()
    cfg = SftConfig(**json.loads(Path(args.config).read_text())) if args.config else load_params(args.params, args.overrides).sft
    run(cfg, Paths(args.raw, args.workdir), fresh=args.fresh)


if __name__ == "__main__":
    main()
