"""The chat template: how an instruction and its response become token ids for tuning and scoring.

    from fm.data.chat import ChatTemplate
    chat = ChatTemplate(tokenizer)                      # a tokenizer from fm.data.tokenizer.open_tokenizer
    ids, labels = chat.encode("What is the capital of France?", "Paris")
    prompt_ids = chat.encode_prompt("What is the capital of France?")   # what generation starts from

One exchange is

    <|user|> prompt <|end|> <|assistant|> response <|end|>

with the control tokens inserted by id (from the tokenizer's own vocabulary: fm.data.tokenizer's
SPECIAL_TOKENS), never by matching text: a user who types "<|end|>" gets those characters as
text, because fm's tokenizers never match special tokens in text (open_tokenizer). The model
learns only the assistant's part: `labels` is -100 over the prompt and the assistant marker, and
the response ids plus the closing <|end|> (which teaches the model to stop) elsewhere. labels are
aligned with ids (label i is the target *for* token i, not shifted): a loader shifts them when it
builds (input, target) pairs.
"""

from __future__ import annotations

from tokenizers import Tokenizer

IGNORE_INDEX = -100
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


class ChatTemplate:
    """The user/assistant template over a tokenizer that has fm's control tokens."""

    def __init__(self, tokenizer: Tokenizer):
        ids = {t: tokenizer.token_to_id(t) for t in (USER, ASSISTANT, END)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token: train it with `fm tokenize` "
                             f"(fm's tokenizers carry the chat control tokens)")
        self.tokenizer = tokenizer
        self.user_id, self.assistant_id, self.end_id = ids[USER], ids[ASSISTANT], ids[END]

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, prompt: str) -> list[int]:
        """<|user|> prompt <|end|> <|assistant|>: the context a response (or a scored option) follows."""
        return [self.user_id, *self._text(prompt), self.end_id, self.assistant_id]

    def encode_response(self, response: str) -> list[int]:
        """response <|end|>: what the model is trained to write, and what multiple choice scores."""
        return [*self._text(response), self.end_id]

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of one exchange; labels are IGNORE_INDEX on the prompt, the ids on the response."""
        context, answer = self.encode_prompt(prompt), self.encode_response(response)
        return context + answer, [IGNORE_INDEX] * len(context) + answer

    def encode_batch(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """encode() over many exchanges, with the tokenizer's batch encoder (its Rust threads)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        p_ids = self.tokenizer.encode_batch_fast(prompts, add_special_tokens=False)
        r_ids = self.tokenizer.encode_batch_fast(responses, add_special_tokens=False)
        out = []
        for p, r in zip(p_ids, r_ids):
            context = [self.user_id, *p.ids, self.end_id, self.assistant_id]
            answer = [*r.ids, self.end_id]
            out.append((context + answer, [IGNORE_INDEX] * len(context) + answer))
        return out
