"""CLIP model tests (fm/models/clip.py), each against a reference, on CPU in seconds: the loss against
open_clip's ClipLoss (1 process, and 2 gloo processes gathering features against 1 process on the
whole batch), retrieval and zero-shot against hand computations, a tiny overfit, ONNX Runtime
against torch, and a safetensors round trip."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fm.models.clip import (CLIP, ClipConfig, axial_rope_tables, clip_loss, retrieval_metrics, zero_shot_classifier,
                            zero_shot_predict)
from fm.models.decoder import apply_rope

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# image 16x16 in 4x4 patches (16 patches), widths 32 in 2 heads of 16, 2 layers per tower
TINY = dict(image_size=16, patch_size=4, vision_layers=2, vision_width=32, vision_heads=2, text_layers=2,
            text_width=32, text_heads=2, vocab_size=64, context_length=12, embed_dim=16)


def tiny_model(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(ClipConfig(**{**TINY, **overrides})).eval()


def batch(B: int, T: int = 8, seed: int = 0, cfg: ClipConfig = ClipConfig(**TINY)):
    """Random images (B, 3, S, S), right-padded ids (B, T) with pad id 1, and lengths (B,) in [1, T]."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ids = torch.randint(2, cfg.vocab_size, (B, T), generator=g)
    ids = ids.masked_fill(torch.arange(T)[None, :] >= lengths[:, None], 1)  # (B, T)
    return images, ids, lengths


def open_clip_loss_module():
    """open_clip's loss.py loaded alone: the package's __init__ needs torchvision and timm."""
    path = importlib.metadata.distribution("open_clip_torch").locate_file("open_clip/loss.py")
    spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unit_features(N: int, E: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(N, E, generator=g), dim=-1), F.normalize(torch.randn(N, E, generator=g), dim=-1)


# ---------------------------------------------------------------- loss


def test_clip_loss_matches_open_clip_with_gradients():
    ref = open_clip_loss_module().ClipLoss()
    img, txt = unit_features(16, 32, seed=0)
    txt = F.normalize(txt + 2 * img, dim=-1)  # correlated, so the loss is far from log(16)
    grads = []
    for loss_fn in (ref, clip_loss):
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_(), torch.tensor(1 / 0.07, requires_grad=True)]
        loss = loss_fn(*leaves)
        loss.backward()
        grads.append((loss.detach(), *[x.grad for x in leaves]))
    (loss_ref, *grads_ref), (loss_ours, *grads_ours) = grads
    assert abs(loss_ours.item() - loss_ref.item()) < 1e-6 and loss_ref.item() < 0.5 * math.log(16)
    for ours, theirs in zip(grads_ours, grads_ref):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


WORLD, LOCAL_B, E_IN, E = 2, 4, 12, 8


def toy_encoders(seed: int = 0):
    """Two linear 'encoders' and a logit scale: enough to see what each rank's gradients do."""
    g = torch.Generator().manual_seed(seed)
    w_img, w_txt = torch.randn(E_IN, E, generator=g), torch.randn(E_IN, E, generator=g)
    x_img, x_txt = torch.randn(WORLD * LOCAL_B, E_IN, generator=g), torch.randn(WORLD * LOCAL_B, E_IN, generator=g)
    x_txt = x_txt + x_img  # correlated pairs
    params = [w_img.requires_grad_(), w_txt.requires_grad_(), torch.tensor(math.log(1 / 0.07), requires_grad=True)]
    return params, x_img, x_txt


def features_and_loss(params, x_img, x_txt, loss_fn):
    w_img, w_txt, log_scale = params
    img, txt = F.normalize(x_img @ w_img, dim=-1), F.normalize(x_txt @ w_txt, dim=-1)  # (B, E)
    img.retain_grad()
    txt.retain_grad()
    loss = loss_fn(img, txt, log_scale.exp())
    loss.backward()
    return loss.detach(), img.grad, txt.grad, [p.grad for p in params]


