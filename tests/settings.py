"""Settings for the in-process tests: the real settings with a throwaway secret and node key."""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("OPTIMAGPT_NODE_ACCESS_KEY", "tests-node-access-key")  # 21 characters
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)

from optimagpt.settings import *  # noqa: F403
