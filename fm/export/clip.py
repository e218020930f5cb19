"""ONNX graphs of a CLIP model's two towers, for embedding images and captions with onnxruntime.

    from fm.export.clip import export_clip
    sha = export_clip(model, Path("07_export/clip"))     # {"image.onnx": sha256, "text.onnx": sha256}

    image.onnx  images (B, 3, S, S) float32, normalised as fm.data.images.normalise  -> image_embeds (B, E)
    text.onnx   ids (B, T) int64 right-padded, lengths (B,) int64                    -> text_embeds (B, E)

B and T are dynamic (1 <= T <= context_length); both outputs are unit-norm, so a cosine similarity
is a dot product (zero-shot: argmax over class-prompt embeddings). Each graph carries metadata_props
"fm.graph" (clip_image | clip_text) and "fm.model_config" (ClipConfig.to_dict()), and is checked by
onnx.checker when written (fm.export.onnx.export_graph).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fm.export.onnx import export_graph
from fm.models.clip import CLIP


class ImageTower(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.encode_image(images)  # (B, E)


class TextTower(nn.Module):
    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, ids, lengths):
        return self.model.encode_text(ids, lengths)  # (B, E)


def export_clip(model: CLIP, out_dir: Path) -> dict[str, str]:
    """Write image.onnx and text.onnx of a float32 CLIP model into out_dir; return {file name: sha256}."""
    from torch.export import Dim

    if not isinstance(model, CLIP):
        raise ValueError(f"export_clip needs an fm CLIP model, got {type(model).__name__}")
    cfg = model.cfg
    if model.logit_scale.dtype != torch.float32:
        raise ValueError(f"ONNX export takes a float32 model, got {model.logit_scale.dtype}: call model.float() first")
    if cfg.context_length < 3:
        raise ValueError(f"export_clip needs context_length >= 3 for its example, got {cfg.context_length}")
    out_dir.mkdir(parents=True, exist_ok=True)
    batch, seq = Dim("batch"), Dim("seq", min=1, max=cfg.context_length)
    size = cfg.image_size
    images = torch.zeros(2, 3, size, size)
    ids = torch.zeros(2, 3, dtype=torch.long)
    lengths = torch.tensor([3, 2])
    return {
        "image.onnx": export_graph(ImageTower(model), "clip_image", (images,), {"images": {0: batch}},
                                   out_dir / "image.onnx", ["images"], ["image_embeds"]),
        "text.onnx": export_graph(TextTower(model), "clip_text", (ids, lengths), {"ids": {0: batch, 1: seq}, "lengths": {0: batch}},
                                  out_dir / "text.onnx", ["ids", "lengths"], ["text_embeds"]),
    }
