"""The README's code stays true: its notebook example runs and CI runs its test command."""

from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str, language: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```{language}\n(.*?)```", README, re.S)
    assert match, f"README.md has no ```{language} block after <!-- {marker} -->"
    return match.group(1)


def test_notebook_example_runs():
    namespace: dict = {}
    exec(compile(_block_after("notebook-example", "python"), "README.md", "exec"), namespace)
    # The example's tree: leaves 2 (-1), 3 (+1), 4 (0) -> z-scores -1.2247, 1.2247, 0.
    z = namespace["z"]
    assert abs(float(z[0, 3]) - 1.224744) < 1e-4 and abs(float(z[0, 2]) + 1.224744) < 1e-4
    assert namespace["advantages"].shape == (3, 7)


def test_ci_runs_the_readme_test_command():
    command = _block_after("test-command", "bash").strip()
    assert "pytest" in command and ".venv" in command
    printed = subprocess.run(
        [str(ROOT / ".ci" / "run"), "--print-command"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == command
