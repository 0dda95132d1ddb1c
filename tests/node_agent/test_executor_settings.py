"""Executor settings: validated in one place (the node; the gateway calls the same code), kept across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from node_agent.executors import ExecutorSettings, SettingsError, SettingsStore


def test_changes_apply_on_top_of_the_current_settings() -> None:
    base = ExecutorSettings(enabled=True, n_ctx=2048)
    changed = ExecutorSettings.parse({"replicas": 2, "alias": "smol"}, base=base)
    assert (changed.enabled, changed.n_ctx, changed.replicas, changed.alias) == (True, 2048, 2, "smol")


@pytest.mark.parametrize("changes, words", [
    ({"n_ctx": -5}, "n_ctx"), ({"n_ctx": "4096"}, "n_ctx"), ({"replicas": 0}, "replicas"),
    ({"replicas": True}, "replicas"), ({"threads": 1.5}, "threads"), ({"enabled": 1}, "enabled"),
    ({"alias": "../etc"}, "alias"), ({"alias": "a b"}, "alias"), ({"chat_format": "<x>"}, "chat_format"),
    ({"n_gpu_layers": -2}, "n_gpu_layers"), ({"description": "x" * 1001}, "description"),
    ({"nope": 1}, "unknown setting"), ({"embedding": "yes"}, "embedding"),
])
def test_bad_values_are_refused_with_the_setting_named(changes: dict, words: str) -> None:
    with pytest.raises(SettingsError, match=words):
        ExecutorSettings.parse(changes)


def test_settings_survive_a_restart_and_a_damaged_file_is_not_fatal(tmp_path: Path) -> None:
    store = SettingsStore(tmp_path / "executors.json")
    assert store.load() == {}
    store.save({"a.gguf": ExecutorSettings(enabled=True, replicas=3)})
    assert SettingsStore(tmp_path / "executors.json").load() == {"a.gguf": ExecutorSettings(enabled=True, replicas=3)}
    (tmp_path / "executors.json").write_text("{not json")
    assert store.load() == {}
