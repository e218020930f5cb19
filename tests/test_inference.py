"""fm.models.inference.cpu_inference_copy: the oneDNN copy computes what the model computes (logits to
1e-5, the same greedy tokens, MoE and GQA and an untied head included), leaves the model untouched, and
refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fm.models.decoder import Decoder, ModelConfig
from fm.models.inference import OneDnnLinear, cpu_inference_copy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(vocab_size=96, seq_len=48, n_layer=2, n_head=4, d_model=32)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_head": 2, "tie_embeddings": False},
                                       {"moe_layers": "all", "n_experts": 4, "moe_routing": "top1"}])
def test_copy_matches_the_model_and_leaves_it_alone(overrides):
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**TINY, **overrides})).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = cpu_inference_copy(model)
    assert sum(isinstance(m, OneDnnLinear) for m in fast.modules()) >= 7 * TINY["n_layer"] + 1 - (
        3 * TINY["n_layer"] if overrides.get("moe_layers") else 0)  # every projection and the LM head
    assert not any(isinstance(m, OneDnnLinear) for m in model.modules())
    assert not any(p.requires_grad for p in fast.parameters()) and not fast.training
    ids = torch.randint(0, TINY["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids)[0], fast(ids)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    prompt = ids[:1, :5]
    assert torch.equal(fast.generate(prompt, 12, temperature=0), model.generate(prompt, 12, temperature=0))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_linear_with_bias_and_batched_input():
    torch.manual_seed(2)
    linear = nn.Linear(8, 5)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(OneDnnLinear(linear)(x), linear(x), rtol=0, atol=1e-6)


def test_refuses_models_it_cannot_run():
    model = Decoder(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        cpu_inference_copy(model.to(torch.bfloat16))
