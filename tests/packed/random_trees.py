"""Random rollout forests as the trainer sees them (prompts, leaf rows, the node owning each token).

Trees have depth up to 6 and 1-8 children per node; nodes are a generated turn (loss mask 1)
followed by a tool result (loss mask 0) when they have children, and some have no tokens at all;
the first tree also gets an empty leaf and a one-turn leaf under its root, so there are always
rows that end in the prompt's first turn, rows sharing every node but the last, and empty rows.
Advantages follow the credit mode's structure: one value per node (tree credit) or per row (GRPO);
old and reference log-probs are one value per token of a node, so rows sharing a node agree.
"""

from __future__ import annotations

import numpy as np

from atpo_jax.train.packing import MiniBatchRows


def _grow(rng: np.random.Generator, max_depth: int, max_nodes: int) -> list[int]:
    """Parents of a random tree (node 0 the root, which owns no tokens)."""
    parent = [-1]
    frontier = [(0, 0)]
    while frontier:
        node, depth = frontier.pop(0)
        if depth >= max_depth or (depth > 0 and rng.random() < 0.35):
            continue
        for _ in range(int(rng.integers(1, 9))):
            if len(parent) >= max_nodes:
                return parent
            parent.append(node)
            frontier.append((len(parent) - 1, depth + 1))
    return parent


def random_forest(
    seed: int,
    *,
    trees: int = 3,
    vocab: int = 48,
    max_prompt: int = 12,
    max_turn: int = 9,
    max_depth: int = 6,
    max_nodes: int = 24,
    credit: str = "tree",
    width: int | None = None,
) -> tuple[MiniBatchRows, np.ndarray]:
    """A mini-batch of the leaf rows of ``trees`` random trees, and [rows, R] reference log-probs
    (NumPy, see the module doc). ``width``: the rows' response width R (default: the longest)."""
    rng = np.random.default_rng(seed)
    prompts, rows, forest = [], [], []
    for b in range(trees):
        parent = _grow(rng, max_depth, max_nodes)
        # The first tree also has an empty leaf and a leaf of one turn under its root.
        special = {len(parent): 0, len(parent) + 1: 1} if b == 0 else {}
        parent += [0] * len(special)
        children: dict[int, list[int]] = {n: [] for n in range(len(parent))}
        for n, p in enumerate(parent):
            if p >= 0:
                children[p].append(n)
        nodes = {}
        for n in range(1, len(parent)):
            turn = int(rng.integers(1, max_turn + 1)) if rng.random() > 0.1 else 0
            turn = turn * special[n] if n in special else turn
            tool = int(rng.integers(1, max_turn + 1)) if children[n] and turn else 0
            nodes[n] = dict(
                tokens=rng.integers(1, vocab, turn + tool),
                mask=np.r_[np.ones(turn, np.int32), np.zeros(tool, np.int32)],
                old=rng.normal(-3.9, 0.3, turn + tool).astype(np.float32),
                ref=rng.normal(-3.9, 0.3, turn + tool).astype(np.float32),
                advantage=np.float32(rng.normal()),
            )
        forest.append(nodes)
        prompts.append(rng.integers(1, vocab, int(rng.integers(1, max_prompt + 1))))
        for leaf in (n for n in range(1, len(parent)) if not children[n]):
            path, n = [], leaf
            while n > 0:
                path.append(n)
                n = parent[n]
            rows.append((b, path[::-1], np.float32(rng.normal())))
    longest = max(sum(len(forest[b][n]["tokens"]) for n in path) for b, path, _ in rows)
    width = max(longest, 1) if width is None else width
    p_len = max(len(p) for p in prompts)
    num = len(rows)
    prompt_tokens = np.zeros((trees, p_len), np.int32)
    prompt_mask = np.zeros((trees, p_len), np.int32)
    for b, prompt in enumerate(prompts):
        prompt_tokens[b, p_len - len(prompt) :] = prompt
        prompt_mask[b, p_len - len(prompt) :] = 1
    response = np.zeros((num, width), np.int32)
    loss_mask = np.zeros((num, width), np.int32)
    token_node = np.full((num, width), -1, np.int32)
    advantages = np.zeros((num, width), np.float32)
    old = np.zeros((num, width), np.float32)
    ref = np.zeros((num, width), np.float32)
    for r, (b, path, row_advantage) in enumerate(rows):
        t = 0
        for n in path:
            node = forest[b][n]
            span = slice(t, t + len(node["tokens"]))
            response[r, span] = node["tokens"]
            loss_mask[r, span] = node["mask"]
            token_node[r, span] = n
            old[r, span], ref[r, span] = node["old"], node["ref"]
            advantages[r, span] = node["advantage"] if credit == "tree" else row_advantage
            t = span.stop
    advantages *= loss_mask
    batch = MiniBatchRows(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tree_index=np.array([b for b, _, _ in rows], np.int32),
        response=response,
        loss_mask=loss_mask,
        token_node=token_node,
        advantages=advantages,
        old_log_probs=old,
    )
    return batch, ref
