"""ONNX export tests (fm/export/onnx.py), each against the torch Decoder on CPU with tiny configs: the
prefill graph against Decoder.forward at shapes the export never saw (multi-head and grouped-query),
every decode step against a full recompute, greedy OnnxGenerator against Decoder.generate, the int8
graph's size and top-1 agreement with fp32 on a trained model, and sha256 refusals."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from fm.export.onnx import (OUTPUTS, OnnxGenerator, OnnxLM, export_decode, export_prefill, fold_weight_transposes,
                            fuse_for_onnxruntime, graph_metadata, load_session, quantize_int8)
from fm.io import sha256_file
from fm.models.decoder import Decoder, KVCache, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# 2 layers of width 32 in 4 heads of 8; the exports' examples are B=2, T=4 (prefill) and P=3 (decode)
TINY = dict(vocab_size=96, seq_len=48, n_layer=2, n_head=4, d_model=32)
VARIANTS = {"mha": {}, "gqa": {"n_kv_head": 2}}


def tiny_decoder(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    """(model, prefill path, decode path, their sha256s) of a tiny random-init Decoder, multi-head or GQA."""
    model = tiny_decoder(**VARIANTS[request.param])
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    prefill, decode = out / "prefill.onnx", out / "decode.onnx"
    shas = {"prefill_sha256": export_prefill(model, prefill), "decode_sha256": export_decode(model, decode)}
    return model, prefill, decode, shas


def reference_with_cache(model: Decoder, ids: torch.Tensor):
    """Decoder.forward's logits (B, T, V) and the keys/values its KVCache holds (n_layer, B, Hkv, T, D)."""
    B, T = ids.shape
    cache = KVCache(model.cfg, B, T)
    with torch.no_grad():
        logits = model(ids, kv_cache=cache)[0]
    return logits, cache.k, cache.v


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_prefill_matches_decoder_at_other_batch_and_length(exported):
    model, prefill, decode, shas = exported
    cfg = model.cfg
    for path in (prefill, decode):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    graph = onnx.load(str(prefill)).graph
    assert [i.name for i in graph.input] == ["ids"] and [o.name for o in graph.output] == OUTPUTS
    assert all(isinstance(d, str) for d in dims(graph.input[0]))  # batch and length symbolic
    session = load_session(prefill, shas["prefill_sha256"], intra_op_threads=1)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for B, T in ((3, 11), (1, 1), (2, cfg.seq_len)):  # the export saw (2, 4)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        logits, keys, values = (torch.from_numpy(x) for x in session.run(OUTPUTS, {"ids": ids.numpy()}))
        ref_logits, ref_keys, ref_values = reference_with_cache(model, ids)
        assert logits.shape == (B, T, cfg.vocab_size)
        assert keys.shape == values.shape == (cfg.n_layer, B, cfg.n_kv_head, T, cfg.head_dim)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(keys, ref_keys, rtol=0, atol=1e-5)  # KVCache's layout, RoPE applied
        torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-5)
        worst = max(worst, (logits - ref_logits).abs().max().item())
    print(f"prefill n_kv_head={cfg.n_kv_head}: max |logits - Decoder.forward| = {worst:.2e}")


def test_decode_steps_equal_full_recompute(exported):
    """Prefill 7 tokens, then decode 5 one at a time, feeding the cache back: each step's logits are
    Decoder.forward's on the whole sequence so far at its last position."""
    model, prefill, decode, shas = exported
    cfg = model.cfg
    B, T, steps = 3, 7, 5
    tokens = torch.randint(0, cfg.vocab_size, (B, T + steps), generator=torch.Generator().manual_seed(2))
    prefill_session = load_session(prefill, shas["prefill_sha256"], intra_op_threads=1)
    decode_session = load_session(decode, shas["decode_sha256"], intra_op_threads=1)
    graph = onnx.load(str(decode)).graph
    assert [i.name for i in graph.input] == ["ids", "past_keys", "past_values"]
    assert dims(graph.output[1])[3] == "past + 1"
    _, keys, values = prefill_session.run(OUTPUTS, {"ids": tokens[:, :T].numpy()})
    worst = 0.0
    for step in range(steps):
        P = T + step
        feeds = {"ids": tokens[:, P:P + 1].numpy(), "past_keys": keys, "past_values": values}
        logits, keys, values = decode_session.run(OUTPUTS, feeds)
        with torch.no_grad():
            expected = model(tokens[:, :P + 1])[0][:, -1:]  # (B, 1, V) full recompute, no cache
        assert logits.shape == (B, 1, cfg.vocab_size) and keys.shape[3] == P + 1
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=0, atol=1e-4)
        worst = max(worst, (torch.from_numpy(logits) - expected).abs().max().item())
        if step == 0:  # the cache is read: the same token after a zeroed past is another prediction
            zeroed = decode_session.run(OUTPUTS, {**feeds, "past_keys": np.zeros_like(feeds["past_keys"]),
                                                  "past_values": np.zeros_like(feeds["past_values"])})[0]
            assert np.abs(zeroed - logits).max() > 1e-3
    _, ref_keys, ref_values = reference_with_cache(model, tokens)
    torch.testing.assert_close(torch.from_numpy(keys), ref_keys, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(values), ref_values, rtol=0, atol=1e-5)
    print(f"decode n_kv_head={cfg.n_kv_head}: max |logits - full recompute| over {steps} steps = {worst:.2e}")


