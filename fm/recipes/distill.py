"""Knowledge distillation of the tuned model into a smaller student: the `distill` stage.

    fm distill                                          # teacher: 06_models/sft/models/<sft.teacher>
    fm distill --set distill.student.n_layer=3 --set distill.student.d_model=192
    torchrun --nproc_per_node 2 -m fm.recipes.distill   # data parallel (the stage does this when distill.nproc > 1)

Teacher: the instruction-tuned model that `sft.teacher` names (full, or LoRA merged into the weights).
Student: the teacher's config with `distill.student`'s fields replaced (fewer layers, narrower). Where
shapes allow it starts from the teacher: student layer i copies teacher layer round(i * (L_t - 1) /
(L_s - 1)) (evenly spaced, first and last kept, as DistilBERT takes every other layer), and the
embedding, final norm and head are copied when their widths match; everything else is freshly
initialised. The summary lists what was copied.

Loss (fm.train.distill.distill_loss): alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha)
* cross-entropy on the data, over the positions that have a target (the responses of the instruction set,
every token of pretraining text). The teacher's logits are computed on the fly, in eval mode and without
gradients. A share `text_share` of the steps are pretraining windows from the token shards (the mix and
validation split of the pretrain run), the rest packed instruction examples (fm.data.packing).

Same loop, checkpoints, resume rules (fm.train.session) and process layout as pretraining.
Writes:
    06_models/checkpoints/distill/step-XXXXXXXX/   training state (the student's; the teacher is not in it)
    06_models/student/   model.safetensors, config.json, tokenizer.json, metrics.jsonl, loss.csv, summary.json
                         (summary: sizes, held-out QA accuracy and batch-1 forward latency of student and teacher)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import torch
from torch import nn

from fm.config import DistillConfig, SftConfig, load_params
from fm.data.chat import ChatTemplate
from fm.data.loader import TokenLoader
from fm.data.packing import PackedLoader
from fm.data.shards import load_manifest
from fm.data.tokenizer import SPECIAL_IDS
from fm.io import atomic_dir, sha256_file, write_json
from fm.models.decoder import Decoder, ModelConfig
from fm.models.pretrained import load_pretrained
from fm.paths import Paths
from fm.recipes.sft import _resolve_dtype, _wrap, evaluate_qa, heldout_loss, load_examples, sample_items
from fm.train.checkpoint import export_model, seed_rng
from fm.train.distill import distill_loss
from fm.train.launch import die_with_parent, launch_recipe
from fm.train.loop import progress_bar, train
from fm.train.optim import build_optimizer
from fm.train.parallel import Dist, destroy_distributed, init_distributed, unwrap
from fm.train.session import TrainingSession

EXECUTION_ONLY = ("batch_size", "grad_accum", "nproc", "parallel", "threads", "log_every", "eval_every",
                  "eval_batches", "ckpt_every", "keep_checkpoints", "mc_items")
SCHEDULE = ("max_steps", "warmup_steps", "lr", "min_lr_ratio")


def student_config(teacher: ModelConfig, overrides: dict) -> ModelConfig:
    """The teacher's config with `overrides`; fields derived from an overridden one are derived again."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"distill.student: unknown model setting(s) {', '.join(sorted(unknown))}")
    fixed = {"vocab_size", "seq_len"} & set(overrides)
    if fixed:
        raise ValueError(f"distill.student: {', '.join(sorted(fixed))} must stay the teacher's (the tokenizer and positions are shared)")
    values = dict(overrides)
    for given, derived in (("n_head", "n_kv_head"), ("d_model", "ffn_hidden")):
        if given in values and derived not in values:
            values[derived] = None
    n_layer = values.get("n_layer", teacher.n_layer)
    if "moe_layers" not in values:
        values["moe_layers"] = tuple(i for i in teacher.moe_layers if i < n_layer)
    return dataclasses.replace(teacher, **values)


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Which teacher layer each student layer starts from: evenly spaced, the first and last kept."""
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


@torch.no_grad()
def init_from_teacher(student: Decoder, teacher: Decoder) -> dict:
    """Copy every teacher tensor whose shape matches into the student (layers by layer_map); returns what was copied."""
    t_state = teacher.state_dict()
    mapping = layer_map(teacher.cfg.n_layer, student.cfg.n_layer)
    copied, fresh = [], []
    for name, tensor in student.state_dict().items():
        source = name
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            source = f"layers.{mapping[int(i)]}.{rest}"
        if source in t_state and t_state[source].shape == tensor.shape:
            tensor.copy_(t_state[source])
            copied.append(name)
        else:
            fresh.append(name)
    shared_head = student.cfg.tie_embeddings  # lm_head.weight is tok_emb.weight: count it once
    return {"layer_map": mapping, "tensors_copied": len(copied), "tensors_fresh": len(fresh),
            "params_copied": sum(student.state_dict()[n].numel() for n in copied if not (shared_head and n == "lm_head.weight"))}


class Distillation(nn.Module):
    """The student, trained against a frozen teacher: forward returns the student's logits and the KD + CE loss.

    The teacher is held outside the module's parameters and state (not trained, not checkpointed, not
    wrapped by DDP) and always runs in eval mode under no_grad.
    """

    def __init__(self, student: Decoder, teacher: Decoder, temperature: float, alpha: float):
        super().__init__()
        self.student = student
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # not a submodule
        self.temperature, self.alpha = temperature, alpha

    def forward(self, idx, targets=None, domains=None, doc_ids=None):
        packing = {"doc_ids": doc_ids} if doc_ids is not None else {}
        with torch.no_grad():
            teacher_logits, _, _ = self.teacher(idx, domains=domains, **packing)  # (B, T, V)
        logits, _, aux = self.student(idx, domains=domains, **packing)  # (B, T, V)
        if targets is None:
            return logits, None, aux
        out = distill_loss(logits, teacher_logits, targets, self.temperature, self.alpha)
        loss = out.loss + (self.student.cfg.aux_loss_weight * aux["aux_loss"] if "aux_loss" in aux else 0.0)
        return logits, loss, {**aux, "ce_loss": out.ce_loss.detach(), "kd_loss": out.kd_loss.detach()}


class MixedLoader:
    """Packed instruction rows and pretraining windows, interleaved by a fixed rule: step k takes text when
    floor((k + 1) * share) > floor(k * share), so any `share` of the steps is text, evenly spread, with no RNG."""

    def __init__(self, packed: PackedLoader, text: TokenLoader | None, share: float):
        self.packed, self.text, self.share, self.k = packed, text, share if text is not None else 0.0, 0

    def next_batch(self):
        use_text = math.floor((self.k + 1) * self.share) > math.floor(self.k * self.share)
        self.k += 1
        return self.text.next_batch() if use_text else self.packed.next_batch()

    def state_dict(self) -> dict:
        return {"k": self.k, "packed": self.packed.state_dict(), "text": self.text.state_dict() if self.text else None}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["k"]
        self.packed.load_state_dict(state["packed"])
        if self.text is not None and state["text"] is not None:
            self.text.load_state_dict(state["text"])


def teacher_dir(paths: Paths, sft: SftConfig) -> Path:
    return paths.models / "sft" / "models" / sft.teacher


def train_student(cfg: DistillConfig, sft: SftConfig, paths: Paths, d: Dist, fresh: bool = False,
                  progress: bool = True) -> dict:
    """Distill in this process (one of torchrun's, or alone); rank 0 exports 06_models/student/ and returns the summary."""
    start = time.perf_counter()
    t_dir = teacher_dir(paths, sft)
    teacher, tokenizer = load_pretrained(t_dir, d.device)
    tcfg = teacher.cfg
    scfg = student_config(tcfg, cfg.student)
    seq_len = cfg.seq_len or tcfg.seq_len
    if seq_len > tcfg.seq_len:
        raise ValueError(f"distill.seq_len ({seq_len}) exceeds the teacher's seq_len ({tcfg.seq_len})")
    chat = ChatTemplate(tokenizer)
    shard_dir = paths.tokens / "shards"
    manifest = load_manifest(shard_dir)
    codes = manifest["codes"]["modality"]
    examples, _ = load_examples(paths.instructions / "train.parquet", chat, codes)
    heldout, _ = load_examples(paths.instructions / "heldout.parquet", chat, codes)
    pad = SPECIAL_IDS["<|pad|>"]
    packed = PackedLoader(examples, seq_len, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size, pad_id=pad)
    pretrain_cfg = json.loads((paths.models / "pretrain" / "config.json").read_text())["pretrain"]
    text = None
    if cfg.text_share > 0:
        text = TokenLoader(shard_dir, seq_len, cfg.batch_size, pretrain_cfg.get("mix") or None, cfg.seed, d.dp_rank,
                           d.dp_size, split="train", val_fraction=pretrain_cfg.get("val_fraction", 0.02))
    loader = MixedLoader(packed, text, cfg.text_share)
    val_loader = None
    try:
        val_loader = PackedLoader(heldout, seq_len, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size, pad_id=pad)
    except ValueError as e:
        if d.is_main:
            print(f"distill: no held-out loss ({e})", file=sys.stderr)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = _resolve_dtype(cfg.dtype, d.device)
    torch.manual_seed(cfg.seed)
    student = Decoder(scfg).to(d.device)
    init = init_from_teacher(student, teacher)
    model = _wrap(Distillation(student, teacher, cfg.temperature, cfg.alpha), d, cfg, "full")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    seed_rng(cfg.seed, d)

    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_ONLY + SCHEDULE}
    identity.update(seq_len=seq_len, global_batch=cfg.batch_size * cfg.grad_accum * d.dp_size,
                    data={"teacher": json.loads((t_dir / "config.json").read_text())["weights"]["sha256"],
                          "instructions": sha256_file(paths.instructions / "train.parquet"),
                          "token_shards": sorted([e["path"], e["sha256"]] for e in manifest["shards"] if e["kind"] == "tokens")})
    schedule = {k: getattr(cfg, k) for k in SCHEDULE}
    session = TrainingSession("distill", paths.checkpoints / "distill", identity, schedule, d, fresh)
    start_step = session.start(model, optimizer, loader, cfg.seed)

    def checkpoint(step: int) -> None:
        session.save(step, model, optimizer, loader, {"config": dataclasses.asdict(cfg)}, keep=cfg.keep_checkpoints)

    loop_cfg = SimpleNamespace(**{k: getattr(cfg, k) for k in ("max_steps", "warmup_steps", "min_lr_ratio", "grad_accum",
                                                             "grad_clip", "batch_size", "eval_every", "eval_batches",
                                                             "ckpt_every", "log_every", "lr")},
                               seq_len=seq_len, dtype=dtype)
    to_train = start_step < cfg.max_steps
    bar = progress_bar() if (progress and d.is_main and to_train) else nullcontext(None)
    with bar as prog:
        history = train(model, optimizer, loader, loop_cfg, d, val_loader=val_loader, start_step=start_step,
                        checkpoint_fn=checkpoint, metrics_path=session.metrics_path, progress=prog, name="distill")
    session.finish()

    summary = {"stage": "distill", "teacher": str(t_dir), "resumed_from_step": start_step, **session.summary_extra,
               "steps": cfg.max_steps, "student_params": scfg.num_params(), "teacher_params": tcfg.num_params(),
               "student_layers": scfg.n_layer, "teacher_layers": tcfg.n_layer, "student_d_model": scfg.d_model,
               "init_from_teacher": init, "dtype": dtype}
    if history:
        tail = history[-min(10, len(history)):]
        summary["tokens_per_s"] = round(sum(r["tokens_per_s"] for r in tail) / len(tail), 1)
    out = paths.models / "student"
    meta = {"tokenizer": json.loads((t_dir / "config.json").read_text())["tokenizer"], "distill": dataclasses.asdict(cfg),
            "step": cfg.max_steps, "schedule_history": session.schedule_history, "teacher": {"path": str(t_dir), **identity["data"]}}
    with (atomic_dir(out) if d.is_main else nullcontext(None)) as tmp:
        export_model(unwrap(model).student, scfg, tmp, d, meta)
        if d.is_main:
            shutil.copyfile(t_dir / "tokenizer.json", tmp / "tokenizer.json")
            summary.update(session.write_records(tmp)[1])
            summary["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["outputs"] = [str(out)]
    return summary


def run(cfg: DistillConfig, sft: SftConfig, paths: Paths, fresh: bool = False, progress: bool = True) -> dict:
    d = init_distributed()
    try:
        if d.device.type == "cpu":
            torch.set_flush_denormal(True)
        return train_student(cfg, sft, paths, d, fresh, progress)
    finally:
        destroy_distributed()


@torch.no_grad()
def forward_latency(model: Decoder, seq_len: int = 128, repeats: int = 15) -> float:
    """Median seconds of a batch-1 forward of seq_len tokens (after 3 warm-up calls)."""
    model.eval()
    idx = torch.randint(len(SPECIAL_IDS), model.cfg.vocab_size, (1, min(seq_len, model.cfg.seq_len)),
                        generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 3):
        t = time.perf_counter()
        model(idx)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def distill(cfg: DistillConfig, sft: SftConfig, paths: Paths, fresh: bool = False) -> dict:
    """The distill stage: train the student (torchrun when cfg.nproc > 1), then compare it with the teacher on
    held-out QA and batch-1 forward latency; write 06_models/student/summary.json."""
    t_dir = teacher_dir(paths, sft)
    if not (t_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{t_dir} has no model: run `fm sft` first (the teacher is sft.teacher={sft.teacher})")
    if cfg.nproc == 1:
        summary = run(cfg, sft, paths, fresh)
    else:
        launch_recipe("fm.recipes.distill", {"distill": dataclasses.asdict(cfg), "sft": dataclasses.asdict(sft)},
                      paths.checkpoints / "distill-launch.json", paths.raw, paths.workdir, cfg.nproc, cfg.threads, fresh)
        summary = json.loads((paths.models / "student" / "summary.json").read_text())

    out = paths.models / "student"
    teacher, tokenizer = load_pretrained(t_dir)
    student, _ = load_pretrained(out)
    chat = ChatTemplate(tokenizer)
    items = sample_items(pq.read_table(paths.instructions / "heldout.parquet").to_pylist(), cfg.mc_items, cfg.seed)
    codes = load_manifest(paths.tokens / "shards")["codes"]["modality"]
    held, _ = load_examples(paths.instructions / "heldout.parquet", chat, codes)
    seq_len = cfg.seq_len or teacher.cfg.seq_len
    summary["heldout_loss"] = {name: heldout_loss(m, held, seq_len, cfg.batch_size, cfg.eval_batches, cfg.seed)
                               for name, m in (("teacher", teacher), ("student", student))}
    if items:
        summary["qa"] = {"teacher": evaluate_qa(teacher, chat, items, codes), "student": evaluate_qa(student, chat, items, codes)}
        summary["qa_accuracy"] = {k: v["accuracy"] for k, v in summary["qa"].items()}
        summary["qa_chance"] = summary["qa"]["teacher"]["chance"]
    # Interleaved, so that load from other processes hits both alike; one thread, as a deployed batch-1 server runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_times, s_times = [], []
        for _ in range(3):
            t_times.append(forward_latency(teacher))
            s_times.append(forward_latency(student))
    finally:
        torch.set_num_threads(threads)
    summary["latency_ms"] = {"teacher": round(1000 * statistics.median(t_times), 3),
                             "student": round(1000 * statistics.median(s_times), 3), "batch": 1, "seq_len": 128, "threads": 1}
    summary["speedup"] = round(statistics.median(t_times) / statistics.median(s_times), 3)
    summary["size_ratio"] = round(summary["student_params"] / summary["teacher_params"], 4)
    summary.pop("outputs", None)
    write_json(summary, out / "summary.json")
    shown = {k: v for k, v in summary.items() if k not in ("qa", "init_from_teacher", "teacher")}  # the rest: summary.json
    shown["outputs"] = [str(out)]
    return shown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Distill the tuned teacher into a smaller student "
                                             "(run under torchrun for several processes; `fm distill` also scores it).")
    ap.add_argument("--params", default="params.yaml", help="params file; its `distill` and `sft` sections are used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. distill.max_steps=50")
    ap.add_argument("--config", help="the resolved sections as JSON (what the stage passes to torchrun)")
    ap.add_argument("--raw", default="data/01_raw")
    ap.add_argument("--workdir", default="data")
    ap.add_argument("--fresh", action="store_true", help="set existing checkpoints aside and train from step 0")
    args = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    if args.config:
        given = json.loads(Path(args.config).read_text())
        cfg, sft = DistillConfig(**given["distill"]), SftConfig(**given["sft"])
    else:
        params = load_params(args.params, args.overrides)
        cfg, sft = params.distill, params.sft
    run(cfg, sft, Paths(args.raw, args.workdir), fresh=args.fresh)


if __name__ == "__main__":
    main()
