"""Packed training batches: each leaf row's tokens computed without padding, each shared prefix once.

Three layouts of a mini-batch's leaf rows (``train.packing``):

* ``padded`` — the reference layout: one row per leaf, the prompt left-padded to
  ``rollout.max_prompt_len`` and the response right-padded to ``rollout.max_response_len``
  (``policy.PolicyRows``).
* ``rows`` — every row (its prompt, then its response) packed end to end into sequences of
  ``train.micro_batch_tokens`` tokens, longest first (first-fit decreasing): no padding but the
  tail of each sequence.
* ``tree`` — every tree packed as one *piece*: its prompt, then each node's tokens once, in
  depth-first order (a node after its parent, every subtree contiguous). A tree longer than the
  budget is cut into pieces of whole leaves (leaves in depth-first order, as many as fit), so the
  nodes two pieces share are computed once per piece. Pieces are packed into sequences like rows.

In a packed sequence token ``j`` is seen by the queries ``j .. visible_end[j]`` (its own node's
later tokens and its node's descendants, i.e. ``visible_end[j]`` = the last position of its node's
subtree in this piece; for ``rows`` the end of its row); ``positions[j]`` is its index in its
root-to-node sequence (what the unpacked row gives it), and ``predictor[j]`` is the packed
position whose hidden state predicts it (the previous token in its own row: the previous token of
its node, or the last token of its parent, or the last prompt token), -1 for tokens no row scores.

A micro-batch is ``S`` sequences (one per batch device: ``micro_batch_tokens`` is a per-device
budget) of ``T`` tokens and the ``Rm`` leaf rows whose tokens they hold, in the row layout the loss
kernels take ([Rm, R] loss mask, advantages, old/reference log-probs) with ``row_index`` [Rm, R]
mapping each row token to its flat packed position (``s * T + j``). The policy's log-probs are
computed at the packed positions and gathered into the rows, so the loss is the per-leaf-row loss
itself, term by term, and a shared token's gradient is the sum of its rows' contributions.

Shapes are bucketed so a run compiles few programs: ``T`` is the budget (or the budget times a
power of two for a single row longer than it) and ``Rm`` the mini-batch's rows (rounded up to a
multiple of the sequences), whatever share of them a micro-batch holds: the [Rm, R] loss arrays
are small next to the model's work, and a fixed ``Rm`` leaves one program per ``T``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from flax import struct

from atpo_jax.settings import StrEnum


class Packing(StrEnum):
    PADDED = "padded"  # one padded row per leaf (the reference layout)
    ROWS = "rows"  # rows end to end, no padding
    TREE = "tree"  # each tree's nodes once (the default)


@struct.dataclass
class PackedBatch:
    """One micro-batch of packed sequences and the leaf rows they hold (see the module doc).

    ``tokens``, ``positions``, ``visible_end``, ``predictor`` [S, T] int32; ``row_index``
    [Rm, R] int32 (flat ``s * T + j``, -1 for row padding); ``loss_mask`` [Rm, R] int32;
    ``advantages``, ``old_log_probs``, ``ref_log_probs`` [Rm, R] float32.
    """

    tokens: np.ndarray
    positions: np.ndarray
    visible_end: np.ndarray
    predictor: np.ndarray
    row_index: np.ndarray
    loss_mask: np.ndarray
    advantages: np.ndarray
    old_log_probs: np.ndarray
    ref_log_probs: np.ndarray

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        """(S, T, Rm, R): what the compiled programs depend on."""
        return (*self.tokens.shape, *self.row_index.shape)


@dataclasses.dataclass(frozen=True)
class MiniBatchRows:
    """A mini-batch's leaf rows as the rollout gives them (NumPy).

    ``prompt_tokens`` / ``prompt_mask`` [trees, P] (prompts left-padded), ``tree_index`` [rows]
    (the row's prompt), ``response`` / ``loss_mask`` / ``token_node`` [rows, R] (``token_node``:
    the node owning each token, numbered within the row's tree, -1 on padding), ``advantages``
    and ``old_log_probs`` [rows, R].
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tree_index: np.ndarray
    response: np.ndarray
    loss_mask: np.ndarray
    token_node: np.ndarray
    advantages: np.ndarray
    old_log_probs: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.response.shape[0]

    def row_lengths(self) -> np.ndarray:
        """[rows] response tokens of each row (its owned tokens; padding excluded)."""
        return np.sum(self.token_node >= 0, axis=1)

    def real_tokens(self) -> int:
        """Tokens of the per-leaf rows without padding: each row's prompt plus its response."""
        return real_tokens(self.prompt_mask, self.tree_index, self.token_node)


def real_tokens(prompt_mask: np.ndarray, tree_index: np.ndarray, token_node: np.ndarray) -> int:
    """Prompt plus response tokens of every leaf row, without padding (``prompt_mask`` [trees, P],
    ``tree_index`` [rows], ``token_node`` [rows, R] with -1 on padding)."""
    prompts = np.sum(np.asarray(prompt_mask) != 0, axis=1)[np.asarray(tree_index)]
    return int(np.sum(prompts) + np.sum(np.asarray(token_node) >= 0))


@dataclasses.dataclass
class _Node:
    tokens: np.ndarray
    loss_mask: np.ndarray


@dataclasses.dataclass
class _Piece:
    """A forest fragment: a prompt and the nodes of some leaf rows, laid out depth-first."""

    rows: list[int]  # mini-batch row indices, in layout order
    length: int
    tokens: np.ndarray
    positions: np.ndarray
    visible_end: np.ndarray  # relative to the piece start
    predictor: np.ndarray  # relative to the piece start, -1 = not scored
    row_positions: list[np.ndarray]  # per row: piece-relative position of each response token


def _row_path(batch: MiniBatchRows, r: int) -> list[tuple[int, int, int]]:
    """The nodes of row ``r`` as (node, start, stop) spans of its response, root first."""
    owner = batch.token_node[r]
    length = int(np.sum(owner >= 0))
    if np.any(owner[length:] >= 0) or np.any(owner[:length] < 0):
        raise ValueError(f"row {r}: token_node must hold its tokens first, then -1 padding")
    cuts = [0, *(np.flatnonzero(np.diff(owner[:length]) != 0) + 1).tolist(), length]
    return [(int(owner[a]), a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def _prompt(batch: MiniBatchRows, tree: int) -> np.ndarray:
    mask = np.asarray(batch.prompt_mask[tree]) != 0
    tokens = np.asarray(batch.prompt_tokens[tree])[mask]
    if tokens.size == 0:
        raise ValueError(f"tree {tree} has an empty prompt: a response needs a token to follow")
    return tokens


def _build_piece(batch: MiniBatchRows, tree: int, rows: Sequence[int], paths) -> _Piece:
    """Lays out the prompt of ``tree`` and the nodes of ``rows`` (same tree) depth-first."""
    prompt = _prompt(batch, tree)
    p = len(prompt)
    # Prompt tokens are never scored (no row trains on them): predictor -1.
    tokens, positions, predictor = [prompt], [np.arange(p)], [np.full(p, -1)]
    start_of: dict[int, int] = {}  # node -> piece position of its first token
    depth_of: dict[int, int] = {}  # node -> rotary position of its first token
    last_of: dict[int, int] = {}  # node -> piece position of the last token before its end
    subtree_end: dict[int, int] = {}
    cursor = p
    row_positions = []
    for r in rows:
        context_last, context_depth, offsets = p - 1, p, []
        for node, a, b in paths[r]:
            n = b - a
            if node not in start_of:
                seen = batch.response[r, a:b]
                tokens.append(np.asarray(seen))
                positions.append(context_depth + np.arange(n))
                predictor.append(np.concatenate([[context_last], cursor + np.arange(n - 1)]))
                start_of[node], depth_of[node] = cursor, context_depth
                last_of[node] = cursor + n - 1
                cursor += n
            elif depth_of[node] != context_depth:
                raise ValueError(f"row {r}: node {node} sits at two depths (not a tree)")
            offsets.append(start_of[node] + np.arange(n))
            context_last, context_depth = last_of[node], context_depth + n
        row_positions.append(
            np.concatenate(offsets).astype(np.int32) if offsets else np.zeros(0, np.int32)
        )
        for node, _, _ in paths[r]:
            subtree_end[node] = cursor - 1
    visible_end = np.full(cursor, cursor - 1, np.int64)  # the prompt: the whole piece
    for node, start in start_of.items():
        visible_end[start : last_of[node] + 1] = subtree_end[node]
    return _Piece(
        rows=list(rows),
        length=cursor,
        tokens=np.concatenate(tokens).astype(np.int32),
        positions=np.concatenate(positions).astype(np.int32),
        visible_end=visible_end.astype(np.int32),
        predictor=np.concatenate(predictor).astype(np.int32),
        row_positions=row_positions,
    )


def _pieces(batch: MiniBatchRows, packing: Packing, budget: int) -> list[_Piece]:
    paths = [_row_path(batch, r) for r in range(batch.num_rows)]
    if packing == Packing.ROWS:
        return [
            _build_piece(batch, int(batch.tree_index[r]), [r], paths) for r in range(batch.num_rows)
        ]
    pieces = []
    for tree in np.unique(batch.tree_index):
        # Leaves in depth-first order: rows sharing a prefix are neighbours, so a greedy cut into
        # pieces that fit the budget keeps shared nodes together.
        rows = sorted(
            np.flatnonzero(batch.tree_index == tree), key=lambda r: [n for n, *_ in paths[r]]
        )
        p = len(_prompt(batch, int(tree)))
        group: list[int] = []
        nodes: dict[int, int] = {}
        for r in rows:
            extra = {n: b - a for n, a, b in paths[r] if n not in nodes}
            if group and p + sum(nodes.values()) + sum(extra.values()) > budget:
                pieces.append(_build_piece(batch, int(tree), group, paths))
                group, nodes = [], {}
                extra = {n: b - a for n, a, b in paths[r]}
            group.append(int(r))
            nodes.update(extra)
        pieces.append(_build_piece(batch, int(tree), group, paths))
    return pieces


def _sequence_length(length: int, budget: int) -> int:
    """The bucketed length of a sequence holding ``length`` tokens: the budget, or the budget
    times the smallest power of two that fits (a single row longer than the budget)."""
    size = budget
    while size < length:
        size *= 2
    return size


def _bins(pieces: list[_Piece], budget: int) -> list[list[_Piece]]:
    """First-fit decreasing: pieces, longest first, into sequences of ``budget`` tokens (a piece
    longer than the budget gets a sequence of its own)."""
    order = sorted(range(len(pieces)), key=lambda i: (-pieces[i].length, i))
    bins: list[list[_Piece]] = []
    used: list[int] = []
    for i in order:
        piece = pieces[i]
        for b, filled in enumerate(used):
            if filled + piece.length <= budget:
                bins[b].append(piece)
                used[b] += piece.length
                break
        else:
            bins.append([piece])
            used.append(piece.length)
    return bins


@dataclasses.dataclass
class PackedMiniBatch:
    """A mini-batch's micro-batches and what they cost.

    Attributes:
      micro: the micro-batches (NumPy), longest sequences first.
      real_tokens: tokens of the per-leaf rows without padding (prompt + response per row).
      placed_tokens: positions of the packed sequences holding a token (the rest is padding).
      row_ids: per micro-batch, the mini-batch row held by each of its first rows (the rest of
        its ``Rm`` rows are empty).
    """

    micro: list[PackedBatch]
    real_tokens: int
    placed_tokens: int
    row_ids: list[np.ndarray]

    def rows_layout(self, values: np.ndarray) -> list[np.ndarray]:
        """Per micro-batch, [Rm, R] ``values`` ([rows, R] of the mini-batch) of its rows."""
        out = []
        for m, ids in zip(self.micro, self.row_ids, strict=True):
            x = np.zeros(m.row_index.shape, np.asarray(values).dtype)
            x[: len(ids)] = np.asarray(values)[ids]
            out.append(x)
        return out

    @property
    def computed_tokens(self) -> int:
        """Positions the model runs over (padding included)."""
        return int(sum(m.tokens.size for m in self.micro))


def pack_mini_batch(
    batch: MiniBatchRows,
    packing: Packing | str,
    *,
    budget: int,
    sequences: int = 1,
    pad_id: int = 0,
) -> PackedMiniBatch:
    """The micro-batches of one mini-batch in a packed layout.

    Args:
      batch: the mini-batch's rows.
      packing: ``rows`` or ``tree``.
      budget: ``train.micro_batch_tokens``, tokens per sequence (per device).
      sequences: sequences per micro-batch (the batch devices of this process).
      pad_id: token id of the padding at the end of a sequence.

    Returns:
      The micro-batches (:class:`PackedMiniBatch`); every row of ``batch`` is in exactly one.
    """
    packing = Packing.parse(packing, "train.packing")
    if packing == Packing.PADDED:
        raise ValueError("pack_mini_batch packs rows or trees; padded rows are policy.policy_rows")
    if budget < 1 or sequences < 1:
        raise ValueError(
            f"train.micro_batch_tokens={budget} and sequences={sequences} must be >= 1"
        )
    pieces = _pieces(batch, packing, budget)
    bins = _bins(pieces, budget)
    bins.sort(key=lambda members: -sum(p.length for p in members))
    while len(bins) % sequences:
        bins.append([])
    micro, row_ids = [], []
    width = batch.response.shape[1]
    for first in range(0, len(bins), sequences):
        group = bins[first : first + sequences]
        t = max(_sequence_length(sum(p.length for p in members), budget) for members in group)
        tokens = np.full((sequences, t), pad_id, np.int32)
        positions = np.zeros((sequences, t), np.int32)
        # Padding sees only itself, and predicts nothing.
        visible_end = np.broadcast_to(np.arange(t, dtype=np.int32), (sequences, t)).copy()
        predictor = np.full((sequences, t), -1, np.int32)
        rows, row_positions = [], []
        for s, members in enumerate(group):
            offset = 0
            for piece in members:
                span = slice(offset, offset + piece.length)
                tokens[s, span] = piece.tokens
                positions[s, span] = piece.positions
                visible_end[s, span] = piece.visible_end + offset
                predictor[s, span] = np.where(piece.predictor >= 0, piece.predictor + offset, -1)
                rows.extend(piece.rows)
                row_positions.extend(s * t + offset + q for q in piece.row_positions)
                offset += piece.length
        num_rows = -(-batch.num_rows // sequences) * sequences
        row_index = np.full((num_rows, width), -1, np.int32)
        for i, flat in enumerate(row_positions):
            row_index[i, : len(flat)] = flat
        take = np.asarray(rows, np.int64)
        row_ids.append(take)

        def rows_of(x: np.ndarray, dtype, take=take, num_rows=num_rows) -> np.ndarray:
            out = np.zeros((num_rows, width), dtype)
            out[: len(take)] = np.asarray(x)[take]
            return out

        loss_mask = rows_of(batch.loss_mask, np.int32)
        loss_mask[row_index < 0] = 0
        micro.append(
            PackedBatch(
                tokens=tokens,
                positions=positions,
                visible_end=visible_end,
                predictor=predictor,
                row_index=row_index,
                loss_mask=loss_mask,
                advantages=rows_of(batch.advantages, np.float32),
                old_log_probs=rows_of(batch.old_log_probs, np.float32),
                ref_log_probs=np.zeros((num_rows, width), np.float32),
            )
        )
    return PackedMiniBatch(
        micro=micro,
        real_tokens=batch.real_tokens(),
        placed_tokens=int(sum(p.length for p in pieces)),
        row_ids=row_ids,
    )


def resized(batch: PackedBatch, length: int, rows: int, pad_id: int = 0) -> PackedBatch:
    """``batch`` with its sequences padded to ``length`` tokens and its rows to ``rows`` (the
    shapes every process agrees on in a multi-process run)."""
    s, t = batch.tokens.shape
    if length < t or rows < batch.row_index.shape[0]:
        raise ValueError(f"cannot shrink a micro-batch {batch.shape_key} to ({length}, {rows})")
    extra, more = length - t, rows - batch.row_index.shape[0]
    tail = np.broadcast_to(np.arange(t, length, dtype=np.int32), (s, extra))
    flat = batch.row_index
    row_index = np.where(flat >= 0, (flat // t) * length + flat % t, -1).astype(np.int32)

    def rows_of(x: np.ndarray, fill) -> np.ndarray:
        return np.concatenate([x, np.full((more, x.shape[1]), fill, x.dtype)])

    return PackedBatch(
        tokens=np.concatenate([batch.tokens, np.full((s, extra), pad_id, np.int32)], axis=1),
        positions=np.concatenate([batch.positions, np.zeros((s, extra), np.int32)], axis=1),
        visible_end=np.concatenate([batch.visible_end, tail], axis=1),
        predictor=np.concatenate([batch.predictor, np.full((s, extra), -1, np.int32)], axis=1),
        row_index=rows_of(row_index, -1),
        loss_mask=rows_of(batch.loss_mask, 0),
        advantages=rows_of(batch.advantages, 0),
        old_log_probs=rows_of(batch.old_log_probs, 0),
        ref_log_probs=rows_of(batch.ref_log_probs, 0),
    )


def empty_batch(sequences: int, length: int, rows: int, width: int, pad_id: int = 0) -> PackedBatch:
    """A micro-batch of padding and empty rows (a process with fewer micro-batches than another
    runs these, so every process calls the programs equally often)."""
    zeros = np.zeros((rows, width), np.float32)
    return PackedBatch(
        tokens=np.full((sequences, length), pad_id, np.int32),
        positions=np.zeros((sequences, length), np.int32),
        visible_end=np.broadcast_to(np.arange(length, dtype=np.int32), (sequences, length)).copy(),
        predictor=np.full((sequences, length), -1, np.int32),
        row_index=np.full((rows, width), -1, np.int32),
        loss_mask=np.zeros((rows, width), np.int32),
        advantages=zeros,
        old_log_probs=zeros,
        ref_log_probs=zeros,
    )


def align_processes(
    micro: Sequence[PackedBatch],
    shapes: Sequence[Sequence[tuple[int, int, int, int]]],
    *,
    block: int,
    pad_id: int = 0,
) -> list[PackedBatch]:
    """This process's micro-batches made to line up with every other's: as many micro-batches
    (empty ones appended), each padded to the largest ``T`` and ``Rm`` any process has at that
    index (``shapes``: every process's ``shape_key`` list), and ``row_index`` shifted to this
    process's block of the global sequences (block ``block`` of ``S`` sequences each)."""
    count = max(len(x) for x in shapes)
    out = []
    width = micro[0].row_index.shape[1] if micro else max(x[0][3] for x in shapes if x)
    for i in range(count):
        present = [x[i] for x in shapes if len(x) > i]
        s = present[0][0]
        length = max(x[1] for x in present)
        rows = max(x[2] for x in present)
        if i < len(micro):
            batch = resized(micro[i], length, rows, pad_id)
        else:
            batch = empty_batch(s, length, rows, width, pad_id)
        offset = block * s * length
        batch = batch.replace(
            row_index=np.where(batch.row_index >= 0, batch.row_index + offset, -1).astype(np.int32)
        )
        out.append(batch)
    return out
