"""Where the questions come from (the ``data`` section of a run's config)."""

from __future__ import annotations

import dataclasses
import math

from atpo_jax.data.synthetic.build import SyntheticWorldConfig
from atpo_jax.settings import StrEnum, check, coerce_choices


class DataSource(StrEnum):
    SYNTHETIC = "synthetic"  # the seeded multi-hop world (DESIGN.md §6), built under the workdir
    FILES = "files"  # ATPO/Search-R1 parquet or JSONL rows


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Training and evaluation questions and the tokenizer.

    Attributes:
      source: ``synthetic`` (the default offline world) or ``files``.
      synthetic_dir: where the synthetic world's files go (default ``<workdir>/synthetic``);
        reused when up to date.
      synthetic: the synthetic world's size, noise and prompt style.
      train_files, eval_files: comma-separated parquet/JSONL files (``source=files``); their rows
        carry the prompt messages (built when the files were made, e.g. by
        ``python -m atpo_jax.data.flashrag --prompt-style paper``).
      tokenizer_path: a tokenizer directory; default ``model.path`` (files) or the synthetic
        world's word-level tokenizer.
      shuffle: visit the training questions in a seeded random order per epoch.
    """

    source: DataSource = DataSource.SYNTHETIC
    synthetic_dir: str = ""
    synthetic: SyntheticWorldConfig = SyntheticWorldConfig()
    train_files: str = ""
    eval_files: str = ""
    tokenizer_path: str = ""
    shuffle: bool = True

    def __post_init__(self) -> None:
        coerce_choices(self, "data")
        _check_synthetic(self.synthetic)

    @property
    def train_paths(self) -> list[str]:
        return [p for p in self.train_files.split(",") if p]

    @property
    def eval_paths(self) -> list[str]:
        return [p for p in self.eval_files.split(",") if p]


def _check_synthetic(w: SyntheticWorldConfig) -> None:
    """The synthetic world's sizes and rates, checked with the settings: the world builder checks
    them too, but only when it runs, and without naming the ``data.synthetic`` setting."""
    for name, least in (
        ("num_countries", 2),
        ("cities_per_country", 2),
        ("num_people", 2),
        ("num_companies", 1),
        ("demo_shortcut_hops", 1),
    ):
        value = getattr(w, name)
        check(value >= least, f"data.synthetic.{name}={value} must be >= {least}")
    # Comparisons are False for NaN, so these also refuse NaN. A fraction of 0 would leave its
    # split without questions, which the world builder cannot write.
    for name in ("validation_fraction", "test_fraction"):
        value = getattr(w, name)
        check(
            0 < value < 1,
            f"data.synthetic.{name}={value} must be in (0, 1) (each split needs questions)",
        )
    check(
        w.validation_fraction + w.test_fraction < 1,
        f"data.synthetic.validation_fraction + test_fraction = "
        f"{w.validation_fraction + w.test_fraction} must be < 1 (leave training questions)",
    )
    for name in ("demo_mistake_rate", "demo_shortcut_rate"):
        value = getattr(w, name)
        check(0 <= value <= 1, f"data.synthetic.{name}={value} must be in [0, 1]")
    weights = w.demo_mistake_weights
    check(
        all(math.isfinite(x) and x >= 0 for x in weights)
        and (sum(weights) > 0 or w.demo_mistake_rate == 0),
        f"data.synthetic.demo_mistake_weights={tuple(weights)} must be finite, >= 0 and not all 0 "
        "(or set data.synthetic.demo_mistake_rate=0)",
    )
