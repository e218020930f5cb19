"""ONNX graphs of a Decoder for KV-cached generation with onnxruntime, their int8 version, and a greedy generator.

    from fm.export.onnx import export_prefill, export_decode, quantize_int8, load_session, OnnxGenerator
    prefill_sha = export_prefill(model, "out/prefill.onnx")        # model: a dense causal fm Decoder
    decode_sha = export_decode(model, "out/decode.onnx")
    int8_sha = quantize_int8("out/decode.onnx", "out/decode.int8.onnx")  # the fp32 file stays beside it
    gen = OnnxGenerator("out/prefill.onnx", "out/decode.onnx", prefill_sha256=prefill_sha, decode_sha256=decode_sha)
    ids = gen.generate(tokenizer.encode("def add(a, b):").ids, max_new_tokens=20)   # prompt + new ids

Two graphs, the cache as plain tensors, stacked over layers in KVCache's layout:

    prefill  inputs  ids            (B, T)                          int64, B and T dynamic, 1 <= T <= seq_len
             outputs logits         (B, T, V)                       float32
                     present_keys   (n_layer, B, n_kv_head, T, D)   float32, RoPE already applied
                     present_values (n_layer, B, n_kv_head, T, D)
    decode   inputs  ids            (B, 1)                          int64, the token at position P
                     past_keys      (n_layer, B, n_kv_head, P, D)   B and P dynamic, 1 <= P < seq_len
                     past_values    (n_layer, B, n_kv_head, P, D)
             outputs logits         (B, 1, V)
                     present_keys   (n_layer, B, n_kv_head, P + 1, D)   feed back as the next past
                     present_values (n_layer, B, n_kv_head, P + 1, D)

The position of the decoded token is the past length P (read from past_keys' shape), so it cannot
disagree with the cache. The graphs do not check bounds: OnnxGenerator does (positions < seq_len,
from the config stored in the graph's metadata). Every graph carries metadata_props "fm.graph"
(prefill | decode) and "fm.model_config" (ModelConfig.to_dict() as JSON).

The wrappers below run the Decoder's own modules and tables (tok_emb, RMSNorms, wq/wk/wv/wo, the
SwiGLU MLP, rope_cos/rope_sin through apply_rope, lm_head) with the cache concatenated explicitly:
KVCache's preallocated in-place writes do not export well. tests/test_export_onnx.py checks both
graphs against Decoder.forward (prefill, and every decode step against a full recompute).

Only dense causal Decoders without MoE layers export. MoE (routing with expert capacity, dropped
tokens, hash and domain routing) and the sparse attention patterns (slices of a full-length mask)
are future work; export_* refuses them.

Writes are atomic (fm.io.atomic_path) and every writer returns the file's sha256; load_session
refuses a file whose sha256 differs, and hashes the very bytes it hands to onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fm.io import atomic_path, sha256_file
from fm.models.decoder import Attention, Decoder, apply_rope

OPSET = 18
INPUTS = {"prefill": ["ids"], "decode": ["ids", "past_keys", "past_values"]}
OUTPUTS = ["logits", "present_keys", "present_values"]


def check_exportable(model) -> None:
    """ValueError unless model is a float32, dense, causal Decoder without MoE layers."""
    if not isinstance(model, Decoder):
        raise ValueError(f"ONNX export needs an fm Decoder, got {type(model).__name__} "
                         f"(adapters: merge LoRA first; prefix and prompt tuning are not exported)")
    cfg = model.cfg
    if not cfg.causal:
        raise ValueError("ONNX export is for generation: the Decoder must be causal (cfg.causal=True)")
    if cfg.moe_layers:
        raise ValueError(f"ONNX export of MoE layers {list(cfg.moe_layers)} is future work (routing with expert "
                         f"capacity and dropped tokens); only dense Decoders export")
    if cfg.attention != "dense":
        raise ValueError(f"ONNX export of sparse attention ({cfg.attention!r}) is future work (its mask is a slice "
                         f"of a full-length one); only attention='dense' exports")
    if model.tok_emb.weight.dtype != torch.float32:
        raise ValueError(f"ONNX export takes a float32 model, got {model.tok_emb.weight.dtype}: call model.float() first")


def attend(attn: Attention, x, cos, sin, past_k=None, past_v=None):
    """Attention.forward with an explicit cache: x (B, T, C) at the positions of cos, sin (T, D), after
    past_k, past_v (B, Hkv, P, D) if given. Returns (out (B, T, C), k, v (B, Hkv, P + T, D))."""
    B, T, _ = x.shape
    q = apply_rope(attn.wq(x).view(B, T, attn.n_head, attn.head_dim), cos, sin).transpose(1, 2)  # (B, H, T, D)
    k = apply_rope(attn.wk(x).view(B, T, attn.n_kv_head, attn.head_dim), cos, sin).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.wv(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
    if past_k is not None:
        k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)  # (B, Hkv, P + T, D)
    k_all, v_all = k, v
    if attn.n_kv_head != attn.n_head:
        k_all = k.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)  # (B, H, S, D)
        v_all = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)
    # Prefill: queries and keys aligned, SDPA's causal mask. Decode (T = 1): the new token sees every key.
    y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=past_k is None)  # (B, H, T, D)
    return attn.wo(y.transpose(1, 2).reshape(B, T, -1)), k, v  # (B, T, C)


def run_layers(model: Decoder, ids, cos, sin, past_keys=None, past_values=None):
    """Decoder.forward (eval mode) over ids (B, T) with the cache explicit: (logits (B, T, V), keys, values
    (n_layer, B, Hkv, P + T, D)), past_keys/values (n_layer, B, Hkv, P, D) or None for a prefill."""
    x = model.tok_emb(ids)  # (B, T, C)
    keys, values = [], []
    for i, block in enumerate(model.layers):
        past = (None, None) if past_keys is None else (past_keys[i], past_values[i])
        h, k, v = attend(block.attn, block.attn_norm(x), cos, sin, *past)
        x = x + h
        x = x + block.mlp(block.mlp_norm(x))  # (B, T, C)
        keys.append(k)
        values.append(v)
    return model.lm_head(model.norm(x)), torch.stack(keys), torch.stack(values)


class Prefill(nn.Module):
    """ids (B, T) at positions 0..T-1 -> logits (B, T, V), present_keys, present_values (n_layer, B, Hkv, T, D)."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, ids):
        T = ids.shape[1]
        return run_layers(self.model, ids, self.model.rope_cos[:T], self.model.rope_sin[:T])


