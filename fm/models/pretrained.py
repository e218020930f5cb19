"""Load a trained model folder: what `fm pretrain` writes to `06_models/pretrain/`.

    from fm.models import load_pretrained
    model, tokenizer = load_pretrained("data/06_models/pretrain")
    ids = torch.tensor([tokenizer.encode("def add(a, b):").ids])      # (1, T)
    out = model.generate(ids, max_new_tokens=20, temperature=0)
    print(tokenizer.decode(out[0].tolist()))

A model folder is self-contained: `model.safetensors` (weights; a tied LM head is stored once, as
`tok_emb.weight`), `config.json` (`"model"`: the ModelConfig fields; also the tokenizer's sha256, the
training config and schedule) and `tokenizer.json` (Hugging Face tokenizers). Loading reads
safetensors and JSON only: nothing is unpickled. The same by hand:

    cfg = json.loads(Path(d, "config.json").read_text())["model"]
    model = Decoder(ModelConfig(**cfg))
    model.load_state_dict(safetensors.torch.load_file(Path(d, "model.safetensors")))   # strict
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from fm.models.decoder import Decoder, ModelConfig


def load_decoder(model_dir: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """Rebuild a Decoder from config.json and load model.safetensors into it (strictly; no pickle involved)."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: not an fm model folder")
    cfg = ModelConfig.from_dict(json.loads((model_dir / "config.json").read_text())["model"])
    model = Decoder(cfg)
    try:
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise ValueError(f"{model_dir}: model.safetensors does not match config.json: {e}") from None
    return model.to(device)


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(Decoder, tokenizers.Tokenizer) from a model folder; the tokenizer is checked against config.json's sha256."""
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    model = load_decoder(model_dir, device)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model folder has no tokenizer (written by an older fm?)")
    expected = json.loads((model_dir / "config.json").read_text()).get("tokenizer", {}).get("sha256")
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise ValueError(f"{path} is not the tokenizer this model was trained with (sha256 differs from config.json)")
    return model, Tokenizer.from_file(str(path))
