"""Multiple choice scored by log-likelihood, as GPT-3 (Brown et al. 2020, sec. 2.4) and lm-evaluation-harness do.

    from fm.eval.choice import continuation_logprobs, model_max_len, multiple_choice
    model.to("cuda")
    max_len = model_max_len(model)                      # a Decoder, PrefixTuning or PromptTuning
    res = multiple_choice(model, ChatTemplate(tokenizer), rows, max_len, device="cuda")
    res["accuracy"], res["accuracy_norm"], res["chance"]  # rows: fm.data.instructions rows with options

    scores = continuation_logprobs(model, [(context_ids, continuation_ids), ...], max_len)
    logprob, is_greedy = scores[0]

The model writes nothing: each option is scored as a continuation of the prompt, and the option
with the highest log p(option | prompt) is the prediction. With fm's chat template the context is
`<|user|> prompt <|end|> <|assistant|>` and the continuation `option <|end|>`, exactly what the
model was tuned to write, so the closing <|end|> also charges an option that is only the start of
a likelier answer. `accuracy_norm` divides each option's log-likelihood by its UTF-8 byte length
(lm-evaluation-harness's acc_norm idea, in bytes rather than characters so that a Chinese character
weighs what its three bytes cost the byte-level BPE); it removes most of the raw score's bias
towards short options.

Batching: pairs are sorted by length (longest first, so a too-large batch fails at once) and
right-padded to the batch's longest. A forward holds at most batch_size x max_len tokens: batch_size
rows at full length, proportionally more rows when they are shorter (a 20-token cloze or minimal
pair goes in batches of ~200 rows instead of 16, same memory, several times fewer forwards). In a
causal model a position never attends to later ones, so the padding cannot change the scored
positions and the results do not depend on batch_size (an MoE drops tokens over capacity only in
training mode, and scoring runs in eval mode).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from fm.data.chat import ChatTemplate
from fm.models.adapters import PrefixTuning, PromptTuning
from fm.models.decoder import Decoder, ModelConfig


def _decoder(model: nn.Module) -> Decoder:
    """The Decoder itself or the one an adapter wraps; any other module that scores like a Decoder and
    carries its ModelConfig as .cfg (fm.export.onnx.OnnxLM, an exported graph) stands for itself."""
    if isinstance(model, (PrefixTuning, PromptTuning)):
        return model.model
    if isinstance(getattr(model, "cfg", None), ModelConfig):  # a Decoder, or OnnxLM
        return model
    raise TypeError(f"expected a Decoder, PrefixTuning or PromptTuning, got {type(model).__name__}")


def model_max_len(model: nn.Module) -> int:
    """The most real tokens model takes in one forward: seq_len, less the positions an adapter's prefix or
    soft prompt fills. The max_len to score with."""
    seq_len = _decoder(model).cfg.seq_len
    if isinstance(model, PrefixTuning):
        return seq_len - model.n_prefix  # the real tokens sit at positions n_prefix..
    if isinstance(model, PromptTuning):
        return seq_len - model.n_virtual  # the soft prompt is prepended to the input
    return seq_len


def continuation_logprobs(model: nn.Module, pairs: list[tuple[list[int], list[int]]], max_len: int,
                          batch_size: int = 32, pad_id: int = 1, device="cpu",
                          domains: list[int] | None = None) -> list[tuple[float, bool]]:
    """Per pair: (sum of log p(continuation token | all before it), whether every continuation token is the argmax).

    pairs: (context ids, continuation ids), both non-empty. context + continuation is kept within
    max_len tokens by dropping tokens from the left of the context, never from the continuation (a
    continuation of more than max_len - 1 tokens is a ValueError: its first token needs at least one
    token before it). The last token is never fed, so the model sees at most max_len - 1 positions.
    Results come back in the order of pairs. batch_size: rows per forward at max_len tokens; shorter rows
    fill a forward up to batch_size * max_len tokens. The model must already be on device. pad_id is fm's
    <|pad|>; as right padding it is never attended to by a scored position, so any id would do.
    domains: one domain id per pair, for a domain-routed MoE (fm.models.moe); else None.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if domains is not None and len(domains) != len(pairs):
        raise ValueError(f"{len(domains)} domains for {len(pairs)} pairs")
    if not _decoder(model).cfg.causal:
        raise ValueError("log-likelihood scoring needs a causal model (a bidirectional one sees the continuation)")
    seqs = []  # (ids of context + continuation within max_len, continuation length)
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation must both be non-empty")
        if len(continuation) > max_len - 1:
            raise ValueError(f"pair {i}: a continuation of {len(continuation)} tokens does not fit max_len={max_len} "
                             f"after at least one context token")
        seqs.append(([*context, *continuation][-max_len:], len(continuation)))

    # Longest first; sorted() is stable, so equal lengths keep input order (deterministic batches).
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    batches, start = [], 0
    while start < len(order):  # the first row of a batch is its longest: rows x its length <= the token budget
        longest = max(len(seqs[order[start]][0]) - 1, 1)
        n_rows = max(batch_size, batch_size * max_len // longest)
        batches.append(order[start:start + n_rows])
        start += n_rows
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    was_training = model.training
    model.eval()  # no dropout; an MoE routes without capacity, so rows do not affect each other
    try:
        with torch.no_grad():
            for rows in batches:
                T = max(len(seqs[i][0]) for i in rows) - 1  # inputs drop the last token: nothing follows it
                inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
                targets = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T): the token after each position
                scored = torch.zeros((len(rows), T), dtype=torch.bool)  # (B, T): where the continuation is predicted
                for r, i in enumerate(rows):
                    ids, n_cont = seqs[i]
                    n = len(ids) - 1
                    inputs[r, :n] = torch.tensor(ids[:-1])
                    targets[r, :n] = torch.tensor(ids[1:])
                    scored[r, n - n_cont:n] = True
                inputs, targets, scored = inputs.to(device), targets.to(device), scored.to(device)
                routing = {} if domains is None else {"domains": torch.tensor([domains[i] for i in rows], device=device)}
                logits = model(inputs, **routing)[0]  # (B, T, V)
                # Only the continuation's positions: a few per row, where an fp32 copy of all (B, T, V)
                # logits would be the largest tensor of the run. fp32, since bf16 keeps ~3 significant digits.
                logp = F.log_softmax(logits[scored].float(), dim=-1)  # (M, V), M = scored positions of the batch
                picked = targets[scored]  # (M,)
                token_logp = torch.zeros(scored.shape, device=logp.device)  # (B, T)
                token_logp[scored] = logp.gather(-1, picked[:, None])[:, 0]
                miss = torch.zeros(scored.shape, dtype=torch.bool, device=logp.device)  # (B, T)
                miss[scored] = logp.argmax(dim=-1) != picked
                total = token_logp.sum(dim=1)  # (B,): a plain row sum, the same order on every device
                greedy = ~miss.any(dim=1)  # (B,)
                for i, lp, g in zip(rows, total.tolist(), greedy.tolist()):  # one device sync per batch
                    results[i] = (lp, g)
    finally:
        model.train(was_training)  # leave the caller's model as it was
    return results


