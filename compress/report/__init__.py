"""What a run reports: report.json (versioned schema), report.md, report.html, the CI step summary,
and the comparison of several runs (``compare``)."""

from __future__ import annotations

from pathlib import Path

from .html import render
from .markdown import markdown, step_summary
from .model import REPORT_SCHEMA_VERSION, Report

__all__ = ["REPORT_SCHEMA_VERSION", "Report", "markdown", "render", "step_summary", "write_reports"]


def write_reports(report: Report, folder: Path) -> None:
    (folder / "report.json").write_text(report.to_json())
    (folder / "report.md").write_text(markdown(report))
    (folder / "report.html").write_text(render(report))
