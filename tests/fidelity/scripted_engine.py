"""A real :class:`Engine` whose decode program is replaced by a script of token ids.

Everything around the decode runs for real (prefill/extend/fork/force on a tiny model at Qwen3's
vocabulary size, the host's stop-string matching and truncation, the tree search's turn rules and
packing); only *which* ids are sampled is chosen by the test, one id list per turn, as a policy
emitting arbitrary (also non-canonical) BPE sequences would.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax.models import CausalLM, ModelConfig
from atpo_jax.rollout import engine as engine_module
from atpo_jax.rollout.engine import Engine


def tiny_qwen3(vocab_rows: int) -> CausalLM:
    config = ModelConfig(
        model_type="qwen3",
        vocab_size=vocab_rows,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        qk_norm=True,
        tie_word_embeddings=True,
    )
    return CausalLM(config, rngs=nnx.Rngs(0))


class ScriptedEngine(Engine):
    """``turns[chain][k]``: the ids the k-th ``generate`` of that chain's slot samples, then
    ``filler`` forever (a turn the script does not end runs into the budget)."""

    def __init__(self, *args, turns: Sequence[Sequence[Sequence[int]]], filler: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._turns = [list(map(list, chain)) for chain in turns]
        self._filler = filler
        self._script_of: dict[int, int] = {}  # slot -> chain index, in order of first generate
        self._turn_of: dict[int, int] = {}
        self._start: dict[int, int] = {}
        self._decode = self._scripted_decode

    def start_turn(self, slot, budget, key):
        if slot not in self._script_of:
            self._script_of[slot], self._turn_of[slot] = len(self._script_of), -1
        self._turn_of[slot] += 1
        self._start[slot] = len(self._seqs[slot])
        return super().start_turn(slot, budget, key)

    def decode_step(self, params, turns):
        # The rows a call runs are the first ones (the default pool never makes a row wait).
        self._rows = [t.slot for t in turns][: self.num_slots]
        return super().decode_step(params, turns)

    def _script(self, slot: int) -> list[int]:
        chain = self._turns[self._script_of[slot]]
        turn = self._turn_of[slot]
        return chain[turn] if turn < len(chain) else []

    def _scripted_decode(self, graphdef, state, cache, table, lengths, pending, active, budget,
                         keys, eos, stop_table, stop_accepts, stop_state, *, steps, sampling,
                         top_logprobs):  # fmt: skip
        active, budget = np.asarray(active), np.asarray(budget)
        slots = self._rows + [-1] * (len(active) - len(self._rows))
        eos_ids = set(np.asarray(eos).tolist())
        batch = len(slots)
        tokens = np.zeros((batch, steps), np.int32)
        count = np.zeros((batch,), np.int32)
        finish = np.zeros((batch,), np.int32)
        for b in range(batch):
            if not active[b]:
                continue
            slot = int(slots[b])
            script = self._script(slot)
            done = len(self._seqs[slot]) - self._start[slot]
            for step in range(steps):
                i = done + step
                token = script[i] if i < len(script) else self._filler
                tokens[b, step], count[b] = token, step + 1
                position = len(self._seqs[slot]) + step  # index of this token in the sequence
                if token in eos_ids:
                    finish[b] = engine_module._EOS
                    break
                if step + 1 >= budget[b] or position + 1 >= self.max_len:
                    finish[b] = engine_module._LENGTH
                    break
        zeros = jnp.zeros((batch, steps), jnp.float32)
        ran = int(count.max(initial=0))
        out = (jnp.asarray(tokens), zeros - 1.0, zeros, jnp.asarray(count), finish, stop_state, ran)
        top = (
            jnp.full((batch, steps, top_logprobs), -jnp.inf),
            jnp.zeros((batch, steps, top_logprobs)),
        )
        return (cache, *out, *top)
