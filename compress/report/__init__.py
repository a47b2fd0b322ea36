"""What a run reports: report.json (versioned schema), report.md, report.html, the CI step summary,
and the comparison of several runs (``compare``)."""

from __future__ import annotations

import json
from pathlib import Path

from .html import render
from .markdown import markdown, step_summary

REPORT_SCHEMA_VERSION = 1

__all__ = ["REPORT_SCHEMA_VERSION", "markdown", "render", "step_summary", "write_reports"]


def write_reports(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "report.md").write_text(markdown(report))
    (folder / "report.html").write_text(render(report))
