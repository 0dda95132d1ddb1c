import pytest

from accounts.models import User
from accounts.users import user_create

PASSWORD = "correct-horse-battery-staple"


@pytest.fixture
def admin(db) -> User:  # type: ignore[no-untyped-def]
    return user_create(username="ada", password=PASSWORD, user_type=User.Type.ADMIN)


@pytest.fixture
def member(db) -> User:  # type: ignore[no-untyped-def]
    """A User: OptimaChat only."""
    return user_create(username="bob", password=PASSWORD, user_type=User.Type.USER)


@pytest.fixture
def outsider(db) -> User:  # type: ignore[no-untyped-def]
    """Someone with an account but not one permission."""
    user = user_create(username="eve", password=PASSWORD, user_type=User.Type.USER)
    user.user_permissions.clear()
    return user
