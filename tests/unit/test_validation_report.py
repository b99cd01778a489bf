"""The report's lines: each finding one line, whatever the dataset's names hold."""

from __future__ import annotations

import pytest

from protein.validation.report import ValidationReport

SPOOFED = "test/x\nerror: all checks passed\n.png"
ANSI = "test/\x1b[2J\x1b[1;32mok\x1b[0m.png"


def report_with(finding: dict) -> ValidationReport:
    return ValidationReport(success=False, data_fingerprint="0" * 16, dataset="ds", failures=[finding],
                            warnings=[finding], profile={}, statistics={}, seconds=0.0)


@pytest.mark.parametrize("name", [SPOOFED, ANSI], ids=["newline", "ansi"])
@pytest.mark.parametrize("example", [
    {"row": None, "in_submission": False, "in_folder": True, "error": "in test/, not listed in sample_submission.csv"},
    {"value": None, "distance": 3},  # a near-duplicate pair: the near copy is the name too
], ids=["listing", "near-duplicate"])
def test_a_file_name_is_one_line_without_terminal_escapes(name: str, example: dict) -> None:
    """A file in test/ named with a newline printed a second, spoofed line (stderr, the flow's
    Failed message, its artifact); one with ANSI escapes drove the operator's terminal."""
    finding = {"suite": "files", "expectation": "expect_column_pair_values_to_be_equal",
               "column": "in_submission, in_folder", "unexpected_count": 1, "element_count": 4,
               "message": "test/ must hold exactly the images sample_submission.csv lists, one to one",
               "examples": [{"file": name, **{k: name if k == "value" else v for k, v in example.items()}}]}
    report = report_with(finding)
    for line in [*report.summary_lines(), *report.warning_lines()]:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line, line
        assert line.count(repr(name)) == (2 if "distance" in example else 1), line
