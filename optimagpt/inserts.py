"""Many rows written in one prepared INSERT, for the writes that batch behind answers (stored responses, the
request log): Django's bulk_create builds its query anew for each row (0.2 ms a row, measured for stored
responses), on the thread that the event loop shares its interpreter with.

Imports nothing of the project. The statement names the model's own columns; every value is a parameter.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from django.db import connection, models, transaction


@functools.cache
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(connection.ops.quote_name(c) for c in columns)
    # (The names are the model's own and every value is a parameter: no SQL is made from input.)
    return f"INSERT INTO {connection.ops.quote_name(table)} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"  # nosec B608


def rows_insert(model: type[models.Model], columns: Sequence[str], values: Sequence[Sequence[Any]]) -> None:
    """INSERT `values` (one sequence per row, in the order of `columns`, ready for the database) in one
    transaction."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.executemany(_insert_sql(model._meta.db_table, tuple(columns)), values)
