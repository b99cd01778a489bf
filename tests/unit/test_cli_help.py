"""`protein --help` lists every exit code protein.errors gives (12, training diverged, was missing)."""

from __future__ import annotations

import re

import protein.errors
from protein.cli import build_parser


def _subclasses(cls: type) -> list[type]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _subclasses(child))]


def test_the_help_names_every_exit_code_of_protein_errors() -> None:
    codes = {cls.exit_code for cls in _subclasses(protein.errors.ProteinError)
             if cls.__module__ == protein.errors.__name__}
    described = build_parser().format_help()
    missing = [code for code in sorted(codes) if not re.search(rf"(?<![\w-]){code} [a-z]", described)]
    assert missing == [], described