def test_generator_equals_greedy_generate(exported):
    model, prefill, decode, shas = exported
    gen = OnnxGenerator(prefill, decode, **shas, intra_op_threads=1)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(prompt, max_new_tokens=12, temperature=0)[0].tolist()
    got = gen.generate(prompt[0].tolist(), max_new_tokens=12)
    assert got == expected and len(got) == 5 + 12
    eos = expected[5 + 3]  # the 4th new token: both stop right after emitting it
    assert gen.generate(prompt[0].tolist(), 12, eos_id=eos) == model.generate(prompt, 12, temperature=0, eos_id=eos)[0].tolist()
    assert len(gen.generate(prompt[0].tolist(), 12, eos_id=eos)) <= 5 + 4
    with pytest.raises(ValueError, match="exceeds seq_len=48"):
        gen.generate(prompt[0].tolist(), max_new_tokens=44)
    with pytest.raises(ValueError, match="is a decode graph, expected a prefill graph"):
        OnnxGenerator(decode, prefill)


def pattern_batch(B: int, T: int, cycle: torch.Tensor, g: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Rows of the token cycle from random offsets; a share `noise` of tokens replaced by random ones."""
    starts = torch.randint(0, len(cycle), (B, 1), generator=g)
    ids = cycle[(starts + torch.arange(T)) % len(cycle)]  # (B, T)
    swap = torch.rand(B, T, generator=g) < noise
    return torch.where(swap, torch.randint(0, len(cycle) * 4, (B, T), generator=g), ids)


def trained_tiny(steps: int = 30) -> tuple[Decoder, torch.Tensor]:
    """A tiny tied model trained for `steps` steps on a repeating 12-token cycle (so its predictions are
    confident, not near-uniform), and the cycle."""
    model = tiny_decoder(seed=4, n_kv_head=2).train()
    g = torch.Generator().manual_seed(5)
    cycle = torch.randperm(model.cfg.vocab_size, generator=g)[:12]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        ids = pattern_batch(16, 24, cycle, g, noise=0.05)
        _, loss, _ = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), cycle


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_int8_graph_is_smaller_and_agrees_with_fp32(tmp_path, method):
    """The trained tiny model exported and quantized (dynamic, or static calibrated on other rows of the
    cycle): the int8 file is smaller, every weight MatMul (the tied LM head included) and the embedding
    are int8, and its top-1 next token agrees with fp32's on noisy rows of the cycle."""
    model, cycle = trained_tiny()
    cfg = model.cfg
    assert cfg.tie_embeddings  # the LM head is MatMul(x, Transpose(embedding)) in the graph
    fp32, int8 = tmp_path / "prefill.onnx", tmp_path / "prefill.int8.onnx"
    fp32_sha = export_prefill(model, fp32)
    calibration = [{"ids": pattern_batch(8, 32, cycle, torch.Generator().manual_seed(7), noise=0.1).numpy()}]
    int8_sha = quantize_int8(fp32, int8, method, calibration if method == "static" else None)
    assert sha256_file(fp32) == fp32_sha and sha256_file(int8) == int8_sha  # the fp32 file stays beside it
    graph = onnx.load(str(int8))
    ops = [n.op_type for n in graph.graph.node]
    weight_matmuls = 7 * cfg.n_layer + 1  # wq wk wv wo w_gate w_up w_down per layer, lm_head
    if method == "dynamic":
        assert ops.count("MatMulInteger") == weight_matmuls
    else:  # QDQ: each quantized weight is an int8 initializer behind a DequantizeLinear
        int8_weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
        assert len(int8_weights) >= weight_matmuls
    assert "SkipSimplifiedLayerNormalization" in ops  # onnxruntime's RMSNorm fusion ran first
    sizes = fp32.stat().st_size, int8.stat().st_size
    assert sizes[1] < 0.5 * sizes[0]  # the embedding table too: about a quarter, plus scales and a tiny graph's overhead

    ids = pattern_batch(8, 32, cycle, torch.Generator().manual_seed(6), noise=0.1)  # 256 predictions
    logits32 = load_session(fp32, fp32_sha, 1).run(["logits"], {"ids": ids.numpy()})[0]
    session8 = load_session(int8, int8_sha, 1)
    assert graph_metadata(session8)[0] == "prefill"  # the metadata OnnxGenerator reads survives quantization
    logits8 = session8.run(["logits"], {"ids": ids.numpy()})[0]
    confidence = torch.from_numpy(logits32).softmax(-1).max(-1).values.mean().item()
    agreement = float((logits32.argmax(-1) == logits8.argmax(-1)).mean())
    print(f"int8 {method}: {sizes[0]} -> {sizes[1]} bytes ({sizes[1] / sizes[0]:.2f}x), "
          f"fp32 mean top-1 prob {confidence:.3f}, top-1 agreement {agreement:.4f} over {ids.numel()} positions, "
          f"max |logits8 - logits32| {np.abs(logits8 - logits32).max():.3f}")
    assert confidence > 0.5  # trained: far from uniform (1/96), so agreement measures something
    assert agreement >= 0.9


def test_graph_rewrites_before_quantization_keep_the_logits(exported, tmp_path):
    """fold_weight_transposes gives the tied LM head a constant weight, and onnxruntime's RMSNorm fusion
    replaces the decomposed norms: the fp32 logits stay the same (1e-5) after each."""
    model, prefill, _, shas = exported
    graph = onnx.load(str(prefill))
    ids = torch.randint(0, model.cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(8)).numpy()
    expected = load_session(prefill, shas["prefill_sha256"], 1).run(["logits"], {"ids": ids})[0]
    # The exporter folds a small tied head's Transpose itself; a large one is left to fold_weight_transposes
    # (test_fold_weight_transposes_unties_a_shared_weight).
    assert fold_weight_transposes(graph) in (0, 1)
    inits = {t.name for t in graph.graph.initializer}
    weight_matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weight_matmuls) == 7 * model.cfg.n_layer + 1  # every projection and the LM head read a constant
    fused = fuse_for_onnxruntime(graph)
    ops = [n.op_type for n in fused.graph.node]
    assert "Pow" not in ops and ops.count("SkipSimplifiedLayerNormalization") == 2 * model.cfg.n_layer
    for i, proto in enumerate((graph, fused)):
        path = tmp_path / f"rewritten{i}.onnx"
        onnx.save(proto, str(path))
        got = load_session(path, sha256_file(path), 1).run(["logits"], {"ids": ids})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert {p.key for p in fused.metadata_props} >= {"fm.graph", "fm.model_config"}


