"""The README's "Reading report.json" section names exactly the fields of the typed records."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from icbs.records import LayerSummary, PruneSummary, RunReport, SolverStats, StepRecord, TIMING_KEYS

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    return text.split("### Reading `report.json`", 1)[1].split("\n## ", 1)[0]


def _bullet(section: str, key: str) -> str:
    match = re.search(rf"^- `{key}`.*?(?=^- |\Z)", section, re.S | re.M)
    assert match, f"README's report.json section has no bullet for {key!r}"
    return match.group(0)


def _names(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def test_readme_report_section_names_every_run_report_field_and_no_other():
    section = _section()
    top = set(re.findall(r"^- `(\w+)`", section, re.M))
    top |= set(re.findall(r"`(seed|resumed|config|versions|method|model|metrics)[`.]", section))
    assert _names(RunReport) <= top, _names(RunReport) - top
    assert top <= _names(RunReport), top - _names(RunReport)


def test_readme_step_and_summary_fields_match_the_dataclasses():
    section = _section()
    steps = set(re.findall(r"`(\w+)`", _bullet(section, "steps")))
    assert _names(StepRecord) <= steps, _names(StepRecord) - steps
    prune = set(re.findall(r"`(\w+)`", _bullet(section, "prune")))
    for cls in (PruneSummary, LayerSummary, SolverStats):
        assert _names(cls) <= prune, (cls.__name__, _names(cls) - prune)
    assert set(TIMING_KEYS) <= prune
