"""CLIP pretraining and Frozen-style captioning recipes (fm/data/images.py, fm/recipes/clip.py, fm/recipes/caption.py,
`fm generate --image`): the split by image and its labels, the image-caption loader (one caption per image per
epoch, seeded crops, resume, rank shares), pretrain_clip resumed bit-identically and on 2 processes against 1,
the frozen LM under the caption prefix, the exported folders loading (and refusing tampered files), the CLI.

Data: a slice of the bundled sample's image-caption manifests (Fashion-MNIST with English and Chinese captions,
emoji, clip art) ingested at 32 px through fm.data.ingest, beside the text and code slice of
tests/conftest.py's build_sample_shards, through the real tokenize and shard stages. Runs (module-scoped):
    single    pretrain_clip, 1 process, batch 8, 4 steps (checkpoints at 2 and 4)
    crashed   the same, killed after its step-2 checkpoint, then rerun
    dual      pretrain_clip on 2 processes (torchrun), batch 4 each
    caption   a 100-step 2 x 32 pretrained LM, then 3 caption steps on single's CLIP
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc  # noqa: F401  (pa.ipc)
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import fm.recipes.caption as caption_recipe
import fm.recipes.clip as clip_recipe
import fm.train.loop as loop
from fm.cli import app
from fm.config import CaptionConfig, IngestConfig, PretrainClipConfig, PretrainConfig
from fm.data.images import ImageCaptionLoader, ImageSet, _decode, _is_heldout, load_image_captions, normalise
from fm.data.ingest import ingest_image_manifest, load_image
from fm.data.schema import SCHEMAS
from fm.data.tokenizer import SPECIAL_IDS, lang_token, open_tokenizer
from fm.paths import Paths
from fm.recipes.caption import (caption_loglik, caption_targets, load_captioner, train_captioner, write_caption)
from fm.recipes.clip import class_names_of, embed_set, evaluate_clip, load_clip, pretrain_clip
from fm.train.checkpoint import step_dirs
from fm.train.optim import lr_at
from fm.train.parallel import Dist
from tests.conftest import REPO, build_sample_shards

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RAW = REPO / "data" / "01_raw"
IMAGE_SIZE = 32
# manifest lines taken from each source (Fashion-MNIST and emoji: an English and a Chinese caption per image)
SLICE = {"fashion-mnist": 160, "noto-emoji": 80, "openclipart": 40}
HELDOUT = 0.25
MODEL = {"patch_size": 16, "vision_layers": 1, "vision_width": 32, "vision_heads": 2, "text_layers": 1,
         "text_width": 32, "text_heads": 2, "context_length": 16, "embed_dim": 16}
CLIP = dict(model=MODEL, heldout_fraction=HELDOUT, augment=2, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=1,
            ckpt_every=2, keep_checkpoints=2, log_every=0, threads=1, dtype="fp32")
GLOBAL_BATCH = 8
# 100 steps on text and captions (a second): enough for greedy captions in words ("a photo of a ..."); after 2
# steps the LM's first guess after <|lang:en|> is <|endoftext|> and every caption is empty
PRETRAIN = dict(preset="tiny", model={"n_layer": 2, "d_model": 32, "n_head": 2}, seq_len=128, batch_size=2,
                max_steps=100, warmup_steps=1, eval_every=100, eval_batches=1, ckpt_every=100, threads=1,
                peak_tflops=1.0, mix={"text": 1, "image_text": 1})
CAPTION = dict(n_prefix=2, max_caption_tokens=16, augment=2, retrieval_images=8, batch_size=4, max_steps=3,
               warmup_steps=1, eval_every=3, eval_batches=1, ckpt_every=3, log_every=0, threads=1)
TIMING = ("tokens_per_s", "step_s")
FASHION_PNG = RAW / "image_text" / "fashion-mnist" / "images" / "t10k-00023.png"  # the first manifest line's image


def clip_cfg(nproc: int = 1) -> PretrainClipConfig:
    return PretrainClipConfig(**CLIP, batch_size=GLOBAL_BATCH // nproc, nproc=nproc)


# ------------------------------------------------------------------ fixtures


def manifest_slice() -> list[dict]:
    """The manifest records the shards hold, with their image keys ("source:image path")."""
    out = []
    for source, n in SLICE.items():
        for line in (RAW / "image_text" / source / "manifest.jsonl").read_text(encoding="utf-8").splitlines()[:n]:
            rec = json.loads(line)
            out.append({**rec, "key": f"{rec.get('source', source)}:{rec['image']}"})
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Paths:
    """Sample shards with the image-caption slice (32 px), text and code, a 512-token tokenizer."""
    wd = tmp_path_factory.mktemp("clip-shards")
    paths = Paths(RAW, wd)
    paths.curated.mkdir(parents=True)
    rows = []
    cfg = IngestConfig(image_size=IMAGE_SIZE)
    for source, n in SLICE.items():
        manifest = RAW / "image_text" / source / "manifest.jsonl"
        data = b"".join(manifest.read_bytes().splitlines(keepends=True)[:n])
        res = ingest_image_manifest(manifest, data, f"image_text/{source}/manifest.jsonl", source, cfg, RAW)
        assert not res.quarantined and len(res.rows) == n
        rows += res.rows
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["image_text"]), paths.curated / "image_text.parquet")
    return build_sample_shards(wd)  # adds text and code, trains the tokenizer, writes every shard


@pytest.fixture(scope="module")
def tokenizer(shards):
    return open_tokenizer(shards.tokens / "tokenizer.json")


@pytest.fixture(scope="module")
def data(shards, tokenizer):
    return load_image_captions(shards.tokens / "shards", tokenizer, MODEL["context_length"], HELDOUT, seed=0)


def workdir(shards: Paths, root: Path, name: str) -> Paths:
    wd = root / name
    (wd / "06_models").mkdir(parents=True)
    (wd / "05_tokens").symlink_to(shards.tokens.resolve(), target_is_directory=True)
    return Paths(shards.raw, wd)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clip-runs")


@pytest.fixture(scope="module")
def single(shards, root):
    """pretrain_clip on 1 process at the global batch; the trained CLIP captured as it is exported."""
    paths = workdir(shards, root, "single")
    captured = {}
    real_export = clip_recipe.export_model

    def export(model, *args, **kwargs):
        captured["model"] = copy.deepcopy(model).eval()
        return real_export(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clip_recipe, "export_model", export)
        summary = pretrain_clip(clip_cfg(1), paths)
    return paths, summary, captured["model"]


@pytest.fixture(scope="module")
def dual(shards, root):
    """The same run on 2 processes (the stage launches torchrun), batch 4 each."""
    paths = workdir(shards, root, "dual")
    return paths, pretrain_clip(clip_cfg(2), paths)


@pytest.fixture(scope="module")
def captioned(shards, single, root):
    """A tiny pretrained LM and 3 caption steps on single's CLIP; the Captioner and optimizer captured, and which
    parameters held a gradient at each optimizer step."""
    from fm.recipes.pretrain import run as pretrain_run

    paths = workdir(shards, root, "caption")
    pretrain_run(PretrainConfig(**PRETRAIN), paths, progress=False)
    (paths.models / "clip").symlink_to(single[0].models / "clip", target_is_directory=True)
    captured = {"grads": []}
    real_train = caption_recipe.train

    def spy_train(model, optimizer, *args, **kwargs):
        captured["model"], captured["optimizer"] = model, optimizer
        real_step = optimizer.step

        def step(*a, **k):
            named = [(f"prefix.{n}", p) for n, p in model.prefix.named_parameters()]
            named += [(f"lm.{n}", p) for n, p in model.lm.named_parameters()]
            captured["grads"].append({n: None if p.grad is None else p.grad.detach().clone() for n, p in named})
            return real_step(*a, **k)

        optimizer.step = step
        return real_train(model, optimizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caption_recipe, "train", spy_train)
        summary = train_captioner(CaptionConfig(**CAPTION), paths, Dist(), progress=False)
    return paths, summary, captured


def records(folder: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (everything that must be bit-identical)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_safetensors(a: Path, b: Path) -> bool:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01  # in the tensor data, not the header: the file still parses
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ 1. the split by image and the labels


def test_split_is_by_image_and_keeps_every_caption_with_its_image(data, tokenizer):
    expected: dict[str, set] = {}
    for rec in manifest_slice():
        expected.setdefault(rec["key"], set()).add((rec["caption"], rec["lang"]))
    train, held = data.train, data.heldout
    assert not set(train.keys) & set(held.keys)
    assert set(train.keys) | set(held.keys) == set(expected)
    assert len(train) + len(held) == len(expected) == 40 + 80 + 40  # images, not captions
    eot = SPECIAL_IDS["<|endoftext|>"]
    for s in (train, held):
        assert len(s.keys) == len(s.sources) == s.images.shape[0] and len(set(s.keys)) == len(s.keys)
        assert s.images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and s.images.dtype == torch.uint8
        assert len(s.texts) == len(s.langs) == len(s.ids) == len(s.image_of)
        assert all(0 <= i < len(s) for i in s.image_of)
        for i, captions in enumerate(s.captions_of()):
            # every caption of the image, in every language, on this side of the split
            assert {(s.texts[c], s.langs[c]) for c in captions} == expected[s.keys[i]]
            assert s.sources[i] == s.keys[i].split(":")[0]
        for text, lang, ids in zip(s.texts, s.langs, s.ids):
            want = [tokenizer.token_to_id(lang_token(lang))] + tokenizer.encode(text, add_special_tokens=False).ids
            want = want[:MODEL["context_length"] - 1] + [eot]
            assert ids == want and len(ids) <= MODEL["context_length"]
    assert sum(len(s.ids) for s in (train, held)) == sum(SLICE.values())
    # the pixels: the raw file through ingest's fit to 32 px, decoded
    key = f"fashion-mnist:images/{FASHION_PNG.name}"
    s = train if key in train.keys else held
    _, png, _ = load_image(FASHION_PNG, IngestConfig(image_size=IMAGE_SIZE))
    assert torch.equal(s.images[s.keys.index(key)], torch.from_numpy(_decode(png, IMAGE_SIZE, "x")))


def test_heldout_share_follows_the_fraction_and_the_seed(shards, tokenizer, data):
    n = len(data.train) + len(data.heldout)
    share = len(data.heldout) / n
    assert abs(share - HELDOUT) < 4 * math.sqrt(HELDOUT * (1 - HELDOUT) / n), share  # 4 sigma of a binomial
    keys = [f"source:images/{i}.png" for i in range(20_000)]
    for fraction in (0.1, 0.5):
        assert abs(sum(_is_heldout(k, fraction, 0) for k in keys) / len(keys) - fraction) < 0.015
    shard_dir = shards.tokens / "shards"
    again = load_image_captions(shard_dir, tokenizer, MODEL["context_length"], HELDOUT, seed=0)
    assert again.heldout.keys == data.heldout.keys and again.train.keys == data.train.keys
    assert torch.equal(again.heldout.images, data.heldout.images) and again.heldout.ids == data.heldout.ids
    other = load_image_captions(shard_dir, tokenizer, MODEL["context_length"], HELDOUT, seed=1)
    assert set(other.heldout.keys) != set(data.heldout.keys)
    assert set(other.train.keys) | set(other.heldout.keys) == set(data.train.keys) | set(data.heldout.keys)
    more = load_image_captions(shard_dir, tokenizer, MODEL["context_length"], 0.6, seed=0)
    assert set(data.heldout.keys) < set(more.heldout.keys)  # a larger fraction only adds images (one hash per key)


def test_fashion_mnist_images_carry_their_class_names_in_both_languages(data):
    label_of = {rec["key"]: rec["label"] for rec in manifest_slice() if rec["source"] == "fashion-mnist"}
    by_label: dict[int, dict] = {}
    for s in (data.train, data.heldout):
        labelled = {s.keys[i] for i in s.labels}
        assert labelled == {k for k in s.keys if k.startswith("fashion-mnist:")}  # every one, and only them
        for i, names in s.labels.items():
            assert set(names) == {"en", "zh"}
            texts = {s.texts[c] for c in s.captions_of()[i]}
            article = ("an " if names["en"][0] in "aeiou" else "a ") if names["en"] != "trousers" else ""
            assert texts == {f"a photo of {article}{names['en']}", f"一张{names['zh']}的照片"}
            assert by_label.setdefault(label_of[s.keys[i]], names) == names  # one name per class
    held_labels = {label_of[data.heldout.keys[i]] for i in data.heldout.labels}
    assert len(data.heldout.labels) >= 5 and len(held_labels) >= 4  # a zero-shot test set with several classes
    assert len({n["en"] for n in by_label.values()}) == len(by_label) and len(by_label) >= 8
    assert data.heldout.labels[next(iter(data.heldout.labels))]["en"] in {n["en"] for n in by_label.values()}
    names = class_names_of(data)
    assert names["en"] == sorted(n["en"] for n in by_label.values())
    assert names["zh"] == [next(n["zh"] for n in by_label.values() if n["en"] == en) for en in names["en"]]
    assert "ankle boot" in names["en"] and "短靴" in names["zh"] and "trousers" in names["en"]


def test_a_picture_stored_twice_stays_on_one_side_of_the_split(tokenizer, tmp_path):
    manifest = RAW / "image_text" / "openclipart" / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    pair = [line for line in lines if b"light_bulb_karl_bartel_01.png" in line or b"teschio_fabio_olivo_02.png" in line]
    res = ingest_image_manifest(manifest, b"".join(pair), "image_text/openclipart/manifest.jsonl", "openclipart",
                                IngestConfig(image_size=IMAGE_SIZE), RAW)
    assert len(res.rows) == 2 and res.rows[0]["id"] != res.rows[1]["id"]  # other captions: curate keeps both
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    table = pa.Table.from_pylist(res.rows, schema=SCHEMAS["image_text"])
    with pa.ipc.new_file(shard_dir / "image_text-00000.arrow", table.schema) as writer:
        writer.write_table(table)
    entry = {"path": "image_text-00000.arrow", "kind": "images"}
    (shard_dir / "manifest.json").write_text(json.dumps({"shards": [entry]}))
    split = load_image_captions(shard_dir, tokenizer, MODEL["context_length"], HELDOUT, seed=0)
    # one picture: one image with both captions, on one side of the split (and never twice in a batch)
    assert len(split.train) + len(split.heldout) == 1
    side = split.train if len(split.train) else split.heldout
    assert len(side.ids) == 2 and side.image_of == [0, 0]


# ------------------------------------------------------------------ 2. the loader


def synthetic_set(n: int, size: int = 12) -> ImageSet:
    """n images whose channel 0 is the image index, channel 1 the column and channel 2 the row (so a crop's
    offset can be read back), with 1 or 2 captions each of 1..4 words whose ids name the caption."""
    col = torch.arange(size).expand(size, size)
    images = torch.stack([torch.stack([torch.full((size, size), i), col, col.T]) for i in range(n)]).to(torch.uint8)
    s = ImageSet(keys=[f"s:{i}" for i in range(n)], sources=["s"] * n, images=images)
    for i in range(n):
        for k in range(1 + i % 2):
            c = len(s.ids)
            s.ids.append([5] + [100 + c] * (1 + c % 4) + [SPECIAL_IDS["<|endoftext|>"]])
            s.texts.append(f"caption {c}")
            s.langs.append("en")
            s.image_of.append(i)
    return s


def decode_batch(batch: dict, s: ImageSet, pad: int) -> list[tuple[int, int, int, int]]:
    """(image, caption, dy, dx) per row, read back from the pixels and ids."""
    pixels = ((batch["images"] + 1) * 127.5).round().to(torch.long)  # (B, 3, S, S)
    out = []
    for r in range(pixels.shape[0]):
        image = int(pixels[r, 0, 0, 0])
        ids = batch["ids"][r, :batch["lengths"][r]].tolist()
        caption = ids[1] - 100
        assert s.ids[caption] == ids and (batch["ids"][r, batch["lengths"][r]:] == SPECIAL_IDS["<|pad|>"]).all()
        dy, dx = int(pixels[r, 2, pad, 0]), int(pixels[r, 1, 0, pad])  # crop row/column `pad` is padded row/col dy/dx
        # the whole crop is the image padded by its edge, shifted by (dy - pad, dx - pad)
        rows = (torch.arange(pixels.shape[-1]) + dy - pad).clamp(0, pixels.shape[-1] - 1)
        cols = (torch.arange(pixels.shape[-1]) + dx - pad).clamp(0, pixels.shape[-1] - 1)
        assert (pixels[r, 0] == image).all()
        assert (pixels[r, 1] == cols[None, :]).all() and (pixels[r, 2] == rows[:, None]).all()
        assert 0 <= dy <= 2 * pad and 0 <= dx <= 2 * pad
        out.append((image, caption, dy, dx))
    return out


def test_each_image_once_per_epoch_with_one_of_its_captions():
    s = synthetic_set(24)
    loader = ImageCaptionLoader(s, batch_size=4, seed=3, augment=2)
    epochs = []
    for epoch in range(4):
        rows = []
        for _ in range(6):
            batch = decode_batch(loader.next_batch(), s, 2)
            assert len({r[0] for r in batch}) == len(batch) == 4  # no picture twice in a batch
            rows += batch
        assert sorted(r[0] for r in rows) == list(range(24))  # each image exactly once
        assert all(s.image_of[c] == i for i, c, _, _ in rows)  # with one of its own captions
        assert loader.state_dict() == {"epoch": epoch, "cursor": 24}
        epochs.append({i: (c, dy, dx) for i, c, dy, dx in rows})
    assert [r[0] for r in rows] != sorted(r[0] for r in rows)  # shuffled
    # crops differ across epochs (25 offsets: a repeat has chance 1/25 per image)
    same = sum(epochs[0][i][1:] == epochs[1][i][1:] for i in range(24))
    assert same <= 6, same
    # images with 2 captions use both over the epochs
    two = [i for i in range(24) if i % 2]
    assert sum(len({e[i][0] for e in epochs}) == 2 for i in two) >= len(two) // 2

    # a batch that does not fit the epoch's end is left out: 26 images, 6 batches of 4, then a new epoch
    s = synthetic_set(26)
    loader = ImageCaptionLoader(s, batch_size=4, seed=3)
    for epoch in range(2):
        rows = [r for _ in range(6) for r in decode_batch(loader.next_batch(), s, 0)]
        assert len({r[0] for r in rows}) == 24 and loader.state_dict() == {"epoch": epoch, "cursor": 24}
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ImageCaptionLoader(synthetic_set(7), batch_size=4, seed=0, world_size=2)


def test_crop_and_caption_depend_on_seed_epoch_and_image_only():
    """The same image gets the same crop and caption in an epoch however the batches are cut; another seed
    draws other ones."""
    s = synthetic_set(24)
    drawn = {}
    for B in (2, 3, 4, 6):
        loader = ImageCaptionLoader(s, batch_size=B, seed=7, augment=3)
        got = {}
        for _ in range(2 * 24 // B):  # two epochs
            for i, c, dy, dx in decode_batch(loader.next_batch(), s, 3):
                got[(loader.epoch, i)] = (c, dy, dx)
        drawn[B] = got
    assert len(drawn[2]) == 48 and all(drawn[B] == drawn[2] for B in drawn)
    other = ImageCaptionLoader(s, batch_size=4, seed=8, augment=3)
    got = {}
    for _ in range(6):
        for i, c, dy, dx in decode_batch(other.next_batch(), s, 3):
            got[i] = (c, dy, dx)
    assert sum(got[i] != drawn[2][(0, i)] for i in range(24)) >= 12


@pytest.mark.parametrize("at", [2, 5, 6, 9])  # mid-epoch, the epoch's last batch, its end, the next epoch
def test_loader_resumes_identically(at):
    s = synthetic_set(24)
    loader = ImageCaptionLoader(s, batch_size=4, seed=1, augment=2)
    for _ in range(at):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(8)]
    resumed = ImageCaptionLoader(s, batch_size=4, seed=1, augment=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_two_ranks_together_give_the_global_batch_of_one_rank():
    s = synthetic_set(26)  # not a multiple of the global batch: the epochs end alike
    one = ImageCaptionLoader(s, batch_size=6, seed=2, augment=2)
    ranks = [ImageCaptionLoader(s, batch_size=3, seed=2, rank=r, world_size=2, augment=2) for r in range(2)]
    for _ in range(10):  # 2.5 epochs
        full = one.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p["images"] for p in parts]), full["images"])
        assert torch.equal(torch.cat([p["lengths"] for p in parts]), full["lengths"])
        rows = [p["ids"][r, :p["lengths"][r]] for p in parts for r in range(3)]
        assert all(torch.equal(a, full["ids"][r, :full["lengths"][r]]) for r, a in enumerate(rows))
        assert all(loader.state_dict() == one.state_dict() for loader in ranks)
    assert len({r[0] for r in decode_batch(parts[0], s, 2)} & {r[0] for r in decode_batch(parts[1], s, 2)}) == 0


def test_real_batches_hold_an_image_and_one_of_its_captions(data):
    loader = ImageCaptionLoader(data.train, batch_size=8, seed=0, augment=2)
    batch = loader.next_batch()
    assert batch["images"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    plain = ImageCaptionLoader(data.train, batch_size=8, seed=0).next_batch()  # no crop: the decoded images
    order = loader._order()[:8]
    assert torch.equal(plain["images"], normalise(data.train.images[order]))
    assert torch.equal(plain["ids"], batch["ids"])  # the crop draws after the caption: the same captions
    for r, i in enumerate(order):
        ids = batch["ids"][r, :batch["lengths"][r]].tolist()
        assert ids in [data.train.ids[c] for c in data.train.captions_of()[i]]


# ------------------------------------------------------------------ 3. pretrain_clip resume is bit-identical


def test_killed_pretrain_clip_run_resumes_bit_identical(single, shards, root, monkeypatch):
    straight, summary, _ = single
    out = lambda p: p.models / "clip"  # noqa: E731
    assert [p.name for p in step_dirs(straight.checkpoints / "pretrain_clip")] == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in records(out(straight))] == [1, 2, 3, 4] and summary["resumed_from_step"] == 0
    assert [("val_loss" in r) for r in records(out(straight))] == [False, True, False, True]

    crashed = workdir(shards, root, "crashed")

    def crash_after_the_step_2_checkpoint(step, *args):
        if step == 2:  # 0-based: the third step
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash_after_the_step_2_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain_clip(clip_cfg(1), crashed)
    assert [p.name for p in step_dirs(crashed.checkpoints / "pretrain_clip")] == ["step-00000002"]
    assert not out(crashed).exists()
    monkeypatch.setattr(loop, "lr_at", lr_at)
    resumed = pretrain_clip(clip_cfg(1), crashed)
    assert resumed["resumed_from_step"] == 2
    assert records(out(crashed)) == records(out(straight))  # losses, lr, grad norms, val losses: bit-identical
    assert same_safetensors(out(crashed) / "model.safetensors", out(straight) / "model.safetensors")
    for key in ("final_loss", "val_loss", "image_to_text_R@1", "text_to_image_R@5", "zero_shot", "logit_scale"):
        assert resumed[key] == summary[key], key
    # ...and the losses moved: the run trained (the same bits are not those of an untrained model)
    losses = [r["loss"] for r in records(out(straight))]
    assert len(set(losses)) == 4 and all(math.isfinite(x) for x in losses)
    # a finished run is only exported again
    again = pretrain_clip(clip_cfg(1), crashed)
    assert again["resumed_from_step"] == 4 and records(out(crashed)) == records(out(straight))
    assert (out(crashed) / "model.safetensors").read_bytes() == (out(straight) / "model.safetensors").read_bytes()


def test_pretrain_clip_summary_scores_the_heldout_images(single, data, tokenizer):
    _, summary, model = single
    names = class_names_of(data)
    assert summary["train_images"] == len(data.train) and summary["train_captions"] == len(data.train.ids)
    assert summary["heldout_images"] == len(data.heldout) and summary["heldout_captions"] == len(data.heldout.ids)
    zs = summary["zero_shot"]
    assert zs["images"] == len(data.heldout.labels) and zs["classes"] == len(names["en"]) == 10 and zs["chance"] == 0.1
    assert {"accuracy_en", "accuracy_zh"} <= set(zs)
    again = evaluate_clip(model, data.heldout, names, tokenizer)  # the exported model, scored again
    for key, value in again.items():
        assert summary[key] == value, key


# ------------------------------------------------------------------ 4. 2 processes against 1


# Measured (1 vs 2 processes, fp32, gloo, 1 thread each, 4 steps at lr 1e-3): the step-1 loss is bit-equal; later
# losses, grad norms and val losses agree to ~2e-7 relative. The weights differ by at most 7.5e-6 (in
# visual.patch_embed; most tensors by < 1e-7), from float sums taken in another order: AdamW divides each
# gradient by its own RMS, so where an element's gradient is tiny (patches of flat white padding) a relative
# rounding difference in it moves the update by up to that fraction of lr. WEIGHTS_ATOL = 1e-4 is ~13x that,
# and a tenth of one step's lr: another batch, or a gradient of another loss, moves elements by ~lr per step
# (training moved some by 3.7e-3). A gradient scaled by a constant (summed instead of averaged over ranks)
# leaves AdamW's update unchanged, so the grad norm, which the loop logs before clipping, is compared as well.
STEP1_LOSS_TOL = 1e-5
RECORD_RTOL = 1e-5
WEIGHTS_ATOL = 1e-4


def test_two_processes_train_the_global_batch_of_one(single, dual):
    (one, s1, _), (two, s2) = single, dual
    r1, r2 = records(one.models / "clip"), records(two.models / "clip")
    assert [r["step"] for r in r2] == [1, 2, 3, 4] and [("val_loss" in r) for r in r2] == [False, True, False, True]
    assert abs(r1[0]["loss"] - r2[0]["loss"]) <= STEP1_LOSS_TOL * r1[0]["loss"], (r1[0], r2[0])
    # each rank scores its 4 rows against all 8 gathered ones: the loss starts near log 8 (log 4 without the gather)
    assert abs(r1[0]["loss"] - math.log(GLOBAL_BATCH)) < 0.2
    for a, b in zip(r1, r2):
        assert a["lr"] == b["lr"]
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= RECORD_RTOL * a[key], (key, a, b)
    w1, w2 = tensors(one.models / "clip" / "model.safetensors"), tensors(two.models / "clip" / "model.safetensors")
    assert w1.keys() == w2.keys()
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    moved = max((w1[k] - w0).abs().max().item() for k, w0 in initial_weights(single).items())
    assert diff <= WEIGHTS_ATOL and moved > 10 * WEIGHTS_ATOL, (diff, moved)
    assert json.loads((two.models / "clip" / "config.json").read_text())["model"] == \
        json.loads((one.models / "clip" / "config.json").read_text())["model"]
    assert s2["train_images"] == s1["train_images"] and s2["heldout_images"] == s1["heldout_images"]
    assert s2["zero_shot"]["images"] == s1["zero_shot"]["images"]


def initial_weights(single) -> dict[str, torch.Tensor]:
    """The CLIP the run started from (the recipe seeds torch with cfg.seed before building it)."""
    model = single[2]
    torch.manual_seed(clip_cfg().seed)
    return type(model)(model.cfg).state_dict()


# ------------------------------------------------------------------ 5. the caption stage


def caption_ids_by_hand(tokenizer, text: str, lang: str, max_len: int) -> list[int]:
    ids = [SPECIAL_IDS["<|image_text|>"], tokenizer.token_to_id(lang_token(lang))]
    ids += tokenizer.encode(text, add_special_tokens=False).ids
    return ids[:max_len - 1] + [SPECIAL_IDS["<|endoftext|>"]]


def heldout_captions(captioned, tokenizer) -> tuple[torch.Tensor, list[list[int]]]:
    """Each held-out caption's image (M, 3, S, S) uint8 and its ids in the caption format."""
    paths, _, captured = captioned
    lm = captured["model"].lm
    data = load_image_captions(paths.tokens / "shards", tokenizer, lm.cfg.seq_len, HELDOUT, 0, image_size=IMAGE_SIZE)
    max_len = min(CAPTION["max_caption_tokens"], lm.cfg.seq_len - CAPTION["n_prefix"])
    ids = [caption_ids_by_hand(tokenizer, t, lang, max_len) for t, lang in zip(data.heldout.texts, data.heldout.langs)]
    return data.heldout.images[torch.tensor(data.heldout.image_of)], ids


