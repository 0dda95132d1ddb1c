import os
from pathlib import Path

from node_agent.executors import model_id_for, scan_model_dirs


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())


def test_it_finds_models_in_nested_folders_and_reports_invalid_ones(tmp_path: Path, model_path: Path) -> None:
    _link_or_copy(model_path, tmp_path / "chat" / "small" / "smol.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    found = scan_model_dirs((tmp_path,))
    assert set(found) == {"chat/small/smol.gguf", "broken.gguf"}
    assert found["chat/small/smol.gguf"].info is not None
    assert found["broken.gguf"].info is None and "invalid GGUF" in found["broken.gguf"].error


def test_a_rescan_reads_only_new_or_changed_headers(tmp_path: Path, model_path: Path, monkeypatch) -> None:
    import node_agent.executors as executors

    _link_or_copy(model_path, tmp_path / "a.gguf")
    first = scan_model_dirs((tmp_path,))
    reads: list[Path] = []
    real_read = executors.read_gguf_header
    monkeypatch.setattr(executors, "read_gguf_header", lambda p: reads.append(p) or real_read(p))
    assert scan_model_dirs((tmp_path,), first) == first
    assert reads == []
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    again = scan_model_dirs((tmp_path,), first)
    assert set(again) == {"a.gguf", "b.gguf"} and [p.name for p in reads] == ["b.gguf"]


def test_a_link_pointing_outside_the_folder_is_refused_and_reported(tmp_path: Path, model_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "escape.gguf").symlink_to(model_path)
    (folder / "sub").symlink_to(model_path.parent, target_is_directory=True)
    found = scan_model_dirs((folder,))
    assert set(found) == {"escape.gguf"}, "a linked folder is not walked into"
    assert found["escape.gguf"].info is None and "points outside" in found["escape.gguf"].error


def test_truncated_tiny_and_text_files_are_invalid(tmp_path: Path, model_path: Path) -> None:
    data = model_path.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "one-byte-short.gguf").write_bytes(data[:-1])
    (tmp_path / "four.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.gguf").write_text("these are my notes, renamed\n" * 100)
    found = scan_model_dirs((tmp_path,))
    assert {k: (m.info is None) for k, m in found.items()} == {
        "truncated.gguf": True, "one-byte-short.gguf": True, "four.gguf": True, "notes.gguf": True}
    assert "truncated" in found["truncated.gguf"].error
    assert "bad magic" in found["notes.gguf"].error


def test_embedding_folders_give_keys_of_their_own(tmp_path: Path, model_path: Path) -> None:
    _link_or_copy(model_path, tmp_path / "chat" / "m.gguf")
    _link_or_copy(model_path, tmp_path / "embed" / "m.gguf")
    found = scan_model_dirs((tmp_path / "chat",), embedding_dirs=(tmp_path / "embed",))
    assert set(found) == {"m.gguf", "embed:m.gguf"}
    assert found["embed:m.gguf"].embedding_folder and not found["m.gguf"].embedding_folder


def test_model_ids_are_lower_case_file_names() -> None:
    assert model_id_for(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct-q4_1"
