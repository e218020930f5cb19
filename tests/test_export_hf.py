"""fm.export.hf: an exported folder loads in transformers and computes what fm computes.

    .venv/bin/python -m pytest -q tests/test_export_hf.py

Tiny Decoders (2 layers, d 64, 4 heads; GQA with 2 kv heads; tied and untied heads) with weights
drawn large enough that logits differ by whole units, and RMSNorm gains moved off 1 so that a
swapped norm would show. Reference: fm's own forward and generate. transformers runs offline.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata

# Before transformers (and huggingface_hub) are imported: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import pre_tokenizers, trainers

from fm.data.tokenizer import SPECIAL_IDS, SPECIAL_TOKENS, new_tokenizer, open_tokenizer
from fm.export.hf import export_hf
from fm.io import sha256_file
from fm.models.decoder import Decoder, ModelConfig
from fm.train.checkpoint import export_model
from fm.train.parallel import Dist
from tests.conftest import EN_DOCS, ZH_DOCS

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "床前明月光，疑是地上霜。",
    "Mixed 中文 and English, with  two spaces and a tab\t.",
    "A literal <|endoftext|> and <|user|> in text stay text.",
    "Cafe\u0301 au lait",  # NFC: the normalizer composes it, in fm and in transformers alike
]
EOS, PAD, END = SPECIAL_IDS["<|endoftext|>"], SPECIAL_IDS["<|pad|>"], SPECIAL_IDS["<|end|>"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small byte-level BPE trained the way `fm tokenize` trains one (specials first)."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(EN_DOCS * 3 + ZH_DOCS * 3, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def write_model_dir(path, cfg: ModelConfig, tokenizer_path, seed: int = 0) -> Decoder:
    """An fm model folder as `fm pretrain` writes it (export_model + tokenizer.json); returns the model."""
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():  # RMSNorm gains at 1 would hide a swapped input/post-attention norm
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    tokenizer = {"path": "tokenizer.json", "sha256": sha256_file(tokenizer_path),
                 "vocab_size": open_tokenizer(tokenizer_path).get_vocab_size()}
    export_model(model, cfg, path, Dist(), {"tokenizer": tokenizer})
    shutil.copyfile(tokenizer_path, path / "tokenizer.json")
    return model.eval()


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 448, "seq_len": 64, "n_layer": 2, "n_head": 4, "d_model": 64,
                          "init_std": 0.15, **kw})


def until_stop(row: list[int], prompt_len: int) -> list[int]:
    """The generated part of a row up to and including the first stop token (transformers pads after it)."""
    new = row[prompt_len:]
    for i, t in enumerate(new):
        if t in (EOS, END):
            return new[:i + 1]
    return new


@pytest.mark.parametrize("n_kv_head,tie", [(4, True), (2, False), (2, True)], ids=["mha-tied", "gqa-untied", "gqa-tied"])
def test_logits_and_greedy_generation_match_fm(tmp_path, tokenizer_path, n_kv_head, tie):
    cfg = tiny(n_kv_head=n_kv_head, tie_embeddings=tie)
    model = write_model_dir(tmp_path / "fm", cfg, tokenizer_path)
    summary = export_hf(tmp_path / "fm", tmp_path / "hf")
    assert summary["architecture"] == "LlamaForCausalLM"
    with open(tmp_path / "hf" / "config.json") as f:
        written = json.load(f)
    assert (written["num_key_value_heads"], written["tie_word_embeddings"]) == (n_kv_head, tie)

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.config.head_dim == cfg.head_dim and hf.config.intermediate_size == cfg.ffn_hidden
    names = set(hf.state_dict())
    assert ("lm_head.weight" in names) and (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    torch.testing.assert_close(hf.model.embed_tokens.weight, model.tok_emb.weight, rtol=0, atol=0)
    torch.testing.assert_close(hf.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)

    torch.manual_seed(1)
    ids = torch.randint(len(SPECIAL_TOKENS), cfg.vocab_size, (2, 16))  # (B, T); no pad id: no mask inferred
    with torch.no_grad():
        want, _, _ = model(ids)  # (B, T, V)
        got = hf(input_ids=ids).logits
    assert want.std() > 0.5  # logits that differ, so a wrong layout cannot hide in the tolerance
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    prompt = ids[:, :6]
    fm_out = model.generate(prompt, max_new_tokens=10, temperature=0)  # (B, 16)
    hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                         use_cache=True)
    for fm_row, hf_row in zip(fm_out.tolist(), hf_out.tolist()):
        assert until_stop(hf_row, 6) == until_stop(fm_row, 6)
    assert fm_out.shape == (2, 16)


def test_rope_tables_equal_transformers():
    """fm's rope_tables against LlamaRotaryEmbedding: same inv_freq, same [cos, cos] layout, sin's sign folded."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

    from fm.models.decoder import apply_rope, rope_tables

    cfg = tiny(seq_len=512, rope_theta=500000.0)
    hf_cfg = transformers.LlamaConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_head,
                                      max_position_embeddings=cfg.seq_len,
                                      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    x = torch.randn(1, cfg.seq_len, cfg.n_head, cfg.head_dim)  # (B, T, H, D)
    cos, sin = LlamaRotaryEmbedding(hf_cfg)(x, torch.arange(cfg.seq_len)[None])  # (1, T, D) each
    fm_cos, fm_sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
    # fm builds the angles in float64, transformers in float32: at position 511 they differ by float32 rounding
    torch.testing.assert_close(fm_cos, cos[0], rtol=0, atol=1e-4)
    half = cfg.head_dim // 2
    torch.testing.assert_close(fm_sin, torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1), rtol=0, atol=1e-4)
    hf_rot = x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]
    torch.testing.assert_close(apply_rope(x, fm_cos, fm_sin), hf_rot, rtol=0, atol=1e-4)


