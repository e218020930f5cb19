"""Contrastive image-text pretraining (CLIP) on the corpus's image-caption pairs: the `pretrain_clip` stage.

    fm pretrain_clip                                    # beside pretrain in the DAG: it needs only the shards
    torchrun --nproc_per_node 2 -m fm.recipes.clip      # data parallel (the stage does this when nproc > 1)

Reads the image-caption Arrow shards (`05_tokens/shards`, with the tokenizer they were made with),
splits them by image (fm.data.images), and trains fm.models.clip.CLIP with the symmetric InfoNCE loss
over the global batch (features are gathered across data-parallel ranks, as open_clip does) through
fm.train.loop.train: the same loop, checkpoints, resume rules (fm.train.session) and process layout as
pretraining. Augmentation is a seeded random crop.

Then, on the held-out images (never trained on, in any language):
    retrieval      Recall@1/5/10 image->text (any of the image's captions) and text->image, over every
                   held-out caption, English and Chinese;
    zero-shot      the held-out Fashion-MNIST images against the class names their captions use (10 in
                   the sample: chance 10%), each class embedded through several prompt templates and
                   averaged (CLIP's prompt ensembling), in English and in Chinese.
Writes:
    06_models/checkpoints/pretrain_clip/step-XXXXXXXX/   training state
    06_models/clip/   model.safetensors, config.json ("model": the ClipConfig), tokenizer.json, metrics.jsonl,
                      loss.csv, summary.json (the metrics above); load with fm.recipes.clip.load_clip
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from fm.config import PretrainClipConfig, load_params
from fm.data.images import ImageCaptionLoader, ImageSet, load_image_captions, normalise, pad_ids
from fm.data.shards import load_manifest
from fm.data.tokenizer import SPECIAL_IDS, lang_token, open_tokenizer
from fm.io import atomic_dir, sha256_file
from fm.models.clip import CLIP, ClipConfig, clip_loss, retrieval_metrics, zero_shot_classifier, zero_shot_predict
from fm.paths import Paths
from fm.train.checkpoint import export_model, seed_rng
from fm.train.launch import die_with_parent, launch_recipe
from fm.train.loop import progress_bar, train
from fm.train.optim import build_optimizer
from fm.train.parallel import Dist, destroy_distributed, init_distributed, unwrap
from fm.train.session import TrainingSession

# Prompt templates for zero-shot classification, filled with a class name (CLIP's prompt ensembling).
TEMPLATES = {
    "en": ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.", "a small photo of a {}."],
    "zh": ["一张{}的照片", "一张{}的图片", "{}的照片", "一幅{}的图像"],
}
EXECUTION_ONLY = ("batch_size", "grad_accum", "nproc", "parallel", "threads", "log_every", "eval_every", "eval_batches",
                  "ckpt_every", "keep_checkpoints")
SCHEDULE = ("max_steps", "warmup_steps", "lr", "min_lr_ratio")


class ClipTraining(nn.Module):
    """CLIP with its loss: forward(images, ids, lengths) -> (None, loss, aux), what fm.train.loop.train calls."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, images, ids, lengths):
        image_features, text_features, logit_scale = self.model(images, ids, lengths)  # (B, D), (B, D), ()
        loss = clip_loss(image_features, text_features, logit_scale)
        return None, loss, {}


def clip_config(cfg: PretrainClipConfig, vocab_size: int, image_size: int) -> ClipConfig:
    fields = {f.name for f in dataclasses.fields(ClipConfig)}
    unknown = set(cfg.model) - fields
    if unknown:
        raise ValueError(f"pretrain_clip.model: unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(fields))})")
    return ClipConfig(**{**cfg.model, "vocab_size": vocab_size, "image_size": image_size})