def test_fold_weight_transposes_unties_a_shared_weight(tmp_path):
    """A hand-built tied head, as the exporter writes a large one: Gather(W, ids) and MatMul(x, Transpose(W))
    share the initializer W. After the fold the MatMul reads its own W^T, the Transpose is gone, the Gather
    still reads W, and the outputs are unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    W = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)  # (V, C)
    nodes = [helper.make_node("Gather", ["W", "ids"], ["emb"]),
             helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["emb", "Wt"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, 10])],
                              [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ids = np.array([[1, 2, 3], [9, 0, 4]], dtype=np.int64)
    expected = W[ids] @ W.T  # (2, 3, 10)
    assert fold_weight_transposes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul"]
    assert model.graph.node[0].input[0] == "W" and model.graph.node[1].input[1] == "W.T"
    onnx.checker.check_model(model)
    path = tmp_path / "folded.onnx"
    onnx.save(model, str(path))
    got = load_session(path, sha256_file(path), 1).run(["logits"], {"ids": ids})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_static_int8_needs_calibration(exported, tmp_path):
    _, prefill, _, _ = exported
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(prefill, tmp_path / "x.onnx", "static")
    with pytest.raises(ValueError, match="dynamic' or 'static"):
        quantize_int8(prefill, tmp_path / "x.onnx", "fp8")
    with pytest.raises(ValueError, match="beside its input"):
        quantize_int8(prefill, prefill)
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_lm_scores_like_the_decoder_and_refuses_a_changed_file(exported, tmp_path):
    """OnnxLM (what the evaluate stage scores int8 graphs with) gives Decoder.forward's logits and, through
    fm.eval.choice, the same continuation log-likelihoods; a decode graph or a changed file is refused."""
    from fm.eval.choice import continuation_logprobs, model_max_len

    model, prefill, decode, shas = exported
    lm = OnnxLM(prefill, shas["prefill_sha256"], 1)
    assert lm.cfg == model.cfg and model_max_len(lm) == model.cfg.seq_len
    ids = torch.randint(0, model.cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids)[0], model(ids)[0], rtol=0, atol=1e-4)
    pairs = [([1, 2, 3], [4, 5]), ([7] * 20, [9]), ([3, 1], [2, 2, 2])]
    for (got, greedy_got), (want, greedy_want) in zip(continuation_logprobs(lm, pairs, 16, batch_size=2),
                                                      continuation_logprobs(model, pairs, 16, batch_size=3)):
        assert abs(got - want) < 1e-4 and greedy_got == greedy_want
    with pytest.raises(ValueError, match="takes only token ids"):
        lm(ids, domains=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="is a decode graph"):
        OnnxLM(decode, shas["decode_sha256"])
    changed = tmp_path / "prefill.onnx"
    data = bytearray(prefill.read_bytes())
    data[len(data) // 3] ^= 1
    changed.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="prefill.onnx has sha256"):
        OnnxLM(changed, shas["prefill_sha256"])


def test_a_dynamic_int8_graph_scores_each_row_as_if_alone(exported, tmp_path):
    """Dynamic quantization scales activations by the range of the whole call: run as one batch, a row's logits
    move with its neighbours and padding. OnnxLM runs such a graph row by row without right padding, so
    continuation scores are the same at every batch size (what the evaluate stage's figures rely on)."""
    from fm.eval.choice import continuation_logprobs

    model, prefill, _, _ = exported
    int8 = tmp_path / "prefill.int8.onnx"
    sha = quantize_int8(prefill, int8, "dynamic")
    lm = OnnxLM(int8, sha, 1)
    assert lm.per_row and not OnnxLM(prefill, sha256_file(prefill), 1).per_row
    g = torch.Generator().manual_seed(3)
    quiet = torch.randint(2, 40, (1, 12), generator=g)  # a row of small ids next to one of large ones
    loud = torch.randint(40, model.cfg.vocab_size, (1, 12), generator=g)
    alone = lm(quiet)[0][0]
    together = lm(torch.cat([quiet, loud]))[0][0]
    padded = lm(torch.cat([quiet, torch.ones(1, 4, dtype=torch.long)], dim=1))[0][0, :12]
    assert torch.equal(alone, together) and torch.equal(alone, padded)
    whole = lm.session.run(["logits"], {"ids": torch.cat([quiet, loud]).numpy()})[0][0]
    assert not np.array_equal(whole, alone.numpy())  # one call for both rows: the row's scores moved
    pairs = [([5, 9, 12, 3], [7, 8]), ([60, 61, 62], [2]), ([3] * 10, [40, 41, 42])]
    scores = [continuation_logprobs(lm, pairs, 16, batch_size=b) for b in (1, 2, 3)]
    assert scores[0] == scores[1] == scores[2]


def test_load_session_refuses_a_changed_file(exported, tmp_path):
    model, prefill, decode, shas = exported
    copy = tmp_path / "prefill.onnx"
    shutil.copyfile(prefill, copy)
    load_session(copy, shas["prefill_sha256"])  # intact: loads
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    copy.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{copy}.*expected {shas['prefill_sha256']}"):
        load_session(copy, shas["prefill_sha256"])
    with pytest.raises(ValueError, match=str(copy)):
        OnnxGenerator(copy, decode, **shas)


@pytest.mark.parametrize("overrides, message", [
    ({"moe_layers": "all"}, "MoE layers .* future work"),
    ({"attention": "local", "attn_window": 8}, "sparse attention .* future work"),
    ({"causal": False}, "must be causal"),
])
def test_export_refuses_models_it_cannot_represent(tmp_path, overrides, message):
    model = tiny_decoder(**overrides)
    for export in (export_prefill, export_decode):
        with pytest.raises(ValueError, match=message):
            export(model, tmp_path / "graph.onnx")
    assert not (tmp_path / "graph.onnx").exists()
    with pytest.raises(ValueError, match="float32"):
        export_prefill(tiny_decoder().to(torch.bfloat16), tmp_path / "graph.onnx")
