"""Export an fm model folder as a Hugging Face Llama folder that transformers loads as it is.

    python -m fm.export.hf data/06_models/pretrain data/07_export/hf     # or, from Python:

    from fm.export.hf import export_hf
    summary = export_hf(Path("data/06_models/pretrain"), Path("data/07_export/hf"))

    from transformers import AutoTokenizer, LlamaForCausalLM       # then, offline
    model = LlamaForCausalLM.from_pretrained("data/07_export/hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained("data/07_export/hf")

fm's dense Decoder is a Llama: pre-norm RMSNorm blocks, SwiGLU MLP, grouped-query attention, no
biases, RoPE in the rotate-half layout that transformers' LlamaAttention uses (fm's rope_tables /
apply_rope give (x1 cos - x2 sin, x2 cos + x1 sin) over the halves of each head, with the same
inv_freq = theta^(-2i/D) and [cos, cos] layout as LlamaRotaryEmbedding), and the same head-to-kv-group
assignment (fm's repeat_interleave, HF's repeat_kv). So the export renames tensors and permutes
nothing; tests/test_export_hf.py checks that logits and greedy generation agree with transformers.

The folder written (atomically: it appears complete or not at all):
    config.json              LlamaConfig (architectures ["LlamaForCausalLM"]); rope_theta both as
                             transformers 5's rope_parameters and as the older top-level key
    generation_config.json   bos/eos/pad; generation stops at <|endoftext|> or <|end|> (a tuned
                             model ends its answer with <|end|>, as `fm generate` stops there)
    model.safetensors        HF tensor names, float32; a tied LM head is stored once (embed_tokens)
    tokenizer.json           fm's, byte for byte
    tokenizer_config.json, special_tokens_map.json
                             PreTrainedTokenizerFast with eos <|endoftext|>, pad <|pad|> and
                             split_special_tokens true: like fm's open_tokenizer, a literal
                             "<|endoftext|>" in text stays text (control tokens go in by id; pass
                             split_special_tokens=False to a call to match them in a template string)
    fm_export.json           size and sha256 of every file above, and the source folder's checksums

What Llama cannot express is refused (ValueError naming the folder and the feature), never exported
approximately: MoE layers (an fm MoE model is fm-only: transformers' Mixtral needs every layer to be
MoE with learned top-k routing, while fm mixes dense and MoE layers, routes by top1/hash/domain too
and drops tokens over capacity), sparse attention patterns (Llama attends densely), non-causal
models, and prompt/prefix-tuning adapters (extra state outside the Llama weights). Dropout is
written as nothing: it is off at inference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from fm.data.chat import END
from fm.data.tokenizer import SPECIAL_TOKENS
from fm.io import atomic_dir, sha256_file
from fm.models.decoder import ModelConfig
from fm.models.pretrained import load_pretrained

ARCHITECTURE = "LlamaForCausalLM"
EOS, PAD = "<|endoftext|>", "<|pad|>"
# fm has no beginning-of-sequence token: a packed pretraining stream puts the previous document's
# <|endoftext|> before every document, so it plays BOS's part (as in GPT-2).
BOS = EOS

# fm parameter name -> HF name; {i} is the layer index.
LAYER_NAMES = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
TOP_NAMES = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}


def check_exportable(model_dir: Path, config: dict) -> ModelConfig:
    """The folder's ModelConfig, or a ValueError naming what LlamaForCausalLM cannot express."""
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{model_dir}: config.json does not describe an fm Decoder ({e}): only decoder LMs "
                         f"export to {ARCHITECTURE}") from None
    where = f"{model_dir} cannot be exported to {ARCHITECTURE}"
    if cfg.moe_layers:
        raise ValueError(f"{where}: it has MoE layers {list(cfg.moe_layers)} ({cfg.moe_routing} routing over "
                         f"{cfg.n_experts} experts). An fm MoE model is fm-only: Llama has no experts, and "
                         f"transformers' Mixtral needs every layer to be MoE with top-k routing and no "
                         f"capacity limit; load it with fm.models.load_pretrained")
    if cfg.attention != "dense":
        raise ValueError(f"{where}: it uses sparse attention ({cfg.attention!r}), Llama attends to every earlier "
                         f"token; load it with fm.models.load_pretrained")
    if not cfg.causal:
        raise ValueError(f"{where}: it is non-causal (causal=False, a bidirectional encoder); Llama is a causal LM")
    if "adapter" in config:
        raise ValueError(f"{where}: it carries a {config['adapter'].get('method')!r} tuning adapter "
                         f"({config['adapter'].get('path')}), state outside the Llama weights; load it with "
                         f"fm.models.pretrained.load_tuned")
    return cfg


def hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fm Decoder tensors under HF Llama names (same values and shapes: no permutation is needed)."""
    out = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the same tensor as tok_emb.weight; tie_word_embeddings makes HF share it again
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
            continue
        prefix, i, rest = name.split(".", 2) if name.startswith("layers.") else (name, "", "")
        if prefix != "layers" or rest not in LAYER_NAMES:
            raise ValueError(f"no Llama name for fm tensor {name!r}")
        out[f"model.layers.{i}.{LAYER_NAMES[rest]}"] = tensor
    # safetensors writes contiguous CPU tensors; no two of these share storage (the tied head is left out).
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(out.items())}


def llama_config(cfg: ModelConfig, token_ids: dict[str, int]) -> dict:
    """config.json for transformers' LlamaConfig (field names of transformers 5, rope_theta also for 4.x)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.seq_len,  # fm's RoPE table and KV cache end there
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": token_ids[BOS],
        "eos_token_id": token_ids[EOS],
        "pad_token_id": token_ids[PAD],
        "torch_dtype": "float32",
    }


def tokenizer_files(tokenizer, seq_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for PreTrainedTokenizerFast over fm's tokenizer.json."""
    extra = [t for t in SPECIAL_TOKENS if t not in (EOS, PAD) and tokenizer.token_to_id(t) is not None]
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    return {
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "additional_special_tokens": extra,
            "model_max_length": seq_len,
            "split_special_tokens": True,  # fm's open_tokenizer: special tokens are never matched in text
            "add_bos_token": False,  # fm puts no token before a prompt
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # byte-level BPE: decode(encode(x)) == NFC(x)
        },
        "special_tokens_map.json": {**special, "additional_special_tokens": extra},
    }


def export_hf(model_dir: Path, out_dir: Path) -> dict:
    """Write fm model folder model_dir as a transformers Llama folder out_dir; return a summary.

    The source is loaded as fm loads it (weights and tokenizer checked against config.json's sha256).
    Summary: out_dir, architecture, source (folder, weights and tokenizer sha256), files (bytes, sha256).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not an fm model folder")
    config = json.loads(config_path.read_text())
    cfg = check_exportable(model_dir, config)  # before loading: the refusal does not depend on the weights
    model, tokenizer = load_pretrained(model_dir)
    token_ids = {t: tokenizer.token_to_id(t) for t in (EOS, PAD, END)}
    missing = [t for t, i in token_ids.items() if i is None or i >= cfg.vocab_size]
    if missing:
        raise ValueError(f"{model_dir / 'tokenizer.json'} has no {', '.join(missing)} within the model's "
                         f"vocab_size {cfg.vocab_size}: not an fm tokenizer")
    tensors = hf_state_dict(model.state_dict(), cfg)
    generation = {"bos_token_id": token_ids[BOS], "eos_token_id": [token_ids[EOS], token_ids[END]],
                  "pad_token_id": token_ids[PAD]}
    with atomic_dir(out_dir) as tmp:
        # One metadata key ("format": "pt", which transformers requires): the same weights give the same bytes.
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(model_dir / "tokenizer.json", tmp / "tokenizer.json")
        jsons = {"config.json": llama_config(cfg, token_ids), "generation_config.json": generation,
                 **tokenizer_files(tokenizer, cfg.seq_len)}
        for name, obj in jsons.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        source = {"model_dir": str(model_dir), "weights_sha256": config.get("weights", {}).get("sha256"),
                  "tokenizer_sha256": sha256_file(model_dir / "tokenizer.json")}
        record = {"architecture": ARCHITECTURE, "source": source, "files": files}
        (tmp / "fm_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return {"out_dir": str(out_dir), **record}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fm.export.hf", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="an fm model folder (fm pretrain / fm sft output)")
    parser.add_argument("out_dir", type=Path, help="the transformers folder to write (replaced if present)")
    args = parser.parse_args(argv)
    try:
        summary = export_hf(args.model_dir, args.out_dir)
    except (FileNotFoundError, ValueError) as e:  # a folder that is not exportable: one line, not a traceback
        print(f"fm.export.hf: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