def test_caption_targets_mask_the_markers_and_the_padding():
    it, lang, eot, pad = SPECIAL_IDS["<|image_text|>"], 7, SPECIAL_IDS["<|endoftext|>"], SPECIAL_IDS["<|pad|>"]
    ids = torch.tensor([[it, lang, 11, 12, 13, eot],
                        [it, lang, 21, eot, pad, pad],
                        [it, lang, eot, pad, pad, pad]])
    lengths = torch.tensor([6, 4, 3])
    assert caption_targets(ids, lengths).tolist() == [
        [-100, 11, 12, 13, eot, -100],  # <|image_text|> predicts nothing (the marker <|lang|> is given)
        [-100, 21, eot, -100, -100, -100],  # nothing predicted from <|endoftext|> or the padding
        [-100, eot, -100, -100, -100, -100],  # an empty caption: only its end
    ]


def test_the_frozen_lm_is_bitwise_unchanged_and_exported_as_is(captioned):
    paths, summary, captured = captioned
    pretrained = paths.models / "pretrain" / "model.safetensors"
    exported = paths.models / "caption" / "model.safetensors"
    assert summary["lm_unchanged"] is True and summary["steps"] == CAPTION["max_steps"]
    assert exported.read_bytes() == pretrained.read_bytes()
    assert same_safetensors(exported, pretrained)
    state = captured["model"].lm.state_dict()
    weights = tensors(pretrained)
    assert weights and all(torch.equal(state[k], v) for k, v in weights.items())
    config = json.loads((paths.models / "caption" / "config.json").read_text())
    assert config["model"] == json.loads((paths.models / "pretrain" / "config.json").read_text())["model"]
    assert config["caption"]["n_prefix"] == CAPTION["n_prefix"] and config["caption"]["max_caption_tokens"] == 16
    assert [r["step"] for r in records(paths.models / "caption")] == [1, 2, 3]


