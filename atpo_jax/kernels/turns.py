"""Turn segmentation, per-turn reductions and exact token entropy.

A *turn* is one assistant generation inside a multi-turn agent response. In the padded training rows
(DESIGN.md §2) the policy-sampled tokens have ``loss_mask == 1`` and tool results, inserted text and
padding have ``loss_mask == 0``, so the turns of a row are the maximal runs of consecutive 1s of its
mask (ALGORITHM.md §4.2; golden behaviour §9.6).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from atpo_jax.kernels import native as _native
from atpo_jax.kernels._common import as_float, safe_divide


def turn_ids_from_mask(loss_mask: chex.Array) -> chex.Array:
    """Numbers the maximal runs of non-zero entries of each row: 0, 1, 2, ...; -1 elsewhere.

    Args:
      loss_mask: [S, L] bool/int/float mask; a non-zero entry marks a policy-sampled token.

    Returns:
      int32 [S, L]: ``turn_ids[s, t] = (number of runs of 1s in row s that start at or before t) - 1``
      where ``loss_mask[s, t] != 0`` and -1 where it is 0.

    Example: mask ``[0,1,1,0,0,1,0,1,1,1]`` -> ``[-1,0,0,-1,-1,1,-1,2,2,2]``, i.e. turns [1,3), [5,6),
    [7,10).
    """
    chex.assert_rank(loss_mask, 2)
    inside = jnp.asarray(loss_mask) != 0
    ids = jnp.cumsum(_run_starts(inside), axis=1, dtype=jnp.int32) - 1
    return jnp.where(inside, ids, -1)


def _run_starts(inside: chex.Array) -> chex.Array:
    """[S, L] bool: True where a run of ``inside`` begins (inside, and the previous token is not)."""
    return inside & ~jnp.pad(inside[:, :-1], ((0, 0), (1, 0)))


def _flat_segment_ids(turn_ids: chex.Array, num_turns: int) -> tuple[chex.Array, chex.Array]:
    """Maps (row, turn) to ``row * num_turns + turn``; out-of-range turns go to one extra bucket.

    Returns the flat ids [S*L] and the validity mask [S, L] (``0 <= turn_id < num_turns``).
    """
    rows = turn_ids.shape[0]
    valid = (turn_ids >= 0) & (turn_ids < num_turns)
    row_offset = num_turns * jnp.arange(rows, dtype=jnp.int32)[:, None]
    flat = jnp.where(valid, turn_ids + row_offset, rows * num_turns)
    return flat.reshape(-1), valid


def _segment_sums(values: chex.Array, flat_ids: chex.Array, num_segments: int) -> chex.Array:
    """Sum of ``values`` per flat segment id; entry ``num_segments`` is the discard bucket.

    Returns ``num_segments + 1`` sums. Callers zero the values of discarded tokens, so the bucket
    sums to 0.
    """
    return jax.ops.segment_sum(values.reshape(-1), flat_ids, num_segments=num_segments + 1)


def segment_mean(values: chex.Array, turn_ids: chex.Array, num_turns: int) -> chex.Array:
    """Per-turn mean of ``values``.

    Args:
      values: [S, L] float values (e.g. token entropies or log-ratios).
      turn_ids: [S, L] int turn index of each token, -1 for tokens outside every turn (as returned by
        :func:`turn_ids_from_mask`).
      num_turns: static int T, the number of turn slots to return. Turns with index >= T are not
        represented in the output.

    Returns:
      [S, T] float: ``out[s, k] = mean{values[s, t] : turn_ids[s, t] == k}``, and 0 for a turn with no
      tokens. Values at positions outside every turn never enter the result (even if NaN).
    """
    chex.assert_rank([values, turn_ids], 2)
    chex.assert_equal_shape([values, turn_ids])
    if int(num_turns) < 1:
        raise ValueError(f"segment_mean: num_turns must be a positive static int, got {num_turns}")
    num_turns = int(num_turns)
    values = as_float(values)
    rows = values.shape[0]
    flat, valid = _flat_segment_ids(jnp.asarray(turn_ids), num_turns)
    sums = _segment_sums(jnp.where(valid, values, 0), flat, rows * num_turns)
    counts = _segment_sums(valid.astype(values.dtype), flat, rows * num_turns)
    return safe_divide(sums, counts)[:-1].reshape(rows, num_turns)


def per_token_turn_mean(
    values: chex.Array, weights: chex.Array, turn_ids: chex.Array
) -> tuple[chex.Array, chex.Array]:
    """Weighted mean of ``values`` over each token's turn, broadcast back to the token.

    Args:
      values: [S, L] float.
      weights: [S, L] float token weights (the 0/1 loss mask); a token with weight 0 does not count.
      turn_ids: [S, L] int turn of each token in [0, L), -1 outside every turn.

    Returns:
      ``(mean, num_turns)``: [S, L] float with ``mean[s, t] = sum_{u in turn(s,t)} w_u v_u /
      sum_{u in turn(s,t)} w_u`` (0 outside turns and for weightless turns), and [S] int32 number of
      turns in each row that hold at least one weighted token.
    """
    rows, length = values.shape
    flat, valid = _flat_segment_ids(turn_ids, length)
    weights = jnp.where(valid, weights, 0)
    sums = _segment_sums(jnp.where(weights != 0, values * weights, 0), flat, rows * length)
    counts = _segment_sums(weights, flat, rows * length)
    turn_mean = safe_divide(sums, counts)
    # Gather each token's turn mean; the discard bucket (index rows*length) holds 0.
    per_token = turn_mean[flat].reshape(rows, length)
    turns_per_row = jnp.sum((counts[:-1] != 0).reshape(rows, length), axis=1, dtype=jnp.int32)
    return per_token, turns_per_row


# Tokens per scatter update in per_token_run_mean. Measured on XLA:CPU at the paper's scale
# (benchmarks/kernels.py): 4 beats 2 (twice the updates) and 8 (wider, sparser update rows).
_RUN_WINDOW = 4
# Block length of the matmul prefix count in _exclusive_cumsum_rows (0/1 counts: exact in f32).
_PREFIX_BLOCK = 64


def per_token_run_mean(
    values: chex.Array, mask: chex.Array, *, native: bool | None = None
) -> tuple[chex.Array, chex.Array]:
    """Mean of ``values`` over each token's run of non-zero ``mask``, broadcast back to the token.

    Same result as ``per_token_turn_mean(values, mask != 0, turn_ids_from_mask(mask))``, built for the
    ``turn_ids=None`` path of the turn losses, where runs are maximal and contiguous:

        mean[s, t] = (1 / (b - a)) * sum_{u in [a, b)} values[s, u]    for t in a run [a, b) of row s
        mean[s, t] = 0                                                  outside every run

    Values outside runs never enter a sum (NaN/inf there are harmless). On CPU this lowers to a
    hand-written XLA FFI kernel (:mod:`atpo_jax.kernels.native`: one streaming pass per row, sums in
    float64) when it could be built; elsewhere, or without a C++ compiler, to
    :func:`_windowed_run_mean` (pure JAX, the reference path). Differentiable in ``values``: the map is a symmetric
    averaging operator, so its vector-Jacobian product is the same run mean of the cotangent.

    Args:
      values: [S, L] float (bf16/f16 are computed in float32).
      mask: [S, L] bool/int/float; non-zero marks a token of a run.
      native: ``None`` follows ``ATPO_JAX_NATIVE`` (the native CPU kernel when it is available);
        ``False`` always traces the pure-JAX path; ``True`` requires the native kernel on CPU.

    Returns:
      ``(mean, num_runs)``: [S, L] float with each masked token's run mean (0 elsewhere) and [S] int32
      number of runs per row.
    """
    chex.assert_rank([values, mask], 2)
    chex.assert_equal_shape([values, mask])
    values = as_float(values)
    if values.size == 0:  # No rows or no tokens: nothing to average (and no run table to build).
        return jnp.zeros_like(values), jnp.zeros(values.shape[:1], jnp.int32)
    mask = jnp.asarray(mask)
    if mask.dtype not in _NATIVE_MASK_DTYPES:
        mask = mask != 0
    if native is None:
        use_native = _native.run_mean_available()
    elif native:
        if not _native.run_mean_available():
            raise _native.NativeBuildError(
                "per_token_run_mean(native=True): the native CPU kernel is unavailable "
                f"({_native.SWITCH_ENV}={_native.switch()})"
            )
        use_native = True
    else:
        use_native = False
    return _run_mean(values, mask, use_native)


# Mask dtypes the native kernel reads directly (others are converted to bool first).
_NATIVE_MASK_DTYPES = tuple(
    jnp.dtype(d)
    for d in (bool, jnp.int8, jnp.uint8, jnp.int32, jnp.int64, jnp.float32, jnp.float64)
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _run_mean(
    values: chex.Array, mask: chex.Array, use_native: bool
) -> tuple[chex.Array, chex.Array]:
    if use_native:
        # Resolved when lowering: CPU gets the FFI kernel, other platforms the pure-JAX path.
        return lax.platform_dependent(
            values, mask, cpu=_native_run_mean, default=_windowed_run_mean
        )
    return _windowed_run_mean(values, mask)


def _run_mean_fwd(values, mask, use_native):
    return _run_mean(values, mask, use_native), mask


def _run_mean_bwd(use_native, mask, cotangents):
    mean_cotangent, _ = cotangents
    # mean = M @ values with M[i, j] = 1/|run| when i and j share a run: M is symmetric.
    values_cotangent, _ = _run_mean(mean_cotangent, mask, use_native)
    return values_cotangent, None


_run_mean.defvjp(_run_mean_fwd, _run_mean_bwd)


def _native_run_mean(values: chex.Array, mask: chex.Array) -> tuple[chex.Array, chex.Array]:
    """The CPU FFI kernel (``native/run_mean.cc``); any leading axes, the last one is L."""
    call = jax.ffi.ffi_call(
        _native.RUN_MEAN_TARGET,
        (
            jax.ShapeDtypeStruct(values.shape, values.dtype),
            jax.ShapeDtypeStruct(values.shape[:-1], jnp.int32),
        ),
        # The kernel treats every leading axis as rows, so a vmapped call is one bigger call.
        vmap_method="broadcast_all",
    )
    return call(values, mask)


def _windowed_run_mean(values: chex.Array, mask: chex.Array) -> tuple[chex.Array, chex.Array]:
    """Pure-JAX :func:`per_token_run_mean` for [S, L] float values (GPU/TPU, or CPU without the kernel).

    A per-token scatter and a per-token prefix count dominate the obvious formulation on CPU, so this
    version works on windows of W = 4 tokens instead:

    * A window holds at most ``1 + ceil(W/2) = 3`` runs: the one continuing from the previous window
      (slot 0) and up to two starting inside it (slots 1, 2). A token's slot is the number of run
      starts at or before it within the window.
    * With ``base`` = the number of runs started before the window (an exclusive prefix count over
      windows), slot q of the window holds run ``base + q - 1``: the slots' runs are consecutive, so
      the window adds its three (sum, count) pairs to a per-row run table with ONE scatter of a
      contiguous 6-wide slice at ``base`` (a quarter of the updates, no per-token index array).
    * Each token reads its run's mean at ``base + slot``; sums are plain float additions in each
      run's own tokens, as with a segment sum (no prefix-sum differences, no cancellation).
    """
    rows, length = values.shape
    window = _RUN_WINDOW
    slots = 1 + (window + 1) // 2
    num_windows = -(-length // window)
    pad = ((0, 0), (0, num_windows * window - length))
    inside = jnp.asarray(mask) != 0
    starts = _run_starts(inside)

    def windowed(x):
        return jnp.pad(x, pad).reshape(rows, num_windows, window)

    x, inside_w, starts_w = (
        windowed(jnp.where(inside, values, 0)),
        windowed(inside),
        windowed(starts),
    )
    # slot[j] = number of run starts at positions <= j of the window; `slots` marks tokens outside
    # every run. Unrolled over the W columns: XLA:CPU reduces a tiny minor axis far slower.
    starts_so_far = [starts_w[..., 0].astype(jnp.int32)]
    for j in range(1, window):
        starts_so_far.append(starts_so_far[-1] + starts_w[..., j])
    slot = jnp.where(inside_w, jnp.stack(starts_so_far, axis=-1), slots).astype(jnp.int8)
    slot_cols = [slot[..., j] for j in range(window)]
    base = _exclusive_cumsum_rows(starts_so_far[-1])
    # Table entry base + q (per row) holds run base + q - 1; entries per row cover every run id + 1.
    row_stride = (length + 1) // 2 + slots
    partials = []
    for q in range(slots):
        in_slot = [column == q for column in slot_cols]
        partials.append(sum(jnp.where(in_slot[j], x[..., j], 0) for j in range(window)))
        partials.append(sum(in_slot[j].astype(values.dtype) for j in range(window)))
    updates = jnp.stack(partials, axis=-1).reshape(rows * num_windows, 2 * slots)
    entry = base + row_stride * jnp.arange(rows, dtype=jnp.int32)[:, None]
    table = lax.scatter_add(
        jnp.zeros((2 * rows * row_stride,), values.dtype),
        (2 * entry).reshape(-1, 1),
        updates,
        lax.ScatterDimensionNumbers(
            update_window_dims=(1,), inserted_window_dims=(), scatter_dims_to_operand_dims=(0,)
        ),
        indices_are_sorted=True,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    run_mean = safe_divide(table[0::2], table[1::2])
    window_means = lax.gather(
        run_mean,
        entry.reshape(-1, 1),
        lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(), start_index_map=(0,)),
        slice_sizes=(slots,),
        indices_are_sorted=True,
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    ).reshape(rows, num_windows, slots)
    mean = jnp.zeros_like(x)
    for q in range(slots):
        mean = jnp.where(slot == q, window_means[..., q : q + 1], mean)
    mean = mean.reshape(rows, num_windows * window)[:, :length]
    num_runs = base[:, -1] + starts_so_far[-1][:, -1]
    return mean, num_runs


def _exclusive_cumsum_rows(counts: chex.Array) -> chex.Array:
    """Exclusive prefix sum along axis 1 of a small non-negative int32 [S, N] array.

    XLA:CPU's cumsum is a slow sequential loop; a block-triangular matmul (0/1-weighted integer
    sums, exact in float32 up to 2^24, computed at HIGHEST precision so TPU/GPU do not round them)
    plus a cumsum over the few block totals is several times faster and exact.
    """
    rows, n = counts.shape
    block = min(_PREFIX_BLOCK, n)
    num_blocks = -(-n // block)
    x = jnp.pad(counts, ((0, 0), (0, num_blocks * block - n))).astype(jnp.float32)
    x = x.reshape(rows, num_blocks, block)
    strictly_before = jnp.triu(jnp.ones((block, block), jnp.float32), k=1)
    within = jnp.einsum("snb,bc->snc", x, strictly_before, precision=lax.Precision.HIGHEST)
    totals = jnp.sum(x, axis=2)
    before_block = jnp.cumsum(totals, axis=1) - totals
    out = (within + before_block[:, :, None]).reshape(rows, num_blocks * block)[:, :n]
    return out.astype(jnp.int32)


def token_entropy(logits: chex.Array) -> chex.Array:
    """Exact entropy (nats) of ``softmax(logits)`` along the last axis.

    Args:
      logits: [..., V] float logits; ``-inf`` entries (masked vocabulary) are allowed.

    Returns:
      [...] float32 ``H = -sum_v p_v log p_v`` with ``p = softmax(logits)``; terms with ``p_v = 0``
      contribute 0, so masked vocabulary entries never produce NaN.
    """
    logits = as_float(logits)
    if logits.ndim < 1:
        raise ValueError("token_entropy: logits must have a trailing vocabulary axis [..., V]")
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    log_p = jnp.where(jnp.isneginf(logits), -jnp.inf, logits - log_norm)
    p = jnp.exp(log_p)
    return -jnp.sum(jnp.where(p > 0, p * log_p, 0), axis=-1)
