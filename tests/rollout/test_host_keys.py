"""Host-side key derivation equals jax.random.fold_in bit for bit."""

import jax
import numpy as np
import pytest

from atpo_jax.rollout import host_keys


def test_fold_in_equals_jax_for_random_keys_and_data():
    rng = np.random.default_rng(0)
    seeds = [0, 1, 7, 2**31 - 1, *rng.integers(0, 2**31, 6).tolist()]
    data = [0, 1, 5, 2**31 - 3, 2**32 - 1, *rng.integers(0, 2**32, 6).tolist()]
    for seed in seeds:
        key = jax.random.key(seed)
        for d in data:
            expected = np.asarray(jax.random.key_data(jax.random.fold_in(key, d)))
            got = host_keys.fold_in(host_keys.key_data(key), d)
            assert got.dtype == np.uint32
            np.testing.assert_array_equal(got, expected)


def test_fold_in_path_equals_nested_jax_fold_ins_and_legacy_keys():
    key = jax.random.key(42)
    expected = key
    for d in (3, 0, 17, 2**31 - 2):
        expected = jax.random.fold_in(expected, d)
    got = host_keys.fold_in_path(host_keys.key_data(key), 3, 0, 17, 2**31 - 2)
    np.testing.assert_array_equal(got, np.asarray(jax.random.key_data(expected)))
    legacy = jax.random.PRNGKey(42)  # raw uint32 [2] keys have the same data
    np.testing.assert_array_equal(host_keys.key_data(legacy), host_keys.key_data(key))


def test_threefry_matches_the_published_known_answer():
    # Random123's known-answer test for threefry2x32_20 (key and counter all ones).
    ones = 0xFFFFFFFF
    assert host_keys.threefry2x32((ones, ones), (ones, ones)) == (0x1CB996FC, 0xBB002BE7)
    assert host_keys.threefry2x32((0, 0), (0, 0)) == (0x6B200159, 0x99BA4EFE)


def test_fold_in_rejects_data_outside_uint32():
    key = host_keys.key_data(jax.random.key(0))
    with pytest.raises(ValueError, match="outside"):
        host_keys.fold_in(key, -1)
    with pytest.raises(ValueError, match="outside"):
        host_keys.fold_in(key, 2**32)