def test_only_the_prefix_receives_gradients(captioned):
    paths, summary, captured = captioned
    model, optimizer = captured["model"], captured["optimizer"]
    prefix_params = {id(p) for p in model.prefix.parameters()}
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == prefix_params and len(optimized) == len(prefix_params)
    assert all(not p.requires_grad for p in model.lm.parameters())
    assert len(captured["grads"]) == CAPTION["max_steps"]
    for grads in captured["grads"]:
        assert all(g is None for n, g in grads.items() if n.startswith("lm."))
        prefix = {n: g for n, g in grads.items() if n.startswith("prefix.")}
        assert len(prefix) == len(prefix_params) and all(g is not None and g.abs().sum() > 0 for g in prefix.values())
    assert summary["trainable_params"] == sum(p.numel() for p in model.prefix.parameters())
    # the image tower started from CLIP's and trained
    clip, _ = load_clip(paths.models / "clip")
    start = clip.visual.state_dict()
    trained = model.prefix.visual.state_dict()
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)


@torch.no_grad()
def loglik_by_hand(model, images: torch.Tensor | None, ids: list[list[int]]) -> list[float]:
    """log p(caption and its end | <|image_text|> <|lang|>, [image prefix]) per row, one row at a time, in float64:
    the frozen LM called as a plain Decoder (no caption_targets, no _lm_forward)."""
    lm, out = model.lm, []
    for r, row in enumerate(ids):
        x = torch.tensor([row])  # (1, L)
        if images is None:
            logits = lm(x)[0][0]  # (L, V)
        else:
            prefix = model.prefix(normalise(images[r:r + 1]))  # (1, P, C)
            P = prefix.shape[1]
            embeds = torch.cat((prefix, lm.tok_emb(x)), dim=1)  # (1, P + L, C)
            logits = lm(torch.cat((x.new_zeros(1, P), x), dim=1), inputs_embeds=embeds)[0][0, P:]  # (L, V)
        logp = F.log_softmax(logits.double(), dim=-1)
        # the caption after <|lang|> and its end, each predicted from the token before it
        out.append(sum(logp[t, row[t + 1]].item() for t in range(1, len(row) - 1)))
    return out


