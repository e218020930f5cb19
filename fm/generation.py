"""Next-token sampling, stop tokens and streamed detokenization, shared by both generators.

Decoder.generate (torch, fm/models/decoder.py) and OnnxGenerator.generate (onnxruntime,
fm/export/onnx.py) draw every token with sample_token, so with the same seed and the same logits
they write the same tokens; `fm generate` streams their output through TextStreamer.

    from fm.generation import TextStreamer, sample_token
    g = torch.Generator().manual_seed(0)
    next_id = sample_token(logits[:, -1], temperature=0.8, top_k=50, top_p=0.9, generator=g)   # (B, 1)
    streamer = TextStreamer(tokenizer)
    for token_id in new_ids:
        print(streamer.put(token_id), end="", flush=True)    # only complete characters
    print(streamer.end())                                   # all of it == tokenizer.decode(new_ids)

A token is drawn in this order (the order of Hugging Face's samplers):
    temperature  0: greedy, the argmax (top_k and top_p unused, nothing drawn from the generator);
                 > 0: the logits are divided by it (below 1 sharper, above 1 flatter)
    top_k        keep the k most likely tokens (ties with the k-th are kept too)
    top_p        nucleus: of what top_k kept, the smallest set of most likely tokens whose probability
                 reaches p; the most likely token always stays, p = 1 keeps everything
    draw         torch.multinomial over the softmax of what is left, from `generator`, on the generator's
                 device (a CPU generator seeds a CUDA model's sampling too)
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding gives for bytes that are not (yet) a whole UTF-8 character


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """ValueError unless temperature >= 0, top_k >= 1 (or None) and top_p in (0, 1] (or None)."""
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None: no top-k), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no nucleus cut), got {top_p}")


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, V) bool, True on the k largest logits of each row of logits (B, V) and on ties with the k-th."""
    kth = logits.topk(min(k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
    return logits >= kth


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """(B, V) bool, True on the nucleus of each row of logits (B, V): the fewest most likely tokens whose
    softmax probabilities add up to at least p. The most likely token is always in it."""
    probs = logits.double().softmax(dim=-1)  # (B, V); float64 so that a sum "reaching p" is not a rounding artefact
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # (B, V) each
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of the more likely tokens
    keep = before < p  # a token is needed while the ones before it fall short of p
    keep[:, 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def sample_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits (B, V) -> (B, 1) int64 on logits' device (see the module docstring)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), float("-inf"))
    if top_p is not None and top_p < 1:
        logits = logits.masked_fill(~top_p_mask(logits, top_p), float("-inf"))
    probs = logits.softmax(dim=-1)  # (B, V), exactly 0 outside top-k and the nucleus
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), num_samples=1, generator=generator).to(logits.device)  # (B, 1)


def stop_ids_with(eos_id: int | None, stop_ids=()) -> list[int]:
    """The ids that end generation: stop_ids and eos_id (kept for the callers that pass one id), sorted, once each."""
    ids = {int(i) for i in stop_ids}
    if eos_id is not None:
        ids.add(int(eos_id))
    return sorted(ids)


class TextStreamer:
    """Incremental detokenization: put(token_id) returns the text the token completed, end() what is left.

    Byte-level BPE splits a Chinese character or an emoji over several tokens, and a token can end
    inside a character's UTF-8 bytes; decoding it then ends in U+FFFD. put() holds such a tail back
    until the character's last byte arrives, so it never returns part of a character, and the pieces
    put() and end() return add up to tokenizer.decode(every id put) exactly (a U+FFFD of bytes that
    never form a character comes out with the next complete text, or from end()). Every put decodes
    all ids so far: generation is at most seq_len tokens, and this needs nothing from the decoder
    but that decoding more tokens extends the text (true of byte-level decoding).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""  # the text returned so far

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        ready = self.tokenizer.decode(self.ids).rstrip(REPLACEMENT)
        if len(ready) <= len(self.sent) or not ready.startswith(self.sent):
            return ""
        piece, self.sent = ready[len(self.sent):], ready
        return piece

    def end(self) -> str:
        """The rest of the text (a trailing U+FFFD where the last character never completed)."""
        text = self.tokenizer.decode(self.ids)
        if not text.startswith(self.sent):
            raise ValueError("the tokenizer's decoding of more tokens does not extend its decoding of fewer: "
                             "TextStreamer needs a byte-level decoder")
        piece, self.sent = text[len(self.sent):], text
        return piece
