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


def test_a_link_pointing_outside_the_folder_is_refused(tmp_path: Path, model_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "escape.gguf").symlink_to(model_path)
    assert scan_model_dirs((folder,)) == {}


def test_model_ids_are_lower_case_file_names() -> None:
    assert model_id_for(Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct-q4_1"