def gather_worker(rank: int, rendezvous: str, out_dir: str):
    """One of 2 gloo ranks: its half of the global batch through clip_loss (gathering by default, as
    under torchrun) and through open_clip's ClipLoss(local_loss=True, gather_with_grad=True)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=WORLD)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    results = {}
    ref = open_clip_loss_module().ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
    for name, loss_fn in (("ours", clip_loss), ("open_clip", ref)):
        params, x_img, x_txt = toy_encoders()
        loss, g_img, g_txt, g_params = features_and_loss(params, x_img[rows], x_txt[rows], loss_fn)
        for g in g_params:  # what DDP does to parameter gradients: the mean over ranks
            dist.all_reduce(g)
            g /= WORLD
        results[name] = {"loss": loss, "img_grad": g_img, "txt_grad": g_txt, "param_grads": g_params}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # neither rank tears down the store while the other still uses it
    dist.destroy_process_group()
    # The results are on disk. Skip interpreter finalization: gloo's worker threads can still hold
    # autograd tensors there, and tearing them down after Python has gone aborts the process
    # ("terminate called without an active exception", seen once in CI under load).
    os._exit(0)


def test_two_process_gather_matches_one_process_on_the_full_batch(tmp_path):
    """2 ranks x 4 rows against 1 process x 8 rows. Compared: (a) the mean of the ranks' losses is the
    full-batch loss; (b) a rank's feature gradients are WORLD times the full-batch loss's gradients for
    its rows (the gather's backward sums every rank's contribution); (c) the parameter gradients
    averaged over ranks, as DDP does, are the full-batch gradients; (d) each rank's loss and gradients
    are open_clip's ClipLoss(local_loss=True, gather_with_grad=True)."""
    params, x_img, x_txt = toy_encoders()
    full_loss, full_img_grad, full_txt_grad, full_param_grads = features_and_loss(
        params, x_img, x_txt, lambda i, t, s: clip_loss(i, t, s, gather=False))
    torch.multiprocessing.spawn(gather_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ours = [r["ours"] for r in ranks]
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack([r["loss"] for r in ours]).mean(), full_loss, **close)
    assert not torch.allclose(ours[0]["loss"], ours[1]["loss"])  # each rank scores only its own rows
    for rank, r in enumerate(ours):
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        torch.testing.assert_close(r["img_grad"], WORLD * full_img_grad[rows], **close)
        torch.testing.assert_close(r["txt_grad"], WORLD * full_txt_grad[rows], **close)
        for g, full in zip(r["param_grads"], full_param_grads):
            torch.testing.assert_close(g, full, **close)
        theirs = ranks[rank]["open_clip"]
        torch.testing.assert_close(r["loss"], theirs["loss"], **close)
        torch.testing.assert_close(r["img_grad"], theirs["img_grad"], **close)
        torch.testing.assert_close(r["txt_grad"], theirs["txt_grad"], **close)


def test_gather_needs_a_process_group():
    img, txt = unit_features(4, 8, seed=0)
    with pytest.raises(ValueError, match="process group"):
        clip_loss(img, txt, torch.tensor(10.0), gather=True)


# ---------------------------------------------------------------- retrieval and zero-shot


def test_retrieval_metrics_by_hand_with_several_captions_and_ties():
    # texts t0 t1 (image 0), t2 (image 1), t3 t4 (image 2). Rank of the true item = wrong items
    # scoring >= it (ties go against the model); for an image, against its best caption.
    image_of_text = torch.tensor([0, 0, 1, 2, 2])
    sim = torch.tensor([
        [0.9, 0.1, 0.5, 0.2, 0.3],  # image 0: best caption t0, nothing wrong above: rank 0
        [0.4, 0.6, 0.6, 0.1, 0.7],  # image 1: t2 0.6; t1 ties it, t4 beats it: rank 2
        [0.2, 0.3, 0.8, 0.1, 0.3],  # image 2: best caption t4 0.3 (t3 is 0.1); t1 ties, t2 beats: rank 2
    ])
    # columns, text -> image: t0 rank 0; t1 0.1 < 0.6, 0.3: 2; t2 0.6 < 0.8: 1;
    # t3 0.1 <= 0.2, 0.1 (tie): 2; t4 0.3 <= 0.3 (tie), 0.7: 2
    got = retrieval_metrics(sim, image_of_text, ks=(1, 2, 3, 10))
    assert got == pytest.approx({
        "image_to_text_R@1": 1 / 3, "text_to_image_R@1": 1 / 5,
        "image_to_text_R@2": 1 / 3, "text_to_image_R@2": 2 / 5,
        "image_to_text_R@3": 1.0, "text_to_image_R@3": 1.0,  # 3 = every image: clamped, all hit
        "image_to_text_R@10": 1.0, "text_to_image_R@10": 1.0,
    })
    perm = torch.tensor([3, 0, 4, 2, 1])  # the order of the texts changes nothing
    assert retrieval_metrics(sim[:, perm], image_of_text[perm], ks=(1, 2, 3, 10)) == got
    flat = retrieval_metrics(torch.zeros(3, 5), image_of_text, ks=(1, 3))  # a collapsed model gets no credit...
    assert flat == {"image_to_text_R@1": 0.0, "text_to_image_R@1": 0.0, "image_to_text_R@3": 0.0, "text_to_image_R@3": 1.0}
    with pytest.raises(ValueError, match="at least one text"):  # ...except where k covers every candidate
        retrieval_metrics(sim, torch.tensor([0, 0, 0, 2, 2]))


