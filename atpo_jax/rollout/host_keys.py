"""PRNG keys derived on the host: ``jax.random.fold_in`` for the default Threefry keys, in Python.

The tree search derives one key per chain turn (``fold_in`` of the tree's key by phase, chain
ordinal and turn). Done with ``jax.random.fold_in`` each derivation is an eager device dispatch
(about 0.3 ms on CPU): ~900 of them per rollout of the tiny run were 22% of its rollout wall time.
Here a key is its raw key data, a ``uint32`` array of shape [2], and :func:`fold_in` computes the
same Threefry-2x32 function JAX's default implementation runs (Salmon et al., "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; 20 rounds, the rotation constants of ``jax._src.prng``), so

    fold_in(key_data(k), d) == jax.random.key_data(jax.random.fold_in(k, d))

bit for bit (tested against JAX for random keys and data). Keys reach the device as a stacked
[batch, 2] ``uint32`` array and are re-wrapped there (``jax.random.wrap_key_data``).

Where the default PRNG implementation is not ``threefry2x32`` (``jax_default_prng_impl``), the
functions fall back to JAX's own ``fold_in`` (same results, eager speed).

Example::

    >>> k = key_data(jax.random.key(0))
    >>> bool((fold_in(k, 7) == jax.random.key_data(jax.random.fold_in(jax.random.key(0), 7))).all())
    True
"""

from __future__ import annotations

import jax
import numpy as np

_MASK = 0xFFFFFFFF
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA  # Threefry's key-schedule constant


def _rotate_left(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def threefry2x32(key: tuple[int, int], count: tuple[int, int]) -> tuple[int, int]:
    """Threefry-2x32 (20 rounds) of one counter pair under one key pair, on Python ints.

    Args:
      key: (k0, k1), each in [0, 2**32).
      count: (x0, x1), each in [0, 2**32).

    Returns:
      (y0, y1), each in [0, 2**32): what ``jax.random``'s ``threefry2x32`` primitive returns for
      scalar inputs.
    """
    k0, k1 = key
    schedule = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = (count[0] + schedule[0]) & _MASK
    x1 = (count[1] + schedule[1]) & _MASK
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = (x0 + x1) & _MASK
            x1 = _rotate_left(x1, r) ^ x0
        x0 = (x0 + schedule[(group + 1) % 3]) & _MASK
        x1 = (x1 + schedule[(group + 2) % 3] + group + 1) & _MASK
    return x0, x1


def host_threefry() -> bool:
    """Whether keys are derived on the host (the default PRNG implementation is Threefry)."""
    return jax.config.jax_default_prng_impl == "threefry2x32"


def key_data(key) -> np.ndarray:
    """The raw ``uint32`` data of a typed key (``jax.random.key``), a legacy ``uint32`` key, or
    key data already on the host (returned as is)."""
    if isinstance(key, np.ndarray) and key.dtype == np.uint32:
        return key
    return np.asarray(jax.random.key_data(key), np.uint32)


def fold_in(key: np.ndarray, data: int) -> np.ndarray:
    """``jax.random.fold_in`` on raw key data: [2] ``uint32`` (Threefry) -> [2] ``uint32``.

    Args:
      key: the key's data (:func:`key_data`).
      data: an integer in [0, 2**32) (what ``jax.random.fold_in`` accepts as ``uint32``).
    """
    data = int(data)
    if not 0 <= data <= _MASK:
        raise ValueError(f"fold_in: data {data} is outside [0, 2**32)")
    if not host_threefry():
        folded = jax.random.fold_in(jax.random.wrap_key_data(key), data)
        return np.asarray(jax.random.key_data(folded), np.uint32)
    if key.shape != (2,):
        raise ValueError(f"fold_in: Threefry key data has shape (2,), got {key.shape}")
    # fold_in(k, d) = threefry2x32(k, threefry_seed(d)) with threefry_seed(d) = (0, d) for uint32 d.
    y0, y1 = threefry2x32((int(key[0]), int(key[1])), (0, data))
    return np.array([y0, y1], np.uint32)


def fold_in_path(key: np.ndarray, *path: int) -> np.ndarray:
    """``fold_in`` by each element of ``path`` in turn."""
    for data in path:
        key = fold_in(key, data)
    return key
