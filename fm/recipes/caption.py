"""Frozen-style captioning (Tsimpoukelli et al. 2021): a vision prefix for the frozen pretrained LM, the `caption` stage.

    fm caption                                  # after pretrain and pretrain_clip
    fm generate --image path/to/picture.png     # a caption for any PNG or JPEG

An image encoder (started from the CLIP image tower) maps an image to `n_prefix` embeddings in the
decoder's input space; the pretrained decoder reads them in front of the caption and stays frozen
(requires_grad False, and its weights are checked bit for bit after training). Only the image side
trains, on the caption's cross-entropy given the prefix. A caption is the pretraining format of an
image-caption document, `<|image_text|> <|lang:xx|> caption <|endoftext|>`, so the LM already knows
how a caption reads; the loss is on the caption and its end (not on the two markers, which are given).

Metrics, on held-out images (the same image split as pretrain_clip):
    perplexity        of the held-out captions with the image prefix, against the same frozen LM with no
                      prefix (the image must lower it);
    retrieval         image -> caption by caption likelihood: for each of up to `retrieval_images` held-out
                      images, its English caption ranked among theirs by log p(caption | image), Recall@1/5,
                      and by log p(caption | image) - log p(caption) (`_pmi`: what the image adds).
Writes:
    06_models/checkpoints/caption/step-XXXXXXXX/   training state (the image side only)
    06_models/caption/   model.safetensors (the frozen LM, unchanged), prefix.safetensors (the image side),
                         config.json, tokenizer.json, metrics.jsonl, loss.csv, summary.json; load with load_captioner
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fm.config import CaptionConfig, load_params
from fm.data.images import ImageCaptionLoader, ImageSet, load_image_captions, normalise, pad_ids
from fm.data.tokenizer import SPECIAL_IDS, lang_token
from fm.io import atomic_dir, sha256_file
from fm.models.clip import ClipConfig, VisionTransformer
from fm.models.decoder import Decoder
from fm.models.pretrained import load_pretrained
from fm.paths import Paths
from fm.recipes.clip import load_clip
from fm.train.checkpoint import seed_rng
from fm.train.launch import die_with_parent, launch_recipe
from fm.train.loop import progress_bar, train
from fm.train.optim import build_optimizer
from fm.train.parallel import Dist, destroy_distributed, init_distributed, unwrap
from fm.train.session import TrainingSession

EXECUTION_ONLY = ("batch_size", "nproc", "threads", "log_every", "eval_every", "eval_batches", "ckpt_every",
                  "keep_checkpoints", "retrieval_images")
SCHEDULE = ("max_steps", "warmup_steps", "lr", "min_lr_ratio")


class VisionPrefix(nn.Module):
    """Image (B, 3, S, S) -> n_prefix embeddings (B, P, d_model) for the decoder's input."""

    def __init__(self, vision_cfg: ClipConfig, n_prefix: int, d_model: int):
        super().__init__()
        self.visual = VisionTransformer(vision_cfg)
        self.n_prefix, self.d_model = n_prefix, d_model
        self.proj = nn.Linear(vision_cfg.vision_width, n_prefix * d_model)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, images):
        pooled = self.visual(images)  # (B, W)
        return self.proj(pooled).view(images.shape[0], self.n_prefix, self.d_model)  # (B, P, C)


class Captioner(nn.Module):
    """The trainable vision prefix in front of a frozen Decoder (held outside the module's parameters and state,
    so it is neither trained, nor wrapped by DDP, nor checkpointed)."""

    def __init__(self, prefix: VisionPrefix, lm: Decoder):
        super().__init__()
        self.prefix = prefix
        self.__dict__["lm"] = lm.eval().requires_grad_(False)  # not a submodule

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # the frozen LM never drops out
        return self

    def forward(self, images, ids, lengths):
        """ids (B, T): <|image_text|> <|lang|> caption <|endoftext|>, right-padded; lengths (B,).
        Returns (logits (B, T, V) of the caption positions, loss on the caption and its end, aux)."""
        prefix = self.prefix(images) if images is not None else None  # (B, P, C)
        return _lm_forward(self.lm, prefix, ids, lengths)


