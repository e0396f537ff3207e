"""docs/training_infrastructure.md stays true: its end-to-end example runs."""

from __future__ import annotations

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "training_infrastructure.md"


def test_runnable_example_runs():
    match = re.search(r"<!-- runnable-example -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{DOC.name} has no ```python block after <!-- runnable-example -->"
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(match.group(1), str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    records = namespace["records"]
    assert all(r["loss"] > 0 for r in records)
    # The LR the next update uses: after 1 of 2 warm-up updates, half the peak; then the peak.
    assert records[0]["optim/learning_rate"] == pytest.approx(5e-4)
    assert records[-1]["optim/learning_rate"] == pytest.approx(1e-3)
    assert (pathlib.Path(namespace["workdir"]) / "learning_curves.png").stat().st_size > 1000
