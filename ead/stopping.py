"""When a generation ends, and which part of its text may be shown yet.

End-of-sequence ids end it at once; a stop string ends it where the string starts, and the string itself is
never part of the text. While a stream is running, text that could still grow into a stop string (or is an
unfinished multi-byte character) is held back, so what has been shown never has to be taken back.
"""

from __future__ import annotations

from collections.abc import Callable, Collection


# Decoding is incremental: the text of a settled prefix of the ids is kept, and only the tail is decoded again.
SETTLE_TOKENS = 16  # a tail this long is split...
MARGIN_TOKENS = 4  # ...this many tokens before its end, if decoding the two parts apart gives the same text


class StopChecker:
    def __init__(self, decode: Callable[[list[int]], str], eos_token_ids: Collection[int],
                 stop: tuple[str, ...], max_new_tokens: int) -> None:
        self.decode = decode
        self.eos_token_ids = eos_token_ids
        self.stop = stop
        self.max_new_tokens = max_new_tokens
        self.text = ""
        self.visible_chars = 0  # len(text[:visible_chars]) can be shown and will not change
        self._settled_ids, self._settled_text = 0, ""

    def _decode(self, token_ids: list[int], start: int = 0) -> str:
        """decode(token_ids[start:]), in time that does not grow with the length of the text.

        The ids before `_settled_ids` decode to `_settled_text`. A split is settled only where decoding the two
        sides apart gives exactly the text of decoding them together (true for byte-level BPE at a character
        boundary; a tokenizer that drops a leading space, as SentencePiece does, fails the check and keeps
        decoding a longer tail, which stays exact, only slower)."""
        n = len(token_ids) - start
        if n < self._settled_ids:  # not the continuation of what came before: start over
            self._settled_ids, self._settled_text = 0, ""
        k = self._settled_ids
        tail = self.decode(token_ids[start + k:])
        text = self._settled_text + tail
        if n - k >= SETTLE_TOKENS and not tail.endswith("\ufffd"):
            split = start + n - MARGIN_TOKENS
            head = self.decode(token_ids[start + k:split])
            if head + self.decode(token_ids[split:]) == tail and not head.endswith("\ufffd"):
                self._settled_ids, self._settled_text = split - start, self._settled_text + head
        return text

    def update(self, token_ids: list[int], start: int = 0) -> str | None:
        """Take the generated ids so far, `token_ids[start:]` (the newest last; `start` spares the caller a copy
        of a long sequence's ids every token); return "stop" or "length" when generation ends."""
        text = self._decode(token_ids, start)
        hits = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if hits:
            self.text = text[:min(hits)]
            self.visible_chars = len(self.text)
            return "stop"
        self.text = text
        if token_ids[-1] in self.eos_token_ids:
            self.visible_chars = len(text)
            return "stop"
        if len(token_ids) - start >= self.max_new_tokens:
            self.visible_chars = len(text)
            return "length"
        self.visible_chars = max(self.visible_chars, len(text) - self._held_back(text))
        return None

    def _held_back(self, text: str) -> int:
        """How many trailing characters might still change: a partial UTF-8 character or a stop-string prefix."""
        held = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held
