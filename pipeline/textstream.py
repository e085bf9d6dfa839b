"""Token ids -> streamed text: the pure layer between the serving worker (token ids only) and the
clients that speak text (the app, the CLI, the HTTP API).

Two rules, as in nanochat's chat_web and litgpt's generate: streamed text never ends in half a
character (a multi-byte character split over tokens decodes to U+FFFD until its last token
arrives), and a tail that may be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decode a growing list of token ids piece by piece, in time linear in the reply.

    The offsets are those of Hugging Face's text-generation-inference and vLLM: decode a short
    window of recent tokens twice (with and without the newest ones) and emit the difference.
    Decoding the window rather than the token alone keeps what the tokenizer does at word
    boundaries (SentencePiece's leading spaces, byte-level merges) identical to decoding the whole.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens before this index have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete ("" while a character is still split)."""
        self.tokens.extend(int(t) for t in token_ids)
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before) :]

    def flush(self) -> str:
        """The text of tokens still held (a character that never completed shows as U+FFFD)."""
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        self._prefix = self._read = len(self.tokens)
        return after[len(before) :] if len(after) > len(before) else ""


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters may still become a stop string (the longest proper prefix of a stop
    that `text` ends with)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


class StopFilter:
    """Text in, text out, with stop strings cut and their possible starts held back.

    `push` returns the text that can be shown now; once a stop string appears, `stopped` is true,
    the text ends just before it and everything after is ignored. `finish` returns what was held back.
    Used on decoded tokens (TextStream) and on a remote engine's text, whose server may keep the stop
    string in its reply (`transformers serve` does).
    """

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # everything so far (cut at a stop string)
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def _advance(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped, final = self.text[: min(hits)], True, True
        end = len(self.text) if final else len(self.text) - holdback(self.text, self.stops)
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out

    def push(self, piece: str) -> str:
        return self._advance(piece, final=False)

    def finish(self) -> str:
        return self._advance("", final=True)


class TextStream:
    """Token ids in, displayable text out: incremental decoding, then a StopFilter."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.filter = StopFilter(stops)

    @property
    def stopped(self) -> bool:
        return self.filter.stopped

    @property
    def text(self) -> str:
        return self.filter.text

    def push(self, token_ids: Sequence[int]) -> str:
        return self.filter.push(self.decoder.push(token_ids))

    def finish(self) -> str:
        return self.filter._advance(self.decoder.flush(), final=True)