def fake_encode_texts(vocab: int, pad_to: int):
    """A stand-in for the fm tokenizer: one id per character, right-padded with id 1."""
    def encode(texts: list[str]):
        rows = [[2 + ord(ch) % (vocab - 2) for ch in text] for text in texts]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.tensor([r + [1] * (pad_to - len(r)) for r in rows])  # (n, pad_to)
        return ids, lengths
    return encode


def test_zero_shot_ensembles_normalised_prompts_and_predicts_by_cosine():
    model = tiny_model()
    encode = fake_encode_texts(64, pad_to=12)
    classnames, templates = ["cat", "dog", "ox"], ["a {}.", "the {}!", "{} pic"]
    classifier = zero_shot_classifier(model, encode, classnames, templates)
    with torch.no_grad():
        expected = []
        for name in classnames:  # one prompt at a time, unpadded: the hand computation
            embs = [model.encode_text(*fake_encode_texts(64, pad_to=len(t.format(name)))([t.format(name)]))[0]
                    for t in templates]
            mean = sum(e / e.norm() for e in embs) / len(embs)
            expected.append(mean / mean.norm())
    assert classifier.shape == (3, 16)
    torch.testing.assert_close(classifier, torch.stack(expected), rtol=0, atol=1e-6)

    # Cosine, not dot product: a long class vector does not win by its length.
    long_class = torch.tensor([[10.0, 0.0], [0.6, 0.8]])
    assert zero_shot_predict(torch.tensor([[0.5, 0.866], [2.0, 0.1]]), long_class).tolist() == [1, 0]
    feats = torch.randn(20, 16, generator=torch.Generator().manual_seed(1)) * torch.rand(20, 1) * 5
    cos = [[F.cosine_similarity(f, c, dim=0).item() for c in classifier] for f in feats]
    assert zero_shot_predict(feats, classifier).tolist() == [max(range(3), key=row.__getitem__) for row in cos]


def test_text_features_ignore_padding_and_positions_after_the_last_token():
    model = tiny_model()
    _, ids, lengths = batch(4, T=8)
    with torch.no_grad():
        ref = model.encode_text(ids, lengths)
        junk = torch.randint(2, 64, (4, 4), generator=torch.Generator().manual_seed(3))
        longer = torch.cat((ids, junk), dim=1)  # (4, 12): other "padding" after the real tokens
        torch.testing.assert_close(model.encode_text(longer, lengths), ref, rtol=0, atol=1e-6)
        one = model.encode_text(ids[:1, : lengths[0]], lengths[:1])  # the first caption alone, unpadded
        torch.testing.assert_close(one, ref[:1], rtol=0, atol=1e-6)
        assert not torch.allclose(model.encode_text(ids, lengths.clamp(max=1)), ref)  # the length is read


def test_axial_rope_scores_depend_on_the_2d_offset_only():
    grid, D = 4, 16
    cos, sin = axial_rope_tables(grid, D, 100.0)  # (1 + 16, D)
    q, k = torch.randn(D), torch.randn(D)
    rq = apply_rope(q.expand(1, 1 + grid * grid, 1, D), cos, sin)[0, :, 0]  # (17, D) the same q at every position
    rk = apply_rope(k.expand(1, 1 + grid * grid, 1, D), cos, sin)[0, :, 0]
    at = lambda r, c: 1 + r * grid + c  # token index of patch (r, c)
    torch.testing.assert_close(rq[at(0, 0)] @ rk[at(1, 2)], rq[at(2, 1)] @ rk[at(3, 3)])  # offset (1, 2) both
    # On a raster line the patch one row down, three left is also 1 step away; here it is not.
    assert not torch.allclose(rq[at(0, 3)] @ rk[at(1, 0)], rq[at(0, 0)] @ rk[at(0, 1)])
    positions = torch.unique(torch.cat((cos, sin), dim=1), dim=0)
    assert positions.shape[0] == 1 + grid * grid  # the class token has a position of its own


