from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _settings_as_the_environment_says() -> Iterator[None]:
    """What a test stored on the Configuration page is laid over django.conf.settings; undo it after each test."""
    from django.conf import settings

    from operations import config, nodekeys

    defaults = dict(config.environment())
    yield
    for name, value in defaults.items():
        setattr(settings, name, value)
    config._stored.clear()
    config._tracing_until = 0.0
    nodekeys.keys_load(None, None)
