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


def _packs(model: nn.Module) -> bool:
    """Whether model scores packed rows (Decoder.forward's doc_ids): a torch Decoder, or an adapter around one,
    with causal dense attention. An exported graph (OnnxLM) takes ids only."""
    decoder = _decoder(model)
    return isinstance(decoder, Decoder) and decoder.cfg.causal and decoder.cfg.attention == "dense"


def _units(pairs: list[tuple[list[int], list[int]]], max_len: int, domains: list[int] | None, pack: bool) -> list[dict]:
    """The rows to feed, each with the (pair, position, target) entries it scores.

    A context shared by several pairs (the options of one question) becomes one packed row when it fits:
    the context once (doc id -1, shared) and each continuation after it as its own document (doc ids 0, 1,
    ...), so every continuation sits at the positions and sees the tokens it would alone. Its first token
    is predicted at the context's last position, its k-th at its own (k-1)-th. Any other pair is the row
    context + continuation without its last token, cut from the left to max_len."""
    groups: dict[tuple, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault((tuple(context), None if domains is None else domains[i]), []).append(i)
    units, single = [], []
    for (context, domain), members in groups.items():
        conts = [pairs[i][1] for i in members]
        if not pack or len(members) < 2 or len(context) + sum(map(len, conts)) > max_len:
            single.extend(members)
            continue
        ids, doc, entries = list(context), [-1] * len(context), []
        for d, (i, cont) in enumerate(zip(members, conts)):
            begin = len(ids)
            ids.extend(cont)
            doc.extend([d] * len(cont))
            entries.extend((i, len(context) - 1 if k == 0 else begin + k - 1, tok) for k, tok in enumerate(cont))
        units.append({"ids": ids, "doc": doc, "entries": entries, "domain": domain})
    for i in sorted(single):
        context, cont = pairs[i]
        ids = [*context, *cont][-max_len:]
        n = len(ids) - 1  # inputs drop the last token: nothing follows it
        units.append({"ids": ids[:-1], "doc": None, "domain": None if domains is None else domains[i],
                      "entries": [(i, n - len(cont) + k, tok) for k, tok in enumerate(cont)]})
    return units


def continuation_logprobs(model: nn.Module, pairs: list[tuple[list[int], list[int]]], max_len: int,
                          batch_size: int = 32, pad_id: int = 1, device="cpu",
                          domains: list[int] | None = None) -> list[tuple[float, bool]]:
    """Per pair: (sum of log p(continuation token | all before it), whether every continuation token is the argmax).

    pairs: (context ids, continuation ids), both non-empty. context + continuation is kept within
    max_len tokens by dropping tokens from the left of the context, never from the continuation (a
    continuation of more than max_len - 1 tokens is a ValueError: its first token needs at least one
    token before it). The last token is never fed, so the model sees at most max_len - 1 positions.
    Pairs with the same context (the options of one question) are scored in one packed row when the
    context and all of them fit in max_len (see _units): the context is computed once, not once per
    option, with the same figures to float rounding. Results come back in the order of pairs.
    batch_size: rows per forward at max_len tokens; shorter rows fill a forward up to batch_size * max_len
    tokens. The model must already be on device. pad_id is fm's <|pad|>; as right padding it is never
    attended to by a scored position, so any id would do. domains: one domain id per pair, for a
    domain-routed MoE (fm.models.moe); else None.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if domains is not None and len(domains) != len(pairs):
        raise ValueError(f"{len(domains)} domains for {len(pairs)} pairs")
    if not _decoder(model).cfg.causal:
        raise ValueError("log-likelihood scoring needs a causal model (a bidirectional one sees the continuation)")
    for i, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {i}: the context and the continuation must both be non-empty")
        if len(continuation) > max_len - 1:
            raise ValueError(f"pair {i}: a continuation of {len(continuation)} tokens does not fit max_len={max_len} "
                             f"after at least one context token")
    units = _units(pairs, max_len, domains, _packs(model))
    # Packed rows apart from plain ones (only they need a mask); longest first, so a too-large batch fails at
    # once; sorted() is stable, so equal lengths keep their order (deterministic batches).
    order = sorted(range(len(units)), key=lambda u: (units[u]["doc"] is None, -len(units[u]["ids"])))
    batches, start = [], 0
    while start < len(order):  # the first row of a batch is its longest: rows x its length <= the token budget
        kind, longest = units[order[start]]["doc"] is None, max(len(units[order[start]]["ids"]), 1)
        n_rows = max(batch_size, batch_size * max_len // longest)
        rows = [u for u in order[start:start + n_rows] if (units[u]["doc"] is None) == kind]
        batches.append(rows)
        start += len(rows)
    token_logp: list[list[float]] = [[] for _ in pairs]  # per pair, its tokens' log-probs in order
    greedy = [True] * len(pairs)
    was_training = model.training
    model.eval()  # no dropout; an MoE routes without capacity, so rows do not affect each other
    try:
        with torch.no_grad():
            for rows in batches:
                T = max(len(units[u]["ids"]) for u in rows)
                inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
                packed = units[rows[0]]["doc"] is not None
                doc = torch.full((len(rows), T), 1 << 30, dtype=torch.long) if packed else None  # (B, T): pads apart
                where, targets, owner = [], [], []
                for r, u in enumerate(rows):
                    unit = units[u]
                    inputs[r, :len(unit["ids"])] = torch.tensor(unit["ids"])
                    if packed:
                        doc[r, :len(unit["doc"])] = torch.tensor(unit["doc"])
                    for i, pos, tok in unit["entries"]:
                        where.append((r, pos))
                        targets.append(tok)
                        owner.append(i)
                kwargs = {} if domains is None else {
                    "domains": torch.tensor([units[u]["domain"] for u in rows], device=device)}
                if packed:
                    kwargs["doc_ids"] = doc.to(device)
                logits = model(inputs.to(device), **kwargs)[0]  # (B, T, V)
                at = torch.tensor(where, device=logits.device)  # (M, 2)
                # Only the scored positions: a few per row, where an fp32 copy of all (B, T, V) logits would be
                # the largest tensor of the run. fp32, since bf16 keeps ~3 significant digits.
                logp = F.log_softmax(logits[at[:, 0], at[:, 1]].float(), dim=-1)  # (M, V)
                picked = torch.tensor(targets, device=logp.device)  # (M,)
                values = logp.gather(-1, picked[:, None])[:, 0].tolist()  # (M,), one device sync per batch
                hits = (logp.argmax(dim=-1) == picked).tolist()
                for i, v, hit in zip(owner, values, hits):
                    token_logp[i].append(v)
                    greedy[i] = greedy[i] and hit
    finally:
        model.train(was_training)  # leave the caller's model as it was
    return [(float(sum(lps)), g) for lps, g in zip(token_logp, greedy)]  # each pair's tokens summed in order


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
