"""``dreamcord generate --no-wait``, ``queue``, ``cancel`` and ``worker --until-idle`` in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main


@pytest.fixture(autouse=True)
def env(tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMCORD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DREAMCORD_BUILTIN_MODELS_DIR", str(tiny_models))
    monkeypatch.setenv("DREAMCORD_CONFIG", str(tmp_path / "none.toml"))


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, object]:
    assert main(argv) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out


def test_queue_then_cancel_then_serve(capsys: pytest.CaptureFixture[str]) -> None:
    common = [
        "--model",
        "tiny-sd15",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--no-wait",
        "--json",
    ]
    first = _json(capsys, ["generate", "--prompt", "a red circle", "--user", "1", *common])
    second = _json(capsys, ["generate", "--prompt", "a blue square", "--user", "1", *common])
    third = _json(capsys, ["generate", "--prompt", "a star", "--user", "2", *common])
    ids = [job["job"]["id"] for job in (first, second, third)]  # type: ignore[index]
    listed = _json(capsys, ["queue", "--json"])["jobs"]
    assert [(row["job"], row["position"]) for row in listed] == [(ids[0], 1), (ids[2], 2), (ids[1], 3)]  # type: ignore[union-attr, index]
    assert _json(capsys, ["cancel", str(ids[1]), "--json"]) == {"job": ids[1], "cancelled": True}
    assert main(["worker", "--until-idle"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted((line["job"], line["status"]) for line in lines) == [(ids[0], "done"), (ids[2], "done")]
    assert _json(capsys, ["queue", "--json"]) == {"jobs": []}
    assert _json(capsys, ["cancel", str(ids[0]), "--json"]) == {"job": ids[0], "cancelled": False}


def test_cancel_of_an_unknown_job_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cancel", "999"]) == 2
    assert capsys.readouterr().err.strip() == "There is no job 999 that you can cancel."
