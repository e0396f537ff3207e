"""The packed layouts hold every leaf row exactly: tokens, positions, what each token sees and what
predicts it, checked against each row rebuilt from the padded layout (random forests)."""

from __future__ import annotations

import numpy as np
import pytest

from atpo_jax.train import packing
from atpo_jax.train.packing import Packing, align_processes, pack_mini_batch, resized
from tests.packed.random_trees import random_forest


def _row_sequence(batch, r):
    """Row r unpacked: its prompt then its response tokens, and the node owning each (-1 prompt)."""
    prompt = batch.prompt_tokens[batch.tree_index[r]][batch.prompt_mask[batch.tree_index[r]] != 0]
    n = int(np.sum(batch.token_node[r] >= 0))
    tokens = np.r_[prompt, batch.response[r, :n]]
    owner = np.r_[np.full(len(prompt), -1), batch.token_node[r, :n]]
    return tokens, owner, len(prompt)


def _check_layout(batch, packed):
    """Every row's tokens sit at its row_index; each sees exactly its own row's earlier tokens
    (through visible_end) and is predicted by the previous token of its row."""
    seen_rows = np.concatenate(packed.row_ids)
    assert sorted(seen_rows.tolist()) == list(range(batch.num_rows))
    for m, ids in zip(packed.micro, packed.row_ids, strict=True):
        s, t = m.tokens.shape
        flat = lambda x: x.reshape(-1)  # noqa: E731
        tokens, positions, ends, pred = map(
            flat, (m.tokens, m.positions, m.visible_end, m.predictor)
        )
        assert np.all(ends >= np.arange(s * t) % t)  # every token sees itself
        for i, r in enumerate(ids):
            seq, _, p = _row_sequence(batch, r)
            n = len(seq) - p
            where = m.row_index[i, :n]
            assert np.all(where >= 0) and np.all(m.row_index[i, n:] == -1)
            np.testing.assert_array_equal(tokens[where], seq[p:])
            np.testing.assert_array_equal(positions[where], np.arange(p, p + n))
            np.testing.assert_array_equal(m.loss_mask[i, :n], batch.loss_mask[r, :n])
            np.testing.assert_array_equal(m.advantages[i], batch.advantages[r])
            # The response's first token is predicted by the last prompt token, each later one by
            # the previous response token.
            for k in range(n):
                q = where[k]
                assert pred[q] >= 0
                before = (q // t) * t + pred[q]  # predictor: a position in the same sequence
                assert tokens[before] == seq[p + k - 1]
                assert positions[before] == p + k - 1
            # What the last token of the row sees is exactly the row: its prompt and response.
            if n:
                last = where[-1]
                seq_start = (last // t) * t
                keys = np.arange(seq_start, last + 1)
                visible = keys[ends[keys] >= last % t]  # visible_end: a position in the sequence
                assert len(visible) == len(seq)
                np.testing.assert_array_equal(np.sort(positions[visible]), np.arange(len(seq)))
                np.testing.assert_array_equal(tokens[visible[np.argsort(positions[visible])]], seq)
        # Rows past the real ones are empty.
        assert np.all(m.row_index[len(ids) :] == -1) and np.all(m.loss_mask[len(ids) :] == 0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["rows", "tree"])
def test_every_row_is_held_exactly(seed, mode):
    batch, _ = random_forest(seed, trees=4)
    packed = pack_mini_batch(batch, mode, budget=48, sequences=2 if seed % 2 else 1)
    _check_layout(batch, packed)
    assert packed.real_tokens == sum(len(_row_sequence(batch, r)[0]) for r in range(batch.num_rows))


def test_tree_packing_holds_each_node_once_and_rows_each_row():
    batch, _ = random_forest(11, trees=3)
    tree = pack_mini_batch(batch, "tree", budget=4096)
    rows = pack_mini_batch(batch, "rows", budget=4096)
    nodes = set()
    for r in range(batch.num_rows):
        for n in np.unique(batch.token_node[r][batch.token_node[r] >= 0]):
            nodes.add((int(batch.tree_index[r]), int(n), int(np.sum(batch.token_node[r] == n))))
    prompts = int(np.sum(batch.prompt_mask))
    # One piece per tree: each prompt and each node once.
    assert tree.placed_tokens == prompts + sum(length for *_, length in nodes)
    assert rows.placed_tokens == rows.real_tokens
    assert tree.placed_tokens < rows.placed_tokens
    assert len(tree.micro) == 1 and tree.computed_tokens == 4096


def test_a_tree_longer_than_the_budget_is_cut_into_whole_leaves():
    batch, _ = random_forest(2, trees=1, max_nodes=24)
    longest = max(len(_row_sequence(batch, r)[0]) for r in range(batch.num_rows))
    packed = pack_mini_batch(batch, "tree", budget=longest)
    assert len(packed.micro) > 1
    for m in packed.micro:
        assert m.tokens.shape == (1, longest)
    _check_layout(batch, packed)


def test_a_row_longer_than_the_budget_gets_a_longer_sequence():
    batch, _ = random_forest(4, trees=2)
    longest = max(len(_row_sequence(batch, r)[0]) for r in range(batch.num_rows))
    budget = max(1, longest // 3)
    packed = pack_mini_batch(batch, "rows", budget=budget)
    lengths = {m.tokens.shape[1] for m in packed.micro}
    assert all(size // budget in (1, 2, 4) and size % budget == 0 for size in lengths)
    assert max(lengths) >= longest
    _check_layout(batch, packed)


def test_every_micro_batch_has_the_mini_batch_shape_of_rows():
    batch, _ = random_forest(5, trees=4)
    for sequences in (1, 2, 4):
        packed = pack_mini_batch(batch, "rows", budget=64, sequences=sequences)
        want = -(-batch.num_rows // sequences) * sequences
        assert {m.shape_key for m in packed.micro} == {
            (sequences, 64, want, batch.response.shape[1])
        }


def test_resizing_and_aligning_keep_every_row():
    batch, _ = random_forest(6, trees=3)
    packed = pack_mini_batch(batch, "tree", budget=64, sequences=2)
    shapes = [m.shape_key for m in packed.micro]
    other = [(2, 4 * 64, 2 * s[2], s[3]) for s in shapes] + [(2, 64, 2, shapes[0][3])]
    aligned = align_processes(packed.micro, [shapes, other], block=1)
    assert len(aligned) == len(shapes) + 1
    for a, m, s in zip(aligned, packed.micro, other, strict=False):
        assert a.shape_key == s
        t_old, t_new = m.tokens.shape[1], a.tokens.shape[1]
        offset = 1 * 2 * t_new  # this process holds the second block of 2 sequences
        ok = m.row_index >= 0
        old = m.row_index[ok]
        new = a.row_index[: m.row_index.shape[0]][ok] - offset
        np.testing.assert_array_equal(new, (old // t_old) * t_new + old % t_old)
        np.testing.assert_array_equal(a.tokens.reshape(-1)[new], m.tokens.reshape(-1)[old])
    assert np.all(aligned[-1].row_index == -1) and np.all(aligned[-1].predictor == -1)
    with pytest.raises(ValueError, match="shrink"):
        resized(packed.micro[0], 1, 1)


def test_bad_input_gets_a_clear_error():
    batch, _ = random_forest(1, trees=2)
    with pytest.raises(ValueError, match="train.packing"):
        pack_mini_batch(batch, "dense", budget=64)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_mini_batch(batch, "tree", budget=0)
    empty = packing.MiniBatchRows(**{**batch.__dict__, "prompt_mask": 0 * batch.prompt_mask})
    with pytest.raises(ValueError, match="empty prompt"):
        pack_mini_batch(empty, "tree", budget=64)
    assert Packing("tree") == Packing.TREE
