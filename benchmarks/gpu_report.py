"""The GPU check pack's report: ``gpu_report.json`` and ``gpu_report.md``, rewritten after every entry.

A report is a list of sections. Each section holds correctness checks (a measured error against a
stated tolerance: ``pass``/``fail``; ``not_applicable`` with the reason where the platform cannot
run it; ``not_run`` with the reason where this run leaves it out, as ``--quick`` does with
some dtype/precision variants; ``error`` with the exception where it crashed) and measurements (a value with its unit
and, where it means something, a ratio or a fraction of a physical limit). A section's status is
``running`` while it runs (so a report left by a killed process shows where it stopped), then
``ok``, ``failed`` (an exception escaped it), or ``not_run`` with the reason (``--only`` or the
``--budget-s`` time budget).

Both files are written atomically (a temporary file, then ``os.replace``) after every entry, so a
timeout leaves a complete report of everything measured before it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import time
import traceback
from collections.abc import Iterator
from typing import Any

JSON_NAME = "gpu_report.json"
MARKDOWN_NAME = "gpu_report.md"
SCHEMA = 1


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: they are written as strings ("nan", "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _error_text(error: BaseException) -> str:
    """The exception and the last frames of its traceback (enough to find the failing line)."""
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    text = "".join(frames[-3:]).strip()
    return text[-2000:]


class Section:
    """One section's entries; every entry rewrites the report."""

    def __init__(self, report: Report, record: dict[str, Any]):
        self._report = report
        self.record = record

    @property
    def name(self) -> str:
        return self.record["name"]

    def check(
        self,
        name: str,
        *,
        error: float,
        tolerance: float,
        metric: str,
        **detail: Any,
    ) -> bool:
        """Records a correctness check: ``pass`` when ``error <= tolerance`` (NaN fails)."""
        error = float(error)
        passed = bool(error <= tolerance)
        self._add_check(
            name,
            "pass" if passed else "fail",
            max_error=_finite(error),
            tolerance=tolerance,
            metric=metric,
            **detail,
        )
        return passed

    def not_applicable(self, name: str, reason: str) -> None:
        """A check this platform cannot run, with the reason (never a silent skip)."""
        self._add_check(name, "not_applicable", reason=reason)

    def not_run(self, name: str, reason: str) -> None:
        """A check this run leaves out by choice (``--quick``'s reduced matrix), with the reason."""
        self._add_check(name, "not_run", reason=reason)

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """Runs one check or measurement; an exception is recorded as an ``error`` entry named
        ``name`` and the section goes on with its next entry."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the pack
            self._add_check(name, "error", error=_error_text(e))
            self._report.log(f"  ERROR in {self.name}/{name}: {type(e).__name__}: {e}")

    def measure(self, name: str, value: float | None, unit: str, **detail: Any) -> None:
        """Records a measurement (``value`` None: not measured, ``detail`` says why)."""
        entry = {"name": name, "value": _finite(value), "unit": unit}
        entry.update({k: _finite(v) for k, v in detail.items()})
        self.record["measurements"].append(entry)
        shown = "-" if value is None else f"{value:.4g}"
        extra = ", ".join(f"{k}={_short(v)}" for k, v in detail.items())
        self._report.log(f"  {name}: {shown} {unit}" + (f" ({extra})" if extra else ""))
        self._report.write()

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        self._report.log(f"  note: {text}")
        self._report.write()

    def _add_check(self, name: str, status: str, **detail: Any) -> None:
        entry = {"name": name, "status": status}
        entry.update({k: _finite(v) for k, v in detail.items()})
        self.record["checks"].append(entry)
        if status in ("pass", "fail"):
            self._report.log(
                f"  [{status}] {name}: {detail['metric']} = {detail['max_error']:.3g}"
                f" (tolerance {detail['tolerance']:g})"
            )
        elif status in ("not_applicable", "not_run"):
            self._report.log(f"  [{status}] {name}: {detail['reason']}")
        self._report.write()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Report:
    """The report of one run of the pack, written to ``out_dir`` after every entry.

    Args:
      out_dir: where ``gpu_report.json`` and ``gpu_report.md`` go (created).
      budget_s: no new section starts once this many seconds have passed since the start.
      header: run-wide facts (command, mode, ...) stored at the top of the report.
    """

    def __init__(self, out_dir: str, *, budget_s: float, header: dict[str, Any]):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self.budget_s = budget_s
        self._start = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "started": _now(),
            "finished": None,
            "budget_s": budget_s,
            **header,
            "environment": {},
            "limits": {},
            "sections": [],
            "summary": {},
        }
        self.write()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def log(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        print(f"[{stamp} +{self.elapsed():6.1f}s] {message}", flush=True)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def skip(self, name: str, title: str, reason: str) -> None:
        """Records a section that was not started, and why."""
        self.data["sections"].append(self._record(name, title, status="not_run", reason=reason))
        self.log(f"section {name}: NOT RUN ({reason})")
        self.write()

    @contextlib.contextmanager
    def section(self, name: str, title: str) -> Iterator[Section]:
        """Runs a section; an exception that escapes it marks it ``failed`` (the pack goes on)."""
        record = self._record(name, title, status="running")
        self.data["sections"].append(record)
        self.log(f"section {name}: {title}")
        self.write()
        start = time.perf_counter()
        try:
            yield Section(self, record)
            record["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
            record["status"] = "failed"
            record["error"] = _error_text(e)
            self.log(f"section {name} FAILED: {type(e).__name__}: {e}")
        finally:
            record["seconds"] = round(time.perf_counter() - start, 2)
            self.log(f"section {name}: {record['status']} in {record['seconds']:.1f}s")
            self.write()

    @staticmethod
    def _record(name: str, title: str, **fields: Any) -> dict[str, Any]:
        return {
            "name": name,
            "title": title,
            **fields,
            "seconds": 0.0,
            "checks": [],
            "measurements": [],
            "notes": [],
        }

    def finish(self) -> dict[str, Any]:
        """Stamps the end time and the summary; returns the summary."""
        self.data["finished"] = _now()
        self.data["total_s"] = round(self.elapsed(), 1)
        self.data["summary"] = summarize(self.data)
        self.write()
        return self.data["summary"]

    def write(self) -> None:
        self.data["summary"] = summarize(self.data)
        _atomic_write(os.path.join(self.out_dir, JSON_NAME), json.dumps(self.data, indent=1))
        _atomic_write(os.path.join(self.out_dir, MARKDOWN_NAME), markdown(self.data))


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Counts of check statuses and section statuses; ``ok`` when nothing failed or crashed."""
    checks: dict[str, int] = {}
    sections: dict[str, int] = {}
    for section in data["sections"]:
        sections[section["status"]] = sections.get(section["status"], 0) + 1
        for check in section["checks"]:
            checks[check["status"]] = checks.get(check["status"], 0) + 1
    bad = checks.get("fail", 0) + checks.get("error", 0) + sections.get("failed", 0)
    return {"checks": checks, "sections": sections, "ok": bad == 0}


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pairs(detail: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in detail.items() if v is not None)


