"""Instruction tuning and distillation (fm/data/chat.py, fm/data/packing.py, fm/recipes/sft.py,
fm/recipes/distill.py): the loss is on the responses only, the packed loader's rows and resume, a killed sft
or distill run resumed bit-identically, frozen weights untouched by the adapters, tuned folders loading and
refusing a tampered adapter, and the student's initialisation from its teacher.

One module-scoped work dir (sample shards, a 2-layer d_model 32 pretrained model, the instruction set of the
sample's curated tables) and one 4-step run per sft method; every other run is a few steps in its own work dir."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import fm.recipes.sft as sft_recipe
import fm.train.loop as loop
from fm.config import DistillConfig, PretrainConfig, SftConfig
from fm.data.chat import END, IGNORE_INDEX, ChatTemplate
from fm.data.instructions import build_instructions
from fm.data.loader import TokenLoader
from fm.data.packing import PackedLoader
from fm.data.tokenizer import SPECIAL_IDS
from fm.models.adapters import PrefixTuning, PromptTuning, apply_lora
from fm.models.decoder import Decoder, KVCache, ModelConfig
from fm.models.pretrained import load_pretrained, load_tuned
from fm.paths import Paths
from fm.recipes.distill import (Distillation, MixedLoader, init_from_teacher, layer_map, student_config,
                                train_student)
from fm.recipes.sft import evaluate_qa, load_examples, sample_items, sft, train_method
from fm.train.checkpoint import step_dirs
from fm.train.optim import lr_at
from fm.train.parallel import Dist

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PRETRAIN = dict(preset="tiny", model={"n_layer": 2, "d_model": 32, "n_head": 2}, seq_len=128, batch_size=2,
                max_steps=2, warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=2, threads=1, peak_tflops=1.0,
                mix={"text": 1, "code": 1})
METHODS = ("lora", "full", "prefix", "prompt")
SFT = dict(methods=METHODS, lora={"rank": 4, "dropout": 0.1}, prefix={"n_prefix": 4}, prompt={"n_virtual": 4},
           batch_size=2, max_steps=4, warmup_steps=1, eval_every=2, eval_batches=1, ckpt_every=2, keep_checkpoints=2,
           threads=1, mc_items=8)
DISTILL = dict(student={"n_layer": 1, "dropout": 0.1}, text_share=0.5, batch_size=2, max_steps=4, warmup_steps=1,
               eval_every=2, eval_batches=1, ckpt_every=2, keep_checkpoints=2, threads=1, mc_items=4)
TIMING = ("tokens_per_s", "step_s")


# ------------------------------------------------------------------ fixtures


def workdir(base: Paths, root: Path, name: str) -> Paths:
    """A fresh work dir that reads the shared tokens, instruction set and pretrained model (symlinks)."""
    wd = root / name
    (wd / "06_models").mkdir(parents=True)
    (wd / "05_tokens").symlink_to(base.tokens.resolve(), target_is_directory=True)
    (wd / "05_instructions").symlink_to(base.instructions, target_is_directory=True)
    (wd / "06_models" / "pretrain").symlink_to(base.models / "pretrain", target_is_directory=True)
    return Paths(base.raw, wd)


@pytest.fixture(scope="module")
def base(sample_shards, tmp_path_factory, one_thread) -> Paths:
    """Sample shards, a pretrained 2 x 32 model (seq_len 128) and the instruction set of the curated tables."""
    wd = tmp_path_factory.mktemp("sft-base")
    (wd / "05_tokens").symlink_to(sample_shards.tokens, target_is_directory=True)
    paths = Paths(sample_shards.raw, wd)
    from fm.recipes.pretrain import run as pretrain_run

    pretrain_run(PretrainConfig(**PRETRAIN), paths, progress=False)
    card = build_instructions(sample_shards.curated, paths.instructions)
    assert card["rows"]["train"] > 100 and card["rows"]["heldout"] > 10
    return paths


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft-runs")


@pytest.fixture(scope="module")
def trained(base, root):
    """Every method trained 4 steps without interruption; captures the LoRA model just before its merge and the
    trained prefix / prompt modules (what train_method does not return)."""
    paths = workdir(base, root, "straight")
    cfg = SftConfig(**SFT)
    captured: dict = {}
    real_merge, real_write = sft_recipe.merge_lora, sft_recipe._write_adapter

    def merge(model):
        captured["lora"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_merge(model)

    def write_adapter(module, method, out_dir):
        captured[method] = copy.deepcopy(module).eval()
        return real_write(module, method, out_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft_recipe, "merge_lora", merge)
        mp.setattr(sft_recipe, "_write_adapter", write_adapter)
        summaries = {m: train_method(cfg, m, paths, Dist(), progress=False) for m in METHODS}
    return paths, cfg, summaries, captured


def records(folder: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (everything that must be bit-identical)."""
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def chat_of(base: Paths) -> tuple[Decoder, ChatTemplate]:
    model, tokenizer = load_pretrained(base.models / "pretrain")
    return model.eval(), ChatTemplate(tokenizer)


def codes_of(base: Paths) -> list[str]:
    return json.loads((base.tokens / "shards" / "manifest.json").read_text())["codes"]["modality"]