def test_caption_perplexities_are_the_lm_losses_by_hand(captioned, tokenizer):
    _, summary, captured = captioned
    model = captured["model"].eval()
    images, ids = heldout_captions(captioned, tokenizer)
    assert summary["heldout_captions"] == len(ids)
    n_tokens = sum(len(row) - 2 for row in ids)
    for key, given in (("without", None), ("with", images)):
        by_hand = loglik_by_hand(model, given, ids)
        ppl = math.exp(-sum(by_hand) / n_tokens)  # exp of the mean caption loss
        assert abs(summary[f"perplexity_{key}_image"] - ppl) <= 5e-4 + 1e-5 * ppl, (key, summary, ppl)
        # ...and per caption through caption_loglik (an image's prefix shifts a caption by ~0.006 nats on average)
        totals, counts = caption_loglik(model, given, ids)
        assert counts.tolist() == [len(row) - 2 for row in ids]
        assert max(abs(a - b) for a, b in zip(totals.tolist(), by_hand)) < 1e-4


def test_caption_retrieval_by_hand(captioned, tokenizer):
    """evaluate_captioner's image -> caption retrieval: the first retrieval_images held-out images with an English
    caption, each scored with every one of their captions; the true caption's rank counts captions scored strictly
    higher; _pmi subtracts each caption's likelihood without an image."""
    paths, summary, captured = captioned
    model = captured["model"].eval()
    lm = model.lm
    data = load_image_captions(paths.tokens / "shards", tokenizer, lm.cfg.seq_len, HELDOUT, 0, image_size=IMAGE_SIZE)
    held = data.heldout
    english = {}
    for c, i in enumerate(held.image_of):
        if held.langs[c] == "en":
            english.setdefault(i, c)
    chosen = sorted(english)[:CAPTION["retrieval_images"]]
    N = len(chosen)
    assert summary["retrieval_images"] == N == CAPTION["retrieval_images"]
    assert summary["retrieval_chance_R@1"] == round(1 / N, 4)
    caps = [caption_ids_by_hand(tokenizer, held.texts[english[i]], "en", CAPTION["max_caption_tokens"]) for i in chosen]
    scores = torch.tensor([loglik_by_hand(model, held.images[[i] * N], caps) for i in chosen])  # (image, caption)
    prior = torch.tensor(loglik_by_hand(model, None, caps))  # (N,)
    for name, table in (("", scores), ("_pmi", scores - prior[None, :])):
        rank = (table > table.diagonal()[:, None]).sum(dim=1)
        for k in (1, 5):
            assert summary[f"image_to_caption{name}_R@{k}"] == round((rank < k).float().mean().item(), 4), (name, k)