class Decode(nn.Module):
    """ids (B, 1) at position P after past_keys, past_values (n_layer, B, Hkv, P, D) -> logits (B, 1, V),
    present_keys, present_values (n_layer, B, Hkv, P + 1, D)."""

    def __init__(self, model: Decoder):
        super().__init__()
        self.model = model

    def forward(self, ids, past_keys, past_values):
        P = past_keys.shape[3]
        cos, sin = self.model.rope_cos[P:P + 1], self.model.rope_sin[P:P + 1]  # (1, D) each
        return run_layers(self.model, ids, cos, sin, past_keys, past_values)


def export_graph(wrapper: nn.Module, graph: str, example: tuple, dynamic_shapes: dict, path) -> str:
    """Dynamo-export wrapper to one self-contained .onnx file at path (atomically); return its sha256."""
    model = wrapper.model
    was_training = model.training
    wrapper.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # One Dim shared by several inputs (batch, past) is one axis name, as intended.
            warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used", category=UserWarning)
            program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=OPSET, input_names=INPUTS[graph],
                                        output_names=OUTPUTS, dynamic_shapes=dynamic_shapes, verbose=False)
    finally:
        model.train(was_training)
    # Per-node debugging metadata (stack traces with this checkout's absolute paths) would make the
    # bytes, and so the sha256, depend on where fm is installed; for a tiny model it is half the file.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.model.metadata_props.update({"fm.graph": graph, "fm.model_config": json.dumps(model.cfg.to_dict())})
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
    return sha256_file(path)


def export_prefill(model: Decoder, path: str | os.PathLike) -> str:
    """Write the prefill graph of model (see the module docstring) to path; return its sha256."""
    from torch.export import Dim

    check_exportable(model)
    cfg = model.cfg
    # Example sizes of at least 2: torch.export specializes a dimension that is 0 or 1 in the example.
    ids = torch.randint(0, cfg.vocab_size, (2, min(4, cfg.seq_len)), device=model.tok_emb.weight.device)
    batch, seq = Dim("batch"), Dim("seq", min=1, max=cfg.seq_len)
    return export_graph(Prefill(model), "prefill", (ids,), {"ids": {0: batch, 1: seq}}, path)


