"""Load a trained model folder: what `fm pretrain` writes to `06_models/pretrain/`.

    from fm.models import load_pretrained
    model, tokenizer = load_pretrained("data/06_models/pretrain")
    ids = torch.tensor([tokenizer.encode("def add(a, b):").ids])      # (1, T)
    out = model.generate(ids, max_new_tokens=20, temperature=0)
    print(tokenizer.decode(out[0].tolist()))

A model folder is self-contained: `model.safetensors` (weights; a tied LM head is stored once, as
`tok_emb.weight`), `config.json` (`"model"`: the ModelConfig fields; `"weights"`: the size and sha256
of model.safetensors; also the tokenizer's sha256, the training config and schedule) and
`tokenizer.json` (Hugging Face tokenizers). Loading checks both files against those checksums and
refuses a damaged or changed one; it reads safetensors and JSON only: nothing is unpickled. The same
by hand (without the checks):

    cfg = json.loads(Path(d, "config.json").read_text())["model"]
    model = Decoder(ModelConfig(**cfg))
    model.load_state_dict(safetensors.torch.load_file(Path(d, "model.safetensors")))   # strict
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from fm.data.tokenizer import open_tokenizer
from fm.io import sha256_file
from fm.models.decoder import Decoder, ModelConfig


def verify_weights(model_dir: Path, config: dict) -> None:
    """model.safetensors against the size and sha256 that config.json recorded when it was exported."""
    path, want = model_dir / "model.safetensors", config.get("weights")
    if want is None:
        warnings.warn(f"{model_dir / 'config.json'} records no sha256 for model.safetensors (exported by an older fm): "
                      f"loading it unverified", stacklevel=3)
        return
    size = path.stat().st_size
    if size != want["bytes"] or sha256_file(path) != want["sha256"]:
        what = f"has {size} bytes, config.json says {want['bytes']}" if size != want["bytes"] else "does not match its sha256 in config.json"
        raise ValueError(f"{path} {what}: the weights are damaged or were changed after export; export the model again "
                         f"(rerun `fm pretrain`: a finished run exports again without training)")


def load_decoder(model_dir: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """Rebuild a Decoder from config.json and load model.safetensors into it (checked against config.json's
    sha256, then strictly; no pickle involved)."""
    model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: not an fm model folder")
    config = json.loads((model_dir / "config.json").read_text())
    verify_weights(model_dir, config)
    cfg = ModelConfig.from_dict(config["model"])
    model = Decoder(cfg)
    try:
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    except RuntimeError as e:  # missing, unexpected or misshapen tensors
        raise ValueError(f"{model_dir}: model.safetensors does not match config.json: {e}") from None
    return model.to(device)


def load_pretrained(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(Decoder, tokenizers.Tokenizer) from a model folder; the tokenizer is checked against config.json's sha256."""
    
    model_dir = Path(model_dir)
    model = load_decoder(model_dir, device)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the model folder has no tokenizer (written by an older fm?)")
    expected = json.loads((model_dir / "config.json").read_text()).get("tokenizer", {}).get("sha256")
    if expected and sha256_file(path) != expected:
        raise ValueError(f"{path} is not the tokenizer this model was trained with (sha256 differs from config.json): "
                         f"export the model again (rerun `fm pretrain`: a finished run exports again without training)")
    return model, open_tokenizer(path)  # special tokens are never matched in text


def load_tuned(model_dir: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a tuned model folder (`fm sft` writes them): a Decoder, or for prefix and prompt
    tuning the pretrained Decoder behind its adapter (PrefixTuning / PromptTuning), whose adapter.safetensors
    is checked against config.json's sha256 like the weights. A plain model folder loads as load_pretrained."""
    from fm.models.adapters import PrefixTuning, PromptTuning

    model_dir = Path(model_dir)
    model, tokenizer = load_pretrained(model_dir, device)
    adapter = json.loads((model_dir / "config.json").read_text()).get("adapter")
    if adapter is None:
        return model, tokenizer
    path = model_dir / adapter["path"]
    if not path.is_file() or path.stat().st_size != adapter["bytes"] or sha256_file(path) != adapter["sha256"]:
        raise ValueError(f"{path} is missing, damaged or changed after export (size or sha256 differs from config.json): "
                         f"rerun `fm sft` (a finished run exports again without training)")
    tensors = load_file(str(path))
    if adapter["method"] == "prefix":
        wrapped = PrefixTuning(model, adapter["n_prefix"])
    elif adapter["method"] == "prompt":
        wrapped = PromptTuning(model, adapter["n_virtual"])
    else:
        raise ValueError(f"{model_dir / 'config.json'}: unknown adapter method {adapter['method']!r}")
    try:
        wrapped.load_state_dict({**{f"model.{k}": v for k, v in model.state_dict().items()}, **tensors})
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the model in {model_dir}: {e}") from None
    return wrapped.to(device).eval(), tokenizer
