from tests.accounts.conftest import admin, member, outsider  # noqa: F401 - shared users for permission cases
