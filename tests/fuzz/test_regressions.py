"""Every input the fuzzers (fuzz/fuzz.py) found a crash with, replayed through its target: none may crash again."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("optimagpt_fuzz", FUZZ / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = sorted((path.parent.name, path) for path in (FUZZ / "regressions").glob("*/*") if path.is_file())


def test_there_are_regressions_to_replay() -> None:
    assert CASES, "fuzz/regressions/ holds the crashes found so far"


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_a_crash_found_by_fuzzing_stays_fixed(target: str, path: Path) -> None:
    module = _fuzz_module()
    function, _ = module.TARGETS[target]
    function(path.read_bytes())


@pytest.mark.parametrize("target", ["gguf", "link", "pipe"])
def test_the_starting_corpus_goes_through_every_target(target: str) -> None:
    module = _fuzz_module()
    function, seeds = module.TARGETS[target]
    for data in seeds():
        function(data)
