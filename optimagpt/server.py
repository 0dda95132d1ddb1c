"""Run the gateway under daphne: `python -m optimagpt.server -b 127.0.0.1 -p 8000` (daphne's own flags).

Daphne alone would be `python -m daphne ... optimagpt.asgi:application`. This
wrapper adds one thing: once daphne has stopped, the process ends with
os._exit instead of a normal interpreter shutdown. On CPython 3.11 that
shutdown can segfault while garbage-collecting a channel layer's pending
asyncio.Queue.get (python/cpython#113566), turning a clean SIGTERM into exit
code 139. Everything worth finishing (requests, links, database writes) has
finished by the time daphne returns.
"""

from __future__ import annotations

import logging
import os
import sys

APPLICATION = "optimagpt.asgi:application"


def main(argv: list[str]) -> None:
    from daphne.cli import CommandLineInterface

    code = 0
    try:
        CommandLineInterface().run([*argv, APPLICATION])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, then still skip the crashing shutdown
        logging.getLogger("optimagpt.server").exception("daphne failed")
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
