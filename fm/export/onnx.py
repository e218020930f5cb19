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
import logging
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
QUANTIZED_OPS = ["MatMul", "Gemm", "Gather"]  # ops whose constant weights quantize_int8 stores as int8


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


def export_graph(wrapper: nn.Module, graph: str, example: tuple, dynamic_shapes: dict, path,
                 input_names: list[str] | None = None, output_names: list[str] | None = None) -> str:
    """Dynamo-export wrapper (whose .model has a .cfg with to_dict()) to one self-contained .onnx file at
    path (atomically), checked by onnx.checker; return its sha256. Names default to the decoder graphs'."""
    import onnx

    model = wrapper.model
    was_training = model.training
    wrapper.eval()
    # The exporter logs a warning per torchvision op it cannot register (torchvision is not a dependency)
    # and pytree a FutureWarning of its own: noise to a user exporting a language model.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration_level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # One Dim shared by several inputs (batch, past) is one axis name, as intended.
            warnings.filterwarnings("ignore", message=".*The axis name: .* will not be used", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            program = torch.onnx.export(wrapper, example, dynamo=True, opset_version=OPSET,
                                        input_names=input_names or INPUTS[graph], output_names=output_names or OUTPUTS,
                                        dynamic_shapes=dynamic_shapes, verbose=False)
    finally:
        model.train(was_training)
        registration.setLevel(registration_level)
    # Per-node debugging metadata (stack traces with this checkout's absolute paths) would make the
    # bytes, and so the sha256, depend on where fm is installed; for a tiny model it is half the file.
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    program.model.metadata_props.update({"fm.graph": graph, "fm.model_config": json.dumps(model.cfg.to_dict())})
    with atomic_path(path) as tmp:
        program.save(str(tmp), external_data=False)
        onnx.checker.check_model(str(tmp), full_check=True)  # ValidationError: nothing is published
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


def fold_weight_transposes(model) -> int:
    """Give every MatMul whose weight is Transpose(initializer) a pre-transposed initializer of its own.

    A tied LM head exports as MatMul(x, Transpose(embedding)): the embedding initializer also feeds
    the Gather, so no optimizer folds the Transpose, and onnxruntime's quantizer, which quantizes only
    constant weights, would leave the largest MatMul of a small model in float32. The copy costs the
    embedding's size once (as an untied model stores it) and nothing numerically. Returns how many
    MatMuls were rewired; Transposes left without a consumer are removed.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    folded, names = 0, {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        transpose = producer[node.input[1]]
        if transpose.op_type != "Transpose" or transpose.input[0] not in inits:
            continue
        weight = numpy_helper.to_array(inits[transpose.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if transpose.input[0] not in names:
            name = f"{transpose.input[0]}.T"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
            names[transpose.input[0]] = name
        node.input[1] = names[transpose.input[0]]
        folded += 1
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & used]:
        graph.node.remove(node)
    return folded


def fuse_for_onnxruntime(model):
    """onnxruntime's transformer fusions on a ModelProto: each RMSNorm (Pow, ReduceMean, Add, Sqrt,
    Div, Mul in the dynamo graph) becomes one SimplifiedLayerNormalization, and the residual add in
    front of it is folded in (SkipSimplifiedLayerNormalization). These are onnxruntime contrib ops
    (domain com.microsoft), so only the int8 graphs, which need onnxruntime anyway, are fused; the
    fp32 graphs keep standard ONNX ops. Attention and rotary fusions do not match the dynamo graph's
    pattern and are left to onnxruntime's own session-time optimizations (ORT_ENABLE_ALL)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    props = {p.key: p.value for p in model.metadata_props}
    loggers = [logging.getLogger(name) for name in ("onnx_model", "onnx_model_bert", "onnx_model_gpt2", "fusion_base",
                                                    "fusion_utils", "fusion_skiplayernorm", "fusion_layernorm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        cfg = json.loads(props["fm.model_config"])
        fused = optimize_model(model, model_type="gpt2", num_heads=cfg["n_head"], hidden_size=cfg["d_model"],
                               opt_level=0).model  # opt_level 0: the Python fusions only
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.helper.set_model_props(fused, props)
    return fused


class CalibrationFeeds:
    """onnxruntime's CalibrationDataReader over a list of feed dicts (numpy arrays by input name)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, method: str = "dynamic",
                  calibration: list[dict] | None = None, fuse: bool = True) -> str:
    """int8 quantization of the graph src into dst with onnxruntime; src stays beside it. Returns dst's sha256.

    The weights of every MatMul/Gemm with a constant weight (wq, wk, wv, wo, the MLP, and the LM head,
    tied or not: see fold_weight_transposes) become int8, symmetric per tensor, and so does the token
    embedding table (its Gather reads int8 rows and dequantizes them). method "dynamic": activations
    are quantized per call (DynamicQuantizeLinear -> MatMulInteger); "static": activation ranges are
    fixed from `calibration` (feed dicts of the graph's inputs; MinMax, QDQ format). Norms and
    attention's own MatMuls stay float32. With fuse, onnxruntime's
    transformer fusions run first (fuse_for_onnxruntime). On fm's graphs dynamic keeps more top-1
    agreement than static (the export stage measures both and keeps the better).
    onnxruntime's quant_pre_process is not run: its symbolic shape inference fails on the dynamo
    graph ("Incomplete symbolic shape inference"), and without it every weight MatMul is quantized
    anyway (tests/test_export_onnx.py counts them), so its "consider pre-processing" warning is moot.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"quantize_int8 writes beside its input, not over it: {src}")
    if method not in ("dynamic", "static"):
        raise ValueError(f"quantize_int8: method must be 'dynamic' or 'static', got {method!r}")
    if method == "static" and not calibration:
        raise ValueError("quantize_int8: static quantization needs calibration feeds")
    with atomic_path(dst) as tmp:
        graph = onnx.load(str(src))
        fold_weight_transposes(graph)  # the tied LM head: a constant weight the quantizer can see
        if fuse:
            graph = fuse_for_onnxruntime(graph)
        onnx.save(graph, str(tmp))
        root = logging.getLogger()  # the quantizer warns through the root logger about quant_pre_process (see above)
        level, root.level = root.level, logging.ERROR
        try:
            if method == "dynamic":
                quantize_dynamic(tmp, tmp, op_types_to_quantize=QUANTIZED_OPS, weight_type=QuantType.QInt8)
            else:
                quantize_static(tmp, tmp, CalibrationFeeds(calibration), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=QUANTIZED_OPS, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        quantized = onnx.load(str(tmp))  # metadata_props (fm.graph, fm.model_config) carried over from src
        props = {p.key: p.value for p in quantized.metadata_props}
        onnx.helper.set_model_props(quantized, {**props, "fm.quantized": f"int8 {method} (MatMul/Gemm weights, embedding)"})
        onnx.save(quantized, str(tmp))
    return sha256_file(dst)


def open_session(model_bytes: bytes, intra_op_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def read_checked(path: str | os.PathLike, sha256: str) -> bytes:
    """path's bytes, refused (ValueError) unless their sha256 is sha256: read once, so what is used is what was checked."""
    path = Path(path)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"{path} has sha256 {actual}, expected {sha256}: the graph is damaged or was changed "
                         f"after export; export it again")
    return data


def load_session(path: str | os.PathLike, sha256: str, intra_op_threads: int | None = None):
    """An onnxruntime CPU InferenceSession of path, refused (ValueError) unless the file's sha256 is sha256."""
    return open_session(read_checked(path, sha256), intra_op_threads)


def graph_metadata(session) -> tuple[str, dict]:
    """(graph kind, model config dict) that export_graph stored in a session's model."""
    props = session.get_modelmeta().custom_metadata_map
    if "fm.graph" not in props or "fm.model_config" not in props:
        raise ValueError("not an fm graph: its metadata has no fm.graph / fm.model_config (export it with fm.export.onnx)")
    return props["fm.graph"], json.loads(props["fm.model_config"])


class OnnxLM(nn.Module):
    """A prefill graph on onnxruntime as a module that scores like a Decoder: forward(ids (B, T)) ->
    (logits (B, T, V) float32 tensor, None, {}), with the exported model's cfg (ModelConfig). fm's
    scorers (fm.eval.choice, held-out perplexity) take it as they take a torch model, so an int8 graph
    is evaluated by the same code. The file is checked against sha256 as load_session does.

    A dynamically quantized graph (DynamicQuantizeLinear: int8 activations scaled by the range of each call's
    whole input) would score a row differently beside other rows or padding; such a graph runs one row at a
    time, each without its right padding (pad_id), so that its scores do not depend on the batch."""

    def __init__(self, prefill_path: str | os.PathLike, sha256: str, intra_op_threads: int | None = None,
                 pad_id: int = 1):
        super().__init__()
        from fm.models.decoder import ModelConfig

        data = read_checked(prefill_path, sha256)
        self.session = open_session(data, intra_op_threads)
        kind, config = graph_metadata(self.session)
        if kind != "prefill":
            raise ValueError(f"{prefill_path} is a {kind} graph; OnnxLM scores with a prefill graph")
        self.cfg = ModelConfig.from_dict({**config, "moe_layers": tuple(config["moe_layers"])})
        self.path = Path(prefill_path)
        self.pad_id = pad_id
        import onnx

        graph = onnx.load_model_from_string(data).graph  # the checked bytes, not the file read a second time
        self.per_row = any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)

    def forward(self, ids: torch.Tensor, **unused):
        if unused:
            raise ValueError(f"an ONNX graph takes only token ids, got {sorted(unused)}")
        ids = ids.detach().cpu().numpy().astype(np.int64)  # (B, T)
        if not self.per_row:
            return torch.from_numpy(self.session.run(["logits"], {"ids": ids})[0]), None, {}
        B, T = ids.shape
        logits = np.zeros((B, T, self.cfg.vocab_size), np.float32)  # (B, T, V); padding positions stay 0
        for b in range(B):
            real = np.flatnonzero(ids[b] != self.pad_id)
            n = int(real[-1]) + 1 if len(real) else 1  # up to the last token that is not right padding
            logits[b, :n] = self.session.run(["logits"], {"ids": ids[b:b + 1, :n]})[0][0]
        return torch.from_numpy(logits), None, {}


class OnnxGenerator:
    """Generation with a prefill and a decode graph on onnxruntime's CPU provider: greedy or sampled, as
    Decoder.generate does for one row (the same fm.generation.sample_token draws every token).

    With prefill_sha256 / decode_sha256 each file is checked as load_session does; without, it is
    loaded unchecked. intra_op_threads: onnxruntime's per-operator threads (None: its default).
    from_export opens the graphs of an export folder, checked against its report.json.
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

    @classmethod
    def from_export(cls, onnx_dir: str | os.PathLike, int8: bool = False,
                    intra_op_threads: int | None = None) -> OnnxGenerator:
        """The generator of `fm export`'s graphs in onnx_dir (07_export/onnx; the int8 pair with int8=True),
        each refused unless its sha256 is the one onnx_dir/../report.json lists for it."""
        onnx_dir = Path(onnx_dir)
        if onnx_dir.name in ("", ".", ".."):  # its name is looked up in report.json
            onnx_dir = onnx_dir.resolve()
        report_path = onnx_dir.parent / "report.json"
        if not report_path.is_file():
            raise FileNotFoundError(f"{report_path} not found: {onnx_dir} is not in an `fm export` folder "
                                    f"(run `fm export`)")
        try:
            files = json.loads(report_path.read_bytes()).get("files", {})
        except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
            raise ValueError(f"{report_path} is not an export report ({e}): it was cut short or overwritten; "
                             f"rerun `fm export`") from None
        suffix = ".int8.onnx" if int8 else ".onnx"
        paths, shas = [], []
        for graph in ("prefill", "decode"):
            key = f"{onnx_dir.name}/{graph}{suffix}"
            if key not in files:
                raise ValueError(f"{report_path} lists no {key}: it cannot vouch for {onnx_dir / (graph + suffix)} "
                                 f"(rerun `fm export`)")
            paths.append(onnx_dir / f"{graph}{suffix}")
            shas.append(files[key]["sha256"])
        return cls(*paths, prefill_sha256=shas[0], decode_sha256=shas[1], intra_op_threads=intra_op_threads)

    def generate(self, ids: list[int], max_new_tokens: int, eos_id: int | None = None, *, stop_ids=(),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, on_token=None) -> list[int]:
        """ids followed by up to max_new_tokens new tokens: Decoder.generate for one row (same sampling and
        settings; greedy by default). Ends after emitting one of stop_ids or eos_id (that token is the
        last one returned). on_token(token_id) is called with each new token as it is chosen (streaming)."""
        from fm.generation import check_sampling, sample_token, stop_ids_with

        check_sampling(temperature, top_k, top_p)
        if not ids:
            raise ValueError("generate needs at least one prompt token")
        if len(ids) + max_new_tokens > self.seq_len:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds seq_len={self.seq_len}")
        stops = set(stop_ids_with(eos_id, stop_ids))
        out = list(ids)
        if max_new_tokens <= 0:
            return out
        logits, keys, values = self.prefill.run(OUTPUTS, {"ids": np.asarray([ids], dtype=np.int64)})  # (1, T, V)
        for step in range(max_new_tokens):
            next_id = int(sample_token(torch.from_numpy(logits[:, -1]), temperature, top_k, top_p, generator))
            out.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if next_id in stops or step == max_new_tokens - 1:
                break
            feeds = {"ids": np.asarray([[next_id]], dtype=np.int64), "past_keys": keys, "past_values": values}
            logits, keys, values = self.decode.run(OUTPUTS, feeds)  # (1, 1, V), caches one position longer
        return out