# ---------------------------------------------------------------- training, export, checkpoints


def test_tiny_clip_overfits_eight_pairs():
    model = tiny_model().train()
    images, ids, lengths = batch(8, T=8, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = clip_loss(*model(images, ids, lengths))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        img, txt, scale = model(images, ids, lengths)
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f}, logit scale {scale.item():.1f}")
    assert losses[-1] < losses[0] / 20
    assert scale.item() <= 100.0 + 1e-4
    metrics = retrieval_metrics(img @ txt.T, torch.arange(8), ks=(1,))
    assert metrics == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0}


def test_logit_scale_is_exponentiated_and_clamped_at_100():
    model = tiny_model()
    images, ids, lengths = batch(2)
    assert model(images, ids, lengths)[2].item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(images, ids, lengths)[2].item() == pytest.approx(100.0, rel=1e-6)


def test_onnx_export_matches_torch_at_other_batch_and_length(tmp_path):
    """fm.export.clip: dynamo export, opset 18, dynamic batch (and sequence for text), checked by
    onnx.checker; ONNX Runtime on shapes the export never saw equals torch to 1e-4; the graphs carry
    their kind and config, and load_session refuses a changed file."""
    from fm.export.clip import export_clip
    from fm.export.onnx import graph_metadata, load_session

    model = tiny_model()
    sha = export_clip(model, tmp_path)
    assert sorted(sha) == ["image.onnx", "text.onnx"]
    test_images, test_ids, test_lengths = batch(5, T=11, seed=7)
    feeds = {"image.onnx": {"images": test_images.numpy()},
             "text.onnx": {"ids": test_ids.numpy(), "lengths": test_lengths.numpy()}}
    with torch.no_grad():
        expected = {"image.onnx": model.encode_image(test_images), "text.onnx": model.encode_text(test_ids, test_lengths)}
    for name in sha:
        session = load_session(tmp_path / name, sha[name], 1)
        kind, config = graph_metadata(session)
        assert kind == f"clip_{name.removesuffix('.onnx')}" and config == model.cfg.to_dict()
        got = torch.from_numpy(session.run(None, feeds[name])[0])
        assert got.shape == (5, 16)
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-4)
    data = bytearray((tmp_path / "text.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "text.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="text.onnx has sha256"):
        load_session(tmp_path / "text.onnx", sha["text.onnx"])


def test_safetensors_round_trip_and_config(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ClipConfig(**TINY)
    model = tiny_model(seed=0)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    restored_cfg = ClipConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert restored_cfg == cfg
    torch.manual_seed(1)
    other = CLIP(restored_cfg).eval()
    images, ids, lengths = batch(3)
    with torch.no_grad():
        assert not torch.allclose(other.encode_image(images), model.encode_image(images))  # a different init
        other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict
        for a, b in zip(other(images, ids, lengths), model(images, ids, lengths)):
            assert torch.equal(a, b)
        assert torch.equal(other.visual.tokens(images), model.visual.tokens(images))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert ClipConfig().num_params() == sum(p.numel() for p in CLIP(ClipConfig()).parameters())


def test_config_rejects_unknown_keys_and_bad_shapes():
    with pytest.raises(ValueError, match=r"unknown clip config keys: \['width'\]"):
        ClipConfig.from_dict({**ClipConfig().to_dict(), "width": 64})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ClipConfig(image_size=60, patch_size=8)
    with pytest.raises(ValueError, match="vision_heads"):
        ClipConfig(vision_width=72, vision_heads=4)  # heads of 18: even, but not a multiple of 4
    with pytest.raises(ValueError, match="text_heads"):
        ClipConfig(text_width=100, text_heads=4)
    with pytest.raises(ValueError, match="embed_dim must be positive"):
        ClipConfig(embed_dim=0)
    with pytest.raises(ValueError, match="exceeds max_logit_scale"):
        ClipConfig(init_logit_scale=5.0)
    with pytest.raises(ValueError, match="images must be 16x16"):
        tiny_model().encode_image(torch.randn(1, 3, 32, 32))
