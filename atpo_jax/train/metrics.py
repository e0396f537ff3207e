"""Metric logging: JSONL (the record of a run), TensorBoard, optional W&B, learning-curve plots,
per-phase timers and a progress bar.

    writer = MetricsWriter(workdir, wandb_project=None)      # only process 0 writes anything
    timer = PhaseTimer()
    with timer.phase("rollout"):
        batch = rollout(...)                                 # block_until_ready inside a phase
    writer.write(step, {"reward/mean": 0.4, "em": 0.3, **timer.pop()})
    writer.close()
    plot_learning_curves(workdir / "metrics.jsonl", workdir / "learning_curves.png")

``metrics.jsonl`` holds one JSON object per ``write``: ``{"step": 3, "time": <unix s>, ...}``.
Values are floats (ints stay ints, arrays become nested lists); NaN is written as ``null`` and
±Inf as the strings ``"inf"``/``"-inf"`` so every line is strict JSON; ``read_metrics`` turns them
back into floats. A resumed run appends to the same file, so a step can appear twice (the run was
killed after logging it but before its checkpoint); ``read_metrics`` merges the records of a step,
later values winning, which keeps the resumed run's numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from atpo_jax.train import flops

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_PLOT_KEYS = ("reward/mean", "em", "eval/em")


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _json_number(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def to_json_value(value: Any) -> Any:
    """A metric value as strict-JSON data: scalars -> float (ints/bools -> int), arrays -> lists.

    Raises ``TypeError`` for anything that is not a number or a numeric array.
    """
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_number(float(value))
    array = np.asarray(value)  # jax arrays too (copies to host)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"metric value of type {type(value).__name__} / dtype {array.dtype}")
    if array.ndim == 0:
        return to_json_value(array.item())
    if array.dtype.kind in "biu":
        return array.astype(np.int64).tolist()
    return _float_list(array.astype(np.float64))


def _float_list(array: np.ndarray) -> list[Any]:
    if array.ndim > 1:
        return [_float_list(row) for row in array]
    return [_json_number(float(x)) for x in array]


def _from_json_value(value: Any) -> Any:
    if value is None:
        return math.nan
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    if isinstance(value, list):
        return [_from_json_value(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    """Where step metrics go (the ``logging`` section of a run's config).

    Attributes:
      tensorboard: TensorBoard event files in ``<workdir>/tensorboard`` (besides
        ``metrics.jsonl``, always written).
      wandb_project: also log to this Weights & Biases project ("" = off; needs ``wandb``).
      plot: write ``learning_curves.png`` at the end of a run.
    """

    tensorboard: bool = True
    wandb_project: str = ""
    plot: bool = True


class MetricsWriter:
    """Appends per-step metrics to ``workdir/metrics.jsonl`` and mirrors them to TensorBoard/W&B.

    Args:
      workdir: run directory (created).
      tensorboard: also write TensorBoard event files to ``workdir/tensorboard`` (tensorboardX;
        no TensorFlow needed). Scalars become scalar summaries, arrays histograms.
      wandb_project: log to this W&B project too, if ``wandb`` is importable (else a warning).
      wandb_config: the run configuration shown in W&B (e.g. ``config.to_dict()``).
      is_main_process: whether this process writes; None = ``jax.process_index() == 0``. The
        other processes' writers accept every call and do nothing.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        wandb_config: Mapping[str, Any] | None = None,
        is_main_process: bool | None = None,
    ):
        self.workdir = os.fspath(workdir)
        self.enabled = _is_main_process() if is_main_process is None else bool(is_main_process)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self._file = None
        self._tb = None
        self._wandb_run = None
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning(
                    "wandb_project=%r but wandb is not installed; not logging to W&B", wandb_project
                )
            else:
                self._wandb_run = wandb.init(
                    project=wandb_project,
                    dir=self.workdir,
                    config=dict(wandb_config or {}),
                )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs ``metrics`` (name -> float / int / array) for ``step``; flushed at once."""
        if not self.enabled:
            return
        step = int(step)
        record: dict[str, Any] = {"step": step, "time": time.time()}
        for key, value in metrics.items():
            if key in ("step", "time"):
                raise ValueError(f"metric name {key!r} is reserved")
            try:
                record[key] = to_json_value(value)
            except TypeError as err:
                raise TypeError(f"metric {key!r}: {err}") from None
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                array = np.asarray(value, dtype=np.float64)
                if array.size == 1:
                    self._tb.add_scalar(key, float(array.reshape(())), step)
                elif array.size > 1 and np.isfinite(array).any():
                    self._tb.add_histogram(key, array[np.isfinite(array)], step)
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(
                {k: v for k, v in record.items() if k not in ("step", "time")}, step=step
            )

    def plot(
        self, png_path: str | os.PathLike | None = None, keys: Sequence[str] = DEFAULT_PLOT_KEYS
    ) -> str | None:
        """Writes the learning curves of this run (default ``workdir/learning_curves.png``);
        works after ``close`` too. Does nothing (returns None) on a non-main process."""
        if not self.enabled:
            return None
        if self._file is not None:
            self._file.flush()
        png_path = png_path or os.path.join(self.workdir, "learning_curves.png")
        plot_learning_curves(self.path, png_path, keys=keys)
        return os.fspath(png_path)

    def close(self) -> None:
        """Flushes and closes every sink (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike, *, merge_steps: bool = True) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl``: one dict per step, ascending (non-finite values restored).

    Args:
      path: the file.
      merge_steps: merge records of the same step (later values win; see the module doc). False
        returns every line as written, in file order.

    Raises:
      ValueError: naming the file and line for a line that is not a JSON object with a ``step``.
    """
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                # A run killed mid-write leaves a truncated last line; anything else is corrupt.
                if not line.endswith("\n"):
                    log.warning("%s:%d: ignoring a truncated last line", path, number)
                    continue
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError(f"{path}:{number}: expected a JSON object with a 'step' key")
            records.append({k: _from_json_value(v) for k, v in record.items()})
    if not merge_steps:
        return records
    merged: dict[int, dict[str, Any]] = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(record)
    return [merged[step] for step in sorted(merged)]


def plot_learning_curves(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: Sequence[str] = DEFAULT_PLOT_KEYS,
    *,
    title: str | None = None,
) -> None:
    """One panel per metric in ``keys`` (value vs step) from a ``metrics.jsonl``, saved as PNG.

    A key that no record has gets an empty panel saying so, so a plot is always written at the
    end of a run. Non-finite values are left out of the lines.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    if not keys:
        raise ValueError("plot_learning_curves: keys is empty")
    records = read_metrics(jsonl_path)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        points = [
            (r["step"], float(r[key]))
            for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o", markersize=3, linewidth=1.2)
        else:
            ax.text(
                0.5, 0.5, f"no data for {key!r}", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class PhaseTimer:
    """Wall-clock seconds per named phase, accumulated until ``pop``.

    JAX dispatches asynchronously: put ``jax.block_until_ready`` on a phase's result inside the
    ``with`` block, or the time lands in whichever later phase first waits for it.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block and adds it to ``name`` (phases may nest; each is timed fully)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Adds seconds measured elsewhere (e.g. tool calls timed by a thread pool)."""
        self._seconds[name] = self._seconds.get(name, 0.0) + float(seconds)

    def pop(self) -> dict[str, float]:
        """``{"time/<phase>_s": seconds}`` since the last pop, and resets."""
        out = {f"time/{name}_s": seconds for name, seconds in self._seconds.items()}
        self._seconds = {}
        return out


class ProgressBar:
    """A tqdm bar over training steps, showing a few metrics; silent where it would be noise.

    Args:
      total: number of steps of the run.
      initial: the step a resumed run starts from.
      postfix_keys: metrics shown next to the bar when passed to ``update``.
      enabled: None = only on the main process and when stderr is a terminal.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "train",
        postfix_keys: Sequence[str] = ("reward/mean", "em"),
        enabled: bool | None = None,
    ):
        from tqdm.auto import tqdm

        if enabled is None:
            enabled = _is_main_process() and sys.stderr.isatty()
        self.postfix_keys = tuple(postfix_keys)
        self.enabled = bool(enabled)
        # Counted here: a disabled tqdm bar does not advance its own counter.
        self._n = int(initial)
        self._bar = tqdm(
            total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True
        )

    @property
    def n(self) -> int:
        """Steps counted so far (including ``initial``)."""
        return self._n

    def update(self, metrics: Mapping[str, Any] | None = None, *, steps: int = 1) -> None:
        """Advances by ``steps`` and shows the ``postfix_keys`` found in ``metrics``."""
        if metrics:
            shown = {
                k: f"{float(np.asarray(metrics[k]).reshape(())):.4g}"
                for k in self.postfix_keys
                if k in metrics and np.size(metrics[k]) == 1
            }
            if shown:
                self._bar.set_postfix(shown, refresh=False)
        self._n += steps
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()


# --------------------------------------------------------------------------------------------
# One RL step's metrics


def step_metrics(
    *,
    scores: np.ndarray,
    ems: np.ndarray,
    f1s: np.ndarray,
    advantages: np.ndarray,
    rollout: Mapping[str, float],
    updates: Sequence[Mapping[str, Any]],
    learning_rate: float,
    nonfinite_skips: float,
) -> dict[str, float]:
    """The scalars of one RL step from the whole run's (all processes') rows.

    Args:
      scores, ems, f1s: [rows] reward, exact match and F1 per leaf row.
      advantages: the advantages of every trained (loss-mask 1) token.
      rollout: the ``rollout/*`` and ``time/*`` rollout metrics.
      updates: the update program's metrics of every mini-batch (averaged per key).
      learning_rate, nonfinite_skips: the optimizer's current LR and skipped-update count.
    """
    has = advantages.size > 0
    metrics = {
        "reward/mean": float(scores.mean()),
        "reward/std": float(scores.std()),
        "em": float(np.mean(ems)),
        "f1": float(np.mean(f1s)),
        "format_failure_rate": float(np.mean(scores < 0)),
        "advantage/mean": float(advantages.mean()) if has else 0.0,
        "advantage/std": float(advantages.std()) if has else 0.0,
        "advantage/max": float(advantages.max()) if has else 0.0,
        "advantage/min": float(advantages.min()) if has else 0.0,
        "lr": float(learning_rate),
        "nonfinite_skips": float(nonfinite_skips),
        "trained_tokens": float(advantages.size),
        **rollout,
    }
    for key in updates[0]:
        metrics[f"update/{key}"] = float(np.mean([m[key] for m in updates]))
    return metrics


def throughput_metrics(
    phases: Mapping[str, float],
    *,
    generated_tokens: float,
    processed_tokens: float,
    context_len: int,
    model_config: Any,
    passes: int,
    num_devices: int,
) -> dict[str, float]:
    """Generated and trained tokens per second and the update's MFU.

    ``processed_tokens`` are the real (attended) tokens of the step's rows; each goes through
    ``passes`` forward-equivalents (3 per update epoch for forward + backward, 1 for recomputed
    old log-probs); ``context_len`` is the rows' padded length (attention FLOPs).
    """
    out = {}
    rollout_s = phases.get("time/rollout_s", 0.0)
    update_s = phases.get("time/update_s", 0.0) + phases.get("time/log_probs_s", 0.0)
    if rollout_s:
        out["throughput/generated_tokens_per_s"] = generated_tokens / rollout_s
    if update_s:
        out["throughput/train_tokens_per_s"] = processed_tokens / update_s
        used = flops.forward_flops_per_token(model_config, context_len) * processed_tokens * passes
        value = flops.mfu(used / num_devices, update_s, flops.peak_flops_per_device())
        if value is not None:
            out["throughput/mfu"] = value
    return out