def multiple_choice(model: nn.Module, chat: ChatTemplate, items: list[dict], max_len: int, batch_size: int = 32,
                    device="cpu") -> dict:
    """Score every option of every item as a continuation of its prompt; the likeliest option is the prediction.

    items: dicts with prompt (str), options (list of non-empty str) and answer_index (int), e.g. the
    multiple-choice rows of fm.data.instructions, and optionally domain (int: a domain-routed MoE's domain id,
    given for every item or none). Ties go to the lowest index. Returns
        n              the number of items
        accuracy       share of items whose highest-log-likelihood option is the answer
        accuracy_norm  the same with log-likelihood / UTF-8 bytes of the option
        chance         the accuracy of guessing: mean of 1 / number of options
        predictions    the predicted option index of each item (by raw log-likelihood)
        logprobs       per item, the log-likelihood of each option
    """
    if not items:
        raise ValueError("no items to score")
    pairs, n_bytes = [], []
    for k, item in enumerate(items):
        options, answer = item.get("options"), item.get("answer_index")
        if options is None or len(options) == 0:  # len(): a pandas row holds an array, whose truth is ambiguous
            raise ValueError(f"item {k} has no options (not a multiple-choice item)")
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(options):
            raise ValueError(f"item {k}: answer_index {answer!r} is not an index into its {len(options)} options")
        if not all(options):
            raise ValueError(f"item {k} has an empty option (no bytes to normalize by)")
        context = chat.encode_prompt(item["prompt"])
        pairs.extend((context, chat.encode_response(o)) for o in options)
        n_bytes.append([len(o.encode("utf-8")) for o in options])
    domains = None
    if any("domain" in item for item in items):
        domains = [int(item["domain"]) for item, sizes in zip(items, n_bytes) for _ in sizes]
    scores = iter(continuation_logprobs(model, pairs, max_len, batch_size, device=device, domains=domains))

    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=values.__getitem__)  # max() keeps the first of equals: the lowest index

    logprobs, predictions, correct, correct_norm = [], [], 0, 0
    for item, sizes in zip(items, n_bytes):
        lps = [next(scores)[0] for _ in sizes]
        pred = argmax(lps)
        pred_norm = argmax([lp / b for lp, b in zip(lps, sizes)])
        logprobs.append(lps)
        predictions.append(pred)
        correct += pred == int(item["answer_index"])
        correct_norm += pred_norm == int(item["answer_index"])
    n = len(items)
    return {"n": n, "accuracy": correct / n, "accuracy_norm": correct_norm / n,
            "chance": sum(1 / len(s) for s in n_bytes) / n, "predictions": predictions, "logprobs": logprobs}