def test_load_captioner_gives_the_trained_likelihoods(captioned, tokenizer):
    paths, _, captured = captioned
    trained = captured["model"]
    loaded, tok = load_captioner(paths.models / "caption")
    assert tok.get_vocab() == tokenizer.get_vocab()
    a, b = loaded.prefix.state_dict(), trained.prefix.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images, ids = heldout_captions(captioned, tokenizer)
    got, n_got = caption_loglik(loaded, images, ids)
    want, n_want = caption_loglik(trained, images, ids)
    assert torch.equal(got, want) and torch.equal(n_got, n_want)
    # the image matters: another image gives other likelihoods
    other, _ = caption_loglik(loaded, images.roll(1, dims=0), ids)
    assert not torch.equal(other, got)


def test_a_tampered_prefix_is_refused_naming_the_file(captioned, tmp_path):
    folder = tmp_path / "caption"
    shutil.copytree(captioned[0].models / "caption", folder)
    load_captioner(folder)
    prefix = folder / "prefix.safetensors"
    original = prefix.read_bytes()
    flip_byte(prefix)
    assert len(prefix.read_bytes()) == len(original)
    message = re.escape(str(prefix)) + " is missing, damaged or changed after export"
    with pytest.raises(ValueError, match=message):
        load_captioner(folder)
    prefix.write_bytes(original[:-8])
    with pytest.raises(ValueError, match=message):
        load_captioner(folder)
    prefix.unlink()
    with pytest.raises(ValueError, match=message):
        load_captioner(folder)
    prefix.write_bytes(original)
    load_captioner(folder)


