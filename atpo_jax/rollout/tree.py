"""Host-side tree of turns built by the tree search (DESIGN.md §2, ALGORITHM.md §2).

A node is one turn: the observation that precedes it (tool-result tokens, loss mask 0) followed by
the assistant's generation (loss mask 1; a call-limit warning inside it has mask 0). The root is the
prompt and generates nothing. The tokens of the nodes on a root-to-leaf path tile that leaf's
response exactly. Nodes are numbered in creation order, so ``parent < index`` always holds.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Node:
    """One turn of the tree.

    Attributes:
      index: creation index within the tree (0 = root).
      parent: parent index (-1 for the root).
      depth: number of tool results on the path from the root (initial turns have depth 0).
      obs_len: how many of ``tokens`` are the observation that starts the node.
      tokens: the node's span of the response (observation + generation), in order.
      loss_mask: 1 for tokens the policy sampled, 0 for observation / inserted text.
      log_probs: sampler log-prob per token (0 where the mask is 0).
      entropies: sampler entropy per token (0 where the mask is 0).
      calls_at_start: tool calls made on the path before this turn (restored by a branch).
      calls_made: tool calls made on the path up to and including this turn.
      is_leaf: the chain ended at this node (answer, EOS, truncation, failure).
      finish: why the node's turn ended: ``tool`` (successful call; the node has a child), ``eos``,
        ``stop`` (a stop token), ``length``, ``tool_failure``, ``empty_call``, ``no_room``.
      entropy: the node's branching signal (set when its turn ends).
      start: where the node's tokens begin in its row's response (its parent's end).
      query, query_tag: the tool input and tag of the call that ended the turn, if any.
      piece_start: index in ``tokens`` where the current generation piece starts (after the last
        inserted text); the tool call is parsed from this piece only.
      branch_of: for an expansion branch, the node whose turn it re-samples.
    """

    index: int
    parent: int
    depth: int
    obs_len: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    log_probs: list[float] = dataclasses.field(default_factory=list)
    entropies: list[float] = dataclasses.field(default_factory=list)
    calls_at_start: int = 0
    calls_made: int = 0
    is_leaf: bool = False
    finish: str = ""
    entropy: float = 0.0
    start: int = 0
    query: str | None = None
    query_tag: str | None = None
    piece_start: int = 0
    branch_of: int | None = None

    def append(self, tokens, mask: int, log_probs=None, entropies=None) -> None:
        tokens = [int(t) for t in tokens]
        self.tokens += tokens
        self.loss_mask += [mask] * len(tokens)
        zeros = [0.0] * len(tokens)
        self.log_probs += list(log_probs) if log_probs is not None else zeros
        self.entropies += list(entropies) if entropies is not None else zeros

    @property
    def generated(self) -> int:
        """Number of policy-sampled tokens in the node."""
        return int(sum(self.loss_mask))

    @property
    def end(self) -> int:
        """Where the node's tokens end in its row's response: the row's length so far."""
        return self.start + len(self.tokens)


@dataclasses.dataclass
class Tree:
    """All turns grown from one prompt."""

    tree_id: int
    prompt: list[int]
    nodes: list[Node] = dataclasses.field(default_factory=list)
    # Expansion bookkeeping for traces and metrics: per round, the picked node indices and scores.
    picks: list[list[int]] = dataclasses.field(default_factory=list)
    scores: list[dict[int, float]] = dataclasses.field(default_factory=list)
    round_sizes: list[int] = dataclasses.field(default_factory=list)  # nodes when each round picked

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes.append(Node(index=0, parent=-1, depth=0))

    @property
    def root(self) -> Node:
        return self.nodes[0]

    def add_child(self, parent: int, **fields) -> Node:
        node = Node(index=len(self.nodes), parent=parent, **fields)
        self.nodes.append(node)
        return node

    def children(self, index: int) -> list[int]:
        return [n.index for n in self.nodes if n.parent == index]

    def bfs_order(self) -> list[int]:
        """Node indices in BFS order (children in creation order), the reference's leaf order."""
        kids: dict[int, list[int]] = {}
        for node in self.nodes[1:]:
            kids.setdefault(node.parent, []).append(node.index)
        order, queue = [], [0]
        while queue:
            index = queue.pop(0)
            order.append(index)
            queue.extend(kids.get(index, []))
        return order

    def leaves(self) -> list[int]:
        """Leaf indices in BFS order."""
        return [i for i in self.bfs_order() if self.nodes[i].is_leaf]

    def path(self, index: int) -> list[int]:
        """Node indices from the first turn below the root down to ``index``."""
        path = []
        while index > 0:
            path.append(index)
            index = self.nodes[index].parent
        return path[::-1]

    def response_length(self, index: int) -> int:
        """Response tokens of the row that ends at node ``index`` so far."""
        return self.nodes[index].end

    def remove_leaf(self, index: int) -> None:
        """Removes a leaf and then every ancestor left without children (never the root).

        Removed nodes are kept as tombstones (``parent = -2``) so indices stay stable; the batch
        builder renumbers the surviving nodes.
        """
        while index > 0 and not self.children(index):
            parent = self.nodes[index].parent
            self.nodes[index].parent = -2
            self.nodes[index].is_leaf = False
            index = parent

    def live_nodes(self) -> list[int]:
        return [n.index for n in self.nodes if n.parent != -2]


def fix_leaf_count(tree: Tree, target: int, rng: np.random.Generator) -> None:
    """Prunes or duplicates leaves so the tree has exactly ``target`` (ALGORITHM.md §2.6).

    More leaves: a random sample of ``target`` leaves is kept; each other leaf is removed with its
    ancestors that are left childless. Fewer: copies of the last BFS leaf are added under that leaf's
    parent (same tokens, mask and entropy) until the count matches.
    """
    leaves = tree.leaves()
    if len(leaves) > target:
        keep = set(rng.choice(leaves, size=target, replace=False).tolist())
        for leaf in leaves:
            if leaf not in keep:
                tree.remove_leaf(leaf)
    while len(leaves) < target:
        last = tree.nodes[tree.leaves()[-1]]
        copy = dataclasses.replace(
            last,
            index=len(tree.nodes),
            tokens=list(last.tokens),
            loss_mask=list(last.loss_mask),
            log_probs=list(last.log_probs),
            entropies=list(last.entropies),
        )
        tree.nodes.append(copy)
        leaves.append(copy.index)
