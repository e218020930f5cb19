"""Image-caption pairs from the shard stage's Arrow files: the data of CLIP and captioning.

    from fm.data.images import load_image_captions, ImageCaptionLoader
    data = load_image_captions(shard_dir, tokenizer, context_length=32, heldout_fraction=0.25)
    loader = ImageCaptionLoader(data.train, batch_size=64, seed=0)
    batch = loader.next_batch()     # {"images": (B, 3, S, S) float, "ids": (B, T) long, "lengths": (B,) long}

An *image* is one picture (identified by its pixels' PNG bytes, so a picture stored twice under two
names is one image); it may have several captions (the Fashion-MNIST and emoji images have an
English and a Chinese one). The held-out split is by image,
never by caption: an image lands wholly in train or held out by a hash of its key, so no held-out
picture is ever trained on in any language. Held-out Fashion-MNIST images, with the class name their
English caption gives ("a photo of a sneaker"), are the zero-shot test set.

Images are the shard's PNGs (already fit into a square by ingest), decoded once to uint8 and
normalised per batch to [-1, 1]. Training batches take each image at most once per epoch (the tail
that does not fill a global batch is skipped) with one of its captions, so a batch never holds the same picture twice (two captions of one image would be false
negatives for the contrastive loss). Augmentation is a random crop of the image padded by
`pad` pixels (edge colour) and drawn from a generator seeded by (seed, epoch, image): the same on any
number of processes and on every resume. Captions are `<|lang:xx|> caption <|endoftext|>`, cut to
context_length; lengths count the real tokens (the text tower pools at the last one).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.ipc as ipc
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from fm.data.shards import load_manifest
from fm.data.tokenizer import SPECIAL_IDS, lang_token

CLASS_CAPTION = {"en": re.compile(r"^a photo of (?:an? )?(.+)$"), "zh": re.compile(r"^一张(.+)的照片$")}
ZERO_SHOT_SOURCE = "fashion-mnist"  # a labelled source: its captions name one of a fixed set of classes


@dataclass
class ImageSet:
    """Images (N, 3, S, S) uint8 with their captions: texts[i] and token ids[i] of image image_of[i]."""
    keys: list[str] = field(default_factory=list)  # "source:path" of each image (its first name, if stored twice)
    sources: list[str] = field(default_factory=list)
    images: torch.Tensor | None = None  # (N, 3, S, S) uint8
    texts: list[str] = field(default_factory=list)  # every caption
    langs: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)  # token ids per caption
    image_of: list[int] = field(default_factory=list)  # caption -> image index
    labels: dict = field(default_factory=dict)  # image index -> {"en": class name, "zh": class name} (zero-shot source)

    def __len__(self) -> int:
        return len(self.keys)

    def captions_of(self) -> list[list[int]]:
        """For each image, the indices of its captions."""
        out: list[list[int]] = [[] for _ in self.keys]
        for c, i in enumerate(self.image_of):
            out[i].append(c)
        return out


@dataclass
class ImageCaptions:
    train: ImageSet
    heldout: ImageSet


def _is_heldout(key: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _decode(png: bytes, size: int, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(png), formats=("PNG", "JPEG")) as im:  # no other Pillow plugin parses it
            if im.format not in ("PNG", "JPEG"):
                raise ValueError(f"{im.format} is not PNG or JPEG")
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.array(im, dtype=np.uint8).transpose(2, 0, 1).copy()  # (3, S, S), writable
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: the image does not decode ({e}): rerun `fm shard`") from None


def load_image_captions(shard_dir: Path, tokenizer: Tokenizer, context_length: int, heldout_fraction: float,
                        seed: int = 0, image_size: int | None = None) -> ImageCaptions:
    """Every image-caption pair of the shards, grouped by image and split by image (see the module docstring)."""
    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    files = [e["path"] for e in manifest["shards"] if e["kind"] == "images"]
    if not files:
        raise FileNotFoundError(f"{shard_dir / 'manifest.json'} lists no image-caption shards: the corpus has no "
                                f"image_text records (see data/README.md for the layout)")
    sets = {"train": ImageSet(), "heldout": ImageSet()}
    pixels: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    index: dict[str, tuple[str, int]] = {}  # image key -> (split, image index)
    pending_labels: dict[tuple[str, int], dict] = {}
    eot = SPECIAL_IDS["<|endoftext|>"]
    for name in files:
        table = ipc.open_file(shard_dir / name).read_all()
        rows = table.select(["source", "lang", "text", "meta", "image", "position", "source_file"]).to_pylist()
        for row in rows:
            if not row["text"] or row["image"] is None:
                continue
            # The picture itself identifies an image: one stored twice under two names (the sample has such a
            # pair) must not land on both sides of the split, nor twice in one contrastive batch.
            pixels_id = hashlib.sha256(row["image"]).hexdigest()
            if pixels_id not in index:
                split = "heldout" if _is_heldout(pixels_id, heldout_fraction, seed) else "train"
                s = sets[split]
                meta = json.loads(row["meta"] or "{}")
                key = f"{row['source']}:{meta.get('image_path', row['source_file'] + '#' + str(row['position']))}"
                array = _decode(row["image"], image_size or row_size(row["image"]), f"{shard_dir / name} ({key})")
                index[pixels_id] = (split, len(s.keys))
                s.keys.append(key)
                s.sources.append(row["source"] or "")
                pixels[split].append(array)
            split, i = index[pixels_id]
            s = sets[split]
            lang = (row["lang"] or "").split("-")[0].lower()
            ids = tokenizer.encode(row["text"], add_special_tokens=False).ids
            lang_id = tokenizer.token_to_id(lang_token(lang))
            s.ids.append(([lang_id] + ids)[:context_length - 1] + [eot])
            s.texts.append(row["text"])
            s.langs.append(lang)
            s.image_of.append(i)
            m = CLASS_CAPTION.get(lang)
            if row["source"] == ZERO_SHOT_SOURCE and m and (found := m.match(row["text"].strip())):
                pending_labels.setdefault((split, i), {})[lang] = found.group(1)
    for split, s in sets.items():
        if pixels[split]:
            s.images = torch.from_numpy(np.stack(pixels[split]))  # (N, 3, S, S) uint8
    for (split, i), names in pending_labels.items():
        if "en" in names:
            sets[split].labels[i] = names
    return ImageCaptions(sets["train"], sets["heldout"])


def row_size(png: bytes) -> int:
    with Image.open(io.BytesIO(png), formats=("PNG", "JPEG")) as im:
        return max(im.size)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def random_crop(image: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """A crop of the same size from the image padded by `pad` pixels of its edge colour: (3, S, S) uint8."""
    if pad == 0:
        return image
    S = image.shape[-1]
    padded = F.pad(image[None].float(), (pad, pad, pad, pad), mode="replicate")[0]  # (3, S + 2p, S + 2p)
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return padded[:, dy:dy + S, dx:dx + S].to(image.dtype)


def pad_ids(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and (B,) lengths."""
    T = max(len(x) for x in ids)
    out = torch.full((len(ids), T), pad_id, dtype=torch.long)
    for r, x in enumerate(ids):
        out[r, :len(x)] = torch.tensor(x)
    return out, torch.tensor([len(x) for x in ids])