def greedy_by_hand(model, tokenizer, image: torch.Tensor, max_new_tokens: int) -> str:
    """Greedy decoding through the training forward (caption_recipe._lm_forward), one full pass per token."""
    ids = [SPECIAL_IDS["<|image_text|>"], tokenizer.token_to_id(lang_token("en"))]
    with torch.no_grad():
        prefix = model.prefix(normalise(image[None]))
        for _ in range(max_new_tokens):
            x = torch.tensor([ids])
            logits, _, _ = caption_recipe._lm_forward(model.lm, prefix, x, torch.tensor([len(ids)]))
            nxt = int(logits[0, -1].argmax())
            if nxt == SPECIAL_IDS["<|endoftext|>"]:
                break
            ids.append(nxt)
    return tokenizer.decode(ids[2:])


def png_tensor(path: Path) -> torch.Tensor:
    _, png, _ = load_image(path, IngestConfig(image_size=IMAGE_SIZE))
    return torch.from_numpy(_decode(png, IMAGE_SIZE, str(path)))


def test_write_caption_is_greedy_and_deterministic(captioned, tokenizer):
    trained = captioned[2]["model"]
    loaded, _ = load_captioner(captioned[0].models / "caption")
    image = png_tensor(FASHION_PNG)
    text = write_caption(trained, tokenizer, image, max_new_tokens=12)
    assert isinstance(text, str) and text.strip()
    assert write_caption(trained, tokenizer, image, max_new_tokens=12) == text
    assert write_caption(loaded, tokenizer, image, max_new_tokens=12) == text
    assert text == greedy_by_hand(trained, tokenizer, image, 12)


