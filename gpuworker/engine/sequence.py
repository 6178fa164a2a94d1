"""Per-request state: incremental detokenisation, stop strings and finish rules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .types import FINISH_LENGTH, FINISH_STOP, EngineRequest


class Detokenizer:
    """Turns a growing list of token ids into complete text deltas.

    Byte-level BPE can split one character over several tokens; decoding those alone gives
    U+FFFD. Like TGI/vLLM we decode a small window [prefix_offset:] and only emit text once it
    no longer ends in a partial character.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is still held back, decoded as the whole sequence
        would be (a trailing partial character becomes U+FFFD, as ``tokenizer.decode`` gives)."""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class StopMatcher:
    """Finds stop strings in the decoded text and holds back any tail that may start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""  # decoded but not yet emitted (a possible stop-string prefix)

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found). The stop string is never emitted."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = self._held_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best


@dataclass(eq=False)  # identity semantics: the engine looks sequences up in its queues
class Sequence:
    """A request inside the engine, from waiting to finished."""

    req: EngineRequest
    detok: Detokenizer
    stopper: StopMatcher
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    length: int = 0  # tokens in this request's KV cache
    prefill_s: float = 0.0

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def append(self, token_id: int, eos_ids: frozenset[int], max_seq_len: int) -> tuple[str, str | None]:
        """Record a generated token; returns (text to emit, finish reason or None)."""
        self.generated.append(token_id)
        if token_id in eos_ids and not self.req.ignore_eos:
            return self._finish("", FINISH_STOP)
        text, stopped = self.stopper.feed(self.detok.push(token_id))
        if stopped:
            return text, FINISH_STOP
        # No room to cache the token just generated, or the request's budget is spent.
        if len(self.generated) >= self.req.max_tokens or self.length >= max_seq_len:
            return self._finish(text, FINISH_LENGTH)
        return text, None

    def _finish(self, text: str, reason: str) -> tuple[str, str]:
        """Emit what the detokenizer and the stop matcher still hold; a late stop string still stops."""
        tail, stopped = self.stopper.feed(self.detok.flush())
        if stopped:
            return text + tail, FINISH_STOP
        return text + tail + self.stopper.flush(), reason
