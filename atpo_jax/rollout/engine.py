"""The generation engine: a paged KV cache that keeps every sequence's cache between turns.

A tree rollout is a forest of sequences that share prefixes. The engine keeps each sequence's KV
cache between calls, so a tool result is appended with :meth:`Engine.extend` (no prefix
recomputation) and a branch starts with :meth:`Engine.fork`, which shares the prefix's full pages
by reference count and copies at most its last, partial page (copy-on-write); nothing is
re-prefilled and a shared prefix is stored once.

Storage: a pool of ``kv_pages`` pages of ``page_size`` positions (``models.PagedKVCache``) sized in
tokens, not in slots x max length; each sequence has a host-side page list (``rollout.pages``
counts references). When the pool is full, a call that needs more pages raises
:class:`~atpo_jax.rollout.pages.KVPoolExhausted` before changing anything, or (for
:meth:`Engine.decode_step`) leaves the rows that do not fit for a later call, so a scheduler can
make them wait. A device call gathers its rows' pages into a batch-local dense cache once, runs the
dense-layout code on it, and writes back only the pages its new tokens touched.

Bookkeeping: the host keeps every sequence's full token list. The device cache of a sequence holds
all of it but the last token, which stays *pending*: the next generation step feeds it and samples
the token after it. So prefill/extend write ``tokens[:-1]``, forking a prefix of length n shares
n - 1 cached positions, and truncating after a stop string is just a shorter host length.

Generation runs as a jitted ``while_loop`` on device over chunks of ``decode_chunk`` steps. Stop
strings end a row inside the loop through a token-level automaton
(``rollout.stop_automaton``), and the host re-checks the decoded text after each chunk (the
authority where a tokenizer's pieces do not concatenate). :meth:`Engine.decode_step` runs one
chunk for a set of rows in progress (:class:`Turn`), which is what a continuous-batching scheduler
calls; :meth:`Engine.generate` loops it until every row is done. Shapes are bucketed (batch to a
power of two, prefill length to a power of two, the attended cache length to a power-of-two
multiple of ``kv_bucket``) so a run compiles a small, fixed set of programs;
:attr:`Engine.compile_count` reports how many distinct ones an engine has used.

The engine holds the model's structure (``nnx.GraphDef``) and the cache, never the weights: every
call that runs the model takes the parameters (``params``, an ``nnx.State``), so the caller's
training state stays their only owner and a rollout uses exactly the policy version it is given.
Cached keys/values computed with other parameters stay as they are.

On a device mesh (``cache_sharding``, see :func:`cache_shardings`) the model's parameters are used
as they are sharded (for training: the engine is collocated with the trainer) and the page pool is
created and kept in the given sharding: every program constrains the pool it returns to it, so the
donated pool never changes layout between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax import parallel
from atpo_jax.kernels import token_entropy
from atpo_jax.models import (
    NULL_PAGE,
    CausalLM,
    PagedKVCache,
    copy_pages,
    forward_with_cache,
    gather_pages,
    init_paged_cache,
    scatter_pages,
)
from atpo_jax.rollout import host_keys
from atpo_jax.rollout.pages import KVPoolExhausted, PageAllocator
from atpo_jax.rollout.sampling import SamplingParams, sample_next, sampling_logits
from atpo_jax.rollout.stop import StopStringMatcher
from atpo_jax.rollout.stop_automaton import StopAutomaton, token_texts_from

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# Device-side finish codes.
_RUNNING, _EOS, _LENGTH, _STOP = 0, 1, 2, 3


@dataclasses.dataclass
class Generation:
    """What one sequence generated in one turn (one :meth:`Engine.generate` call).

    Attributes:
      tokens: generated token ids, ending with the EOS token (``eos``), with the token that
        completed the stop string (``stop``), or wherever the budget/cache ran out (``length``).
      log_probs: log-prob of each token under the distribution it was sampled from.
      entropies: exact entropy (nats) of that distribution at each step.
      finish_reason: ``eos``, ``stop`` or ``length``.
      stop_string: the stop string that ended the generation (``stop`` only).
      top_ids, top_log_probs: for an engine built with ``top_logprobs=k``, the k most likely
        tokens of the sampling distribution and their log-probs at each of the first
        ``top_logprobs_positions`` generated positions ([T', k] as lists); else empty.
    """

    tokens: list[int]
    log_probs: list[float]
    entropies: list[float]
    finish_reason: str
    stop_string: str | None = None
    top_ids: list[list[int]] = dataclasses.field(default_factory=list)
    top_log_probs: list[list[float]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Turn:
    """A generation in progress on one sequence: what :meth:`Engine.decode_step` advances.

    Attributes:
      slot: the sequence.
      key: its PRNG key's raw data (``uint32``, [2] for the default Threefry keys; the token at
        sequence position p is drawn with ``fold_in(key, p)``). :meth:`Engine.start_turn` also
        takes a typed key and stores its data, so a batch's keys reach the device as one array.
      remaining: tokens it may still generate.
      generation: what it generated so far (its ``finish_reason`` is final once ``done``).
      done: the turn ended (EOS, stop string, budget or cache length).
      checked: generated tokens already checked for stop strings on the host.
      stop_state: the stop automaton's state after the generated tokens.
    """

    slot: int
    key: np.ndarray
    remaining: int
    generation: Generation = dataclasses.field(
        default_factory=lambda: Generation([], [], [], FINISH_LENGTH)
    )
    done: bool = False
    checked: int = 0
    stop_state: int = 0


@dataclasses.dataclass
class EngineCounters:
    """What the engine did, for the rollout's metrics (reset by the caller)."""

    decode_calls: int = 0
    row_steps_run: int = 0  # batch rows x steps executed by decode calls (padding rows included)
    row_steps_useful: int = 0  # tokens generated by those calls
    decode_seconds: float = 0.0
    kv_bytes_read: float = 0.0  # cached keys/values attended over by decode steps (estimate)
    # KV pages attended by decode steps, row by row, and with each page counted once per step
    # however many rows of the batch share it (what a shared-prefix/cascade kernel would read).
    kv_pages_read: int = 0
    kv_pages_read_once: int = 0


def _next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# Batches of at least this many rows are bucketed in quarter octaves, smaller ones in powers of two.
QUARTER_OCTAVES_FROM = 64


def batch_bucket(rows: int) -> int:
    """Rows of a device call holding ``rows`` sequences: powers of two below
    :data:`QUARTER_OCTAVES_FROM` (64) rows, four sizes per octave from there (multiples of an
    eighth of the next power of two: 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...).

    Why the split: every batch size is another program per attended-length bucket (trace and
    compile: about a second on CPU for the tiny model, tens of seconds for a 4B model on a GPU),
    while a padding row costs one row of compute and KV reads. Below 64 rows a decode step on an
    accelerator is bound by reading the weights, so padding rows are nearly free and the extra
    programs would not pay (measured on CPU: quarter octaves from 8 rows made the default run's
    rollouts compile 90 programs instead of 66 and run slower); from 64 rows up the per-row KV
    reads dominate and quarter octaves keep padding under 25% of the rows (about 8% on average)
    where powers of two pad up to half the batch."""
    power = _next_power_of_two(rows)
    if power <= QUARTER_OCTAVES_FROM:
        return power
    granule = power // 8
    return -(-rows // granule) * granule


def _keep_layout(cache: PagedKVCache, cache_sharding: PagedKVCache | None) -> PagedKVCache:
    """The returned pool in the pool's sharding (on a mesh), so a donated pool keeps its layout."""
    if cache_sharding is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_sharding)


def _write_back(cache, local, table, start, *, count, cache_sharding):
    """Scatters the pages a call wrote (cached positions ``start .. local.lengths - 1``)."""
    size = cache.page_size
    first = start // size
    last = jnp.where(local.lengths > start, (local.lengths - 1) // size, first - 1)
    cache = scatter_pages(cache, local, table, first, last, count=count)
    return _keep_layout(cache, cache_sharding)


def _prefill_program(graphdef, state, cache, table, lengths, tokens, num_tokens, *, cache_sharding):
    """Writes ``tokens[b, :num_tokens[b]]`` after row b's ``lengths[b]`` cached positions."""
    model = nnx.merge(graphdef, state)
    local = gather_pages(cache, table, lengths)
    _, local = forward_with_cache(model, tokens, local, None, num_tokens, last_only=True)
    count = -(-tokens.shape[1] // cache.page_size) + 1
    return _write_back(cache, local, table, lengths, count=count, cache_sharding=cache_sharding)


def _decode_program(
    graphdef,
    state,
    cache,
    table,
    lengths,
    pending,
    active,
    budget,
    keys,
    eos_ids,
    stop_table,
    stop_accepts,
    stop_state,
    *,
    steps,
    sampling,
    top_logprobs,
    cache_sharding,
):
    """Up to ``steps`` decode steps for the given rows, stopping early when none is active.

    Each step feeds every active row's pending token (writing it to the cache), samples the next
    token with the key ``fold_in(keys[b], position)`` (position = index of the new token in the
    row's sequence, so draws do not depend on batching, chunking or scheduling), advances the row's
    stop automaton, and retires rows that sampled EOS, completed a stop string, used up their
    budget or filled the attended length (the host sizes it so that only ``max_len`` does that).

    Returns (cache, tokens [B, steps], log_probs [B, steps], entropies [B, steps],
    num_generated [B], finish [B], stop_state [B], steps executed, top log-probs
    [B, steps, k] and their ids [B, steps, k]) with k = ``top_logprobs`` (0: empty arrays).
    """
    model = nnx.merge(graphdef, state)
    keys = jax.random.wrap_key_data(keys)
    batch = table.shape[0]
    local = gather_pages(cache, table, lengths)
    max_len = local.max_len
    has_stops = stop_table is not None

    def body(carry):
        (
            step,
            local,
            pending,
            active,
            budget,
            finish,
            stop_state,
            out_tok,
            out_lp,
            out_ent,
            out_top,
            out_top_ids,
            count,
        ) = carry
        position = local.lengths + 1  # index of the token about to be sampled
        logits, local = forward_with_cache(
            model, pending[:, None], local, None, active.astype(jnp.int32), last_only=True
        )
        step_keys = jax.vmap(jax.random.fold_in)(keys, position)
        token, log_prob, entropy, *top = sample_next(
            logits, step_keys, sampling, top_logprobs=top_logprobs
        )
        if top_logprobs:
            out_top = out_top.at[:, step].set(top[0])
            out_top_ids = out_top_ids.at[:, step].set(top[1])
        out_tok = out_tok.at[:, step].set(token)
        out_lp = out_lp.at[:, step].set(log_prob)
        out_ent = out_ent.at[:, step].set(entropy)
        count = count + active.astype(jnp.int32)
        budget = budget - active.astype(jnp.int32)
        is_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        if has_stops:
            new_state = stop_table[stop_state, token]
            is_stop = ~is_eos & (stop_accepts[new_state] >= 0)
            stop_state = jnp.where(active, new_state, stop_state)
        else:
            is_stop = jnp.zeros_like(is_eos)
        # A further step writes at cache position `position`; the host sizes the attended length
        # so this never binds (budgets stop rows at the engine's max_len), it only guards writes.
        full = position >= max_len
        finish = jnp.where(active & is_eos, _EOS, finish)
        finish = jnp.where(active & is_stop, _STOP, finish)
        finish = jnp.where(active & ~is_eos & ~is_stop & ((budget <= 0) | full), _LENGTH, finish)
        pending = jnp.where(active, token, pending)
        active = active & (finish == _RUNNING)
        return (
            step + 1,
            local,
            pending,
            active,
            budget,
            finish,
            stop_state,
            out_tok,
            out_lp,
            out_ent,
            out_top,
            out_top_ids,
            count,
        )

    def cond(carry):
        step, active = carry[0], carry[3]
        return (step < steps) & jnp.any(active)

    zeros_f = jnp.zeros((batch, steps), jnp.float32)
    init = (
        jnp.int32(0),
        local,
        pending,
        active,
        budget,
        jnp.zeros((batch,), jnp.int32),
        stop_state,
        jnp.zeros((batch, steps), jnp.int32),
        zeros_f,
        zeros_f,
        jnp.full((batch, steps, top_logprobs), -jnp.inf, jnp.float32),
        jnp.zeros((batch, steps, top_logprobs), jnp.int32),
        jnp.zeros((batch,), jnp.int32),
    )
    out = jax.lax.while_loop(cond, body, init)
    ran, local, _, _, _, finish, stop_state, tokens, log_probs, entropies, top, top_ids, count = out
    count_pages = -(-steps // cache.page_size) + 1
    cache = _write_back(
        cache, local, table, lengths, count=count_pages, cache_sharding=cache_sharding
    )
    return cache, tokens, log_probs, entropies, count, finish, stop_state, ran, top, top_ids


def _force_program(
    graphdef, state, cache, table, lengths, pending, forced, active, *, sampling, cache_sharding
):
    """One teacher-forced step: feeds each row's pending token and scores ``forced`` as the next one.

    Returns (cache, log-prob [B] of the forced token under the sampling distribution, entropy [B]).
    """
    model = nnx.merge(graphdef, state)
    local = gather_pages(cache, table, lengths)
    logits, local = forward_with_cache(
        model, pending[:, None], local, None, active.astype(jnp.int32), last_only=True
    )
    dist = sampling_logits(logits, sampling)
    log_probs = jax.nn.log_softmax(dist, axis=-1)
    picked = jnp.take_along_axis(log_probs, forced[:, None], axis=-1)[:, 0]
    cache = _write_back(cache, local, table, lengths, count=2, cache_sharding=cache_sharding)
    return cache, picked, token_entropy(dist)


def _copy_program(cache, src, dst, *, cache_sharding):
    return _keep_layout(copy_pages(cache, src, dst), cache_sharding)


# Module-level jitted programs: engines with the same model structure and buckets share compiled
# code (a trainer that rebuilds its engine, or a test suite, does not recompile). The pool is
# donated so every call updates it in place.
_PREFILL = jax.jit(
    _prefill_program, static_argnames=("cache_sharding",), donate_argnames=("cache",)
)
_DECODE = jax.jit(
    _decode_program,
    static_argnames=("steps", "sampling", "top_logprobs", "cache_sharding"),
    donate_argnames=("cache",),
)
_FORCE = jax.jit(
    _force_program, static_argnames=("sampling", "cache_sharding"), donate_argnames=("cache",)
)
_COPY = jax.jit(_copy_program, static_argnames=("cache_sharding",), donate_argnums=0)
_PROGRAMS = (_PREFILL, _DECODE, _FORCE, _COPY)

# Stop automata by (tokenizer, vocabulary size, stop strings): building one reads every token's
# text once, which engines of the same run (training and evaluation) need not repeat.
# Each entry keeps its tokenizer alive, so the id in the key cannot be reused by another object.
_AUTOMATA: dict[tuple, tuple[object, StopAutomaton]] = {}


def _stop_automaton(decode, vocab_size: int, stop_strings: Sequence[str]) -> StopAutomaton:
    owner = getattr(decode, "__self__", decode)
    key = (id(owner), vocab_size, tuple(stop_strings))
    if key not in _AUTOMATA:
        texts = token_texts_from(owner if hasattr(owner, "batch_decode") else decode, vocab_size)
        _AUTOMATA[key] = (owner, StopAutomaton.build(texts, stop_strings))
    return _AUTOMATA[key][1]


def cache_shardings(mesh, model_config, num_pages: int, page_size: int) -> PagedKVCache | None:
    """Shardings of an engine's page pool on ``mesh``, from the pool's declared logical axes
    (``PagedKVCache.logical_axes``): pages split over ``("data", "fsdp")`` and kv heads over
    ``tensor``, each only where the axis divides the dimension.

    Sharding the pages divides the pool's memory by ``data * fsdp``; the price is that a call
    reads its rows' pages with a masked local gather plus an all-reduce (XLA's partitioning of a
    gather along a sharded dimension), once per call (``models.gather_pages``), not per step.
    ``None`` (the default placement) without a mesh or on a one-device mesh.
    """
    if mesh is None or mesh.size == 1:
        return None
    abstract = jax.eval_shape(lambda: init_paged_cache(model_config, num_pages, page_size))
    return parallel.logical_shardings(mesh, abstract, abstract.logical_axes())


def dense_equivalent_pages(num_slots: int, max_len: int, page_size: int) -> int:
    """Pages (null page included) that hold ``num_slots`` sequences of ``max_len`` tokens: the
    pool that never makes a chain wait, what dense per-slot caches would reserve."""
    return num_slots * -(-max_len // page_size) + 1


class Engine:
    """Sequences in a paged KV cache, and batched generation.

    Args:
      model: the policy LM; only its structure is kept (an abstract model from
        ``nnx.eval_shape`` will do). The weights come with each call.
      num_slots: sequences the engine tracks at once (host bookkeeping; memory is in pages) and
        the most rows one device call runs.
      max_len: maximum tokens per sequence (prompt + response).
      eos_token_ids: token ids that end a generation (kept as the last generated token).
      sampling: temperature / top-k / top-p settings.
      stop_strings: strings that end a generation when they appear in the decoded new text.
      decode: token ids -> text, needed when ``stop_strings`` are given (``tokenizer.decode``).
      decode_chunk: decode steps per device call between host checks.
      kv_bucket: granularity of the attended cache length (attention cost follows it); a
        multiple of ``page_size``.
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      cache_sharding: a ``PagedKVCache`` of ``jax.sharding.Sharding`` for the pool on a device
        mesh (:func:`cache_shardings`); ``None`` = the default device.
      page_size: positions per KV page.
      kv_pages: pages in the pool, the null page included (0: :func:`dense_equivalent_pages`,
        enough for ``num_slots`` full sequences, so nothing ever waits).
      device_stops: end rows at stop strings inside the decode loop (else only the host's check
        after each chunk does, and a row decodes to the chunk's end).
      top_logprobs: k > 0 records the k most likely tokens and their log-probs under the
        sampling distribution (vLLM's ``logprobs=k``) in ``Generation.top_ids/top_log_probs``.
      top_logprobs_positions: only for a turn's first this many generated positions (AEPO
        reads 20; the host keeps nothing more); 0 = every position.
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        num_slots: int,
        max_len: int,
        eos_token_ids: Sequence[int],
        sampling: SamplingParams | None = None,
        stop_strings: Sequence[str] = (),
        decode: Callable[[Sequence[int]], str] | None = None,
        decode_chunk: int = 32,
        kv_bucket: int = 128,
        cache_dtype=None,
        cache_sharding: PagedKVCache | None = None,
        page_size: int = 16,
        kv_pages: int = 0,
        device_stops: bool = True,
        top_logprobs: int = 0,
        top_logprobs_positions: int = 0,
    ):
        if num_slots < 1 or max_len < 2:
            raise ValueError(
                f"Engine needs num_slots >= 1 and max_len >= 2, got {num_slots}, {max_len}"
            )
        if stop_strings and decode is None:
            raise ValueError(
                "Engine: stop_strings need a `decode` function (e.g. tokenizer.decode)"
            )
        if not eos_token_ids:
            raise ValueError("Engine: eos_token_ids must name at least one token")
        if page_size < 1 or kv_bucket % page_size:
            raise ValueError(
                f"Engine: kv_bucket={kv_bucket} must be a multiple of page_size={page_size} "
                "(rollout.kv_bucket / rollout.page_size)"
            )
        self.num_slots = num_slots
        self.max_len = max_len
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.decode_chunk = decode_chunk
        self.kv_bucket = kv_bucket
        self.page_size = page_size
        self.max_pages = -(-max_len // page_size)  # pages one sequence can need
        num_pages = kv_pages or dense_equivalent_pages(num_slots, max_len, page_size)
        if num_pages < 2:
            raise ValueError(f"Engine: kv_pages={kv_pages} must be >= 2 (one is the null page)")
        self.pages = PageAllocator(num_pages)
        if top_logprobs < 0 or top_logprobs_positions < 0:
            raise ValueError(
                f"Engine: top_logprobs={top_logprobs} and top_logprobs_positions="
                f"{top_logprobs_positions} must be >= 0"
            )
        self.top_logprobs = min(int(top_logprobs), model.config.vocab_size)
        self.top_logprobs_positions = int(top_logprobs_positions)
        self._eos = jnp.asarray(sorted(set(int(t) for t in eos_token_ids)), jnp.int32)
        self._matcher = StopStringMatcher(decode, stop_strings) if stop_strings else None
        self._automaton = None
        if stop_strings and device_stops:
            automaton = _stop_automaton(decode, model.config.vocab_size, stop_strings)
            self._automaton = automaton
            self._stop_table = jnp.asarray(automaton.table)
            self._stop_accepts = jnp.asarray(automaton.accepts)
        self._graphdef = nnx.graphdef(model)
        self.model_config = model.config
        self.cache_sharding = cache_sharding
        make = functools.partial(init_paged_cache, model.config, num_pages, page_size, cache_dtype)
        if cache_sharding is None:
            self.cache = make()
        else:  # created in place, never whole on one device
            self.cache = jax.jit(make, out_shardings=cache_sharding)()
        self._seqs: list[list[int] | None] = [None] * num_slots
        self._pages: list[list[int]] = [[] for _ in range(num_slots)]
        self._prefill, self._decode, self._force, self._copy = (
            functools.partial(program, cache_sharding=cache_sharding) for program in _PROGRAMS
        )
        self._signatures: set[tuple] = set()  # distinct (program, shapes, static args) used
        self.prefill_tokens_computed = 0  # tokens run through the model by prefill/extend
        self.counters = EngineCounters()
        config = model.config
        itemsize = jnp.dtype(cache_dtype or config.dtype).itemsize
        self.kv_bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
        self.kv_bytes_per_token *= itemsize

    # ------------------------------------------------------------------ sequences and pages

    @property
    def compile_count(self) -> int:
        """Distinct programs (program x shape bucket x static arguments) this engine has run; each
        is compiled once per process (the jitted programs are shared by all engines)."""
        return len(self._signatures)

    def _used(self, *signature) -> None:
        self._signatures.add(signature)

    def free_slots(self) -> list[int]:
        return [s for s, seq in enumerate(self._seqs) if seq is None]

    def allocate(self, count: int) -> list[int]:
        """Reserves ``count`` free sequence slots (they become usable by prefill or fork)."""
        free = self.free_slots()
        if count > len(free):
            raise RuntimeError(
                f"Engine: {count} slots requested but only {len(free)} of {self.num_slots} are free; "
                "raise rollout.num_slots or release finished slots"
            )
        for slot in free[:count]:
            self._seqs[slot] = []
        return free[:count]

    def release(self, slots: int | Sequence[int]) -> None:
        """Frees sequences and drops their references on their pages."""
        for slot in np.atleast_1d(slots).tolist():
            self._drop_pages(slot, 0)
            self._seqs[slot] = None

    def tokens(self, slot: int) -> list[int]:
        """A copy of the slot's full token sequence."""
        return list(self._sequence(slot))

    def length(self, slot: int) -> int:
        return len(self._sequence(slot))

    def page_list(self, slot: int) -> list[int]:
        """The pool pages holding the slot's cached positions, in order."""
        return list(self._pages[slot])

    def _sequence(self, slot: int) -> list[int]:
        seq = self._seqs[slot]
        if seq is None:
            raise ValueError(f"Engine: slot {slot} is not allocated")
        return seq

    def _cached(self, slot: int) -> int:
        """Cached positions of a sequence: all its tokens but the pending last one."""
        return max(len(self._seqs[slot]) - 1, 0)

    def _pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def _drop_pages(self, slot: int, keep: int) -> None:
        """Keeps the slot's first ``keep`` pages and releases the rest."""
        pages = self._pages[slot]
        if len(pages) > keep:
            self.pages.release(pages[keep:])
            del pages[keep:]

    def _plan_writes(self, rows: Sequence[tuple[int, int]]) -> tuple[list, list]:
        """Pages that rows (slot, new cached positions) need before writing: fresh pages for
        positions past their last page, and a private copy of a last page they share (a truncated
        fork's tail). Returns (per row the number of fresh pages, the copy-on-write list)."""
        fresh, cow = [], []
        for slot, new in rows:
            cached = self._cached(slot)
            fresh.append(max(0, self._pages_for(cached + new) - len(self._pages[slot])))
            pages = self._pages[slot]
            if new and cached % self.page_size and self.pages.refs(pages[-1]) > 1:
                cow.append(slot)
        return fresh, cow

    def _reserve(self, rows: Sequence[tuple[int, int]]) -> None:
        """Gives every row (slot, new cached positions) the pages its write needs, all or nothing
        (:class:`KVPoolExhausted` when the pool cannot)."""
        fresh, cow = self._plan_writes(rows)
        total = sum(fresh) + len(cow)
        if total > self.pages.free:
            self.pages.waits += 1
            raise KVPoolExhausted(
                f"Engine: {total} KV pages needed, {self.pages.free} of {self.pages.capacity} "
                "free; raise rollout.kv_pages"
            )
        for (slot, _), count in zip(rows, fresh, strict=True):
            self._pages[slot] += self.pages.allocate(count) if count else []
        self._copy_on_write(cow)

    def _copy_on_write(self, slots: Sequence[int]) -> None:
        """Replaces each slot's shared last page by a private copy (one device call)."""
        if not slots:
            return
        fresh = self.pages.allocate(len(slots))
        src = []
        for slot, page in zip(slots, fresh, strict=True):
            src.append(self._pages[slot][-1])
            self.pages.release([self._pages[slot][-1]])
            self._pages[slot][-1] = page
        self._copy_device(src, fresh)

    def _copy_device(self, src: Sequence[int], dst: Sequence[int]) -> None:
        width = _next_power_of_two(len(src))
        pad = width - len(src)
        self._used("copy", width)
        self.cache = self._copy(
            self.cache,
            jnp.asarray(list(src) + [NULL_PAGE] * pad, jnp.int32),
            jnp.asarray(list(dst) + [self.pages.num_pages] * pad, jnp.int32),
        )

    def _table(
        self, slots: Sequence[int], batch: int, kv_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Page tables [batch, kv_len / page_size] and cached lengths [batch] of ``slots`` (padding
        rows: the null page, length 0)."""
        table = np.full((batch, kv_len // self.page_size), NULL_PAGE, np.int32)
        lengths = np.zeros((batch,), np.int32)
        for i, slot in enumerate(slots):
            pages = self._pages[slot]
            table[i, : len(pages)] = pages
            lengths[i] = self._cached(slot)
        return table, lengths

    # ------------------------------------------------------------------ writing tokens

    def prefill(self, params, slot: int, tokens: Sequence[int]) -> None:
        """Replaces the slot's content with ``tokens`` (e.g. a prompt), run with ``params``."""
        self.prefill_many(params, [slot], [tokens])

    def prefill_many(
        self, params, slots: Sequence[int], token_lists: Sequence[Sequence[int]]
    ) -> None:
        """Batched :meth:`prefill`."""
        for slot in slots:
            self._sequence(slot)
            self._drop_pages(slot, 0)
            self._seqs[slot] = []
        self.extend_many(params, slots, token_lists)

    def extend(self, params, slot: int, tokens: Sequence[int]) -> None:
        """Appends ``tokens`` (e.g. a tool result) without recomputing the slot's prefix."""
        self.extend_many(params, [slot], [tokens])

    def extend_many(
        self, params, slots: Sequence[int], token_lists: Sequence[Sequence[int]]
    ) -> None:
        """Batched :meth:`extend`: one bucketed device call for all slots. Raises
        :class:`KVPoolExhausted` (changing nothing) when the pool cannot hold the new tokens."""
        if len(slots) != len(token_lists) or len(set(slots)) != len(slots):
            raise ValueError("extend_many: need one token list per slot and distinct slots")
        writes = []
        for slot, new in zip(slots, token_lists, strict=True):
            seq = self._sequence(slot)
            new = [int(t) for t in new]
            if len(seq) + len(new) > self.max_len:
                raise ValueError(
                    f"Engine: slot {slot} would hold {len(seq) + len(new)} tokens > max_len "
                    f"{self.max_len}; shorten the input or raise the engine's max_len"
                )
            # The previously pending token and all new tokens but the last go into the cache.
            writes.append((seq[-1:] + new)[:-1] if new else [])
        rows = [(s, w) for s, w in zip(slots, writes, strict=True) if w]
        self._reserve([(s, len(w)) for s, w in rows])
        for slot, new in zip(slots, token_lists, strict=True):
            self._seqs[slot].extend(int(t) for t in new)
        if not rows:
            return
        width = _next_power_of_two(max(len(w) for _, w in rows), minimum=16)
        batch = self._batch_bucket(len(rows))
        tokens = np.zeros((batch, width), np.int32)
        counts = np.zeros((batch,), np.int32)
        for i, (_, w) in enumerate(rows):
            tokens[i, : len(w)] = w
            counts[i] = len(w)
        kv_len = self.attended_length(max(len(self._seqs[s]) for s, _ in rows))
        table, lengths = self._table([s for s, _ in rows], batch, kv_len)
        lengths[: len(rows)] -= counts[: len(rows)]  # cached before this write
        self._used("prefill", batch, width, kv_len)
        self.cache = self._prefill(
            self._graphdef,
            params,
            self.cache,
            jnp.asarray(table),
            jnp.asarray(lengths),
            jnp.asarray(tokens),
            jnp.asarray(counts),
        )
        self.prefill_tokens_computed += int(counts.sum())

    def fork(self, src: int, dst: int, length: int) -> None:
        """Makes ``dst`` a copy of the first ``length`` tokens of ``src``: the prefix's full pages
        are shared, its last partial page is copied."""
        self.fork_many([src], [dst], [length])

    def fork_many(self, srcs: Sequence[int], dsts: Sequence[int], lengths: Sequence[int]) -> None:
        """Batched :meth:`fork` (one device copy for all partial pages). Raises
        :class:`KVPoolExhausted` (changing nothing) when the pool lacks the copies' pages."""
        if len(set(dsts)) != len(dsts):
            raise ValueError("fork_many: destination slots must be distinct")
        prefixes, partial = [], []
        for src, dst, length in zip(srcs, dsts, lengths, strict=True):
            seq = self._sequence(src)
            self._sequence(dst)
            if not 1 <= length <= len(seq):
                raise ValueError(f"fork: length {length} outside [1, {len(seq)}] for slot {src}")
            if dst in srcs and dst != src:
                raise ValueError("fork_many: a destination cannot also be another fork's source")
            prefixes.append(seq[:length])
            partial.append((length - 1) % self.page_size != 0)
        needed = sum(partial)
        if needed > self.pages.free:
            self.pages.waits += 1
            raise KVPoolExhausted(
                f"Engine: forks need {needed} KV pages, {self.pages.free} free; raise rollout.kv_pages"
            )
        copies_src, copies_dst, new_pages = [], [], []
        for src, length, copy in zip(srcs, lengths, partial, strict=True):
            cached = length - 1
            full = self._pages[src][: cached // self.page_size]
            self.pages.share(full)
            pages = list(full)
            if copy:
                (page,) = self.pages.allocate(1)
                copies_src.append(self._pages[src][cached // self.page_size])
                copies_dst.append(page)
                pages.append(page)
            new_pages.append(pages)
        for dst, prefix, pages in zip(dsts, prefixes, new_pages, strict=True):
            self._drop_pages(dst, 0)
            self._seqs[dst] = list(prefix)
            self._pages[dst] = pages
        if copies_src:
            self._copy_device(copies_src, copies_dst)

    def truncate(self, slot: int, length: int) -> None:
        """Drops the slot's tokens after the first ``length`` (>= 1) and the pages past them."""
        seq = self._sequence(slot)
        if not 1 <= length <= len(seq):
            raise ValueError(f"truncate: length {length} outside [1, {len(seq)}] for slot {slot}")
        del seq[length:]
        self._drop_pages(slot, self._pages_for(self._cached(slot)))

    def force(
        self, params, slots: Sequence[int], tokens: Sequence[int]
    ) -> list[tuple[float, float]]:
        """Appends one chosen token per slot and scores it like a sampled one.

        For tokens the rollout inserts but trains on (the reference's EOS after an empty tool call):
        the returned ``(log_prob, entropy)`` are those the sampler would have reported had it drawn
        the token, so the behaviour policy's log-prob of every trained token is known.
        """
        slots = [int(s) for s in slots]
        if len(set(slots)) != len(slots) or len(tokens) != len(slots):
            raise ValueError("force: need distinct slots and one token per slot")
        for slot in slots:
            if not self._sequence(slot):
                raise ValueError(f"force: slot {slot} is empty; prefill it first")
            if len(self._seqs[slot]) >= self.max_len:
                raise ValueError(f"force: slot {slot} is full (max_len {self.max_len})")
        self._reserve([(s, 1) for s in slots])
        batch = self._batch_bucket(len(slots))
        pending = np.zeros((batch,), np.int32)
        forced = np.zeros((batch,), np.int32)
        active = np.zeros((batch,), bool)
        for i, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
            pending[i], forced[i], active[i] = self._seqs[slot][-1], int(token), True
        kv_len = self.attended_length(max(len(self._seqs[s]) for s in slots) + 1)
        table, lengths = self._table(slots, batch, kv_len)
        self._used("force", batch, kv_len, self.sampling)
        self.cache, log_probs, entropies = self._force(
            self._graphdef,
            params,
            self.cache,
            jnp.asarray(table),
            jnp.asarray(lengths),
            jnp.asarray(pending),
            jnp.asarray(forced),
            jnp.asarray(active),
            sampling=self.sampling,
        )
        log_probs, entropies = jax.device_get((log_probs, entropies))
        for slot, token in zip(slots, tokens, strict=True):
            self._seqs[slot].append(int(token))
        return [
            (float(lp), float(e)) for lp, e in zip(log_probs[: len(slots)], entropies, strict=False)
        ]

    # ------------------------------------------------------------------ generation

    def start_turn(self, slot: int, budget: int, key: jax.Array) -> Turn:
        """A :class:`Turn` that generates up to ``budget`` tokens on ``slot`` with ``key``."""
        if not self._sequence(slot):
            raise ValueError(f"generate: slot {slot} is empty; prefill it first")
        turn = Turn(slot=int(slot), key=host_keys.key_data(key), remaining=int(budget))
        turn.done = turn.remaining <= 0 or len(self._seqs[slot]) >= self.max_len
        return turn

    def generate(
        self, params, slots: Sequence[int], budgets: Sequence[int], rng: jax.Array
    ) -> list[Generation]:
        """Generates for all ``slots`` together until each hits EOS, a stop string or its budget.

        Args:
          params: the policy's parameters (``nnx.State``) to decode with.
          slots: distinct allocated, non-empty slots.
          budgets: maximum new tokens per slot (a slot never exceeds its own budget; the cache
            length also bounds it: a slot that fills ``max_len`` ends with reason ``length``).
          rng: one PRNG key (slot i of the call uses ``fold_in(rng, i)``) or [len(slots)] keys, one
            per slot (the tree search passes per-node keys so results do not depend on batching).

        Returns:
          One :class:`Generation` per slot, in order. The generated tokens are appended to the
          slots (after a stop string, the following tokens are dropped).
        """
        slots = [int(s) for s in slots]
        if len(set(slots)) != len(slots) or len(budgets) != len(slots):
            raise ValueError("generate: need distinct slots and one budget per slot")
        keys = self._slot_keys(rng, len(slots))
        turns = [self.start_turn(s, b, k) for s, b, k in zip(slots, budgets, keys, strict=True)]
        while True:
            waiting = [t for t in turns if not t.done]
            if not waiting:
                break
            if not self.decode_step(params, waiting):
                raise KVPoolExhausted(
                    f"Engine: no row fits the KV pool ({self.pages.free} of "
                    f"{self.pages.capacity} pages free); raise rollout.kv_pages"
                )
        return [t.generation for t in turns]

    def decode_step(self, params, turns: Sequence[Turn]) -> list[Turn]:
        """One chunk of up to ``decode_chunk`` decode steps for unfinished ``turns``.

        Rows are taken in order while the pool has pages for their chunk (at most ``num_slots``
        rows); the others are left as they are for a later call. Each row's new tokens are
        appended to its sequence and its :class:`Turn` (``done`` when it ended).

        Returns the turns that ran (empty when not even the first fits the pool).
        """
        steps = self.decode_chunk
        batch_rows: list[Turn] = []
        for turn in turns:
            if turn.done:
                raise ValueError(f"decode_step: the turn of slot {turn.slot} is already done")
            if len(batch_rows) == self.num_slots:
                break
            new = min(steps, turn.remaining, self.max_len - len(self._seqs[turn.slot]))
            try:
                self._reserve([(turn.slot, new)])
            except KVPoolExhausted:
                continue
            batch_rows.append(turn)
        if not batch_rows:
            return []
        clock = time.perf_counter()
        batch = self._batch_bucket(len(batch_rows))
        pending = np.zeros((batch,), np.int32)
        budget = np.zeros((batch,), np.int32)
        is_active = np.zeros((batch,), bool)
        stop_state = np.zeros((batch,), np.int32)
        keys = np.empty((batch, batch_rows[0].key.shape[0]), np.uint32)
        keys[: len(batch_rows)] = [t.key for t in batch_rows]
        keys[len(batch_rows) :] = batch_rows[0].key
        for i, turn in enumerate(batch_rows):
            pending[i] = self._seqs[turn.slot][-1]
            budget[i] = turn.remaining
            is_active[i] = True
            stop_state[i] = turn.stop_state
        longest = max(len(self._seqs[t.slot]) for t in batch_rows)
        kv_len = self.attended_length(min(longest + steps, self.max_len))
        slots = [t.slot for t in batch_rows]
        table, lengths = self._table(slots, batch, kv_len)
        # Rows whose sequences are shorter than the attended length stop at max_len via
        # their budget: the attended length bounds the loop only for the longest rows.
        budget[: len(batch_rows)] = np.minimum(
            budget[: len(batch_rows)],
            self.max_len - np.asarray([len(self._seqs[s]) for s in slots]),
        )
        has_stops = self._automaton is not None
        self._used("decode", batch, steps, kv_len, self.sampling, has_stops, self.top_logprobs)
        out = self._decode(
            self._graphdef,
            params,
            self.cache,
            jnp.asarray(table),
            jnp.asarray(lengths),
            jnp.asarray(pending),
            jnp.asarray(is_active),
            jnp.asarray(budget),
            keys,
            self._eos,
            self._stop_table if has_stops else None,
            self._stop_accepts if has_stops else None,
            jnp.asarray(stop_state),
            steps=steps,
            sampling=self.sampling,
            top_logprobs=self.top_logprobs,
        )
        self.cache = out[0]
        tok, lp, ent, count, finish, stop_state, ran, top, top_ids = jax.device_get(out[1:])
        counters = self.counters
        counters.decode_calls += 1
        counters.row_steps_run += batch * int(ran)
        counters.row_steps_useful += int(count[: len(batch_rows)].sum())
        counters.kv_bytes_read += (
            float(sum(int(lengths[i]) * int(count[i]) for i in range(len(batch_rows))))
            * self.kv_bytes_per_token
        )
        self._count_page_reads(table[: len(batch_rows)], count[: len(batch_rows)])
        for i, turn in enumerate(batch_rows):
            turn.stop_state = int(stop_state[i])
            self._finish_chunk(turn, tok[i], lp[i], ent[i], int(count[i]), int(finish[i]))
            if self.top_logprobs:
                self._keep_top(turn.generation, top[i], top_ids[i], int(count[i]))
        for turn in batch_rows:  # pages reserved for tokens that were not generated
            self._drop_pages(turn.slot, self._pages_for(self._cached(turn.slot)))
        counters.decode_seconds += time.perf_counter() - clock
        return batch_rows

    def _count_page_reads(self, table: np.ndarray, steps: np.ndarray) -> None:
        """Adds a call's page reads: each row reads its pages at each of its steps; a shared
        page is read once per step while any row holding it runs (the cascade bound)."""
        real = table != NULL_PAGE
        steps = np.broadcast_to(np.asarray(steps, np.int64)[:, None], table.shape)
        self.counters.kv_pages_read += int(steps[real].sum())
        once = np.zeros(self.pages.num_pages, np.int64)
        np.maximum.at(once, table[real], steps[real])
        self.counters.kv_pages_read_once += int(once.sum())

    def _keep_top(self, result: Generation, top, top_ids, n: int) -> None:
        """Keeps the chunk's top entries up to ``top_logprobs_positions`` positions of the turn
        (and no further than its tokens: a stop string may have dropped some)."""
        limit = len(result.tokens)
        if self.top_logprobs_positions:
            limit = min(limit, self.top_logprobs_positions)
        take = max(0, min(n, limit - len(result.top_ids)))
        result.top_ids += top_ids[:take].tolist()
        result.top_log_probs += top[:take].tolist()

    def _finish_chunk(self, turn: Turn, tok, lp, ent, n: int, finish: int) -> None:
        """Appends a chunk's tokens to the turn and its sequence; ends the turn at EOS, at a stop
        string (the host's decoded-text check is the authority), budget or length."""
        result, seq = turn.generation, self._seqs[turn.slot]
        result.tokens += tok[:n].tolist()
        result.log_probs += lp[:n].tolist()
        result.entropies += ent[:n].tolist()
        seq.extend(tok[:n].tolist())
        turn.remaining -= n
        stop = self._matcher.first_stop(result.tokens, turn.checked) if self._matcher else None
        turn.checked = len(result.tokens)
        if stop is not None:
            keep, string = stop
            dropped = len(result.tokens) - keep
            del result.tokens[keep:], result.log_probs[keep:], result.entropies[keep:]
            if dropped:
                del seq[len(seq) - dropped :]
            result.finish_reason, result.stop_string = FINISH_STOP, string
            turn.done = True
        elif finish == _EOS:
            result.finish_reason = FINISH_EOS
            turn.done = True
        elif finish == _LENGTH or turn.remaining <= 0 or len(seq) >= self.max_len:
            turn.done = True
        elif finish == _STOP:
            # The automaton saw a stop string the decoded text does not contain (the tokenizer's
            # pieces do not concatenate): the host check is the authority, so the row goes on,
            # with the automaton restarted (its stopped states are absorbing).
            turn.stop_state = 0

    # ------------------------------------------------------------------ buckets

    def _slot_keys(self, rng: jax.Array, count: int) -> list[np.ndarray]:
        rng = jnp.asarray(rng)
        typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        single = rng.ndim == (0 if typed else 1)
        data = np.asarray(jax.random.key_data(rng), np.uint32)
        if single:
            return [host_keys.fold_in(data, i) for i in range(count)]
        if rng.shape[0] != count:
            raise ValueError(f"generate: got {rng.shape[0]} keys for {count} slots")
        return list(data)

    def _batch_bucket(self, rows: int) -> int:
        return min(batch_bucket(rows), max(self.num_slots, rows))

    def attended_length(self, length: int) -> int:
        """Attended cache length for sequences up to ``length``: a power-of-two multiple of
        kv_bucket, at most a sequence's page capacity."""
        blocks = _next_power_of_two(-(-length // self.kv_bucket))
        return min(blocks * self.kv_bucket, self.max_pages * self.page_size)
