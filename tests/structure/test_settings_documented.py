"""Every setting the gateway and the node agent read from the environment is listed in .env.example."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The helpers of optimagpt/env.py and node_agent/settings.py that read one variable each.
READ = re.compile(r'\b(?:env_(?:str|bool|int|float|list|secret|str_map)|_env|_env_list|_secret)\(\s*"([A-Z0-9_]+)"')


def test_every_setting_read_is_in_env_example() -> None:
    names = set()
    for source in ("optimagpt/settings.py", "node_agent/settings.py"):
        names |= set(READ.findall((REPO / source).read_text()))
    assert len(names) > 50, "the pattern no longer finds the settings"
    example = (REPO / ".env.example").read_text()
    missing = sorted(n for n in names if not re.search(rf"^#?\s*{n}=", example, re.M))
    assert not missing, f"not in .env.example: {missing}"
    assert {"OPTIMAGPT_HTTPS_PORT", "OPTIMAGPT_TLS_CERT_FILE", "OPTIMAGPT_TLS_CHECK_S"} <= names
