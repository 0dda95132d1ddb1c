"""Read what a node needs to know about a GGUF file from its header alone.

`gguf.GGUFReader` parses every field into numpy arrays, the 49k-entry tokenizer
vocabulary included, which takes seconds per file. A node scans whole folders,
so this reader walks the header once, skips arrays it does not need, and sums
the tensor shapes for the parameter count. The enums come from the `gguf`
package so type codes and file-type names stay those of llama.cpp.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

GGUF_MAGIC = b"GGUF"
# Strings and arrays longer than this are not metadata a header should carry;
# refusing them keeps a corrupt length field from making us read gigabytes.
MAX_STRING_BYTES = 16 * 1024 * 1024
MAX_ARRAY_ITEMS = 16 * 1024 * 1024
MAX_TENSORS = 1_000_000

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# Arrays kept in full; every other array is skipped and recorded by its length.
_KEEP_ARRAYS = {"general.languages", "general.tags"}


class InvalidGGUF(ValueError):
    """The file is not a GGUF model we can read (bad magic, truncated, absurd sizes)."""


@dataclass(frozen=True)
class GGUFInfo:
    name: str
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int | None
    embedding_length: int | None
    chat_template: str | None
    metadata: dict[str, object] = field(repr=False)

    @property
    def family(self) -> str:
        """The model family as its makers name it (SmolLM2, gemma-3), else the architecture."""
        return str(self.metadata.get("general.basename") or self.architecture)

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 key and value cache one token of context takes; 0 when the header does not say."""
        arch = self.architecture

        def value(suffix: str) -> int:
            v = self.metadata.get(f"{arch}.{suffix}")
            return int(v) if isinstance(v, int) else 0

        layers, heads = value("block_count"), value("attention.head_count")
        kv_heads = value("attention.head_count_kv") or heads
        if not layers or not heads:
            return 0
        head_dim_k = value("attention.key_length") or (self.embedding_length or 0) // heads
        head_dim_v = value("attention.value_length") or head_dim_k
        return layers * kv_heads * (head_dim_k + head_dim_v) * 2


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise InvalidGGUF("file ends inside its header")
    return data


def _unpack(f: BinaryIO, fmt: str) -> object:
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _unpack_count(f: BinaryIO, fmt: str) -> int:
    """An unsigned integer field ("<I", "<Q"): a length, a count, a type code."""
    value: int = struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    return value


def _read_string(f: BinaryIO) -> str:
    length = _unpack_count(f, "<Q")
    if length > MAX_STRING_BYTES:
        raise InvalidGGUF(f"string of {length} bytes in header")
    return _read(f, length).decode("utf-8", errors="replace")


def _skip_string(f: BinaryIO) -> None:
    length = _unpack_count(f, "<Q")
    if length > MAX_STRING_BYTES:
        raise InvalidGGUF(f"string of {length} bytes in header")
    f.seek(length, 1)


def _read_value(f: BinaryIO, vtype: GGUFValueType, key: str) -> object:
    if vtype == GGUFValueType.STRING:
        return _read_string(f)
    if vtype in _SCALARS:
        return _unpack(f, _SCALARS[vtype])
    if vtype == GGUFValueType.ARRAY:
        item_type = _value_type(_unpack_count(f, "<I"))
        count = _unpack_count(f, "<Q")
        if count > MAX_ARRAY_ITEMS:
            raise InvalidGGUF(f"array of {count} items in header")
        if key in _KEEP_ARRAYS:
            return [_read_value(f, item_type, key) for _ in range(count)]
        if item_type == GGUFValueType.STRING:
            for _ in range(count):
                _skip_string(f)
        elif item_type in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_type]), 1)
        else:
            for _ in range(count):
                _read_value(f, item_type, key)
        return f"<array of {count}>"
    raise InvalidGGUF(f"unknown value type {vtype}")


def _value_type(code: int) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError as exc:
        raise InvalidGGUF(f"unknown value type {code}") from exc


def _quantization_name(file_type: object) -> str:
    if not isinstance(file_type, int):
        return "unknown"
    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return "unknown"


def _tensor_bytes(ggml_type: int, elements: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise InvalidGGUF(f"unknown tensor type {ggml_type}") from None
    return elements // block_size * type_size


def read_gguf_header(path: Path) -> GGUFInfo:
    """Parse the header of `path`; raise InvalidGGUF for anything that is not a readable GGUF."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InvalidGGUF("not a GGUF file (bad magic)")
        version = _unpack_count(f, "<I")
        if version not in (2, 3):
            raise InvalidGGUF(f"unsupported GGUF version {version}")
        tensor_count = _unpack_count(f, "<Q")
        kv_count = _unpack_count(f, "<Q")
        if tensor_count > MAX_TENSORS or kv_count > MAX_TENSORS:
            raise InvalidGGUF("absurd tensor or key count")
        metadata: dict[str, object] = {}
        for _ in range(kv_count):
            key = _read_string(f)
            metadata[key] = _read_value(f, _value_type(_unpack_count(f, "<I")), key)
        parameters = 0
        data_bytes = 0  # end of the last tensor, from the start of the data section
        for _ in range(tensor_count):
            _skip_string(f)
            n_dims = _unpack_count(f, "<I")
            if n_dims > 8:
                raise InvalidGGUF("tensor with more than 8 dimensions")
            dims = struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", _read(f, 4 + 8))
            count = 1
            for d in dims:
                count *= d
            parameters += count
            data_bytes = max(data_bytes, offset + _tensor_bytes(ggml_type, count))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise InvalidGGUF(f"bad alignment {alignment!r}")
        data_start = -(-f.tell() // alignment) * alignment
        # The tensor data must all be there: a truncated download has a good header
        # and only part of the weights, and would only fail later inside llama.cpp.
        size = path.stat().st_size
        if tensor_count and size < data_start + data_bytes:
            raise InvalidGGUF(f"file is truncated: its tensors need {data_start + data_bytes} bytes, it has {size}")

    arch = str(metadata.get("general.architecture", "unknown"))

    def arch_int(suffix: str) -> int | None:
        value = metadata.get(f"{arch}.{suffix}")
        return int(value) if isinstance(value, int) else None

    template = metadata.get("tokenizer.chat_template")
    return GGUFInfo(
        name=str(metadata.get("general.name") or path.stem),
        architecture=arch,
        parameter_count=parameters,
        quantization=_quantization_name(metadata.get("general.file_type")),
        context_length=arch_int("context_length"),
        embedding_length=arch_int("embedding_length"),
        chat_template=template if isinstance(template, str) else None,
        metadata=metadata,
    )
