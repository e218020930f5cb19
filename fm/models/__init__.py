"""Model code: the decoder LM (decoder.py), mixture-of-experts FFN (moe.py), sparse attention masks (attention.py),
and `load_pretrained` (pretrained.py): a trained model folder back as (model, tokenizer)."""

from fm.models.attention import build_mask
from fm.models.decoder import PRESETS, Decoder, KVCache, ModelConfig
from fm.models.moe import MoE, hash_experts
from fm.models.pretrained import load_decoder, load_pretrained, load_tuned

__all__ = ["PRESETS", "Decoder", "KVCache", "ModelConfig", "MoE", "build_mask", "hash_experts", "load_decoder",
           "load_pretrained", "load_tuned"]