class ImageCaptionLoader:
    """Batches of (image, one of its captions), every image at most once per epoch; deterministic and resumable.

    Process `rank` of `world_size` takes its batch_size of each global batch (the same global batches on
    any number of processes). State: (epoch, cursor), the same on every rank. augment: the random-crop
    padding in pixels (0: none, as for evaluation)."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 augment: int = 0, shuffle: bool = True):
        if len(data) < batch_size * world_size:
            raise ValueError(f"{len(data)} images are fewer than one global batch ({batch_size} x {world_size})")
        self.data, self.batch_size, self.seed, self.rank, self.world_size = data, batch_size, seed, rank, world_size
        self.augment, self.shuffle = augment, shuffle
        self.captions = data.captions_of()
        self.epoch, self.cursor = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.data)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, W = self.batch_size, self.world_size
        if self.cursor + B * W > len(self.data):
            self.epoch, self.cursor = self.epoch + 1, 0
        chosen = self._order()[self.cursor + self.rank * B: self.cursor + (self.rank + 1) * B]
        self.cursor += B * W
        images, ids = [], []
        for i in chosen:
            rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
            caption = self.captions[i][rng.randrange(len(self.captions[i]))]
            image = self.data.images[i]
            if self.augment:
                image = random_crop(image, self.augment, torch.Generator().manual_seed(rng.getrandbits(63)))
            images.append(image)
            ids.append(self.data.ids[caption])
        x, lengths = pad_ids(ids, SPECIAL_IDS["<|pad|>"])
        return {"images": normalise(torch.stack(images)), "ids": x, "lengths": lengths}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
