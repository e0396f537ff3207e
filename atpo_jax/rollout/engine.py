"""The generation engine: a fixed pool of KV-cache slots that keeps every sequence's cache between turns.

A tree rollout is a forest of sequences that share prefixes. The engine keeps each sequence's KV
cache in a slot between calls, so a tool result is appended with :meth:`Engine.extend` (no prefix
recomputation) and a branch starts with :meth:`Engine.fork` (a device copy of the prefix instead of
a re-prefill).

Slot bookkeeping: the host keeps every slot's full token sequence. The device cache of a slot holds
all of it but the last token, which stays *pending*: the next generation step feeds it and samples
the token after it. So prefill/extend write ``tokens[:-1]``, forking a prefix of length n copies
n - 1 cached positions, and truncating after a stop string is just a new cache length.

Generation runs as a jitted ``while_loop`` on device over chunks of ``decode_chunk`` steps; between
chunks the host reads the new tokens, checks stop strings on their decoded text and drops the tokens
after a stop. Shapes are bucketed (batch to a power of two, prefill length to a power of two, the
attended cache length to a multiple of ``kv_bucket``) so a run compiles a small, fixed set of
programs; :attr:`Engine.compile_count` reports how many distinct ones an engine has used.

The engine holds the model's structure (``nnx.GraphDef``) and the cache, never the weights: every
call that runs the model takes the parameters (``params``, an ``nnx.State``), so the caller's
training state stays their only owner and a rollout uses exactly the policy version it is given.
Cached keys/values computed with other parameters stay as they are.

On a device mesh (``cache_sharding``, see :func:`cache_shardings`) the model's
parameters are used as they are sharded (for training: the engine is collocated with the trainer)
and the KV-cache pool is created and kept in the given sharding: every program constrains the
cache it returns to it, so the donated pool never changes layout between calls.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax import parallel
from atpo_jax.kernels import token_entropy
from atpo_jax.models import (
    CausalLM,
    KVCache,
    fork_slots,
    forward_with_cache,
    gather_slots,
    init_cache,
    scatter_slots,
)
from atpo_jax.rollout.sampling import SamplingParams, sample_next, sampling_logits
from atpo_jax.rollout.stop import StopStringMatcher

FINISH_EOS = "eos"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# Device-side finish codes.
_RUNNING, _EOS, _LENGTH = 0, 1, 2


@dataclasses.dataclass
class Generation:
    """What one slot generated in one :meth:`Engine.generate` call.

    Attributes:
      tokens: generated token ids, ending with the EOS token (``eos``), with the token that
        completed the stop string (``stop``), or wherever the budget/cache ran out (``length``).
      log_probs: log-prob of each token under the distribution it was sampled from.
      entropies: exact entropy (nats) of that distribution at each step.
      finish_reason: ``eos``, ``stop`` or ``length``.
      stop_string: the stop string that ended the generation (``stop`` only).
    """

    tokens: list[int]
    log_probs: list[float]
    entropies: list[float]
    finish_reason: str
    stop_string: str | None = None


def _next_power_of_two(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _keep_layout(cache: KVCache, cache_sharding: KVCache | None) -> KVCache:
    """The returned pool in the pool's sharding (on a mesh), so a donated pool keeps its layout."""
    if cache_sharding is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_sharding)


def _prefill_program(
    graphdef, state, cache, slots, tokens, num_tokens, *, kv_len, cache_sharding=None
):
    """Writes ``tokens[b, :num_tokens[b]]`` into slot ``slots[b]`` after its current length."""
    model = nnx.merge(graphdef, state)
    _, cache = forward_with_cache(
        model, tokens, cache, slots, num_tokens, kv_len=kv_len, last_only=True
    )
    return _keep_layout(cache, cache_sharding)