def text_encoder_input(tokenizer, texts: list[str], langs: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as the text tower reads captions: <|lang:xx|> text <|endoftext|> -> (ids (N, T), lengths (N,))."""
    eot = SPECIAL_IDS["<|endoftext|>"]
    ids = [([tokenizer.token_to_id(lang_token(lang))] + e.ids)[:context_length - 1] + [eot]
           for e, lang in zip(tokenizer.encode_batch_fast(texts, add_special_tokens=False), langs)]
    return pad_ids(ids, SPECIAL_IDS["<|pad|>"])


@torch.no_grad()
def embed_set(model: CLIP, data: ImageSet, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features of every image (N, D) and every caption (M, D) of a set."""
    model.eval()
    images = torch.cat([model.encode_image(normalise(data.images[i:i + batch_size]))
                        for i in range(0, len(data), batch_size)])  # (N, D)
    texts = []
    for i in range(0, len(data.ids), batch_size):
        ids, lengths = pad_ids(data.ids[i:i + batch_size], SPECIAL_IDS["<|pad|>"])
        texts.append(model.encode_text(ids, lengths))
    return images, torch.cat(texts)  # (N, D), (M, D)


@torch.no_grad()
def evaluate_clip(model: CLIP, heldout: ImageSet, class_names: dict[str, list[str]], tokenizer) -> dict:
    """Retrieval on every held-out caption and zero-shot accuracy on the held-out labelled images."""
    image_features, text_features = embed_set(model, heldout)
    out = {"heldout_images": len(heldout), "heldout_captions": len(heldout.ids)}
    out.update({k: round(v, 4) for k, v in retrieval_metrics(image_features @ text_features.T,
                                                               torch.tensor(heldout.image_of)).items()})
    labelled = sorted(heldout.labels)
    if labelled and class_names.get("en"):
        out["zero_shot"] = {"images": len(labelled), "classes": len(class_names["en"]),
                            "chance": round(1 / len(class_names["en"]), 4)}
        features = image_features[labelled]  # (L, D)
        for lang, names in class_names.items():
            truth = [names.index(heldout.labels[i][lang]) if heldout.labels[i].get(lang) in names else -1 for i in labelled]
            keep = [j for j, t in enumerate(truth) if t >= 0]
            if not keep:
                continue
            encode = lambda texts, lang=lang: text_encoder_input(tokenizer, texts, [lang] * len(texts),  # noqa: E731
                                                                 model.cfg.context_length)
            classifier = zero_shot_classifier(model, encode, names, TEMPLATES[lang])  # (C, D)
            pred = zero_shot_predict(features[keep], classifier)  # (L',)
            out["zero_shot"][f"accuracy_{lang}"] = round((pred == torch.tensor([truth[j] for j in keep])).float().mean().item(), 4)
    return out


def class_names_of(data) -> dict[str, list[str]]:
    """The class list of the labelled source, per language, in the order of the English names (sorted)."""
    pairs = {}
    for s in (data.train, data.heldout):
        for names in s.labels.values():
            pairs.setdefault(names["en"], names.get("zh"))
    en = sorted(pairs)
    out = {"en": en}
    if en and all(pairs[n] for n in en):
        out["zh"] = [pairs[n] for n in en]
    return out


def train_clip(cfg: PretrainClipConfig, paths: Paths, d: Dist, fresh: bool = False, progress: bool = True) -> dict:
    """Train in this process (one of torchrun's, or alone); rank 0 exports 06_models/clip/ and returns the summary."""
    start = time.perf_counter()
    shard_dir = paths.tokens / "shards"
    manifest = load_manifest(shard_dir)
    tokenizer_path = shard_dir / manifest["tokenizer"]["path"]
    if sha256_file(tokenizer_path) != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{tokenizer_path} does not match its sha256 in {shard_dir / 'manifest.json'}: rerun `fm shard`")
    tokenizer = open_tokenizer(tokenizer_path)
    context_length = cfg.model.get("context_length", ClipConfig.context_length)
    data = load_image_captions(shard_dir, tokenizer, context_length, cfg.heldout_fraction, cfg.seed)
    if data.train.images is None:
        raise ValueError(f"no training images in {shard_dir}: pretrain_clip.heldout_fraction={cfg.heldout_fraction} holds out all")
    mcfg = clip_config(cfg, manifest["tokenizer"]["vocab_size"], data.train.images.shape[-1])
    loader = ImageCaptionLoader(data.train, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size, augment=cfg.augment)
    val_loader = None
    if len(data.heldout) >= cfg.batch_size * d.dp_size:
        val_loader = ImageCaptionLoader(data.heldout, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size)
    elif d.is_main:
        print(f"pretrain_clip: {len(data.heldout)} held-out images, fewer than a global batch: no held-out loss", file=sys.stderr)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = ClipTraining(CLIP(mcfg).to(d.device))
    wrapped = model
    if d.dp_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    optimizer = build_optimizer(wrapped, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    seed_rng(cfg.seed, d)
    dtype = "bf16" if cfg.dtype == "bf16" or (cfg.dtype == "auto" and d.device.type == "cuda"
                                               and torch.cuda.is_bf16_supported()) else "fp32"

    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_ONLY + SCHEDULE}
    identity.update(model=mcfg.to_dict(), global_batch=cfg.batch_size * d.dp_size,
                    data={"tokenizer": manifest["tokenizer"]["sha256"],
                          "images": sorted([e["path"], e["sha256"]] for e in manifest["shards"] if e["kind"] == "images")})
    schedule = {k: getattr(cfg, k) for k in SCHEDULE}
    session = TrainingSession("pretrain_clip", paths.checkpoints / "pretrain_clip", identity, schedule, d, fresh)
    start_step = session.start(wrapped, optimizer, loader, cfg.seed)

    def checkpoint(step: int) -> None:
        session.save(step, wrapped, optimizer, loader, {"config": dataclasses.asdict(cfg)}, keep=cfg.keep_checkpoints)

    # seq_len 1: the loop's tokens/s is then pairs/s
    loop_cfg = SimpleNamespace(**{k: getattr(cfg, k) for k in ("max_steps", "warmup_steps", "min_lr_ratio", "lr", "grad_accum",
                                                             "grad_clip", "batch_size", "eval_every", "eval_batches",
                                                             "ckpt_every", "log_every")}, seq_len=1, dtype=dtype)
    to_train = start_step < cfg.max_steps
    bar = progress_bar() if (progress and d.is_main and to_train) else nullcontext(None)
    with bar as prog:
        history = train(wrapped, optimizer, loader, loop_cfg, d, val_loader=val_loader, start_step=start_step,
                        checkpoint_fn=checkpoint, metrics_path=session.metrics_path, progress=prog, name="pretrain_clip")
    session.finish()

    clip = unwrap(wrapped).model
    summary = {"stage": "pretrain_clip", "resumed_from_step": start_step, **session.summary_extra, "steps": cfg.max_steps,
               "params": sum(p.numel() for p in clip.parameters()), "train_images": len(data.train),
               "train_captions": len(data.train.ids), "dtype": dtype, "logit_scale": round(clip.logit_scale.exp().item(), 3)}
    if history:
        tail = history[-min(10, len(history)):]
        summary["pairs_per_s"] = round(sum(r["tokens_per_s"] for r in tail) / len(tail), 1)
    if d.is_main and len(data.heldout):
        summary.update(evaluate_clip(clip, data.heldout, class_names_of(data), tokenizer))
    out = paths.models / "clip"
    meta = {"tokenizer": {**manifest["tokenizer"], "path": "tokenizer.json"}, "pretrain_clip": dataclasses.asdict(cfg),
            "step": cfg.max_steps, "schedule_history": session.schedule_history,
            "heldout": {"fraction": cfg.heldout_fraction, "seed": cfg.seed}}
    with (atomic_dir(out) if d.is_main else nullcontext(None)) as tmp:
        export_model(clip, mcfg, tmp, d, meta)
        if d.is_main:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            summary.update(session.write_records(tmp)[1])
            summary["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    summary["outputs"] = [str(out)]
    return summary


def load_clip(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(CLIP, tokenizer) from 06_models/clip/: the weights checked against config.json's sha256, safetensors only."""
    from safetensors.torch import load_file

    from fm.models.pretrained import verify_weights

    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: not a CLIP model folder (run `fm pretrain_clip`)")
    config = json.loads((model_dir / "config.json").read_text())
    verify_weights(model_dir, config)
    model = CLIP(ClipConfig.from_dict(config["model"]))
    try:
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    except RuntimeError as e:
        raise ValueError(f"{model_dir}: model.safetensors does not match config.json: {e}") from None
    return model.to(device).eval(), open_tokenizer(model_dir / "tokenizer.json")


def run(cfg: PretrainClipConfig, paths: Paths, fresh: bool = False, progress: bool = True) -> dict:
    d = init_distributed()
    try:
        if d.device.type == "cpu":
            torch.set_flush_denormal(True)
        return train_clip(cfg, paths, d, fresh, progress)
    finally:
        destroy_distributed()


def pretrain_clip(cfg: PretrainClipConfig, paths: Paths, fresh: bool = False) -> dict:
    """The pretrain_clip stage: train (torchrun when cfg.nproc > 1), evaluate, export to 06_models/clip/."""
    if not (paths.tokens / "shards" / "manifest.json").is_file():
        raise FileNotFoundError(f"{paths.tokens / 'shards'} has no manifest.json: run `fm shard` first")
    if cfg.nproc == 1:
        summary = run(cfg, paths, fresh)
    else:
        launch_recipe("fm.recipes.clip", dataclasses.asdict(cfg), paths.checkpoints / "pretrain_clip-launch.json",
                      paths.raw, paths.workdir, cfg.nproc, cfg.threads, fresh)
        summary = json.loads((paths.models / "clip" / "summary.json").read_text())
        summary["outputs"] = [str(paths.models / "clip")]
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a CLIP dual encoder on the image-caption shards "
                                             "(run under torchrun for several processes).")
    ap.add_argument("--params", default="params.yaml", help="params file; its `pretrain_clip` section is used")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. pretrain_clip.max_steps=50")
    ap.add_argument("--config", help="a resolved PretrainClipConfig as JSON (what the stage passes to torchrun)")
    ap.add_argument("--raw", default="data/01_raw")
    ap.add_argument("--workdir", default="data")
    ap.add_argument("--fresh", action="store_true", help="set existing checkpoints aside and train from step 0")
    args = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    cfg = PretrainClipConfig(**json.loads(Path(args.config).read_text())) if args.config else \
        load_params(args.params, args.overrides).pretrain_clip
    run(cfg, Paths(args.raw, args.workdir), fresh=args.fresh)


if __name__ == "__main__":
    main()
