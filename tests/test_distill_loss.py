"""Distillation loss (fm/train/distill.py) against references: F.kl_div, a hand-computed case, the
analytic gradient (softmax(s/T) - softmax(t/T)) * T. CPU, milliseconds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fm.train.distill import distill_loss


def logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def targets_with_ignored(B, T, V, seed=0):
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    targets[0, :3] = -100  # e.g. a prompt
    targets[1, -2:] = -100  # e.g. padding
    return targets


def test_kd_is_exactly_zero_when_student_equals_teacher():
    s = logits(2, 7, 11)
    targets = targets_with_ignored(2, 7, 11)
    for temperature in (0.5, 1.0, 4.0):
        out = distill_loss(s.clone().requires_grad_(), s, targets, temperature, alpha=0.7)
        assert out.kd_loss.item() == 0.0
        assert out.loss.item() == pytest.approx(0.3 * out.ce_loss.item(), rel=1e-6)
        out.kd_loss.backward()


def test_matches_kl_div_reference():
    B, T, V, temperature, alpha = 3, 9, 17, 2.5, 0.6
    s, t, targets = logits(B, T, V, seed=1), logits(B, T, V, seed=2), targets_with_ignored(B, T, V, seed=3)
    out = distill_loss(s, t, targets, temperature, alpha)

    keep = (targets != -100).flatten()
    kl = F.kl_div(F.log_softmax(s.flatten(0, 1) / temperature, -1), F.softmax(t.flatten(0, 1) / temperature, -1),
                  reduction="none").sum(-1)  # (N,) KL(teacher || student)
    kd = temperature ** 2 * kl[keep].mean()
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.kd_loss, kd, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.ce_loss, ce, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, alpha * kd + (1 - alpha) * ce, atol=1e-6, rtol=0)


def test_hand_computed_two_token_vocab():
    """V = 2, student uniform, teacher logits (ln 3, 0).

    p_t = (3/4, 1/4) at T = 1 and (sqrt3, 1) / (1 + sqrt3) at T = 2.
    """
    s = torch.zeros(1, 2)
    t = torch.tensor([[math.log(3.0), 0.0]])
    target = torch.tensor([0])
    kl_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    kl_t2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    out1 = distill_loss(s, t, target, temperature=1.0, alpha=0.25)
    out2 = distill_loss(s, t, target, temperature=2.0, alpha=0.25)
    assert out1.kd_loss.item() == pytest.approx(kl_t1, rel=1e-6)
    assert out2.kd_loss.item() == pytest.approx(4 * kl_t2, rel=1e-6)
    assert out1.ce_loss.item() == pytest.approx(math.log(2), rel=1e-6)  # uniform student, T = 1 for CE
    assert out2.loss.item() == pytest.approx(0.25 * 4 * kl_t2 + 0.75 * math.log(2), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 8.0, 50.0])
def test_kd_gradient_is_the_analytic_one(temperature):
    """d(T^2 KL)/ds = (softmax(s/T) - softmax(t/T)) * T per kept token, / the number of kept tokens."""
    B, T, V = 2, 6, 13
    s = logits(B, T, V, seed=4).requires_grad_()
    t = logits(B, T, V, seed=5)
    targets = targets_with_ignored(B, T, V, seed=6)
    distill_loss(s, t, targets, temperature, alpha=1.0).loss.backward()
    keep = (targets != -100)[..., None]  # (B, T, 1)
    analytic = (F.softmax(s.detach() / temperature, -1) - F.softmax(t / temperature, -1)) * temperature
    expected = analytic * keep / keep.sum()
    torch.testing.assert_close(s.grad, expected, atol=1e-7, rtol=1e-5)


def test_kd_gradient_scale_is_independent_of_large_temperature():
    """The point of T^2: for large T the KD gradient tends to (s - t centered) / V, whatever T is."""
    s = logits(4, 10, seed=7).requires_grad_()
    t = logits(4, 10, seed=8)
    targets = torch.zeros(4, dtype=torch.long)
    norms = []
    for temperature in (20.0, 40.0, 80.0):
        s.grad = None
        distill_loss(s, t, targets, temperature, alpha=1.0).loss.backward()
        norms.append(s.grad.norm().item())
    diff = s.detach() - t
    limit = ((diff - diff.mean(-1, keepdim=True)) / 10 / 4).norm().item()  # V = 10, 4 tokens
    assert norms == pytest.approx([limit] * 3, rel=0.1)
    assert norms[2] == pytest.approx(norms[1], rel=0.02)
    # without T^2 the gradient would shrink as 1 / T^2: a factor 16 between T = 20 and T = 80


def test_masked_tokens_contribute_nothing():
    B, T, V = 2, 8, 9
    s = logits(B, T, V, seed=9).requires_grad_()
    t = logits(B, T, V, seed=10)
    targets = targets_with_ignored(B, T, V, seed=11)
    masked = targets == -100
    out = distill_loss(s, t, targets, 3.0, alpha=0.5)
    out.loss.backward()
    assert (s.grad[masked] == 0).all() and (s.grad[~masked].abs().sum(-1) > 0).all()
    # whatever the logits at masked positions, nothing changes
    s2, t2 = s.detach().clone(), t.clone()
    s2[masked] = logits(int(masked.sum()), V, seed=12, scale=50.0)
    t2[masked] = -logits(int(masked.sum()), V, seed=13, scale=50.0)
    out2 = distill_loss(s2, t2, targets, 3.0, alpha=0.5)
    for a, b in zip(out, out2):
        assert torch.equal(a.detach(), b)
    # and the mean is over kept tokens: equal to the loss of the kept tokens alone
    kept = distill_loss(s.detach()[~masked], t[~masked], targets[~masked], 3.0, alpha=0.5)
    torch.testing.assert_close(out.loss.detach(), kept.loss, atol=1e-6, rtol=0)
    empty = distill_loss(s.detach(), t, torch.full_like(targets, -100), 3.0, alpha=0.5)
    assert empty.loss.item() == 0.0 and empty.kd_loss.item() == 0.0 and empty.ce_loss.item() == 0.0


def test_teacher_gets_no_gradient_and_bad_arguments_are_refused():
    s, t = logits(3, 5, seed=14).requires_grad_(), logits(3, 5, seed=15).requires_grad_()
    distill_loss(s, t, torch.tensor([0, 1, 2]), 2.0, alpha=0.5).loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(s, t, torch.tensor([0, 1, 2]), 0.0, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(s, t, torch.tensor([0, 1, 2]), 1.0, alpha=1.5)
    with pytest.raises(ValueError, match="shapes"):
        distill_loss(s, t[:, :4], torch.tensor([0, 1, 2]), 1.0, alpha=0.5)
