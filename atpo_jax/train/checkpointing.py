"""Training checkpoints: a thin layer over ``orbax.checkpoint.CheckpointManager``.

    ckpt = Checkpointer(workdir / "checkpoints", keep=3, save_every=10)
    state = {"params": params, "opt_state": opt_state, "rng": key, "step": 7, "data_position": 448}
    ckpt.save(7, state)                       # saves iff 7 % save_every == 0 (or force=True)
    step = ckpt.latest_step()                 # newest COMPLETE checkpoint, or None
    state = ckpt.restore(step, target=state)  # same structure, dtypes and shardings as ``target``
    ckpt.close()                              # waits for the async save in flight

Each top-level key of ``state`` is one orbax item (a sub-directory of the step directory), so a
caller can restore a subset (``target={"params": ...}`` for evaluation). An item whose leaves are
all plain Python values (int, float, str, bool, None, in dicts/lists) is stored as JSON (readable,
exact ints); anything holding arrays is stored with orbax's ``StandardSave`` (tensorstore, one
shard per device, written from every host in a multi-host run). Typed PRNG keys
(``jax.random.key``) are stored as their raw ``uint32`` key data and re-wrapped on restore with
the implementation of the key found in ``target``.

Completeness: orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` only once every item is written, so a save killed mid-way leaves a temporary directory
that ``latest_step`` and ``restore`` never see (and that the next ``Checkpointer`` on the directory
deletes). A save still running in the background in this process is not reported either.

Resharding: ``restore`` reads each array into the sharding of the corresponding ``target`` leaf
(a ``jax.Array`` or a ``jax.ShapeDtypeStruct`` with ``sharding``), whatever mesh it was saved
from.

Pre-emption: ``install_sigterm_handler`` turns SIGTERM into a flag that the training loop checks
at step boundaries (``shutdown.check()``), where it saves a final checkpoint and exits with status
0 (see its docstring).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from atpo_jax.settings import ConfigError, check

log = logging.getLogger(__name__)

_EXPORT_DTYPES = ("", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """Checkpoints and the final export (the ``checkpoint`` section of a run's config).

    Attributes:
      every: save every this many RL steps (plus the warm start, step 0, and the last step).
      keep: complete checkpoints kept (older ones are deleted).
      export_hf: write the final policy as a Hugging Face checkpoint (``<workdir>/hf_export``).
      export_dtype: dtype of the exported tensors: ``float32``, ``bfloat16``, ``float16``, or ""
        for the dtype of the checkpoint the run started from (``model.path``), else the master
        weights' own.
    """

    every: int = 50
    keep: int = 3
    export_hf: bool = True
    export_dtype: str = ""

    def __post_init__(self) -> None:
        check(self.every >= 1, f"checkpoint.every={self.every} must be >= 1")
        check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")
        check(
            self.export_dtype in _EXPORT_DTYPES,
            f"checkpoint.export_dtype={self.export_dtype!r} is not one of "
            + ", ".join(repr(d) for d in _EXPORT_DTYPES),
        )


_JSON_SCALARS = (bool, int, float, str, type(None))


# --------------------------------------------------------------------------------------------
# PRNG keys


def is_typed_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (``jax.random.key``) or its abstract value."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def key_to_data(key: jax.Array) -> jax.Array:
    """Typed key array [...] -> its raw ``uint32`` key data [..., 2] (threefry) for storage."""
    if not is_typed_key(key):
        raise TypeError(f"expected a typed PRNG key (jax.random.key), got dtype {key.dtype}")
    return jax.random.key_data(key)


def key_from_data(data: Any, impl: Any = "threefry2x32") -> jax.Array:
    """Raw ``uint32`` key data [..., n] -> a typed key array [...] of implementation ``impl``."""
    return jax.random.wrap_key_data(jax.numpy.asarray(data, jax.numpy.uint32), impl=impl)


def keys_to_data(tree: Any) -> Any:
    """``tree`` with every typed key leaf replaced by its key data (other leaves unchanged)."""
    return jax.tree.map(lambda x: key_to_data(x) if is_typed_key(x) else x, tree)


def keys_from_data(tree: Any, like: Any) -> Any:
    """Undoes ``keys_to_data``: wraps the leaves of ``tree`` where ``like`` holds a typed key.

    ``like`` must have ``tree``'s structure; its typed key leaves give the implementation.
    """
    return jax.tree.map(
        lambda x, ref: key_from_data(x, jax.random.key_impl(ref)) if is_typed_key(ref) else x,
        tree,
        like,
    )


# --------------------------------------------------------------------------------------------
# Save / restore arguments per item


def _is_json_item(value: Any) -> bool:
    """True when every leaf of ``value`` is a plain Python scalar (stored as JSON)."""
    leaves = jax.tree.leaves(value, is_leaf=lambda x: x is None)
    return all(isinstance(leaf, _JSON_SCALARS) for leaf in leaves)


def _save_arg(name: str, value: Any) -> ocp.args.CheckpointArgs:
    if _is_json_item(value):
        return ocp.args.JsonSave(value)
    for path, leaf in jax.tree_util.tree_leaves_with_path(value):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, *_JSON_SCALARS)):
            raise TypeError(
                f"checkpoint item {name!r}: leaf {jax.tree_util.keystr(path)} has type "
                f"{type(leaf).__name__}; items hold arrays and Python scalars only"
            )
    return ocp.args.StandardSave(_box(keys_to_data(value)))


def _any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective in a multi-process run)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _is_bare_leaf(value: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(value))


# StandardSave takes containers only; a bare array (a PRNG key, say) is stored as {"value": x}.
def _box(value: Any) -> Any:
    return {"value": value} if _is_bare_leaf(value) else value


def _unbox(restored: Any, ref: Any) -> Any:
    return restored["value"] if _is_bare_leaf(ref) else restored


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract_leaf(leaf: Any) -> Any:
    """The restore target for one leaf: arrays become ShapeDtypeStructs carrying a sharding."""
    if is_typed_key(leaf):
        if not isinstance(leaf, jax.Array):
            raise TypeError(
                "a typed PRNG key in a restore target must be a concrete key array "
                "(e.g. jax.random.key(0)), not an abstract value: its implementation is needed"
            )
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding if leaf.sharding is not None else _default_sharding()
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return leaf  # NumPy arrays restore as NumPy arrays, Python scalars as Python scalars.


def _restore_arg(value: Any) -> ocp.args.CheckpointArgs:
    if _is_json_item(value):
        return ocp.args.JsonRestore()
    return ocp.args.StandardRestore(_box(jax.tree.map(_abstract_leaf, value)))


# --------------------------------------------------------------------------------------------
# Integrity: a checksum of every saved value, stored with the step and verified on restore

CHECKSUM_ITEM = "checksums"
_MOD = 1 << 32


class CheckpointError(RuntimeError):
    """A checkpoint step cannot be used: its data fails verification or cannot be read."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def _unsigned_bits(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as an unsigned integer array of the same width, widened to uint32."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _weighted_sum(x: jax.Array) -> jax.Array:
    """uint32 scalar: sum over elements of bits(x_i) * (2 i + 1) mod 2^32, i the row-major index.

    Modular integer arithmetic is exact in any order, so the value does not depend on the
    sharding, the mesh or the device it runs on. The weight of every position is odd, hence a
    unit mod 2^32: any change of a single element changes the sum, and changes of several cancel
    with probability ~2^-32 (positions matter, so swapped elements are caught too).
    """
    bits = _unsigned_bits(x)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in range(x.ndim - 1, -1, -1):
        iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
        index = index + iota * jnp.uint32(stride % _MOD)
        stride *= x.shape[axis]
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


_device_checksums = jax.jit(lambda leaves: [_weighted_sum(x) for x in leaves])


def numpy_checksum(x: np.ndarray) -> int:
    """:func:`_weighted_sum` in NumPy (64-bit host arrays, and the reference in tests)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = x.astype(np.uint64).reshape(-1)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
        bits = x.view(unsigned).reshape(-1).astype(np.uint64)
    weights = (np.arange(bits.size, dtype=np.uint64) * 2 + 1) % _MOD
    return int(np.sum((bits % _MOD) * weights % _MOD, dtype=np.uint64) % _MOD)


def _json_digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _leaf_records(value: Any) -> dict[str, Any]:
    """``{leaf path: {"sum", "dtype", "shape"}}`` for an array item (as stored: boxed, keys as
    data); Python scalars are recorded by value."""
    tree = _box(keys_to_data(value))
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    if not with_paths:
        return {}
    paths, leaves = zip(*with_paths, strict=True)
    names = [jax.tree_util.keystr(p) for p in paths]
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    sums = dict(
        zip(
            on_device,
            jax.device_get(_device_checksums([leaves[i] for i in on_device])),
            strict=True,
        )
    )
    records = {}
    for i, (name, x) in enumerate(zip(names, leaves, strict=True)):
        if isinstance(x, _JSON_SCALARS):
            records[name] = {"value": x}
        else:
            total = int(sums[i]) if i in sums else numpy_checksum(np.asarray(x))
            records[name] = {"sum": total, "dtype": str(x.dtype), "shape": list(x.shape)}
    return records


def checksums(state: Mapping[str, Any]) -> dict[str, Any]:
    """The integrity record of ``state`` (item -> leaf -> checksum, or the JSON item's digest)."""
    return {
        name: {"json_sha256": _json_digest(value)}
        if _is_json_item(value)
        else {"leaves": _leaf_records(value)}
        for name, value in state.items()
    }


class CheckpointMismatchError(ConfigError):
    """A restore target does not fit the checkpoint (other shapes or structure): the model or the
    settings differ from the run that saved it. Not damage: the files are fine."""


def _target_shapes(value: Any) -> dict[str, tuple[int, ...]]:
    # Typed PRNG keys are left out (their stored form is their key data; restore checks them).
    return {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(_box(value))
        if hasattr(leaf, "shape") and not is_typed_key(leaf)
    }


def check_fit(step: int, directory: str, target: Mapping[str, Any], record: Mapping) -> None:
    """Raises ``CheckpointMismatchError`` when an array item of ``target`` has a value the step did
    not save, or one of another shape (dtypes may differ: a restore casts)."""
    for name, ref in target.items():
        want = record.get(name)
        if want is None or "leaves" not in want or _is_json_item(ref):
            continue
        saved = want["leaves"]
        for leaf, shape in _target_shapes(ref).items():
            if leaf not in saved:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {directory} holds no {name}{leaf}: the model or "
                    "settings differ from the run that saved it (pass that run's settings)"
                )
            if "shape" in saved[leaf] and tuple(saved[leaf]["shape"]) != shape:
                raise CheckpointMismatchError(
                    f"checkpoint step {step} in {directory}: {name}{leaf} was saved with shape "
                    f"{tuple(saved[leaf]['shape'])}, the target has {shape}: the model or settings "
                    "differ from the run that saved it (pass that run's settings)"
                )


def verify(step: int, restored: Mapping[str, Any], record: Mapping[str, Any]) -> int:
    """Checks restored items against their integrity record; returns the number of values
    verified. A leaf restored into another dtype or shape than saved (a cast on restore) cannot
    be compared and is skipped.

    Raises:
      CheckpointError: an item or leaf differs from what was saved.
    """
    checked = 0
    for name, value in restored.items():
        want = record.get(name)
        if want is None:
            continue
        if "json_sha256" in want:
            if _json_digest(value) != want["json_sha256"]:
                raise CheckpointError(step, f"checkpoint step {step}: item {name!r} was altered")
            checked += 1
            continue
        got = _leaf_records(value)
        for leaf, saved in want["leaves"].items():
            have = got.get(leaf)
            layout = ("dtype", "shape")
            if have is None or any(have.get(k) != saved.get(k) for k in layout):
                continue
            if have != saved:
                raise CheckpointError(
                    step,
                    f"checkpoint step {step}: {name}{leaf} differs from the saved data "
                    "(checksum mismatch: the files were damaged after the save)",
                )
            checked += 1
    return checked


# --------------------------------------------------------------------------------------------
# Checkpointer


class Checkpointer:
    """Periodic, asynchronous, keep-N checkpoints of a dict of pytrees (see the module doc).

    Args:
      directory: where step directories ``<step>/`` live (created if missing).
      keep: number of most recent checkpoints kept; older ones are deleted after a save.
      save_every: ``save`` writes when ``step % save_every == 0``; 0 = only forced saves.
      async_save: write in a background thread after the device-to-host copy (the training loop
        continues at once); ``wait``/``close`` block until it is on disk.
      read_only: only read (``save`` raises). Use it to read the checkpoints of a run that may
        still be writing: a writer removes leftover ``*.orbax-checkpoint-tmp`` directories when
        it opens the directory, which would include the live run's save in flight.

    Every process of a multi-host run must make the same calls (orbax synchronises them).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        save_every: int = 10,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint keep={keep!r} must be an integer >= 1")
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
            raise ValueError(f"checkpoint save_every={save_every!r} must be an integer >= 0")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.save_every = save_every
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            preservation_policy=None if read_only else ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=async_save,
            # Remove the <step>.orbax-checkpoint-tmp directories of interrupted saves (a save of
            # the same step would replace one anyway; this also frees steps never saved again).
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._last_saved: int | None = None
        self._warned_unverified = False

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` writes a checkpoint."""
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves ``state`` as step ``step`` when due (or ``force``); returns whether it did.

        A step that already has a checkpoint is not written again (returns False), so a forced
        save on SIGTERM right after a periodic one is harmless. With ``async_save`` the call
        returns once the arrays are copied to host memory; the files appear later.

        Args:
          step: the training step the state belongs to (the step directory's name).
          state: item name -> pytree of arrays / Python scalars (``nnx.State``, optax state,
            typed or raw PRNG keys) or a JSON-able value (ints such as ``step``, ``data_position``).
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer({self.directory!r}) was opened read_only")
        if not isinstance(state, Mapping) or not state:
            raise ValueError("checkpoint state must be a non-empty dict of item name -> pytree")
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        if CHECKSUM_ITEM in state:
            raise ValueError(f"{CHECKSUM_ITEM!r} is reserved for the checkpoint's integrity record")
        items = {name: _save_arg(name, v) for name, v in state.items()}
        # Saved with the step (one atomic rename), so a complete step always has its record.
        items[CHECKSUM_ITEM] = ocp.args.JsonSave(checksums(state))
        args = ocp.args.Composite(**items)
        saved = self._manager.save(step, args=args, force=True)
        if saved:
            self._last_saved = step
        return bool(saved)

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint on disk, ascending (a save in flight excluded)."""
        steps = set(self._manager.all_steps())
        if self._last_saved is not None and self._manager.is_saving_in_progress():
            steps.discard(self._last_saved)
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest step with a complete checkpoint, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def item_names(self, step: int) -> list[str]:
        """The item names (top-level ``state`` keys) stored for ``step``."""
        return [name for name in self._stored_items(step) if name != CHECKSUM_ITEM]

    def _stored_items(self, step: int) -> list[str]:
        step_dir = os.path.join(self.directory, str(step))
        return sorted(
            name
            for name in os.listdir(step_dir)
            if os.path.isdir(os.path.join(step_dir, name)) and not name.startswith(("_", "."))
        )

    def restore(self, step: int | None = None, *, target: Mapping[str, Any]) -> dict[str, Any]:
        """Reads checkpoint ``step`` (default: the latest complete one) into ``target``'s layout.

        Args:
          step: the step to read; None = ``latest_step()``.
          target: item name -> a pytree like the one saved: its structure, dtypes and shapes, and
            for arrays their shardings (from ``jax.Array`` leaves or ``jax.ShapeDtypeStruct``
            leaves with ``sharding``; without one an array goes to the first local device).
            Typed key leaves must be concrete keys (they give the implementation). For a JSON
            item the target's value is only a placeholder. Only the named items are read.

        Returns:
          item name -> restored value (``jax.Array`` leaves where the target had arrays,
          NumPy where it had NumPy, typed keys where it had typed keys; JSON lists stay lists).

        Every restored value is checked against the integrity record saved with the step
        (:func:`checksums`); a checkpoint without one (an older version's) is restored with a
        warning.

        Raises:
          FileNotFoundError: no complete checkpoint (for ``step``) in the directory.
          KeyError: ``target`` names an item the checkpoint does not have.
          CheckpointError: the step's files cannot be read, or what they hold differs from what
            was saved.
          CheckpointMismatchError: ``target`` does not fit the step (another model or settings;
            a ``ConfigError``), found from the integrity record before any array is read.
        """
        if not isinstance(target, Mapping) or not target:
            raise ValueError("restore target must be a non-empty dict of item name -> pytree")
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory} (have {steps})"
            )
        available = self.item_names(step)
        missing = sorted(set(target) - set(available))
        if missing:
            raise KeyError(
                f"checkpoint step {step} in {self.directory} has no item(s) {missing}; "
                f"it has {available}"
            )
        record = None
        if CHECKSUM_ITEM in self._stored_items(step):
            record = self._read(step, {CHECKSUM_ITEM: ocp.args.JsonRestore()})[CHECKSUM_ITEM]
            # A target that does not fit what was saved is a settings problem, not damage: say
            # so before reading (orbax would fail the read, which looks like damage).
            check_fit(step, self.directory, target, record)
        items = {name: _restore_arg(v) for name, v in target.items()}
        restored = self._read(step, items)
        restored = {name: restored[name] for name in items}
        if record is not None:
            verify(step, restored, record)
        elif not self._warned_unverified:
            self._warned_unverified = True
            log.warning(
                "checkpoint step %d in %s has no integrity record (saved by an older version): "
                "restored unverified",
                step,
                self.directory,
            )
        return {
            name: restored[name]
            if _is_json_item(ref)
            else keys_from_data(_unbox(restored[name], ref), ref)
            for name, ref in target.items()
        }

    def _read(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
        """orbax's restore of ``items``; any failure is a ``CheckpointError`` on every process."""
        error, restored = None, None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - any failure to read the files means: unusable
            error = f"{type(e).__name__}: {e}"
        # Every process must agree (the verification after the read is a collective).
        if _any_process(error is not None) and error is None:
            error = "another process could not read it"
        if error is not None:
            raise CheckpointError(
                step, f"checkpoint step {step} in {self.directory} cannot be read ({error})"
            )
        return restored

    def quarantine(self, step: int) -> str:
        """Moves step ``step`` out of the checkpoint directory, to ``<directory>_damaged/``
        (kept for inspection, never read again); returns its new path. Every process calls it;
        process 0 moves the files."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = os.path.join(f"{self.directory}_damaged", f"{step}-{stamp}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Blocks until an asynchronous save in flight is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# SIGTERM


class ShutdownRequest:
    """The flag a signal handler sets; the training loop polls it at step boundaries.

    Acting on the signal inside the handler would interrupt whatever the main thread is doing
    (a jitted step, an orbax save) and checkpoint a half-updated state; acting at the boundary
    saves the state of the step that just finished.
    """

    def __init__(self, callback: Callable[[], None] | None, exit_code: int):
        self._callback = callback
        self._exit_code = exit_code
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a handled signal arrived in this process."""
        return self._event.is_set()

    def request(self) -> None:
        """Sets the flag (what the signal handler does; tests and callers may call it too)."""
        self._event.set()

    def should_stop(self) -> bool:
        """Whether any process received the signal (all processes agree: a collective when
        ``jax.process_count() > 1``, so every process must call it at the same step)."""
        flag = self.requested
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
            flag = bool(np.any(flags))
        return flag

    def check(self) -> None:
        """If a stop was requested: runs the callback (save, flush), then ``SystemExit(code)``."""
        if not self.should_stop():
            return
        log.warning("termination signal received: running the shutdown callback and exiting")
        if self._callback is not None:
            self._callback()
        raise SystemExit(self._exit_code)

    def uninstall(self) -> None:
        """Restores the handlers that were installed before ``install_sigterm_handler``."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def install_sigterm_handler(
    callback: Callable[[], None] | None = None,
    *,
    signals: Iterable[int] = (signal.SIGTERM,),
    exit_code: int = 0,
) -> ShutdownRequest:
    """Makes SIGTERM (pre-emption, ``scancel``, ``kill``) end the run with a final checkpoint.

    The handler only sets a flag. The loop calls ``shutdown.check()`` once per step, after the
    step's state is complete; if the flag is set, ``check`` runs ``callback`` (typically a forced
    save + ``close()`` of the checkpointer and the metrics writer) and raises
    ``SystemExit(exit_code)``, so ``finally`` blocks run and the process exits cleanly::

        shutdown = install_sigterm_handler(
            lambda: (ckpt.save(step, state_dict(), force=True), ckpt.close()))
        for step in range(start, num_steps):
            ...                                   # one RL step
            ckpt.save(step, state_dict())
            shutdown.check()

    The grace period between SIGTERM and SIGKILL (SLURM, Kubernetes, TPU pre-emption: tens of
    seconds) must cover the rest of the current step plus the save; otherwise the run resumes from
    the last periodic checkpoint, which is still complete.

    With ``signal.SIGINT`` among ``signals``, a first Ctrl-C stops at the step boundary like
    SIGTERM and a second one raises ``KeyboardInterrupt`` at once.

    Must be called from the main thread (a Python rule for signal handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_sigterm_handler must be called from the main thread")
    request = ShutdownRequest(callback, exit_code)

    def handler(signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and request.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        log.warning(
            "received %s; stopping after the current step (Ctrl-C again to interrupt at once)"
            if signum == signal.SIGINT
            else "received %s; stopping after the current step",
            signal.Signals(signum).name,
        )
        request.request()

    for signum in signals:
        request._previous[signum] = signal.signal(signum, handler)
    return request
