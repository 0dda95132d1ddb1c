"""Many rows written in one prepared INSERT, for the writes that batch behind answers (stored responses, the
request log): Django's bulk_create builds its query anew for each row (0.2 ms a row, measured for stored
responses), on the thread that the event loop shares its interpreter with.

On SQLite the rows go as one JSON parameter that SQLite itself takes apart (json_each): executemany binds row
after row, and takes the interpreter lock back from the event loop for each (it lets go of it around every
row's step), a thread switch per row. The request log at 1000 requests/s cost the gateway 6% of its
throughput so; in one parameter, one switch per batch (bench/routing.py).

Imports nothing of the project. The statement names the model's own columns; every value is a parameter.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from django.db import connection, models, transaction


@functools.cache
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(connection.ops.quote_name(c) for c in columns)
    # (The names are the model's own and every value is a parameter: no SQL is made from input.)
    return f"INSERT INTO {connection.ops.quote_name(table)} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"  # nosec B608


@functools.cache
def _sqlite_json_insert_sql(table: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(connection.ops.quote_name(c) for c in columns)
    picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
    # (As above: the model's own names, and the rows are one parameter.)
    return f"INSERT INTO {connection.ops.quote_name(table)} ({names}) SELECT {picks} FROM json_each(%s)"  # nosec B608


def rows_insert(model: type[models.Model], columns: Sequence[str], values: Sequence[Sequence[Any]]) -> None:
    """INSERT `values` (one sequence per row, in the order of `columns`, ready for the database) in one
    transaction."""
    table, names = model._meta.db_table, tuple(columns)
    rows_json = None
    if connection.vendor == "sqlite":
        try:  # values JSON can carry as they are (text, numbers, booleans, NULL); anything else row by row
            rows_json = json.dumps(values, allow_nan=False)
        except (TypeError, ValueError):
            pass
    with transaction.atomic(), connection.cursor() as cursor:
        if rows_json is not None:
            cursor.execute(_sqlite_json_insert_sql(table, names), [rows_json])
        else:
            cursor.executemany(_insert_sql(table, names), values)