def test_tokenizer_loads_offline_with_fm_ids(tmp_path, tokenizer_path):
    write_model_dir(tmp_path / "fm", tiny(), tokenizer_path)
    export_hf(tmp_path / "fm", tmp_path / "hf")
    fm_tok = open_tokenizer(tokenizer_path)
    for hf_tok in (transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf"),
                   transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")):
        assert (hf_tok.eos_token, hf_tok.eos_token_id) == ("<|endoftext|>", EOS)
        assert (hf_tok.pad_token, hf_tok.pad_token_id) == ("<|pad|>", PAD)
        assert hf_tok.convert_tokens_to_ids("<|end|>") == END
        for text in TEXTS:
            want = fm_tok.encode(text, add_special_tokens=False).ids
            got = hf_tok(text, add_special_tokens=False)["input_ids"]
            assert got == want, text
            assert hf_tok.encode(text) == want  # nothing added by default either (fm puts nothing before a prompt)
            assert hf_tok.decode(got) == unicodedata.normalize("NFC", text) == fm_tok.decode(want)
        assert EOS not in hf_tok("a <|endoftext|> b")["input_ids"]  # a special token in text stays text, as in fm
        assert hf_tok.decode([SPECIAL_IDS["<|user|>"], *want, END], skip_special_tokens=True) == fm_tok.decode(want)
        batch = hf_tok(["a", TEXTS[0]], padding=True)["input_ids"]
        assert batch[0][-1] == PAD and len(batch[0]) == len(batch[1])


@pytest.mark.parametrize("feature,kw", [
    ("MoE", {"moe_layers": "every_2", "n_experts": 2}),
    ("sparse attention", {"attention": "local", "attn_window": 8}),
    ("non-causal", {"causal": False}),
])
def test_refuses_what_llama_cannot_express(tmp_path, tokenizer_path, feature, kw):
    src = tmp_path / "fm-model"
    write_model_dir(src, tiny(**kw), tokenizer_path)
    with pytest.raises(ValueError, match=feature) as e:
        export_hf(src, tmp_path / "hf")
    assert str(src) in str(e.value)
    assert not (tmp_path / "hf").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_refuses_adapter_and_damaged_source(tmp_path, tokenizer_path):
    src = tmp_path / "fm"
    write_model_dir(src, tiny(), tokenizer_path)
    export_hf(src, tmp_path / "hf")
    before = sha256_file(tmp_path / "hf" / "model.safetensors")

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "adapter": {"method": "prefix", "path": "adapter.safetensors"}}))
    with pytest.raises(ValueError, match="prefix.*adapter"):
        export_hf(src, tmp_path / "hf")
    (src / "config.json").write_text(json.dumps(config))

    data = bytearray((src / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit pattern in the last weight: same size, other sha256
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        export_hf(src, tmp_path / "hf")
    assert sha256_file(tmp_path / "hf" / "model.safetensors") == before  # the earlier export is untouched


def test_fm_export_json_matches_files(tmp_path, tokenizer_path):
    src = tmp_path / "fm"
    write_model_dir(src, tiny(tie_embeddings=False), tokenizer_path)
    summary = export_hf(src, tmp_path / "hf")
    record = json.loads((tmp_path / "hf" / "fm_export.json").read_text())
    assert record["files"] == summary["files"]
    listed = set(record["files"])
    assert listed == {p.name for p in (tmp_path / "hf").iterdir()} - {"fm_export.json"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= listed
    for name, want in record["files"].items():
        path = tmp_path / "hf" / name
        assert (path.stat().st_size, sha256_file(path)) == (want["bytes"], want["sha256"]), name
    assert record["files"]["tokenizer.json"]["sha256"] == sha256_file(tokenizer_path)  # copied byte for byte
    assert record["source"]["weights_sha256"] == json.loads((src / "config.json").read_text())["weights"]["sha256"]
    # Same weights, same bytes: a re-export is recognisably the same artifact.
    assert export_hf(src, tmp_path / "hf2")["files"] == record["files"]