def _decode_program(
    graphdef,
    state,
    cache,
    slots,
    pending,
    active,
    budget,
    keys,
    eos_ids,
    *,
    steps,
    kv_len,
    sampling,
    cache_sharding=None,
):
    """Up to ``steps`` decode steps for the given slots, stopping early when none is active.

    Each step feeds every active slot's pending token (writing it to the cache), samples the next
    token with the key ``fold_in(keys[b], position)`` (position = index of the new token in the
    slot's sequence, so draws do not depend on batching or chunking) and retires slots that sampled
    EOS, used up their budget or filled the cache.

    Returns (cache, pending, tokens [B, steps], log_probs [B, steps], entropies [B, steps],
    num_generated [B], finish [B]).
    """
    model = nnx.merge(graphdef, state)
    batch = slots.shape[0]
    max_len = cache.max_len
    # The loop runs on the batch's own kv_len-long copy of its slots: every step then reads its
    # keys without gathering slots, and the pool is gathered and written back once per call.

    def body(carry):
        step, local, pending, active, budget, finish, out_tok, out_lp, out_ent, count = carry
        position = local.lengths + 1  # index of the token about to be sampled
        logits, local = forward_with_cache(
            model,
            pending[:, None],
            local,
            None,
            active.astype(jnp.int32),
            kv_len=kv_len,
            last_only=True,
        )
        step_keys = jax.vmap(jax.random.fold_in)(keys, position)
        token, log_prob, entropy = sample_next(logits, step_keys, sampling)
        out_tok = out_tok.at[:, step].set(token)
        out_lp = out_lp.at[:, step].set(log_prob)
        out_ent = out_ent.at[:, step].set(entropy)
        count = count + active.astype(jnp.int32)
        budget = budget - active.astype(jnp.int32)
        is_eos = jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        # A further step needs room for one more cached position and one more sequence token.
        full = position + 1 >= max_len
        finish = jnp.where(active & is_eos, _EOS, finish)
        finish = jnp.where(active & ~is_eos & ((budget <= 0) | full), _LENGTH, finish)
        pending = jnp.where(active, token, pending)
        active = active & (finish == _RUNNING)
        return step + 1, local, pending, active, budget, finish, out_tok, out_lp, out_ent, count

    def cond(carry):
        step, active = carry[0], carry[3]
        return (step < steps) & jnp.any(active)

    zeros_f = jnp.zeros((batch, steps), jnp.float32)
    init = (
        jnp.int32(0),
        gather_slots(cache, slots, kv_len),
        pending,
        active,
        budget,
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch, steps), jnp.int32),
        zeros_f,
        zeros_f,
        jnp.zeros((batch,), jnp.int32),
    )
    _, local, pending, _, _, finish, tokens, log_probs, entropies, count = jax.lax.while_loop(
        cond, body, init
    )
    cache = scatter_slots(cache, local, slots)
    return _keep_layout(cache, cache_sharding), pending, tokens, log_probs, entropies, count, finish


def _force_program(
    graphdef, state, cache, slots, pending, forced, active, *, kv_len, sampling, cache_sharding=None
):
    """One teacher-forced step: feeds each slot's pending token and scores ``forced`` as the next one.

    Returns (cache, log-prob [B] of the forced token under the sampling distribution, entropy [B]).
    """
    model = nnx.merge(graphdef, state)
    logits, cache = forward_with_cache(
        model,
        pending[:, None],
        cache,
        slots,
        active.astype(jnp.int32),
        kv_len=kv_len,
        last_only=True,
    )
    dist = sampling_logits(logits, sampling)
    log_probs = jax.nn.log_softmax(dist, axis=-1)
    picked = jnp.take_along_axis(log_probs, forced[:, None], axis=-1)[:, 0]
    return _keep_layout(cache, cache_sharding), picked, token_entropy(dist)


def _set_lengths(
    cache: KVCache, slots: jax.Array, lengths: jax.Array, *, cache_sharding=None
) -> KVCache:
    return _keep_layout(cache.replace(lengths=cache.lengths.at[slots].set(lengths)), cache_sharding)


def _fork(cache: KVCache, src, dst, length, *, cache_sharding=None) -> KVCache:
    return _keep_layout(fork_slots(cache, src, dst, length), cache_sharding)


# Module-level jitted programs: engines with the same model structure and buckets share compiled
# code (a trainer that rebuilds its engine, or a test suite, does not recompile). The cache is
# donated so every call updates the pool in place.
_PREFILL = jax.jit(
    _prefill_program, static_argnames=("kv_len", "cache_sharding"), donate_argnames=("cache",)
)
_DECODE = jax.jit(
    _decode_program,
    static_argnames=("steps", "kv_len", "sampling", "cache_sharding"),
    donate_argnames=("cache",),
)
_FORCE = jax.jit(
    _force_program,
    static_argnames=("kv_len", "sampling", "cache_sharding"),
    donate_argnames=("cache",),
)
_FORK = jax.jit(_fork, static_argnames=("cache_sharding",), donate_argnums=0)
_SET_LENGTHS = jax.jit(_set_lengths, static_argnames=("cache_sharding",), donate_argnums=0)
_PROGRAMS = (_PREFILL, _DECODE, _FORCE, _FORK, _SET_LENGTHS)


