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


def _fitted(model_path: Path, available: int, monkeypatch: pytest.MonkeyPatch, **settings: object) -> tuple[int, int]:
    """(n_ctx, parallel) the node picks for the default model with `available` bytes of free memory."""
    import node_agent.executors as executors

    monkeypatch.setattr(executors.psutil, "virtual_memory", lambda: type("Memory", (), {"available": available})())
    (model,) = [
        m for m in executors.scan_model_dirs((model_path.parent,)).values() if m.path == model_path.resolve()]
    supervisor = executors.ModelSupervisor(model, ExecutorSettings(enabled=True, **settings), lambda: None)
    config = supervisor.process_config(executors.NodeDefaults(n_ctx_cap=4096, threads=2, n_gpu_layers=0,
                                                              stream_interval_ms=0))
    assert config is not None
    return config.n_ctx, config.parallel


def test_parallel_is_eight_where_memory_holds_eight_windows_and_fewer_where_not(
        model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node_agent.gguf_header import read_gguf_header

    per_token = read_gguf_header(model_path).kv_bytes_per_token()
    window = 4096 * per_token  # the key-value cache of one request at the node's default cap
    gib = 1 << 30
    assert _fitted(model_path, 64 * gib, monkeypatch) == (4096, 8)
    # Half the free memory is the budget: three windows' worth of it holds three sequences.
    assert _fitted(model_path, 6 * window + window // 2, monkeypatch) == (4096, 3)
    assert _fitted(model_path, window, monkeypatch)[1] == 1  # one at the least, the window shrunk to fit
    # An admin's choice stands; the automatic window then fits that many sequences.
    assert _fitted(model_path, 64 * gib, monkeypatch, parallel=20) == (4096, 20)
    assert _fitted(model_path, 8 * window, monkeypatch, parallel=16) == (1024, 16)
    assert _fitted(model_path, 64 * gib, monkeypatch, n_ctx=2048, replicas=2) == (2048, 8)
    with pytest.raises(SettingsError, match="parallel"):
        ExecutorSettings.parse({"parallel": 65})
