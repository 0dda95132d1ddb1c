from pathlib import Path

import pytest

from node_agent.gguf_header import InvalidGGUF, read_gguf_header


def test_it_reads_name_architecture_size_quantisation_and_context(model_path: Path) -> None:
    info = read_gguf_header(model_path)
    assert info.architecture == "llama"
    assert info.name.lower().startswith("smollm2")
    assert 130_000_000 < info.parameter_count < 140_000_000
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.chat_template and "<|im_start|>" in info.chat_template


@pytest.mark.parametrize("content", [b"GGUF", b"hello, I am a text file renamed to .gguf\n", b""])
def test_it_rejects_files_that_are_not_gguf(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidGGUF):
        read_gguf_header(path)


def test_it_rejects_a_truncated_download(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(model_path.read_bytes()[:50_000])
    with pytest.raises(InvalidGGUF):
        read_gguf_header(path)