# ------------------------------------------------------------------ 6. load_clip


def test_load_clip_gives_the_trained_features(single, data):
    paths, _, trained = single
    loaded, tokenizer = load_clip(paths.models / "clip")
    assert loaded.cfg == trained.cfg and loaded.cfg.image_size == IMAGE_SIZE and not loaded.training
    images, texts = embed_set(loaded, data.heldout)
    want_images, want_texts = embed_set(trained, data.heldout)
    assert images.shape == (len(data.heldout), MODEL["embed_dim"])
    assert texts.shape == (len(data.heldout.ids), MODEL["embed_dim"])
    assert torch.equal(images, want_images) and torch.equal(texts, want_texts)
    assert tokenizer.get_vocab() == open_tokenizer(paths.tokens / "tokenizer.json").get_vocab()
    config = json.loads((paths.models / "clip" / "config.json").read_text())
    assert config["heldout"] == {"fraction": HELDOUT, "seed": 0}


def test_a_tampered_clip_is_refused_naming_the_file(single, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(single[0].models / "clip", folder)
    load_clip(folder)
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    flip_byte(weights)
    with pytest.raises(ValueError, match=re.escape(str(weights)) + " does not match its sha256 in config.json"):
        load_clip(folder)
    weights.write_bytes(original[:-8])
    with pytest.raises(ValueError, match=re.escape(str(weights)) + f" has {len(original) - 8} bytes"):
        load_clip(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(weights))):
        load_clip(folder)
    weights.write_bytes(original)
    load_clip(folder)


# ------------------------------------------------------------------ 7. fm generate --image


runner = CliRunner()


def test_fm_generate_captions_an_image(captioned, tokenizer):
    paths = captioned[0]
    result = runner.invoke(app, ["generate", "--image", str(FASHION_PNG), "--workdir", str(paths.workdir)])
    assert result.exit_code == 0, result.output
    loaded, _ = load_captioner(paths.models / "caption")
    expected = write_caption(loaded, tokenizer, png_tensor(FASHION_PNG), "en", 64)
    assert expected.strip() and result.stdout == expected + "\n"


def test_fm_generate_refuses_a_file_that_is_no_image_in_one_line(captioned, tmp_path):
    paths = captioned[0]
    for name, content in (("notes.png", b"not an image at all"), ("poem.txt", "床前明月光".encode())):
        path = tmp_path / name
        path.write_bytes(content)
        result = runner.invoke(app, ["generate", "--image", str(path), "--workdir", str(paths.workdir)])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert str(path) in result.output and "error" in result.output
