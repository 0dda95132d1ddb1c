from django.core import checks
from django.test import override_settings


def _ids() -> set[str]:
    return {m.id for m in checks.run_checks()}


def test_a_missing_node_access_key_is_reported_with_a_hint() -> None:
    with override_settings(OPTIMAGPT_NODE_ACCESS_KEY=""):
        assert "optimagpt.W001" in _ids()


def test_a_short_node_access_key_is_reported() -> None:
    with override_settings(OPTIMAGPT_NODE_ACCESS_KEY="short"):
        assert "optimagpt.W002" in _ids()


def test_a_long_node_access_key_passes() -> None:
    with override_settings(OPTIMAGPT_NODE_ACCESS_KEY="x" * 32):
        assert not {"optimagpt.W001", "optimagpt.W002"} & _ids()
