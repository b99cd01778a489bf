"""The validation report: what passed, what failed and where, in lines a person can act on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from protein.validation.config import SUMMARY_EXAMPLES


@dataclass
class ValidationReport:
    success: bool  # the GX Checkpoint's verdict over the critical suites
    data_fingerprint: str
    dataset: str
    failures: list[dict]
    warnings: list[dict]
    profile: dict
    statistics: dict
    seconds: float
    docs_path: str | None = None
    docs_uri: str | None = None
    report_uri: str | None = None
    reference: dict = field(default_factory=dict)  # source, n, hash and URI of the reference profile
    suites: dict = field(default_factory=dict)  # each suite's JSON: the exact rules this data met
    skipped: list = field(default_factory=list)  # checks not run, and why (--headers-only, reference lacks)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """One short line per failed expectation: what, where, how many, and a few examples."""
        return [describe(f) for f in self.failures]

    def warning_lines(self) -> list[str]:
        return [f"warning: {describe(w)}" for w in self.warnings]


def describe(finding: dict) -> str:
    where = f"{finding['expectation']}({finding['column']})" if finding.get("column") else finding["expectation"]
    total = finding.get("element_count")
    count = finding.get("unexpected_count", 0)
    if "window" in finding:
        line = (f"{finding['suite']}: {where}: {count} of {total} shares drifted in {finding['window']} "
                f"(n={finding.get('rows')}) - {finding['message']}")
    elif finding.get("examples") and "statistic" in finding["examples"][0]:
        line = f"{finding['suite']}: {where}: outside the reference's bounds - {finding['message']}"
    elif total is None and finding.get("examples"):
        line = f"{finding['suite']}: {where}: {count:,} unexpected - {finding['message']}"
    elif total is None:
        return f"{finding['suite']}: {where}: {finding['message']}"
    else:
        line = f"{finding['suite']}: {where}: {count:,} of {total:,} rows unexpected - {finding['message']}"
    examples = finding.get("examples") or []
    if examples:
        shown = "; ".join(_example_text(e) for e in examples[:SUMMARY_EXAMPLES])
        more = f" (+{count - SUMMARY_EXAMPLES:,} more)" if count > SUMMARY_EXAMPLES else ""
        line += f"; e.g. {shown}{more}"
    return line


def _example_text(example: dict) -> str:
    if "statistic" in example:
        return (f"{example['statistic']}: reference {example['reference']:.4f}, now {example['observed']:.4f} "
                f"(bounds {example['lower']:.4f} to {example['upper']:.4f}, adjusted p={example['p_adjusted']})")
    if "observed" in example and "reference" in example:
        what = " ".join(str(example[k]) for k in ("check", "name") if k in example)
        shift = (example["observed"] - example["reference"]) * 100
        return (f"{what}: {example['reference']:.1%} -> {example['observed']:.1%} ({shift:+.1f} points, "
                f"adjusted p={example.get('p_adjusted')})")
    parts = []
    if "file" in example:  # repr, like ids: a name in test/ may hold a newline or an ANSI escape
        parts.append(repr(example["file"]))
    elif "Image" in example:
        parts.append(f"Image {example['Image']!r}")
    if "row" in example:
        parts.append(f"row {example['row']}")
    text = " ".join(parts)
    if "Label" in example:
        text += f" Label {example['Label']!r}"
    if "distance" in example:  # a near-duplicate pair
        return f"{text} ~ {example['value']!r} ({example['distance']} bits apart)"
    if "value" in example:
        text += f" = {example['value']!r}"
    if "error" in example:
        text += f" ({example['error']})"
    return text
