"""Stop strings as a token-level automaton, so the decode loop can stop a row on device.

``StopStringMatcher`` (``rollout/stop.py``) finds stop strings in decoded text on the host, between
decode chunks. This module compiles the same question into a table: an Aho–Corasick automaton over
the characters of the stop strings, lifted to tokens by feeding every token's text through it from
every state. One decode step then costs one gather per row (:func:`advance`).

States: ``0 .. num_live - 1`` are the "live" Aho–Corasick nodes (the longest suffix of the text so
far that is a proper prefix of a stop string, with no stop string completed yet); state 0 is the
empty match, the start of a generation. ``num_live + k`` is "stop string ``k`` completed"; it is
absorbing (every token keeps it there), so once a row stopped it stays stopped and keeps reporting
the same string, whatever the loop feeds it afterwards.

Exactness. For a decoder that concatenates per-token texts, ``decode(a + b) == decode(a) +
decode(b)``, the automaton's answer equals ``StopStringMatcher(decode, stops).first_stop(ids, 0)``:
the first token whose text completes a stop string, and, when that token completes several, the
first of them in ``stop_strings`` order (the matcher reports the first string whose count grew, not
the one that ended first in the text). Byte-level BPE (Qwen, GPT-2) is concatenative on ASCII: a
token holding part of a multi-byte character decodes alone to ``'\\ufffd'`` where the joint decode
has the real character, but ASCII characters and their adjacency are the same both ways, so ASCII
stop strings (the tool tags) are found exactly. A stop string with non-ASCII characters split inside
a character, or a decoder that rewrites text across tokens (SentencePiece's leading-space rule,
``clean_up_tokenization_spaces``), can make the automaton miss or invent a stop; the engine
therefore keeps the decoded-text check as the authority and uses the automaton to stop rows early.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class StopAutomaton:
    """A DFA over token ids that reports the first stop string completed.

    Attributes:
      table: ``[num_states, vocab_size]`` int16 (int32 past 32,767 states); ``table[s, t]`` is the
        state after feeding token ``t``'s text from state ``s``.
      accepts: ``[num_states]`` int32; the index (into ``stop_strings``) of the stop string that
        entering the state completed, or -1 for a live state.
      stop_strings: the stop strings, in the order their indices refer to.
      num_live: the number of live states; the accepting states are ``num_live + k``.
    """

    table: np.ndarray
    accepts: np.ndarray
    stop_strings: tuple[str, ...]
    num_live: int

    @property
    def num_states(self) -> int:
        return int(self.table.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.table.shape[1])

    @classmethod
    def build(
        cls,
        token_texts: Sequence[str],
        stop_strings: Sequence[str],
        vocab_size: int | None = None,
    ) -> StopAutomaton:
        """Builds the automaton for ``token_texts[t]`` = the text of token ``t``.

        ``vocab_size`` (the model's embedding rows), when given, must equal ``len(token_texts)``:
        every id the sampler can emit needs a column. All tokens are processed together, one
        character position at a time, for all live states at once (NumPy), so Qwen3's 151,936
        tokens build in well under a second.
        """
        stops = _check_stops(stop_strings)
        texts = list(token_texts)
        if not texts:
            raise ValueError(
                "StopAutomaton.build: token_texts is empty; pass one text per token id"
            )
        if vocab_size is not None and len(texts) != vocab_size:
            raise ValueError(
                f"StopAutomaton.build: {len(texts)} token texts for vocab_size {vocab_size}; pass "
                "one text per model vocabulary row (token_texts_from(tokenizer, vocab_size))"
            )
        bad = next((t for t, x in enumerate(texts) if not isinstance(x, str)), None)
        if bad is not None:
            raise ValueError(
                f"StopAutomaton.build: token_texts[{bad}] is {type(texts[bad]).__name__}, not str"
            )
        goto, out_min, alphabet = _aho_corasick(stops)
        none = len(stops)  # out_min's "no stop string ends here"
        live_nodes = np.flatnonzero(out_min == none)  # BFS order: the root (node 0) first
        num_live = len(live_nodes)
        live_index = np.full(len(out_min), -1, np.int64)
        live_index[live_nodes] = np.arange(num_live)

        codes, starts, lengths = _char_codes(texts, alphabet)
        # Longest texts first: the tokens still having a character at position p are a prefix.
        order = np.argsort(-lengths, kind="stable")
        starts, lengths = starts[order], lengths[order]
        width = goto.shape[1]
        goto_flat = goto.reshape(-1)
        node = np.repeat(live_nodes[:, None], len(texts), axis=1)  # [live, V] Aho–Corasick nodes
        best = np.full(node.shape, none, np.int64)  # lowest stop index completed within the token
        neg_lengths = -lengths
        for p in range(int(lengths[0])):  # texts is non-empty
            n = int(np.searchsorted(neg_lengths, -p, side="left"))  # tokens with len > p
            step = goto_flat[node[:, :n] * width + codes[starts[:n] + p]]
            node[:, :n] = step
            # Keep scanning after a completion: a later, lower-index stop string in the same
            # token is the one the matcher reports.
            np.minimum(best[:, :n], out_min[step], out=best[:, :n])
        stopped = best < none
        state = np.where(stopped, num_live + best, live_index[node])
        assert (state >= 0).all(), "a live transition ended on a node that completes a stop"

        num_states = num_live + len(stops)
        dtype = np.int16 if num_states <= np.iinfo(np.int16).max else np.int32
        table = np.empty((num_states, len(texts)), dtype)
        table[:num_live, order] = state
        table[num_live:] = np.arange(num_live, num_states)[:, None]  # accepting: absorbing
        accepts = np.concatenate([np.full(num_live, -1), np.arange(len(stops))]).astype(np.int32)
        return cls(table=table, accepts=accepts, stop_strings=stops, num_live=num_live)

    def first_stop(self, tokens: Sequence[int], state: int = 0) -> tuple[int, int] | None:
        """Host walk: ``(n, stop_index)`` if ``tokens[:n]`` completes a stop string and
        ``tokens[:n-1]`` does not, starting from ``state``; ``None`` if none completes.

        Equals ``StopStringMatcher.first_stop(tokens, 0)`` with ``n`` and ``stop_strings[index]``
        for concatenating decoders (module docstring). From an accepting ``state`` it is
        ``(0, its index)``: the row had already stopped.
        """
        if not 0 <= state < self.num_states:
            raise ValueError(
                f"StopAutomaton.first_stop: state {state} not in [0, {self.num_states})"
            )
        if self.accepts[state] >= 0:
            return 0, int(self.accepts[state])
        ids = np.asarray(tokens, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"StopAutomaton.first_stop: token ids must be in [0, {self.vocab_size}) (the "
                f"automaton's vocab_size), got {ids.min()}..{ids.max()}"
            )
        for n, token in enumerate(ids.tolist(), start=1):
            state = int(self.table[state, token])
            if self.accepts[state] >= 0:
                return n, int(self.accepts[state])
        return None


def advance(
    table: jax.Array, accepts: jax.Array, state: jax.Array, token: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step of the stop automaton for a batch of rows (pure, jittable).

    ``new_state[b] = table[state[b], token[b]]``, ``which[b] = accepts[new_state[b]]`` and
    ``stopped[b] = which[b] >= 0``. Accepting states are absorbing, so ``stopped`` stays true once
    set; the first step at which it is true is the token that completed ``stop_strings[which]``.

    Args:
      table: [S, V] int16/int32, ``StopAutomaton.table`` on device.
      accepts: [S] int32, ``StopAutomaton.accepts`` on device.
      state: [B] int32, each row's state (0 at the start of a generation).
      token: [B] int32, each row's new token, in [0, V) (out-of-range ids are clamped by the
        gather, so the sampler must not emit ids past the table's vocabulary).

    Returns:
      ``(new_state [B] int32, stopped [B] bool, which [B] int32)``.

    Example: stops ``("</a>",)``, tokens ``"</"`` then ``"a>"``: states 0 -> 2 ("</") -> accept,
    ``stopped = [False]`` then ``[True]`` with ``which = [0]``.
    """
    if table.ndim != 2:
        raise ValueError(f"advance: table must be [S, V], got shape {table.shape}")
    if accepts.shape != (table.shape[0],):
        raise ValueError(f"advance: accepts must be [{table.shape[0]}], got {accepts.shape}")
    if state.ndim != 1 or token.shape != state.shape:
        raise ValueError(
            f"advance: state and token must both be [B], got {state.shape} and {token.shape}"
        )
    new_state = table[state, token].astype(jnp.int32)
    which = accepts[new_state]
    return new_state, which >= 0, which


def token_texts_from(decode: Any, vocab_size: int) -> list[str]:
    """The text of every token id ``0 .. vocab_size - 1``.

    ``decode`` is a tokenizer (its ``batch_decode`` runs once over all ids, special tokens kept, as
    the engine's ``decode=tokenizer.decode`` does; a tokenizer without one has its ``decode([t])``
    called per id) or a callable ids -> text (called as ``decode([t])`` per id). Ids past a Hugging Face tokenizer's vocabulary (padded embedding rows)
    decode to ``''`` and so never move the automaton.
    """
    if vocab_size < 1:
        raise ValueError(f"token_texts_from: vocab_size must be >= 1, got {vocab_size}")
    ids = [[t] for t in range(vocab_size)]
    batch: Callable[..., Sequence[str]] | None = getattr(decode, "batch_decode", None)
    single = getattr(decode, "decode", decode)  # a tokenizer without batch_decode, or a callable
    if batch is not None:
        texts = list(batch(ids, skip_special_tokens=False))
    elif callable(single):
        texts = [single(i) for i in ids]
    else:
        raise ValueError(
            f"token_texts_from: need a tokenizer or an ids -> text callable, got {type(decode)}"
        )
    if len(texts) != vocab_size:
        raise ValueError(f"token_texts_from: {len(texts)} texts for vocab_size {vocab_size}")
    return texts


def _check_stops(stop_strings: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop_strings, str):
        raise ValueError(
            f"stop automaton: stop_strings must be a sequence of strings, got the string "
            f"{stop_strings!r}; wrap it: ({stop_strings!r},)"
        )
    stops = tuple(stop_strings)
    if not stops:
        raise ValueError(
            "stop automaton: stop_strings is empty; without stop strings no automaton is needed"
        )
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise ValueError(
                f"stop automaton: stop_strings[{i}] = {s!r}; every stop string must be a "
                "non-empty str (an empty one would stop before any token)"
            )
    return stops


def _aho_corasick(stops: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character automaton: ``goto`` [nodes, 1 + A] (column 0: any character outside the stop
    strings, which always returns to the root), ``out_min`` [nodes] (lowest index of a stop string
    ending at the node, through failure links; ``len(stops)`` if none) and the sorted alphabet's
    code points [A]. Nodes are numbered in BFS order, the root 0."""
    alphabet = sorted(set("".join(stops)))
    code = {c: i + 1 for i, c in enumerate(alphabet)}
    children: list[dict[int, int]] = [{}]
    ends: list[int] = [len(stops)]
    for k, s in enumerate(stops):
        node = 0
        for c in s:
            a = code[c]
            if a not in children[node]:
                children[node][a] = len(children)
                children.append({})
                ends.append(len(stops))
            node = children[node][a]
        ends[node] = min(ends[node], k)
    # Renumber in BFS order while computing failure links, so live states come out BFS-ordered.
    width = len(alphabet) + 1
    goto = np.zeros((len(children), width), np.int64)
    out_min = np.asarray(ends, np.int64)
    fail = np.zeros(len(children), np.int64)
    queue = list(children[0].values())
    goto[0, list(children[0])] = queue
    bfs = [0]
    head = 0
    while head < len(queue):
        node = queue[head]
        head += 1
        bfs.append(node)
        out_min[node] = min(out_min[node], out_min[fail[node]])
        goto[node] = goto[fail[node]]
        for a, child in children[node].items():
            fail[child] = goto[fail[node], a]
            goto[node, a] = child
            queue.append(child)
    # BFS renumbering.
    new = np.empty(len(bfs), np.int64)
    new[bfs] = np.arange(len(bfs))
    goto = new[goto[bfs]]
    out_min = out_min[bfs]
    return goto, out_min, np.asarray([ord(c) for c in alphabet], np.int64)


def _char_codes(
    texts: list[str], alphabet: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All texts' characters as alphabet codes (0 = not in any stop string), flat, with each
    text's start offset and length."""
    lengths = np.fromiter(map(len, texts), np.int64, count=len(texts))
    starts = np.zeros(len(texts), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    # UTF-32 gives one code unit per Python character (surrogatepass keeps lone surrogates).
    flat = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    flat = flat.astype(np.int64)
    pos = np.searchsorted(alphabet, flat)
    hit = alphabet[np.minimum(pos, len(alphabet) - 1)] == flat
    codes = np.where(hit, pos + 1, 0).astype(np.int64)
    return codes, starts, lengths
