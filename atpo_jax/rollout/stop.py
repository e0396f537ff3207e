"""Stop-string detection on decoded text, independent of how the tokenizer splits the string.

A stop string such as ``</search>`` may be one token, several tokens (``</``, ``search``, ``>``) or
part of a token that also carries the preceding text (``query</search>``). The engine therefore
decodes the tokens generated so far and looks for the string in the text; the turn ends at the first
token whose text completes the earliest stop string, and the tokens after it are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class StopStringMatcher:
    """Finds where the first stop string completes in a token sequence.

    Args:
      decode: token ids -> text (e.g. ``tokenizer.decode``; special tokens should be kept so that a
        stop string made of special tokens is seen).
      stop_strings: the strings that end a generation (e.g. ``("</search>", "</python>")``).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop_strings: Sequence[str]):
        self._decode = decode
        self.stop_strings = tuple(s for s in stop_strings if s)
        # Tokens of context kept before the unchecked part: enough to hold any stop string even if
        # every token decodes to one character, plus a margin for byte-level pieces.
        self._margin = max((len(s) for s in self.stop_strings), default=0) + 8

    def first_stop(self, tokens: Sequence[int], start: int = 0) -> tuple[int, str] | None:
        """Earliest completion of a stop string in ``tokens`` after the first ``start`` tokens.

        ``tokens[:start]`` were checked by an earlier call (the engine checks after every decode
        chunk), so only a short window before ``start`` is decoded again: the cost per chunk does
        not grow with the length of the generation.

        Returns ``(n, stop_string)``: the stop string is complete within ``tokens[:n]`` but not
        within ``tokens[:n-1]``; ``None`` if no stop string completes.
        """
        if not self.stop_strings or len(tokens) <= start:
            return None
        base = max(0, start - self._margin)
        # Occurrences already present in the checked part (e.g. a stop string inside the prompt's
        # tail) do not count; a new one makes the per-string counts grow.
        seen = self._counts(tokens[base:start])
        if self._counts(tokens[base:]) == seen:
            return None
        # Counts are monotone in the prefix length, so bisect for the first completing token.
        low, high = start + 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if self._counts(tokens[base:mid]) != seen:
                high = mid
            else:
                low = mid + 1
        counts = self._counts(tokens[base:low])
        found = next(s for s, c, c0 in zip(self.stop_strings, counts, seen, strict=True) if c > c0)
        return low, found

    def _counts(self, tokens: Sequence[int]) -> tuple[int, ...]:
        text = self._decode(tokens)
        return tuple(text.count(s) for s in self.stop_strings)