def export_decode(model: Decoder, path: str | os.PathLike) -> str:
    """Write the one-token decode graph of model (see the module docstring) to path; return its sha256."""
    from torch.export import Dim

    check_exportable(model)
    cfg = model.cfg
    if cfg.seq_len < 4:
        raise ValueError(f"export_decode needs seq_len >= 4 for its example cache, got {cfg.seq_len}")
    device = model.tok_emb.weight.device
    B, P = 2, 3
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device=device)
    past = torch.randn(cfg.n_layer, B, cfg.n_kv_head, P, cfg.head_dim, device=device)
    batch, past_len = Dim("batch"), Dim("past", min=1, max=cfg.seq_len - 1)
    cache_dims = {1: batch, 3: past_len}
    dynamic = {"ids": {0: batch}, "past_keys": cache_dims, "past_values": cache_dims}
    return export_graph(Decode(model), "decode", (ids, past, past.clone()), dynamic, path)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """onnxruntime dynamic quantization of the graph src into dst; src stays beside it. Returns dst's sha256.

    The weights of every MatMul/Gemm with a constant weight (wq, wk, wv, wo, the MLP, the LM head)
    become int8, symmetric per tensor; activations are quantized per call (DynamicQuantizeLinear ->
    MatMulInteger). The embedding Gather, norms and attention's own MatMuls stay float32.
    onnxruntime's quant_pre_process is not run: its symbolic shape inference fails on the dynamo
    graph ("Incomplete symbolic shape inference"), and without it every weight MatMul is quantized
    anyway (tests/test_export_onnx.py counts them), so its "consider pre-processing" warning is moot.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize_int8 writes beside its input, not over it: {src}")
    with atomic_path(dst) as tmp:
        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8)
        quantized = onnx.load(str(tmp))  # metadata_props (fm.graph, fm.model_config) carried over from src
        props = {p.key: p.value for p in quantized.metadata_props}
        onnx.helper.set_model_props(quantized, {**props, "fm.quantized": "int8 dynamic (MatMul/Gemm weights)"})
        onnx.save(quantized, str(tmp))
    return sha256_file(dst)


def open_session(model_bytes: bytes, intra_op_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def load_session(path: str | os.PathLike, sha256: str, intra_op_threads: int | None = None):
    """An onnxruntime CPU InferenceSession of path, refused (ValueError) unless the file's sha256 is sha256."""
    path = Path(path)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"{path} has sha256 {actual}, expected {sha256}: the graph is damaged or was changed "
                         f"after export; export it again")
    return open_session(data, intra_op_threads)


def graph_metadata(session) -> tuple[str, dict]:
    """(graph kind, model config dict) that export_graph stored in a session's model."""
    props = session.get_modelmeta().custom_metadata_map
    if "fm.graph" not in props or "fm.model_config" not in props:
        raise ValueError("not an fm graph: its metadata has no fm.graph / fm.model_config (export it with fm.export.onnx)")
    return props["fm.graph"], json.loads(props["fm.model_config"])


class OnnxGenerator:
    """Greedy generation with a prefill and a decode graph on onnxruntime's CPU provider.

    With prefill_sha256 / decode_sha256 each file is checked as load_session does; without, it is
    loaded unchecked. intra_op_threads: onnxruntime's per-operator threads (None: its default).
    """

    def __init__(self, prefill_path: str | os.PathLike, decode_path: str | os.PathLike, *,
                 prefill_sha256: str | None = None, decode_sha256: str | None = None,
                 intra_op_threads: int | None = None):
        sessions = []
        for path, sha, kind in ((prefill_path, prefill_sha256, "prefill"), (decode_path, decode_sha256, "decode")):
            session = (load_session(path, sha, intra_op_threads) if sha is not None
                       else open_session(Path(path).read_bytes(), intra_op_threads))
            got, config = graph_metadata(session)
            if got != kind:
                raise ValueError(f"{path} is a {got} graph, expected a {kind} graph")
            sessions.append((session, config))
        (self.prefill, prefill_cfg), (self.decode, decode_cfg) = sessions
        if prefill_cfg != decode_cfg:
            raise ValueError(f"{prefill_path} and {decode_path} were exported from models with different configs")
        self.seq_len = prefill_cfg["seq_len"]

    def generate(self, ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """ids followed by up to max_new_tokens greedy tokens (as Decoder.generate with temperature=0 and one
        row): stops after emitting eos_id if given."""
        if not ids:
            raise ValueError("generate needs at least one prompt token")
        if len(ids) + max_new_tokens > self.seq_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds seq_len={self.seq_len}")
        out = list(ids)
        if max_new_tokens <= 0:
            return out
        logits, keys, values = self.prefill.run(OUTPUTS, {"ids": np.asarray([ids], dtype=np.int64)})  # (1, T, V)
        for step in range(max_new_tokens):
            next_id = int(logits[0, -1].argmax())
            out.append(next_id)
            if next_id == eos_id or step == max_new_tokens - 1:
                break
            feeds = {"ids": np.asarray([[next_id]], dtype=np.int64), "past_keys": keys, "past_values": values}
            logits, keys, values = self.decode.run(OUTPUTS, feeds)  # (1, 1, V), caches one position longer
        return out
