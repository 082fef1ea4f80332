"""RELIABILITY.md lists every case of the reliability suite: a case added without its row fails here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "RELIABILITY.md"

#: Parametrized tests that are not rows of the tables (probes of the tests themselves, fuzz examples).
NOT_ROWS = {
    "test_the_payloads_are_live",
    "test_empty_tensor_with_absurd_sizes",
    "test_an_import_token_goes_to_its_own_host_only",
    "test_pnginfo_remix_takes_any_size_text",
}


def _collected_ids() -> dict[str, set[str]]:
    """Case id -> the test modules holding it, from pytest's own collection of tests/reliability."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    listing = subprocess.run(
        [*command, "tests/reliability"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
    ).stdout
    found: dict[str, set[str]] = {}
    for line in listing.splitlines():
        match = re.fullmatch(r"tests/reliability/(\w+\.py)::(\w+)\[(.+)\]", line.strip())
        if match and match[2] not in NOT_ROWS:
            found.setdefault(match[3], set()).add(match[1])
    return found


def _documented_ids(text: str) -> set[str]:
    """The ids in the first column of every table row (several per row, separated by commas)."""
    ids: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| id ") and not line.startswith("|---"):
            ids.update(part.strip().strip("`") for part in line.split("|")[1].split(","))
    return ids


def test_every_case_of_the_suite_has_its_row() -> None:
    collected = _collected_ids()
    assert len(collected) > 150  # the suite is really there (collection did not silently fail)
    missing = sorted(case for case in collected if case not in _documented_ids(DOC.read_text()))
    assert not missing, f"cases without a row in RELIABILITY.md: {missing}"


def test_every_reliability_module_is_named_with_its_command() -> None:
    text = DOC.read_text()
    modules = sorted(p.name for p in (REPO / "tests" / "reliability").glob("test_*.py"))
    unnamed = [name for name in modules if name != Path(__file__).name and name not in text]
    assert not unnamed, f"modules RELIABILITY.md does not name: {unnamed}"
