"""lm-evaluation-harness scores an exported fm model as fm's own multiple-choice evaluator does.

    .venv/bin/python -m pytest -q tests/test_lm_eval_parity.py

A tiny random Decoder (2 layers, d 64, GQA, seed 0, init_std 0.15 so log-likelihoods differ by whole
units) and a small BPE, exported with fm.export.hf; a handful of hand-made items in the held-out
format, one long enough to be truncated at seq_len. fm.eval.lm_eval_task writes the local task and
lm-eval runs it offline through its Python API (model "hf", the same path as the CLI). Reference:
fm.eval.choice.multiple_choice and continuation_logprobs on the same model.

How the formats line up (fm.eval.lm_eval_task's docstring has the detail): lm-eval's context is
"<|user|>" + prompt + "<|end|><|assistant|>" and each choice option + "<|end|>" with target_delimiter
"", read by a copy of the export's tokenizer that matches special tokens in text; no BOS is added;
max_length = seq_len - 1 makes lm-eval's left truncation fm's. Rather than trust that, a spy on
HFLM._loglikelihood_tokens records the (context ids, continuation ids) lm-eval actually scored, and
the test checks they are fm's ChatTemplate ids, pair for pair, before comparing log-likelihoods on
them (1e-4), greedy flags, predictions and accuracy. acc_norm / acc_bytes are lm-eval's rules
(characters / bytes of the choice, "<|end|>" included), so they are checked against fm's
log-likelihoods under those rules, not against fm's accuracy_norm (option bytes alone).
"""

from __future__ import annotations

import os

# Before transformers, datasets and huggingface_hub are imported: they read these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch

from fm.data.chat import ChatTemplate
from fm.data.tokenizer import open_tokenizer
from fm.eval.choice import continuation_logprobs, multiple_choice
from fm.eval.lm_eval_task import TASK, write_lm_eval_task
from fm.export.hf import export_hf
from tests.test_export_hf import tiny, tokenizer_path, write_model_dir  # noqa: F401 (tokenizer_path: a fixture)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

ITEMS = [
    {"prompt": "Which city is the capital of France?\nA. Paris\nB. Rome\nC. Berlin", "options": ["Paris", "Rome", "Berlin"],
     "answer_index": 0},
    {"prompt": "The quick brown fox jumps over the lazy what?", "options": ["dog", "cat", "fox", "hen"], "answer_index": 0},
    {"prompt": "def add(a, b):\n    return ?", "options": ["a + b", "a - b"], "answer_index": 0},
    {"prompt": "床前明月光，疑是地上什么？", "options": ["霜", "雪", "月"], "answer_index": 0},
    {"prompt": "Pick the longer answer.", "options": ["yes", "a much longer answer with several words"], "answer_index": 1},
    {"prompt": "Mixed 中文 and English, with  two spaces?", "options": [" leading space", "trailing space "], "answer_index": 1},
    # Longer than seq_len (64) with its option: both sides drop tokens from the left of the context.
    {"prompt": "The quick brown fox jumps over the lazy dog. " * 8 + "Which animal jumps?", "options": ["fox", "dog"],
     "answer_index": 0},
]


def test_lm_eval_matches_fm_multiple_choice(tmp_path, tokenizer_path, monkeypatch):  # noqa: F811
    cfg = tiny(n_kv_head=2)
    model = write_model_dir(tmp_path / "fm", cfg, tokenizer_path)
    export_hf(tmp_path / "fm", tmp_path / "hf")
    chat = ChatTemplate(open_tokenizer(tokenizer_path))
    summary = write_lm_eval_task(ITEMS, tmp_path / "hf", tmp_path / "task")
    assert (summary["n"], summary["skipped"]) == (len(ITEMS), 0)
    assert f"max_length={cfg.seq_len - 1}" in summary["model_args"]

    scored = []  # (context ids, continuation ids) of every request lm-eval scored
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, *args, **kwargs):
        scored.extend((list(ctx), list(cont)) for _, ctx, cont in requests)
        return original(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    tasks = TaskManager(include_path=str(tmp_path / "task"), include_defaults=False)  # not lm-eval's thousands
    out = lm_eval.simple_evaluate(model="hf", model_args=summary["model_args"], tasks=[TASK], device="cpu",
                                  batch_size=4, log_samples=True, task_manager=tasks)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)

    # The token ids lm-eval scored are fm's chat-template ids, pair for pair.
    want_pairs = [(chat.encode_prompt(it["prompt"]), chat.encode_response(o)) for it in ITEMS for o in it["options"]]
    assert sorted(scored) == sorted(want_pairs)
    assert max(len(c) + len(r) for c, r in want_pairs) > cfg.seq_len  # the long item is truncated

    fm_res = multiple_choice(model, chat, ITEMS, cfg.seq_len, batch_size=3)
    fm_pairs = iter(continuation_logprobs(model, want_pairs, cfg.seq_len))
    worst = 0.0
    for item, sample, fm_lps in zip(ITEMS, samples, fm_res["logprobs"]):
        assert [c for _, c in sample["arguments"]] == [f"{o}<|end|>" for o in item["options"]]
        lm_lps, lm_greedy = zip(*(r[0] for r in sample["resps"]))
        fm_scores = [next(fm_pairs) for _ in item["options"]]
        worst = max(worst, *(abs(a - b) for a, b in zip(lm_lps, fm_lps)))
        assert lm_lps == pytest.approx(fm_lps, abs=1e-4, rel=0)
        assert [lp for lp, _ in fm_scores] == pytest.approx(lm_lps, abs=1e-4, rel=0)
        assert list(lm_greedy) == [g for _, g in fm_scores]
        assert sample["acc"] == float(fm_res["predictions"][sample["doc_id"]] == item["answer_index"])
        # lm-eval's normalised rules, applied to fm's numbers (choices carry the "<|end|>" suffix).
        for metric, size in (("acc_norm", len), ("acc_bytes", lambda s: len(s.encode("utf-8")))):
            sizes = [size(f"{o}<|end|>") for o in item["options"]]
            norm = [lp / n for lp, n in zip(fm_lps, sizes)]
            assert sample[metric] == float(norm.index(max(norm)) == item["answer_index"]), metric
    print(f"max |lm-eval - fm| log-likelihood over {len(want_pairs)} pairs: {worst:.2e}")
    assert worst < 1e-4
    assert out["results"][TASK]["acc,none"] == pytest.approx(fm_res["accuracy"], abs=1e-12)
    # A random model, but with logits that differ: not every option ties, so the comparison has teeth.
    assert len({round(lp, 3) for lps in fm_res["logprobs"] for lp in lps}) == len(want_pairs)


def test_items_spelling_special_tokens_are_left_out(tmp_path, tokenizer_path):  # noqa: F811
    write_model_dir(tmp_path / "fm", tiny(), tokenizer_path)
    export_hf(tmp_path / "fm", tmp_path / "hf")
    items = [*ITEMS[:2], {"prompt": "What does <|end|> mean?", "options": ["end", "start"], "answer_index": 0},
             {"prompt": "Pick one.", "options": ["a <|endoftext|> b", "c"], "answer_index": 1}]
    summary = write_lm_eval_task(items, tmp_path / "hf", tmp_path / "task")
    assert (summary["n"], summary["skipped"]) == (2, 2)
    lines = (tmp_path / "task" / f"{TASK}.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"<|user|>Which city' in lines[0]
    with pytest.raises(ValueError, match="no items"):
        write_lm_eval_task(items[2:], tmp_path / "hf", tmp_path / "task2")