def cache_shardings(mesh, model_config, num_slots: int, max_len: int) -> KVCache | None:
    """Shardings of an engine's KV-cache pool of ``num_slots`` x ``max_len`` on ``mesh``, from the
    cache's declared logical axes (``KVCache.logical_axes``): slots split over ``("data",
    "fsdp")`` and kv heads over ``tensor``, each only where the axis divides the dimension.

    Sharding the slots divides the pool's memory by ``data * fsdp``; the price is that a batch
    reads its slots with a masked local gather plus an all-reduce of the batch's keys and values
    (XLA's partitioning of a gather along a sharded dimension), since a batch row may live on any
    device; the decode loop does this once per call (``models.gather_slots``), not per step.
    ``None`` (the default placement) without a mesh or on a one-device mesh.
    """
    if mesh is None or mesh.size == 1:
        return None
    abstract = jax.eval_shape(lambda: init_cache(model_config, num_slots, max_len))
    return parallel.logical_shardings(mesh, abstract, abstract.logical_axes())


class Engine:
    """A pool of ``num_slots`` KV-cache slots of ``max_len`` tokens each, and batched generation.

    Args:
      model: the policy LM; only its structure is kept (an abstract model from
        ``nnx.eval_shape`` will do). The weights come with each call.
      num_slots: number of sequences the pool holds.
      max_len: maximum tokens per sequence (prompt + response).
      eos_token_ids: token ids that end a generation (kept as the last generated token).
      sampling: temperature / top-k / top-p settings.
      stop_strings: strings that end a generation when they appear in the decoded new text.
      decode: token ids -> text, needed when ``stop_strings`` are given (``tokenizer.decode``).
      decode_chunk: decode steps per device call between host stop-string checks.
      kv_bucket: granularity of the attended cache length (attention cost follows it).
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      cache_sharding: a ``KVCache`` of ``jax.sharding.Sharding`` for the pool on a device mesh
        (:func:`cache_shardings`); ``None`` = the default device.
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
        cache_sharding: KVCache | None = None,
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
        self.num_slots = num_slots
        self.max_len = max_len
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.decode_chunk = decode_chunk
        self.kv_bucket = kv_bucket
        self._eos = jnp.asarray(sorted(set(int(t) for t in eos_token_ids)), jnp.int32)
        self._matcher = StopStringMatcher(decode, stop_strings) if stop_strings else None
        self._graphdef = nnx.graphdef(model)
        self.model_config = model.config
        self.cache_sharding = cache_sharding
        if cache_sharding is None:
            self.cache = init_cache(model.config, num_slots, max_len, cache_dtype)
        else:  # created in place, never whole on one device
            self.cache = jax.jit(
                lambda: init_cache(model.config, num_slots, max_len, cache_dtype),
                out_shardings=cache_sharding,
            )()
        self._seqs: list[list[int] | None] = [None] * num_slots
        self._prefill, self._decode, self._force, self._fork, self._set_lengths = (
            functools.partial(program, cache_sharding=cache_sharding) for program in _PROGRAMS
        )
        self._signatures: set[tuple] = set()  # distinct (program, shapes, static args) used
        self.prefill_tokens_computed = 0  # tokens run through the model by prefill/extend

    # ------------------------------------------------------------------ slot management

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
        """Reserves ``count`` free slots (they become usable by prefill or fork)."""
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
        """Frees slots; their cache contents are dropped."""
        slots = np.atleast_1d(slots).tolist()
        for slot in slots:
            self._seqs[slot] = None
        self._reset_cache_lengths(slots)

    def tokens(self, slot: int) -> list[int]:
        """A copy of the slot's full token sequence."""
        return list(self._sequence(slot))

    def length(self, slot: int) -> int:
        return len(self._sequence(slot))

    def _sequence(self, slot: int) -> list[int]:
        seq = self._seqs[slot]
        if seq is None:
            raise ValueError(f"Engine: slot {slot} is not allocated")
        return seq

    # ------------------------------------------------------------------ writing tokens

    def prefill(self, params, slot: int, tokens: Sequence[int]) -> None:
        """Replaces the slot's content with ``tokens`` (e.g. a prompt), run with ``params``."""
        self.prefill_many(params, [slot], [tokens])

    def prefill_many(
        self, params, slots: Sequence[int], token_lists: Sequence[Sequence[int]]
    ) -> None:
        """Batched :meth:`prefill`."""
        for slot in slots:
            self._seqs[slot] = []
        self._reset_cache_lengths(slots)
        self.extend_many(params, slots, token_lists)

    def _reset_cache_lengths(self, slots: Sequence[int]) -> None:
        self._used("set_lengths", len(slots))
        self.cache = self._set_lengths(
            self.cache, jnp.asarray(slots, jnp.int32), jnp.zeros(len(slots), jnp.int32)
        )

    def extend(self, params, slot: int, tokens: Sequence[int]) -> None:
        """Appends ``tokens`` (e.g. a tool result) without recomputing the slot's prefix."""
        self.extend_many(params, [slot], [tokens])

    def extend_many(
        self, params, slots: Sequence[int], token_lists: Sequence[Sequence[int]]
    ) -> None:
        """Batched :meth:`extend`: one bucketed device call for all slots."""
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
            seq.extend(new)
        rows = [(s, w) for s, w in zip(slots, writes, strict=True) if w]
        if not rows:
            return
        width = _next_power_of_two(max(len(w) for _, w in rows), minimum=16)
        batch = self._batch_bucket(len(rows))
        row_slots = self._padded_slots([s for s, _ in rows], batch)
        tokens = np.zeros((batch, width), np.int32)
        counts = np.zeros((batch,), np.int32)
        for i, (_, w) in enumerate(rows):
            tokens[i, : len(w)] = w
            counts[i] = len(w)
        longest = max(len(self._seqs[s]) for s, _ in rows)
        kv_len = self.attended_length(longest)
        self._used("prefill", batch, width, kv_len)
        self.cache = self._prefill(
            self._graphdef,
            params,
            self.cache,
            jnp.asarray(row_slots),
            jnp.asarray(tokens),
            jnp.asarray(counts),
            kv_len=kv_len,
        )
        self.prefill_tokens_computed += int(counts.sum())

    def fork(self, src: int, dst: int, length: int) -> None:
        """Makes ``dst`` a copy of the first ``length`` tokens of ``src`` (a device copy, no compute)."""
        self.fork_many([src], [dst], [length])

    def fork_many(self, srcs: Sequence[int], dsts: Sequence[int], lengths: Sequence[int]) -> None:
        """Batched :meth:`fork`."""
        if len(set(dsts)) != len(dsts):
            raise ValueError("fork_many: destination slots must be distinct")
        prefixes = []
        for src, length in zip(srcs, lengths, strict=True):
            seq = self._sequence(src)
            if not 1 <= length <= len(seq):
                raise ValueError(f"fork: length {length} outside [1, {len(seq)}] for slot {src}")
            prefixes.append(seq[:length])
        for dst, prefix in zip(dsts, prefixes, strict=True):
            self._seqs[dst] = list(prefix)
        self._used("fork", len(dsts))
        self.cache = self._fork(
            self.cache,
            jnp.asarray(srcs, jnp.int32),
            jnp.asarray(dsts, jnp.int32),
            jnp.asarray(lengths, jnp.int32) - 1,
        )

    def truncate(self, slot: int, length: int) -> None:
        """Drops the slot's tokens after the first ``length`` (>= 1)."""
        seq = self._sequence(slot)
        if not 1 <= length <= len(seq):
            raise ValueError(f"truncate: length {length} outside [1, {len(seq)}] for slot {slot}")
        del seq[length:]
        self._used("set_lengths", 1)
        self.cache = self._set_lengths(
            self.cache, jnp.asarray([slot], jnp.int32), jnp.asarray([length - 1], jnp.int32)
        )

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
        batch = self._batch_bucket(len(slots))
        row_slots = self._padded_slots(slots, batch)
        pending = np.zeros((batch,), np.int32)
        forced = np.zeros((batch,), np.int32)
        active = np.zeros((batch,), bool)
        for i, (slot, token) in enumerate(zip(slots, tokens, strict=True)):
            pending[i], forced[i], active[i] = self._seqs[slot][-1], int(token), True
        longest = max(len(self._seqs[s]) for s in slots)
        kv_len = self.attended_length(longest + 1)
        self._used("force", batch, kv_len, self.sampling)
        self.cache, log_probs, entropies = self._force(
            self._graphdef,
            params,
            self.cache,
            jnp.asarray(row_slots),
            jnp.asarray(pending),
            jnp.asarray(forced),
            jnp.asarray(active),
            kv_len=kv_len,
            sampling=self.sampling,
        )
        log_probs, entropies = jax.device_get((log_probs, entropies))
        for slot, token in zip(slots, tokens, strict=True):
            self._seqs[slot].append(int(token))
        return [
            (float(lp), float(e)) for lp, e in zip(log_probs[: len(slots)], entropies, strict=False)
        ]

    # ------------------------------------------------------------------ generation

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
        results = {s: Generation([], [], [], FINISH_LENGTH) for s in slots}
        checked = dict.fromkeys(slots, 0)
        remaining = {}
        for slot, budget in zip(slots, budgets, strict=True):
            if not self._sequence(slot):
                raise ValueError(f"generate: slot {slot} is empty; prefill it first")
            if budget > 0 and len(self._seqs[slot]) < self.max_len:
                remaining[slot] = int(budget)
        key_of = dict(zip(slots, keys, strict=True))
        while remaining:
            active = list(remaining)
            batch = self._batch_bucket(len(active))
            row_slots = self._padded_slots(active, batch)
            pending = np.zeros((batch,), np.int32)
            budget = np.zeros((batch,), np.int32)
            is_active = np.zeros((batch,), bool)
            row_keys = jnp.stack(
                [key_of[s] for s in active] + [key_of[active[0]]] * (batch - len(active))
            )
            for i, slot in enumerate(active):
                pending[i] = self._seqs[slot][-1]
                budget[i] = remaining[slot]
                is_active[i] = True
            steps = self.decode_chunk
            longest = max(len(self._seqs[s]) for s in active)
            kv_len = self.attended_length(longest + steps)
            self._used("decode", batch, steps, kv_len, self.sampling)
            self.cache, _, tok, lp, ent, count, finish = self._decode(
                self._graphdef,
                params,
                self.cache,
                jnp.asarray(row_slots),
                jnp.asarray(pending),
                jnp.asarray(is_active),
                jnp.asarray(budget),
                row_keys,
                self._eos,
                steps=steps,
                kv_len=kv_len,
                sampling=self.sampling,
            )
            tok, lp, ent, count, finish = jax.device_get((tok, lp, ent, count, finish))
            truncations = []
            for i, slot in enumerate(active):
                n = int(count[i])
                result = results[slot]
                result.tokens += tok[i, :n].tolist()
                result.log_probs += lp[i, :n].tolist()
                result.entropies += ent[i, :n].tolist()
                self._seqs[slot].extend(tok[i, :n].tolist())
                remaining[slot] -= n
                stop = (
                    self._matcher.first_stop(result.tokens, checked[slot])
                    if self._matcher
                    else None
                )
                checked[slot] = len(result.tokens)
                if stop is not None:
                    keep, string = stop
                    dropped = len(result.tokens) - keep
                    del result.tokens[keep:], result.log_probs[keep:], result.entropies[keep:]
                    if dropped:
                        del self._seqs[slot][len(self._seqs[slot]) - dropped :]
                        truncations.append(slot)
                    result.finish_reason, result.stop_string = FINISH_STOP, string
                    del remaining[slot]
                elif finish[i] == _EOS:
                    result.finish_reason = FINISH_EOS
                    del remaining[slot]
                elif finish[i] == _LENGTH or remaining[slot] <= 0:
                    del remaining[slot]
            if truncations:
                self._used("set_lengths", len(truncations))
                self.cache = self._set_lengths(
                    self.cache,
                    jnp.asarray(truncations, jnp.int32),
                    jnp.asarray([len(self._seqs[s]) - 1 for s in truncations], jnp.int32),
                )
        return [results[s] for s in slots]

    # ------------------------------------------------------------------ buckets

    def _slot_keys(self, rng: jax.Array, count: int) -> list[jax.Array]:
        rng = jnp.asarray(rng)
        typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        single = rng.ndim == (0 if typed else 1)
        if single:
            return [jax.random.fold_in(rng, i) for i in range(count)]
        if rng.shape[0] != count:
            raise ValueError(f"generate: got {rng.shape[0]} keys for {count} slots")
        return list(rng)

    def _batch_bucket(self, rows: int) -> int:
        return min(_next_power_of_two(rows), self.num_slots)

    def _padded_slots(self, slots: Sequence[int], batch: int) -> np.ndarray:
        """The given slots followed by distinct unused slot ids for the padding rows."""
        taken = set(slots)
        spare = [s for s in range(self.num_slots) if s not in taken][: batch - len(slots)]
        return np.asarray(list(slots) + spare, np.int32)

    def attended_length(self, length: int) -> int:
        """Attended cache length for sequences up to ``length``: a power-of-two multiple of kv_bucket."""
        blocks = _next_power_of_two(-(-length // self.kv_bucket))
        return min(blocks * self.kv_bucket, self.max_len)