def markdown(data: dict[str, Any]) -> str:
    """The report as markdown: environment, limits, checks, measurements, what did not run."""
    env = data.get("environment", {})
    lines = [
        "# GPU check report",
        "",
        f"- started {data['started']}, finished {data.get('finished') or '(still running)'}"
        f", {data.get('total_s', '?')} s of a {data['budget_s']} s budget"
        f"{' (--quick)' if data.get('quick') else ''}",
        f"- platform: **{env.get('platform', '?')}**, device: {env.get('device_kind', '?')}"
        f" x {env.get('device_count', '?')}",
        f"- jax {env.get('jax', '?')}, jaxlib {env.get('jaxlib', '?')}, flax {env.get('flax', '?')}"
        f", optax {env.get('optax', '?')}; backend: {env.get('platform_version', '?')}",
        f"- CUDA: {_cell(json.dumps(env.get('cuda', '?')))}",
        f"- summary: {json.dumps(data.get('summary', {}))}",
    ]
    if data.get("quick"):
        lines.append(
            "- --quick: tiny shapes on the CPU, compiled with XLA's backend optimisation off: the"
            " speed figures test the code, not the machine"
        )
    limits = data.get("limits", {})
    if limits:
        lines.append(f"- limits used: {limits.get('description', json.dumps(limits))}")
    lines += ["", "## Correctness", "", "| section | check | status | error | tolerance | note |"]
    lines.append("|---|---|---|---|---|---|")
    for section in data["sections"]:
        for c in section["checks"]:
            note = c.get("reason") or c.get("error") or c.get("metric", "")
            extra = {
                k: v
                for k, v in c.items()
                if k
                not in ("name", "status", "max_error", "tolerance", "metric", "reason", "error")
            }
            if extra:
                note = f"{note}; {_pairs(extra)}"
            lines.append(
                f"| {section['name']} | {_cell(c['name'])} | {c['status']} |"
                f" {_cell(c.get('max_error'))} | {_cell(c.get('tolerance'))} | {_cell(note)[:400]} |"
            )
    lines += ["", "## Measurements", "", "| section | what | value | unit | detail |"]
    lines.append("|---|---|---|---|---|")
    for section in data["sections"]:
        for m in section["measurements"]:
            detail = {k: v for k, v in m.items() if k not in ("name", "value", "unit")}
            lines.append(
                f"| {section['name']} | {_cell(m['name'])} | {_cell(m['value'])} | {m['unit']} |"
                f" {_cell(_pairs(detail))} |"
            )
    lines += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for section in data["sections"]:
        note = section.get("reason") or section.get("error") or "; ".join(section["notes"])
        lines.append(
            f"| {section['name']}: {_cell(section['title'])} | {section['status']} |"
            f" {section['seconds']} | {_cell(note)[:600]} |"
        )
    return "\n".join(lines) + "\n"
