"""JUnit XML of a run's budgets, so CI systems (GitHub, GitLab, Jenkins) show each budget as a test.

One test suite per run; one test case per budget, failed when the budget was missed. A run that
stopped on bad input gets a single test case with an <error>.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from .report.model import Report


def budgets_xml(report: Report) -> str:
    checks = report.budgets
    failures = sum(not c.passed for c in checks)
    name = f"compress budgets: {report.name} on {report.model.spec}"
    suite = ET.Element("testsuite", name=name, tests=str(len(checks)), failures=str(failures), errors="0",
                       time=f"{report.timing.total_seconds:.1f}")
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname="compress.budgets", name=c.name)
        relation = ">=" if c.kind == "min" else "<="
        if not c.passed:
            actual = "not measured" if c.actual is None else f"{c.actual:.6g}"
            failure = ET.SubElement(case, "failure", message=f"{c.name}: {actual}, needs {relation} {c.limit}")
            failure.text = f"actual {actual}, limit {relation} {c.limit}"
        else:
            ET.SubElement(case, "system-out").text = f"actual {c.actual:.6g}, limit {relation} {c.limit}"
    return _serialize(ET.Element("testsuites"), suite)


def error_xml(message: str, what: str) -> str:
    suite = ET.Element("testsuite", name=f"compress: {what}", tests="1", failures="0", errors="1")
    case = ET.SubElement(suite, "testcase", classname="compress.run", name="run")
    ET.SubElement(case, "error", message=message).text = message
    return _serialize(ET.Element("testsuites"), suite)


def _serialize(root, suite) -> str:
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_atomically(path: str | Path, text: str) -> None:
    """Write ``text`` via a temporary file renamed into place: never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