def caption_targets(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) targets: position t predicts ids[t + 1] from the lang marker on; the markers and padding are -100."""
    B, T = ids.shape
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    positions = torch.arange(T, device=ids.device)[None, :]  # (1, T)
    targets[(positions < 1) | (positions >= (lengths[:, None] - 1))] = -100  # predict from <|lang|> to <|endoftext|>
    return targets


def _lm_forward(lm: Decoder, prefix: torch.Tensor | None, ids: torch.Tensor, lengths: torch.Tensor):
    """The frozen LM on [prefix, ids]: (logits of the ids' positions (B, T, V), mean caption loss, aux)."""
    B, T = ids.shape
    targets = caption_targets(ids, lengths)  # (B, T)
    embeds = lm.tok_emb(ids)  # (B, T, C)
    if prefix is None:
        logits, loss, aux = lm(ids, targets)
        return logits, loss, aux
    P = prefix.shape[1]
    inputs = torch.cat((prefix.to(embeds.dtype), embeds), dim=1)  # (B, P + T, C)
    idx = torch.cat((ids.new_zeros(B, P), ids), dim=1)  # (B, P + T): id 0 under the prefix (hash-routed MoE)
    full_targets = torch.cat((targets.new_full((B, P), -100), targets), dim=1)  # (B, P + T)
    logits, loss, aux = lm(idx, full_targets, inputs_embeds=inputs)
    return logits[:, P:], loss, aux


def caption_ids(tokenizer, text: str, lang: str, max_len: int) -> list[int]:
    """<|image_text|> <|lang:xx|> text <|endoftext|>, cut to max_len (the end token kept)."""
    head = [SPECIAL_IDS["<|image_text|>"], tokenizer.token_to_id(lang_token(lang))]
    return (head + tokenizer.encode(text, add_special_tokens=False).ids)[:max_len - 1] + [SPECIAL_IDS["<|endoftext|>"]]


def _recaption(data: ImageSet, tokenizer, max_len: int) -> None:
    """Replace the set's text-tower ids (<|lang|> text <|endoftext|>) by the LM's caption format, in place."""
    data.ids = [caption_ids(tokenizer, t, lang, max_len) for t, lang in zip(data.texts, data.langs)]


@torch.no_grad()
def caption_loglik(model: Captioner, images: torch.Tensor | None, ids: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """Sum of log p(caption tokens | image prefix) per (image, caption) row: (N,) nats, and the token count."""
    model.eval()
    totals, counts = [], []
    for i in range(0, len(ids), batch_size):
        x, lengths = pad_ids(ids[i:i + batch_size], SPECIAL_IDS["<|pad|>"])
        prefix = model.prefix(normalise(images[i:i + batch_size])) if images is not None else None
        logits, _, _ = _lm_forward(model.lm, prefix, x, lengths)
        targets = caption_targets(x, lengths)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T)
        mask = targets != -100
        totals.append((picked * mask).sum(dim=1))
        counts.append(mask.sum(dim=1))
    return torch.cat(totals), torch.cat(counts)


@torch.no_grad()
def evaluate_captioner(model: Captioner, heldout: ImageSet, retrieval_images: int) -> dict:
    """Held-out caption perplexity with and without the image prefix, and image->caption retrieval by likelihood."""
    captions = list(range(len(heldout.ids)))
    images = heldout.images[torch.tensor(heldout.image_of)]  # (M, 3, S, S): each caption's image
    ids = [heldout.ids[c] for c in captions]
    with_prefix, n_tokens = caption_loglik(model, images, ids)
    without, _ = caption_loglik(model, None, ids)
    out = {"heldout_captions": len(ids),
           "perplexity_with_image": round(math.exp(-with_prefix.sum().item() / n_tokens.sum().item()), 3),
           "perplexity_without_image": round(math.exp(-without.sum().item() / n_tokens.sum().item()), 3)}
    # Retrieval: N images, the English caption of each; score every (image, caption) pair.
    per_image = {}
    for c, i in enumerate(heldout.image_of):
        if heldout.langs[c] == "en" and i not in per_image:
            per_image[i] = c
    chosen = sorted(per_image)[:retrieval_images]
    if len(chosen) >= 2:
        N = len(chosen)
        caps = [heldout.ids[per_image[i]] for i in chosen]
        rows_images = heldout.images[torch.tensor(chosen)].repeat_interleave(N, dim=0)  # (N * N, ...): image i, caption j
        scores, _ = caption_loglik(model, rows_images, caps * N)
        scores = scores.view(N, N)  # (image, caption): log p(caption | image)
        prior, _ = caption_loglik(model, None, caps)  # (N,): log p(caption) under the LM alone
        out["retrieval_images"] = N
        # Raw likelihood favours captions that are likely anyway (short, common); subtracting each caption's own
        # log-likelihood without the image ranks by what the image adds (pointwise mutual information).
        for name, table in (("", scores), ("_pmi", scores - prior[None, :])):
            true = table.diagonal()[:, None]  # (N, 1)
            rank = (table > true).sum(dim=1)  # captions scored strictly above the image's own (a copy of it ties)
            for k in (1, 5):
                out[f"image_to_caption{name}_R@{k}"] = round((rank < k).float().mean().item(), 4)
        out["retrieval_chance_R@1"] = round(1 / N, 4)
    return out


def train_captioner(cfg: CaptionConfig, paths: Paths, d: Dist, fresh: bool = False, progress: bool = True) -> dict:
    start = time.perf_counter()
    lm_dir, clip_dir = paths.models / "pretrain", paths.models / "clip"
    lm, tokenizer = load_pretrained(lm_dir, d.device)
    clip, _ = load_clip(clip_dir, d.device)
    clip_meta = json.loads((clip_dir / "config.json").read_text())
    if clip_meta["tokenizer"]["sha256"] != json.loads((lm_dir / "config.json").read_text())["tokenizer"]["sha256"]:
        raise ValueError(f"{clip_dir} and {lm_dir} were trained with different tokenizers: rerun `fm pretrain_clip`")
    lm_before = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    held = clip_meta["heldout"]  # the same image split as CLIP's: its held-out images stay unseen here too
    data = load_image_captions(paths.tokens / "shards", tokenizer, lm.cfg.seq_len, held["fraction"], held["seed"],
                               image_size=clip.cfg.image_size)
    max_len = min(cfg.max_caption_tokens, lm.cfg.seq_len - cfg.n_prefix)
    _recaption(data.train, tokenizer, max_len)
    _recaption(data.heldout, tokenizer, max_len)
    loader = ImageCaptionLoader(data.train, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size, augment=cfg.augment)
    val_loader = (ImageCaptionLoader(data.heldout, cfg.batch_size, cfg.seed, d.dp_rank, d.dp_size)
                  if len(data.heldout) >= cfg.batch_size * d.dp_size else None)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prefix = VisionPrefix(clip.cfg, cfg.n_prefix, lm.cfg.d_model).to(d.device)
    prefix.visual.load_state_dict(clip.visual.state_dict())  # the CLIP image tower as the start
    model = Captioner(prefix, lm)
    wrapped = model if d.dp_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    optimizer = build_optimizer(wrapped, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    seed_rng(cfg.seed, d)

    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EXECUTION_ONLY + SCHEDULE}
    identity.update(global_batch=cfg.batch_size * d.dp_size,
                    data={"lm": json.loads((lm_dir / "config.json").read_text())["weights"]["sha256"],
                          "clip": clip_meta["weights"]["sha256"]})
    session = TrainingSession("caption", paths.checkpoints / "caption", identity,
                              {k: getattr(cfg, k) for k in SCHEDULE}, d, fresh)
    start_step = session.start(wrapped, optimizer, loader, cfg.seed)

    def checkpoint(step: int) -> None:
        session.save(step, wrapped, optimizer, loader, {"config": dataclasses.asdict(cfg)}, keep=cfg.keep_checkpoints)

    loop_cfg = SimpleNamespace(**{k: getattr(cfg, k) for k in ("max_steps", "warmup_steps", "min_lr_ratio", "lr", "grad_clip",
                                                             "batch_size", "eval_every", "eval_batches", "ckpt_every",
                                                             "log_every")}, grad_accum=1, seq_len=1, dtype="fp32")
    to_train = start_step < cfg.max_steps
    bar = progress_bar() if (progress and d.is_main and to_train) else nullcontext(None)
    with bar as prog:
        train(wrapped, optimizer, loader, loop_cfg, d, val_loader=val_loader, start_step=start_step,
              checkpoint_fn=checkpoint, metrics_path=session.metrics_path, progress=prog, name="caption")
    session.finish()
    inner = unwrap(wrapped)
    unchanged = all(torch.equal(v, lm_before[k]) for k, v in lm.state_dict().items())
    if not unchanged:
        raise RuntimeError("caption: the frozen LM's weights changed during training (a bug: nothing of it may train)")

    summary = {"stage": "caption", "resumed_from_step": start_step, **session.summary_extra, "steps": cfg.max_steps,
               "n_prefix": cfg.n_prefix, "trainable_params": sum(p.numel() for p in inner.prefix.parameters()),
               "lm_params": sum(p.numel() for p in lm.parameters()), "lm_unchanged": unchanged}
    if d.is_main and len(data.heldout):
        summary.update(evaluate_captioner(inner, data.heldout, cfg.retrieval_images))
    out = paths.models / "caption"
    with (atomic_dir(out) if d.is_main else nullcontext(None)) as tmp:
        if d.is_main:
            for name in ("model.safetensors", "tokenizer.json"):
                shutil.copyfile(lm_dir / name, tmp / name)  # the frozen LM, byte for byte
            save_file({k: v.detach().cpu().contiguous() for k, v in inner.prefix.state_dict().items()},
                      str(tmp / "prefix.safetensors"), metadata={"format": "pt"})
            lm_config = json.loads((lm_dir / "config.json").read_text())
            config = {**lm_config, "caption": {"n_prefix": cfg.n_prefix, "vision": clip.cfg.to_dict(),
                                               "max_caption_tokens": max_len, "path": "prefix.safetensors",
                                               "bytes": (tmp / "prefix.safetensors").stat().st_size,
                                               "sha256": sha256_file(tmp / "prefix.safetensors")}}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            summary.update(session.write_records(tmp)[1])
            summary["seconds"] = round(time.perf_counter() - start, 2)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["outputs"] = [str(out)]
    return summary


def load_captioner(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(Captioner, tokenizer) from 06_models/caption/: the LM and prefix checked against config.json's sha256s."""
    model_dir = Path(model_dir)
    lm, tokenizer = load_pretrained(model_dir, device)
    config = json.loads((model_dir / "config.json").read_text())
    spec = config.get("caption")
    if spec is None:
        raise ValueError(f"{model_dir / 'config.json'} has no caption section: not a captioning model (run `fm caption`)")
    path = model_dir / spec["path"]
    if not path.is_file() or path.stat().st_size != spec["bytes"] or sha256_file(path) != spec["sha256"]:
        raise ValueError(f"{path} is missing, damaged or changed after export (size or sha256 differs from config.json)")
    prefix = VisionPrefix(ClipConfig.from_dict(spec["vision"]), spec["n_prefix"], lm.cfg.d_model)
    try:
        prefix.load_state_dict(load_file(str(path)))
    except RuntimeError as e:
        raise ValueError(f"{path} does not match config.json: {e}") from None
    return Captioner(prefix.to(device).eval(), lm), tokenizer


@torch.no_grad()
def write_caption(model: Captioner, tokenizer, image: torch.Tensor, lang: str = "en", max_new_tokens: int = 24) -> str:
    """Greedy caption of one image (3, S, S) uint8."""
    model.eval()
    lm = model.lm
    prefix = model.prefix(normalise(image[None]))  # (1, P, C)
    ids = [SPECIAL_IDS["<|image_text|>"], tokenizer.token_to_id(lang_token(lang))]
    eot = SPECIAL_IDS["<|endoftext|>"]
    P = prefix.shape[1]
    for _ in range(min(max_new_tokens, lm.cfg.seq_len - P - len(ids))):
        x = torch.tensor([ids])
        embeds = torch.cat((prefix, lm.tok_emb(x)), dim=1)  # (1, P + T, C)
        logits, _, _ = lm(torch.cat((x.new_zeros(1, P), x), dim=1), inputs_embeds=embeds)
        nxt = int(logits[0, -1].argmax())
        if nxt == eot:
            break
        ids.append(nxt)
    return tokenizer.decode(ids[2:])


def run(cfg: CaptionConfig, paths: Paths, fresh: bool = False, progress: bool = True) -> dict:
    d = init_distributed()
    try:
        if d.device.type == "cpu":
            torch.set_flush_denormal(True)
        return train_captioner(cfg, paths, d, fresh, progress)
    finally:
        destroy_distributed()


def caption(cfg: CaptionConfig, paths: Paths, fresh: bool = False) -> dict:
    """The caption stage: train the vision prefix (torchrun when cfg.nproc > 1), evaluate, export 06_models/caption/."""
    for need, stage in ((paths.models / "pretrain" / "model.safetensors", "pretrain"),
                        (paths.models / "clip" / "model.safetensors", "pretrain_clip")):
        if not need.is_file():
            raise FileNotFoundError(f"{need} not found: run `fm {stage}` first")
    if cfg.nproc == 1:
        return run(cfg, paths, fresh)
    launch_recipe("fm.recipes.caption", dataclasses.asdict(cfg), paths.checkpoints / "caption-launch.json",
                  paths.raw, paths.workdir, cfg.nproc, cfg.threads, fresh)
    summary = json.loads((paths.models / "caption" / "summary.json").read_text())
    summary["outputs"] = [str(paths.models / "caption")]
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a vision prefix for the frozen LM (Frozen-style captioning).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--config", help="a resolved CaptionConfig as JSON (what the stage passes to torchrun)")
    ap.add_argument("--raw", default="data/01_raw")
    ap.add_argument("--workdir", default="data")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()
    cfg = CaptionConfig(**json.loads(Path(args.config).read_text())) if args.config else \
        load_params(args.params, args.overrides).caption
    run(cfg, Paths(args.raw, args.workdir), fresh=args.fresh)


if __name__ == "__main__":
    main()
