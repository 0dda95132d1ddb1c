"""Data files readable by their owner only: the SQLite database, the embedded default's secrets."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

OWNER_ONLY_UMASK = 0o077


def restrict_to_owner(folder: Path, *files: Path) -> None:
    """Make `folder` (0700) and the `files` that exist (0600, with SQLite's -wal and -shm) this user's alone.

    Files made later by this process are too: the umask leaves group and others out. A folder or file
    that another user owns is left as it is (we may only read it), and so is a missing one.
    """
    os.umask(OWNER_ONLY_UMASK)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = [(folder, 0o700)]
    for file in files:
        paths += [(file.with_name(file.name + suffix), 0o600) for suffix in ("", "-wal", "-shm", "-journal")]
    for path, mode in paths:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o777 != mode:
                path.chmod(mode)
