"""Model code: the decoder LM (decoder.py), mixture-of-experts FFN (moe.py), sparse attention masks (attention.py)."""

from fm.models.attention import build_mask
from fm.models.decoder import PRESETS, Decoder, KVCache, ModelConfig
from fm.models.moe import MoE, hash_experts

__all__ = ["PRESETS", "Decoder", "KVCache", "ModelConfig", "MoE", "build_mask", "hash_experts"]