def segments(x: torch.Tensor, y: torch.Tensor, doc_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(doc, start, end) of each run of equal doc ids in a row."""
    out, start = [], 0
    for t in range(1, len(doc_ids) + 1):
        if t == len(doc_ids) or doc_ids[t] != doc_ids[start]:
            out.append((int(doc_ids[start]), start, t))
            start = t
    return out


def same_safetensors(a: Path, b: Path) -> bool:
    """The same tensors, bit for bit, and the same metadata. Not the same bytes: see
    test_exporting_the_same_weights_twice_writes_the_same_file."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 3] ^= 0x01  # in the tensor data, not the header: the file still parses
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ 1. the chat template and the loss mask


def test_chat_template_marks_only_the_response_and_inserts_control_tokens_by_id(base):
    _, chat = chat_of(base)
    prompt, response = "What comes after 床前明月光? Say <|end|> if unsure.", "疑是地上霜。"
    ids, labels = chat.encode(prompt, response)
    text = lambda s: chat.tokenizer.encode(s, add_special_tokens=False).ids
    context = [chat.user_id, *text(prompt), chat.end_id, chat.assistant_id]
    assert ids == context + text(response) + [chat.end_id]
    assert labels == [IGNORE_INDEX] * len(context) + text(response) + [chat.end_id]
    assert ids.count(chat.end_id) == 2  # the typed "<|end|>" is text, not the control token
    assert chat.end_id == chat.tokenizer.token_to_id(END) and len({chat.user_id, chat.assistant_id, chat.end_id}) == 3
    assert chat.encode_prompt(prompt) == context and chat.encode_response(response) == text(response) + [chat.end_id]
    rows = pq.read_table(base.instructions / "train.parquet").to_pylist()[:20]
    batch = chat.encode_batch([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert batch == [chat.encode(r["prompt"], r["response"]) for r in rows]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        chat.encode_batch(["a", "b"], ["c"])


def test_prompt_tokens_carry_no_loss_in_a_packed_batch(base):
    model, chat = chat_of(base)
    examples, rows = load_examples(base.instructions / "train.parquet", chat, codes_of(base))
    prompt_len = {}
    for (ids, _, _), r in zip(examples, rows):
        prompt_len[tuple(ids[:-1])] = (ids, len(chat.encode_prompt(r["prompt"])))
    pad = SPECIAL_IDS["<|pad|>"]
    loader = PackedLoader(examples, 128, 4, seed=3, pad_id=pad)
    x, y, domains, doc_ids = loader.next_batch()
    assert x.shape == y.shape == doc_ids.shape == (4, 128)

    expected = torch.full_like(y, IGNORE_INDEX)
    n_packed = 0
    alone_nll, alone_count = 0.0, 0
    logits, loss, _ = model(x, y, domains=domains, doc_ids=doc_ids)
    for b in range(x.shape[0]):
        segs = segments(x[b], y[b], doc_ids[b])
        for k, (doc, start, end) in enumerate(segs):
            assert doc == k
            key = tuple(x[b, start:end].tolist())
            if key not in prompt_len:  # the padding: the last segment, its own doc id, pad inputs, no targets
                assert k == len(segs) - 1 and (x[b, start:] == pad).all() and (y[b, start:] == IGNORE_INDEX).all()
                continue
            n_packed += 1
            ids, context = prompt_len[key]  # the whole example, never cut
            for j in range(end - start):  # position j predicts ids[j + 1]
                if j + 1 >= context:  # the response and the closing <|end|>
                    expected[b, start + j] = ids[j + 1]
            assert x[b, start + context - 1] == chat.assistant_id  # the first learned target follows <|assistant|>
            assert y[b, end - 1] == chat.end_id  # the last target of an example is its closing <|end|>
            # the same example alone gives the same logits, and its response-only loss
            alone = model(torch.tensor([ids[:-1]]), domains=domains[b:b + 1, start:end])[0][0]
            torch.testing.assert_close(logits[b, start:end], alone, atol=2e-5, rtol=1e-5)
            targets = torch.tensor(ids[1:])
            keep = torch.arange(len(targets)) >= context - 1
            alone_nll += F.cross_entropy(alone[keep], targets[keep], reduction="sum").item()
            alone_count += int(keep.sum())
    assert n_packed > 4  # some rows hold several examples
    assert torch.equal(y, expected)
    learned = y[y != IGNORE_INDEX]
    assert not ({chat.user_id, chat.assistant_id, pad} & set(learned.tolist()))

    # The model's loss is cross-entropy over the response positions only, by hand from the logits.
    keep = expected != IGNORE_INDEX
    log_probs = logits.float().log_softmax(-1)[keep]  # (N, V)
    by_hand = -log_probs.gather(1, expected[keep][:, None]).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss.item() == pytest.approx(alone_nll / alone_count, rel=1e-5)
    # ...and not the loss over every position of the rows
    everything = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
    assert abs(F.cross_entropy(logits.flatten(0, 1), everything.flatten()).item() - loss.item()) > 1e-3


# ------------------------------------------------------------------ 2. the packed loader


def synthetic(n: int = 60, seed: int = 0) -> tuple[list[tuple], int]:
    """Examples whose first id (1000 + i) names them; plus ones the loader must skip. Returns (examples, skipped)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(2, 20)
        ids = [1000 + i] + [rng.randint(10, 99) for _ in range(length - 1)]
        prompt = rng.randint(1, length - 1)
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:], i % 3))
    bad = [([2000] + [5] * 40, [IGNORE_INDEX] + [5] * 40, 0),  # longer than a row (41 > seq_len + 1)
           ([2001] + [5] * 5, [IGNORE_INDEX] * 6, 0),  # nothing to learn
           ([2002, 5], [5, IGNORE_INDEX], 0),  # its only label is on the first token: nothing to learn
           ([2003], [5], 0)]  # a single token: no (input, target) pair
    for j, e in enumerate(bad):
        out.insert(7 * j + 3, e)
    return out, len(bad)


def batch_examples(batch, examples_by_id: dict, seq_len: int, pad: int) -> list[list[int]]:
    """The example ids (1000 + i) of each row; asserts the row holds whole examples and padding only."""
    x, y, domains, doc_ids = batch
    rows = []
    for b in range(x.shape[0]):
        segs = segments(x[b], y[b], doc_ids[b])
        names, at = [], 0
        for k, (doc, start, end) in enumerate(segs):
            assert start == at and doc == k
            first = int(x[b, start])
            if first not in examples_by_id:  # the padding tail: the last segment, pad ids, no targets
                assert k == len(segs) - 1 and (x[b, start:] == pad).all() and (y[b, start:] == IGNORE_INDEX).all()
                break
            ids, labels, domain = examples_by_id[first]
            assert end - start == len(ids) - 1  # never cut
            assert x[b, start:end].tolist() == ids[:-1] and y[b, start:end].tolist() == labels[1:]
            assert (domains[b, start:end] == domain).all()
            names.append(first)
            at = end
        assert sum(len(examples_by_id[i][0]) - 1 for i in names) <= seq_len
        rows.append(names)
    return rows


def test_packed_rows_hold_whole_examples_and_an_epoch_holds_each_once():
    examples, n_bad = synthetic()
    by_id = {e[0][0]: e for e in examples if e[0][0] < 2000}
    pad = 1
    loader = PackedLoader(examples, 32, 1, seed=7, pad_id=pad)
    assert loader.skipped == n_bad and len(loader.examples) == len(examples) - n_bad
    R = loader.rows_per_epoch
    assert sum(len(e[0]) - 1 for e in by_id.values()) / 32 <= R < len(by_id)  # some rows hold several examples
    seen = []
    for _ in range(R):
        seen += batch_examples(loader.next_batch(), by_id, 32, pad)[0]
    assert sorted(seen) == sorted(by_id)  # every usable example exactly once per epoch
    assert loader.state_dict() == {"epoch": 0, "cursor": R}
    nxt = batch_examples(loader.next_batch(), by_id, 32, pad)[0]
    assert loader.state_dict() == {"epoch": 1, "cursor": 1}
    for _ in range(loader.rows_per_epoch - 1):  # epoch 1's order packs into its own number of rows
        nxt += batch_examples(loader.next_batch(), by_id, 32, pad)[0]
    assert sorted(nxt) == sorted(by_id)
    assert nxt != seen  # each epoch its own order

    # With 3 rows a batch, an epoch's tail that does not fill a batch is skipped; nothing repeats.
    loader = PackedLoader(examples, 32, 3, seed=7, pad_id=pad)
    per_epoch = R // 3
    rows = [r for _ in range(per_epoch) for r in batch_examples(loader.next_batch(), by_id, 32, pad)]
    flat = [i for r in rows for i in r]
    assert len(rows) == 3 * per_epoch and len(flat) == len(set(flat))
    loader.next_batch()
    assert loader.state_dict() == {"epoch": 1, "cursor": 3}

    unshuffled = PackedLoader(examples, 32, 1, seed=7, pad_id=pad, shuffle=False)
    order = [i for _ in range(unshuffled.rows_per_epoch) for i in batch_examples(unshuffled.next_batch(), by_id, 32, pad)[0]]
    assert order == [e[0][0] for e in examples if e[0][0] < 2000]


def test_packed_loader_refuses_too_few_rows_and_counts_what_it_skips():
    examples, n_bad = synthetic(6)
    with pytest.raises(ValueError, match=r"6 examples pack into \d+ rows of 32, fewer than one global batch \(4 x 2"):
        PackedLoader(examples, 32, 4, seed=0, world_size=2)
    with pytest.raises(ValueError, match="no example fits seq_len=4"):
        PackedLoader([([1] * 9, [5] * 9, 0), ([1, 2], [IGNORE_INDEX] * 2, 0)], 4, 1, seed=0)
    exact = PackedLoader([([1] * 9, [5] * 9, 0), ([1] * 10, [5] * 10, 0)], 8, 1, seed=0)  # 9 tokens: 8 positions
    assert exact.skipped == 1 and len(exact.examples) == 1


@pytest.mark.parametrize("at", ["mid_epoch", "end_of_epoch", "after_the_boundary"])
def test_packed_loader_resumes_identically(at):
    examples, _ = synthetic()
    make = lambda: PackedLoader(examples, 32, 3, seed=11)
    loader = make()
    per_epoch = loader.rows_per_epoch // 3
    k = {"mid_epoch": 2, "end_of_epoch": per_epoch, "after_the_boundary": per_epoch + 1}[at]
    for _ in range(k):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint's train_state.json holds
    after = [loader.next_batch() for _ in range(per_epoch + 2)]  # crosses an epoch boundary
    resumed = make()
    resumed.load_state_dict(state)
    for a, b in zip(after, (resumed.next_batch() for _ in range(per_epoch + 2))):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_two_ranks_together_give_the_rows_of_one_rank_with_twice_the_batch():
    examples, _ = synthetic()
    one = PackedLoader(examples, 32, 4, seed=5)
    ranks = [PackedLoader(examples, 32, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    steps = 3 * one.rows_per_epoch // 4 + 1  # across two epoch boundaries
    for _ in range(steps):
        whole = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert not torch.equal(parts[0][0], parts[1][0])
        for i in range(4):
            assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), whole[i])
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()


def test_every_batch_has_batch_size_rows_in_every_epoch():
    # 4 examples of 9, 12, 13 and 7 positions in rows of 16: 4 rows in epoch 0, 3 in epoch 1 (9 + 7 share one).
    examples = [([1000 + i] + [50] * (n - 1), [IGNORE_INDEX] + [50] * (n - 1), 0) for i, n in enumerate((10, 13, 14, 8))]
    loader = PackedLoader(examples, 16, 4, seed=3)
    ranks = [PackedLoader(examples, 16, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        assert loader.next_batch()[0].shape == (4, 16)
        assert [r.next_batch()[0].shape for r in ranks] == [(2, 16), (2, 16)]


# ------------------------------------------------------------------ 3. sft resume is bit-identical


@pytest.mark.parametrize("method", METHODS)
def test_killed_sft_run_resumes_bit_identical(trained, base, root, method, monkeypatch):
    straight, cfg, summaries, _ = trained
    out = lambda p: p.models / "sft" / "models" / method
    assert [p.name for p in step_dirs(straight.checkpoints / f"sft-{method}")] == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in records(out(straight))] == [1, 2, 3, 4] and summaries[method]["resumed_from_step"] == 0

    crashed = workdir(base, root, f"crashed-{method}")

    def crash_after_the_step_2_checkpoint(step, *args):
        if step == 2:  # 0-based: the third step
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash_after_the_step_2_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_method(cfg, method, crashed, Dist(), progress=False)
    assert [p.name for p in step_dirs(crashed.checkpoints / f"sft-{method}")] == ["step-00000002"]
    assert not out(crashed).exists()
    monkeypatch.setattr(loop, "lr_at", lr_at)
    summary = train_method(cfg, method, crashed, Dist(), progress=False)
    assert summary["resumed_from_step"] == 2
    assert records(out(crashed)) == records(out(straight))  # losses, lr, grad norms, val losses: bit-identical
    assert same_safetensors(out(crashed) / "model.safetensors", out(straight) / "model.safetensors")
    if method in ("prefix", "prompt"):  # one metadata key: written byte for byte the same
        assert (out(crashed) / "adapter.safetensors").read_bytes() == (out(straight) / "adapter.safetensors").read_bytes()


def test_lora_dropout_draws_random_numbers(trained, base, root):
    """What makes test_killed_sft_run_resumes_bit_identical[lora] exercise the RNG state: without dropout the
    same run has other losses."""
    straight, cfg, _, _ = trained
    plain = workdir(base, root, "lora-no-dropout")
    train_method(dataclasses.replace(cfg, lora={"rank": 4, "dropout": 0.0}), "lora", plain, Dist(), progress=False)
    mine = [r["loss"] for r in records(plain.models / "sft" / "models" / "lora")]
    theirs = [r["loss"] for r in records(straight.models / "sft" / "models" / "lora")]
    assert mine[0] == theirs[0]  # step 1: B = 0, the LoRA branch (and its dropout) adds nothing yet
    assert mine[1:] != theirs[1:] and len(mine) == len(theirs) == 4


# ------------------------------------------------------------------ 4. frozen weights


def test_lora_leaves_the_base_weights_bitwise_and_merges_its_update(trained, base):
    straight, cfg, summaries, captured = trained
    pre = load_file(str(base.models / "pretrain" / "model.safetensors"))
    state = captured["lora"]  # the LoRA model after training, before the merge
    settings, n_layer = cfg.lora, 2
    scaling = settings["alpha"] / settings["rank"]
    lora_names = [k for k in state if k.endswith(".lora_A")]
    assert len(lora_names) == n_layer * len(settings["targets"])
    for name, tensor in state.items():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        plain = name.replace(".base.", ".")
        ref = pre["tok_emb.weight"] if plain == "lm_head.weight" else pre[plain]
        assert torch.equal(tensor, ref), name  # every frozen weight bitwise untouched

    with torch.random.fork_rng():  # the adapter as train_method initialised it
        torch.manual_seed(cfg.seed)
        init_model, _ = load_pretrained(base.models / "pretrain")
        init = apply_lora(init_model, tuple(settings["targets"]), settings["rank"], settings["alpha"],
                          settings["dropout"]).state_dict()
    trainable = 0
    exported = load_file(str(straight.models / "sft" / "models" / "lora" / "model.safetensors"))
    for a_name in lora_names:
        prefix = a_name[: -len(".lora_A")]
        A, B = state[a_name], state[prefix + ".lora_B"]
        assert not torch.equal(A, init[a_name]) and B.abs().min() > 0  # the adapter trained (B starts at 0)
        trainable += A.numel() + B.numel()
        merged = pre[prefix + ".weight"] + (B @ A) * scaling  # base + B A alpha / r
        torch.testing.assert_close(exported[prefix + ".weight"], merged, rtol=0, atol=1e-6)
        assert not torch.equal(exported[prefix + ".weight"], pre[prefix + ".weight"])
    assert summaries["lora"]["trainable_params"] == trainable == n_layer * settings["rank"] * (4 * (32 + 32) + 3 * (32 + 128))
    assert set(exported) == set(pre)
    for name in set(pre) - {a[: -len(".lora_A")] + ".weight" for a in lora_names}:
        assert torch.equal(exported[name], pre[name]), name


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_export_the_pretrained_weights_unchanged(trained, base, method):
    straight, cfg, summaries, captured = trained
    folder = straight.models / "sft" / "models" / method
    pre = load_file(str(base.models / "pretrain" / "model.safetensors"))
    exported = load_file(str(folder / "model.safetensors"))
    assert set(exported) == set(pre) and all(torch.equal(exported[k], pre[k]) for k in pre)
    module = captured[method]
    assert all(torch.equal(v, pre[k]) for k, v in module.model.state_dict().items() if k != "lm_head.weight")

    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        init_model, tokenizer = load_pretrained(base.models / "pretrain")
        init = sft_recipe.adapt(init_model, method, getattr(cfg, method), ChatTemplate(tokenizer))
    adapter = load_file(str(folder / "adapter.safetensors"))
    names = ["prefix_k", "prefix_v"] if method == "prefix" else ["prompt"]
    assert sorted(adapter) == sorted(names)
    for n in names:
        assert torch.equal(adapter[n], getattr(module, n).detach())
        assert (adapter[n] != getattr(init, n).detach()).float().mean() > 0.9  # nearly every element trained
    ids = sft_recipe.init_tokens(ChatTemplate(tokenizer), 4)  # an instruction in words
    if method == "prompt":  # Lester et al.'s init: real tokens' embeddings
        assert torch.equal(init.prompt.detach(), pre["tok_emb.weight"][ids])
    else:  # Li & Liang's init: the frozen model's keys/values of those tokens at positions 0..P-1
        cache = KVCache(init_model.cfg, 1, 4)
        init_model.eval()(ids[None], kv_cache=cache)
        assert torch.equal(init.prefix_k.detach(), cache.k[:, 0]) and torch.equal(init.prefix_v.detach(), cache.v[:, 0])
    expected = 2 * 2 * 2 * 4 * 16 if method == "prefix" else 4 * 32  # (k, v) x L x Hkv x P x D ; P x C
    assert summaries[method]["trainable_params"] == expected
    assert summaries[method]["total_params"] == expected + sum(t.numel() for t in pre.values())


def test_full_tuning_changes_every_weight(trained, base):
    straight, _, summaries, _ = trained
    pre = load_file(str(base.models / "pretrain" / "model.safetensors"))
    exported = load_file(str(straight.models / "sft" / "models" / "full" / "model.safetensors"))
    assert set(exported) == set(pre)
    assert all(not torch.equal(exported[k], pre[k]) for k in pre)
    n = sum(t.numel() for t in pre.values())
    assert summaries["full"]["trainable_params"] == summaries["full"]["total_params"] == n


# ------------------------------------------------------------------ 5. load_tuned


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_load_tuned_gives_the_trained_module(trained, base, method):
    straight, _, _, captured = trained
    folder = straight.models / "sft" / "models" / method
    model, tokenizer = load_tuned(folder)
    assert isinstance(model, PrefixTuning if method == "prefix" else PromptTuning) and not model.training
    assert (model.n_prefix if method == "prefix" else model.n_virtual) == 4
    chat = ChatTemplate(tokenizer)
    heldout, _ = load_examples(base.instructions / "heldout.parquet", chat, codes_of(base))
    x, y, domains, doc_ids = PackedLoader(heldout, 124, 2, seed=0, pad_id=SPECIAL_IDS["<|pad|>"]).next_batch()
    with torch.no_grad():
        got, got_loss, _ = model(x, y, domains=domains, doc_ids=doc_ids)
        want, want_loss, _ = captured[method](x, y, domains=domains, doc_ids=doc_ids)
        plain = load_tuned(base.models / "pretrain")[0](x, y, domains=domains, doc_ids=doc_ids)[0]
    assert torch.equal(got, want) and got_loss.item() == want_loss.item()
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter is really applied


def test_load_tuned_full_and_lora_are_plain_decoders(trained):
    straight = trained[0]
    for method in ("full", "lora"):
        folder = straight.models / "sft" / "models" / method
        model, _ = load_tuned(folder)
        assert type(model) is Decoder
        assert json.loads((folder / "config.json").read_text()).get("adapter") is None


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_a_tampered_adapter_is_refused_naming_the_file(trained, tmp_path, method):
    folder = tmp_path / method
    shutil.copytree(trained[0].models / "sft" / "models" / method, folder)
    load_tuned(folder)
    adapter = folder / "adapter.safetensors"
    original = adapter.read_bytes()
    flip_byte(adapter)
    assert len(adapter.read_bytes()) == len(original)
    with pytest.raises(ValueError, match=re.escape(str(adapter)) + " is missing, damaged or changed after export"):
        load_tuned(folder)
    adapter.write_bytes(original[:-8])
    with pytest.raises(ValueError, match=re.escape(str(adapter))):
        load_tuned(folder)
    adapter.unlink()
    with pytest.raises(ValueError, match=re.escape(str(adapter))):
        load_tuned(folder)
    adapter.write_bytes(original)
    load_tuned(folder)


# ------------------------------------------------------------------ the sft stage: a finished run is only exported again


def test_sft_stage_reexports_finished_runs_and_scores_them(trained):
    straight, cfg, _, _ = trained
    models = straight.models / "sft" / "models"
    before = {m: models.parent / f"before-{m}.safetensors" for m in METHODS}
    for m in METHODS:
        shutil.copyfile(models / m / "model.safetensors", before[m])

    shown = sft(cfg, straight)
    for m in METHODS:
        assert json.loads((models / m / "summary.json").read_text())["resumed_from_step"] == 4
        assert same_safetensors(models / m / "model.safetensors", before[m])
        load_tuned(models / m)  # config.json's sha256 was written for the new file
    heldout = pq.read_table(straight.instructions / "heldout.parquet").to_pylist()
    items = sample_items(heldout, cfg.mc_items, cfg.seed)
    assert len(items) == 8 and shown["qa_items"] == 8
    assert shown["qa_chance"] == pytest.approx(sum(1 / len(i["options"]) for i in items) / 8, abs=1e-4)
    assert set(shown["qa_accuracy"]) == {"pretrained", *METHODS}
    assert all(0 <= a <= 1 and round(a * 8) == pytest.approx(a * 8, abs=1e-3) for a in shown["qa_accuracy"].values())
    lines = (straight.models / "sft" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,val_loss,lr,method" and len(lines) == 1 + 4 * len(METHODS)
    for m in METHODS:
        mine = [line.split(",") for line in lines[1:] if line.endswith("," + m)]
        assert [(int(s), float(loss)) for s, loss, *_ in mine] == [(r["step"], round(r["loss"], 6)) for r in records(models / m)]


def test_sample_items_is_a_fixed_sample_of_multiple_choice_rows(base):
    heldout = pq.read_table(base.instructions / "heldout.parquet").to_pylist()
    mc = [r for r in heldout if r["options"]]
    assert 8 < len(mc) < len(heldout)
    a, b = sample_items(heldout, 5, seed=1), sample_items(heldout, 5, seed=1)
    assert a == b and len(a) == 5 and all(r in mc for r in a)
    assert sample_items(heldout, 5, seed=2) != a
    everything = sample_items(heldout, 0, seed=1)
    assert sorted(map(json.dumps, everything)) == sorted(map(json.dumps, mc))
    assert len(sample_items(heldout, 10 * len(heldout), seed=1)) == len(mc)


def test_evaluate_qa_counts_per_task(base):
    model, chat = chat_of(base)
    heldout = pq.read_table(base.instructions / "heldout.parquet").to_pylist()
    items = sample_items(heldout, 6, seed=0)
    res = evaluate_qa(model, chat, items)
    assert res["n"] == 6 and sum(t["n"] for t in res["by_task"].values()) == 6
    assert res["accuracy"] == pytest.approx(sum(t["accuracy"] * t["n"] for t in res["by_task"].values()) / 6, abs=1e-3)
    assert res["chance"] == pytest.approx(sum(1 / len(i["options"]) for i in items) / 6, abs=1e-4)
    assert sorted(res["by_task"]) == sorted({i["task"] for i in items})


# ------------------------------------------------------------------ 6. distillation pieces


def teacher_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, seq_len=32, n_layer=4, n_head=2, d_model=32), **overrides})


def test_layer_map_is_evenly_spaced_and_keeps_the_first_and_last():
    assert layer_map(4, 2) == [0, 3]
    assert layer_map(4, 1) == [0]
    assert layer_map(12, 4) == [0, 4, 7, 11]  # 0, 3.67, 7.33, 11
    assert layer_map(7, 4) == [0, 2, 4, 6]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    for n_teacher, n_student in ((6, 3), (8, 3), (12, 5), (24, 6), (5, 5)):
        got = layer_map(n_teacher, n_student)
        ideal = [i * (n_teacher - 1) / (n_student - 1) for i in range(n_student)]
        assert got[0] == 0 and got[-1] == n_teacher - 1 and len(got) == n_student
        assert all(abs(g - v) <= 0.5 for g, v in zip(got, ideal))  # the nearest layer to the even spacing
        assert got == sorted(set(got))  # distinct, increasing
    assert layer_map(6, 3)[1] in (2, 3)  # 2.5: either neighbour is as near


def test_student_config_rederives_and_refuses():
    t = teacher_cfg(n_kv_head=1, moe_layers=(1, 3))
    wide = student_config(t, {"d_model": 64})
    assert wide.ffn_hidden == 64 * math.ceil(8 * 64 / 3 / 64) == 192 != t.ffn_hidden
    assert wide.n_kv_head == 1 and wide.n_layer == 4 and wide.moe_layers == (1, 3)
    assert student_config(t, {"d_model": 64, "ffn_hidden": 100}).ffn_hidden == 100
    assert student_config(t, {"n_head": 4}).n_kv_head == 4  # re-derived from the new n_head
    assert student_config(t, {"n_head": 4, "n_kv_head": 2}).n_kv_head == 2
    small = student_config(t, {"n_layer": 2})
    assert small.moe_layers == (1,) and small.ffn_hidden == t.ffn_hidden and small.d_model == 32
    assert student_config(t, {}) == t
    for key, value in (("vocab_size", 128), ("seq_len", 64)):
        with pytest.raises(ValueError, match=f"distill.student: {key} must stay the teacher's"):
            student_config(t, {key: value})
    with pytest.raises(ValueError, match="unknown model setting"):
        student_config(t, {"n_layers": 2})


def test_init_from_teacher_copies_mapped_layers_and_leaves_mismatched_tensors_fresh():
    torch.manual_seed(0)
    teacher = Decoder(teacher_cfg())
    t_state = teacher.state_dict()

    torch.manual_seed(1)
    student = Decoder(student_config(teacher.cfg, {"n_layer": 2}))
    info = init_from_teacher(student, teacher)
    assert info["layer_map"] == [0, 3] and info["tensors_fresh"] == 0
    for name, tensor in student.state_dict().items():
        source = name
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            source = f"layers.{[0, 3][int(i)]}.{rest}"
        assert torch.equal(tensor, t_state[source]), name
    assert info["params_copied"] == student.cfg.num_params()

    torch.manual_seed(1)
    narrow_mlp = Decoder(student_config(teacher.cfg, {"n_layer": 2, "ffn_hidden": 64}))
    fresh = {k: v.clone() for k, v in narrow_mlp.state_dict().items()}
    info = init_from_teacher(narrow_mlp, teacher)
    mlp = {n for n in fresh if ".mlp." in n}
    assert len(mlp) == 2 * 3 and info["tensors_fresh"] == len(mlp)
    for name, tensor in narrow_mlp.state_dict().items():
        if name in mlp:
            assert torch.equal(tensor, fresh[name]), name  # left as initialised
        else:
            source = re.sub(r"^layers\.(\d+)\.", lambda m: f"layers.{[0, 3][int(m.group(1))]}.", name)
            assert torch.equal(tensor, t_state[source]), name
    assert info["params_copied"] == narrow_mlp.cfg.num_params() - 2 * 3 * 32 * 64

    torch.manual_seed(1)
    narrow = Decoder(student_config(teacher.cfg, {"d_model": 16}))
    fresh = {k: v.clone() for k, v in narrow.state_dict().items()}
    info = init_from_teacher(narrow, teacher)
    assert info["tensors_copied"] == 0 and info["params_copied"] == 0
    assert all(torch.equal(v, fresh[k]) for k, v in narrow.state_dict().items())


def test_distillation_against_itself_is_cross_entropy_and_the_teacher_stays_out():
    torch.manual_seed(0)
    teacher = Decoder(teacher_cfg(n_layer=2))
    torch.manual_seed(5)
    student = Decoder(student_config(teacher.cfg, {}))
    assert init_from_teacher(student, teacher)["tensors_fresh"] == 0
    alpha = 0.3
    model = Distillation(student, teacher, temperature=2.0, alpha=alpha)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (2, 16), generator=g)
    y = torch.randint(0, 64, (2, 16), generator=g)
    y[:, :5] = IGNORE_INDEX
    doc_ids = torch.tensor([[0] * 7 + [1] * 9, [0] * 16])
    model.train()
    assert not teacher.training
    logits, loss, aux = model(x, y, doc_ids=doc_ids)
    with torch.no_grad():
        t_logits = teacher(x, doc_ids=doc_ids)[0]
    torch.testing.assert_close(logits, t_logits, rtol=0, atol=1e-6)
    ce = F.cross_entropy(t_logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(aux["kd_loss"].item()) < 1e-6
    assert aux["ce_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx((1 - alpha) * ce.item(), rel=1e-5)

    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert {id(p) for p in model.parameters()} == {id(p) for p in student.parameters()}
    assert set(model.state_dict()) == {f"student.{k}" for k in student.state_dict()}
    assert "teacher" not in dict(model.named_modules())

    # A different student: the KD term is positive and the loss is alpha * kd + (1 - alpha) * ce.
    torch.manual_seed(9)
    other = Distillation(Decoder(teacher.cfg), teacher, temperature=2.0, alpha=alpha)
    _, loss, aux = other(x, y)
    assert aux["kd_loss"].item() > 1e-3
    assert loss.item() == pytest.approx(alpha * aux["kd_loss"].item() + (1 - alpha) * aux["ce_loss"].item(), rel=1e-5)
    assert other(x)[1] is None


class Counting:
    """A stand-in loader: each batch says which loader and which call it is."""

    def __init__(self, name: str):
        self.name, self.n = name, 0

    def next_batch(self):
        self.n += 1
        return (self.name, self.n)

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_mixed_loader_takes_text_on_a_fixed_share_of_steps():
    mixed = MixedLoader(Counting("packed"), Counting("text"), 0.25)
    kinds = [mixed.next_batch()[0] for _ in range(16)]
    assert [i + 1 for i, k in enumerate(kinds) if k == "text"] == [4, 8, 12, 16]  # exactly every 4th step
    for share in (0.3, 0.5, 1 / 3, 0.9):
        mixed = MixedLoader(Counting("packed"), Counting("text"), share)
        for n in range(1, 101):
            mixed.next_batch()
            assert mixed.text.n == math.floor(n * share + 1e-9), (share, n)
    never = MixedLoader(Counting("packed"), None, 0.5)
    assert {never.next_batch()[0] for _ in range(10)} == {"packed"}
    assert never.state_dict() == {"k": 10, "packed": {"n": 10}, "text": None}


def test_mixed_loader_state_resumes_exactly(sample_shards):
    examples, _ = synthetic()
    shard_dir = sample_shards.tokens / "shards"

    def make():
        text = TokenLoader(shard_dir, 32, 2, {"text": 1, "code": 1}, 0, split="train")
        return MixedLoader(PackedLoader([(e[0], e[1], 0) for e in examples], 32, 2, seed=0), text, 0.25)

    mixed = make()
    for _ in range(5):
        mixed.next_batch()
    state = json.loads(json.dumps(mixed.state_dict()))
    assert state["k"] == 5
    after = [mixed.next_batch() for _ in range(9)]
    resumed = make()
    resumed.load_state_dict(state)
    again = [resumed.next_batch() for _ in range(9)]
    assert [len(b) for b in after] == [4, 4, 3, 4, 4, 4, 3, 4, 4]  # text windows at k = 7 and 11
    for a, b in zip(after, again):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------ 7. distill resume is bit-identical


def distill_workdir(trained, base, root, name) -> Paths:
    paths = workdir(base, root, name)
    teacher = trained[0].models / "sft" / "models" / "lora"
    shutil.copytree(teacher, paths.models / "sft" / "models" / "lora")
    return paths


def test_killed_distill_run_resumes_bit_identical(trained, base, root, monkeypatch):
    cfg, sft_cfg = DistillConfig(**DISTILL), trained[1]
    straight = distill_workdir(trained, base, root, "distill-straight")
    summary = train_student(cfg, sft_cfg, straight, Dist(), progress=False)
    assert summary["init_from_teacher"]["layer_map"] == [0] and summary["student_layers"] == 1
    assert summary["resumed_from_step"] == 0
    assert [p.name for p in step_dirs(straight.checkpoints / "distill")] == ["step-00000002", "step-00000004"]

    crashed = distill_workdir(trained, base, root, "distill-crashed")

    def crash(step, *args):
        if step == 2:
            raise RuntimeError("simulated crash")
        return lr_at(step, *args)

    monkeypatch.setattr(loop, "lr_at", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_student(cfg, sft_cfg, crashed, Dist(), progress=False)
    monkeypatch.setattr(loop, "lr_at", lr_at)
    assert train_student(cfg, sft_cfg, crashed, Dist(), progress=False)["resumed_from_step"] == 2
    a, b = records(straight.models / "student"), records(crashed.models / "student")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and a == b
    assert same_safetensors(straight.models / "student" / "model.safetensors",
                            crashed.models / "student" / "model.safetensors")
    student, _ = load_pretrained(crashed.models / "student")
    assert student.cfg.n_layer == 1 and student.cfg.dropout == 0.1


# ------------------------------------------------------------------ exports are reproducible


def test_exporting_the_same_weights_twice_writes_the_same_file(tmp_path):
    from fm.io import sha256_file
    from fm.train.checkpoint import export_model

    torch.manual_seed(0)
    model = Decoder(teacher_cfg(n_layer=1))
    digests = set()
    for i in range(24):  # the order is drawn per call: 24 exports all alike by chance is 2^-23
        export_model(model, model.cfg, tmp_path / f"e{i}", Dist())
        digests.add(sha256_file(tmp_path / f"e{i}" / "model.safetensors"))
    assert len(digests) == 1


def test_modality_codes_name_a_damaged_manifest(tmp_path):
    from fm.recipes.sft import modality_codes

    paths = Paths(tmp_path / "raw", tmp_path / "work")
    assert modality_codes(paths) == []  # before `fm shard`: no codes, no error
    manifest = paths.tokens / "shards" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"codes": {"modality": ["text", "code"]}, "shards": []}')
    assert modality_codes(paths) == ["text", "code"]
    for damaged in ('{"codes": {"modality": ["te', '{"shards": []}', "[]"):
        manifest.write_text(damaged)
        with pytest.raises(ValueError, match=re.escape(f"{manifest} holds no modality codes") + r".*rerun `fm shard`"):
            modality_codes(paths)
