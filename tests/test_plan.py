"""`fm plan`: the rank map and memory estimate of a layout against numbers worked out by hand."""

from __future__ import annotations

from typer.testing import CliRunner

from fm.cli import app
from fm.config import PretrainConfig
from fm.models.decoder import ModelConfig
from fm.plan import memory, plan, rank_map

# d=64, 4 heads of 16, ffn 192, vocab 512, 3 layers, untied; 8 ranks = dp 2 x pp 2 x tp 2
MODEL = ModelConfig(vocab_size=512, seq_len=32, n_layer=3, n_head=4, d_model=64, tie_embeddings=False)
CFG = PretrainConfig(seq_len=32, batch_size=4, nproc=8, tp=2, pp=2, pp_microbatches=2, pp_schedule="1f1b", parallel="fsdp")


def test_rank_map_by_hand():
    ranks = rank_map(CFG, MODEL)
    assert [(r.dp, r.pp, r.tp) for r in ranks] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1),
                                                   (0, 1, 0), (0, 1, 1), (1, 1, 0), (1, 1, 1)]
    assert [list(r.layers) for r in ranks[::2]] == [[0, 1], [0, 1], [2], [2]]  # 3 layers: 2 | 1
    assert [(r.first, r.last) for r in (ranks[0], ranks[4])] == [(True, False), (False, True)]
    assert ranks[1].shards == {
        "wq": "rows 32:64 of 64", "wk": "rows 32:64 of 64", "wv": "rows 32:64 of 64", "wo": "cols 32:64 of 64",
        "w_gate": "rows 96:192 of 192", "w_up": "rows 96:192 of 192", "w_down": "cols 96:192 of 192",
        "attn_norm, mlp_norm": "replicated", "tok_emb": "rows 256:512 of 512"}
    assert ranks[4].shards["lm_head"] == "rows 0:256 of 512" and "tok_emb" not in ranks[4].shards
    # a block on one tp rank: norms 2*64 + wq/wk/wv/wo 4 * 32*64 + w_gate/w_up/w_down 3 * 96*64 = 26752
    assert ranks[0].largest_block == 26752
    assert ranks[0].elements == 2 * 26752 + 256 * 64  # + half the embedding = 69888
    assert ranks[4].elements == 26752 + 64 + 256 * 64  # + final norm + half the head = 43200


def test_rank_map_adds_up_to_the_model():
    """With tp = 1 nothing is replicated: the stages' elements add up to num_params."""
    cfg = PretrainConfig(nproc=3, pp=3, pp_microbatches=2, batch_size=4)
    model = ModelConfig(vocab_size=100, seq_len=16, n_layer=5, n_head=2, d_model=32, tie_embeddings=False)
    assert sum(r.elements for r in rank_map(cfg, model)) == model.num_params()


def test_memory_by_hand():
    ranks = rank_map(CFG, MODEL)
    first = memory(CFG, MODEL, ranks[0], fsdp=True, recompute=False, offload=False)
    # FSDP halves 69888 elements: 34944 * 4 B params and grads, * 8 B AdamW state; two gathered blocks
    assert (first["params"], first["grads"], first["optimizer"], first["fsdp_gather"]) == (139776, 139776, 279552, 214016)
    # microbatch b = 4 / 2; a layer: s*b*h*(34 + 5*a*s/h) / tp * 2 (fp32) = 32*2*64*44 = 180224 B;
    # 1F1B stage 0 of 2 holds 2 microbatches of its 2 layers
    assert first["activations"] == 180224 * 2 * 2
    assert first["device_total"] == 139776 * 2 + 279552 + 214016 + 720896
    last = memory(CFG, MODEL, ranks[4], fsdp=True, recompute=False, offload=False)
    # 1 layer, 1 microbatch in flight, + logits and their gradient 2 * b*s*V * 4 B
    assert last["params"] == 86400 and last["activations"] == 180224 + 2 * 2 * 32 * 512 * 4
    recompute = memory(CFG, MODEL, ranks[0], fsdp=True, recompute=True, offload=False)
    assert recompute["activations"] == 2 * 32 * 2 * 64 // 2 * 2 * 2 * 2 + 180224  # layer inputs + one layer recomputed
    plain = memory(CFG, MODEL, ranks[0], fsdp=False, recompute=False, offload=False)
    assert plain["params"] == 69888 * 4 and plain["fsdp_gather"] == 0
    offload = memory(CFG, MODEL, ranks[0], fsdp=True, recompute=True, offload=True)
    assert offload["params"] == offload["grads"] == offload["optimizer"] == 0 and offload["host"] == 139776 * 2 + 279552


def test_plan_uses_the_configured_variant():
    result = plan(CFG, MODEL)
    assert result["layout"] == {"dp": 2, "pp": 2, "tp": 2, "nproc": 8, "parallel": "fsdp", "global_batch": 8}
    assert result["memory"][0]["device_total"] == result["variants"]["fsdp"][0]


def test_plan_command_prints_the_rank_map():
    out = CliRunner().invoke(app, ["plan", "--workdir", "/nonexistent", "--set", "pretrain.nproc=4", "--set", "pretrain.tp=2",
                                   "--set", "pretrain.parallel=fsdp"])
    assert out.exit_code == 0, out.output
    assert "(1, 0, 1)" in out.output and "wq/wk/wv rows 128:256" in out.output
    bad = CliRunner().invoke(app, ["plan", "--set", "pretrain.nproc=3", "--set", "pretrain.tp=2"])
    assert bad.exit_code == 1 and "dp * tp * pp" in bad.output
