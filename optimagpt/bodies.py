"""Reading request bodies on our own APIs. Endpoints take their body as a typed django-ninja parameter
(`body: SomeIn`), so /docs shows it and a bad one is answered by optimagpt/api.py's handler in OpenAI's
error format; `validated` is for the one body whose schema depends on the row it changes (a remote
upstream's PATCH), checked after the row is read.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import InvalidRequest


def validated(schema: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    """The fields of `body` that it sets, checked against `schema`; InvalidRequest naming the first bad one."""
    try:
        parsed = schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"Invalid value for '{where}': {first['msg']}", param=where or None) from None
    return parsed.model_dump(exclude_unset=True)
