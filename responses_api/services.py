"""Stored responses: saving, reading (only the owner's), the turns of a previous_response_id chain, pruning."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from gateway.principal import Principal
from optimagpt.errors import ApiError
from optimagpt.inserts import rows_insert

from .models import ACTIVE, StoredResponse
from .runner import ResponseRun

log = logging.getLogger("optimagpt.responses")
T = TypeVar("T")

# A background response whose row was not touched for this long has lost its process (responses_api/background.py
# touches it every few seconds).
STALE_S = 30.0
# A chain longer than this is not followed further (no window holds that many turns anyway).
MAX_CHAIN = 10_000
STOPPED_ERROR = {"code": "gateway_stopped",
                 "message": "The gateway process running this response stopped before it finished."}


class ResponseNotFound(ApiError):
    status = 404
    code = "not_found"


def _owner(principal: Principal) -> dict[str, Any]:
    """The rows `principal` owns: its user's, or, for a key without an owner, the key's own."""
    if principal.user_id is not None:
        return {"user_id": principal.user_id}
    assert principal.api_key is not None, "a principal is a user or a key"
    return {"user__isnull": True, "api_key_id": principal.api_key.pk}


def _not_found(response_id: str, param: str | None = None) -> ResponseNotFound:
    return ResponseNotFound(f"Response with id '{response_id}' not found.", param=param)


def _fields(run: ResponseRun) -> dict[str, Any]:
    completed = datetime.fromtimestamp(run.completed_at, UTC) if run.completed_at is not None else None
    return {"status": run.status, "output": run.output, "usage": run.usage, "error": run.error,
            "incomplete_details": run.incomplete_details, "completed_at": completed, "updated_at": timezone.now()}


def _new_row(run: ResponseRun) -> StoredResponse:
    principal = run.principal
    return StoredResponse(
        id=run.id, user_id=principal.user_id,
        api_key_id=principal.api_key.pk if principal.user_id is None and principal.api_key is not None else None,
        model=run.model, background=run.background, previous_id=run.previous_id, settings=run.settings,
        input_items=run.own_items, created_at=datetime.fromtimestamp(run.created_at, UTC), **_fields(run))


@database_sync_to_async
def response_create(run: ResponseRun) -> None:
    """Store `run` as it is now, before answering: a background response about to start."""
    _new_row(run).save(force_insert=True)


# Finished responses not written yet (written behind the answer, as usage is: a thread hop and a write per
# request cost the answer a millisecond); reads in this process wait for them (`_read`).
_unsaved: dict[str, StoredResponse] = {}
_writing: asyncio.Task[None] | None = None
WRITE_ATTEMPTS = 3
WRITE_RETRY_S = 1.0


def response_store(run: ResponseRun) -> None:
    """Store a finished response: in the database a moment after the answer, in one thread hop for all that
    finished meanwhile."""
    global _writing
    _unsaved[run.id] = _new_row(run)
    if _writing is None or _writing.done():
        _writing = asyncio.get_running_loop().create_task(_write_unsaved())


def _insert(rows: list[StoredResponse]) -> None:
    """INSERT the rows in one prepared statement (optimagpt/inserts.py)."""
    fields = StoredResponse._meta.concrete_fields
    rows_insert(StoredResponse, [str(f.column) for f in fields],
                [[f.get_db_prep_save(f.pre_save(row, True), connection) for f in fields] for row in rows])


def _insert_each(rows: list[StoredResponse]) -> list[StoredResponse]:
    """Each row on its own, after their batch failed: the rows that fail alone (one bad row, say of a key
    deleted meanwhile, must not lose the others)."""
    failed = []
    for row in rows:
        try:
            _insert([row])
        except Exception:  # noqa: BLE001 - reported by the caller, with the row's id
            failed.append(row)
    return failed


async def _write_unsaved() -> None:
    attempts: dict[str, int] = {}
    while _unsaved:
        batch = list(_unsaved.values())
        try:
            await database_sync_to_async(_insert)(batch)
            failed: list[StoredResponse] = []
        except Exception:  # noqa: BLE001 - the rows are tried one by one
            failed = await database_sync_to_async(_insert_each)(batch)
        for row in batch:
            if row not in failed:
                _unsaved.pop(row.id, None)
        for row in failed:
            attempts[row.id] = attempts.get(row.id, 0) + 1
            if attempts[row.id] >= WRITE_ATTEMPTS:
                log.error("could not store response %s after %d attempts: it is lost", row.id, WRITE_ATTEMPTS)
                _unsaved.pop(row.id, None)
        if failed and _unsaved:
            await asyncio.sleep(WRITE_RETRY_S)


async def responses_written() -> None:
    """Wait until every finished response of this process is in the database (reads, shutdown)."""
    while _writing is not None and not _writing.done():
        await asyncio.shield(_writing)


def responses_write_sync() -> None:
    """Write what is left (at shutdown, when no event loop runs any more)."""
    if _unsaved:
        StoredResponse.objects.bulk_create(list(_unsaved.values()), ignore_conflicts=True)
        _unsaved.clear()


@database_sync_to_async
def response_save(run: ResponseRun, final: bool = False) -> None:
    """A background response's state. A cancel made meanwhile (through any process) stays: the row is changed
    only while it is still running, except for the output, which a cancelled response keeps as far as it got."""
    rows = StoredResponse.objects.filter(pk=run.id, status__in=ACTIVE).update(**_fields(run))
    if not rows and final:
        StoredResponse.objects.filter(pk=run.id, status="cancelled").update(output=run.output, usage=run.usage)


@database_sync_to_async
def response_touch(run: ResponseRun) -> bool:
    """The heartbeat of a background response, with its output so far; False if it is no longer running
    (cancelled, or deleted)."""
    return bool(StoredResponse.objects.filter(pk=run.id, status__in=ACTIVE).update(
        status=run.status, output=run.output, updated_at=timezone.now()))


def _stopped(status: str, updated_at: datetime) -> bool:
    """Whether a row claims to be running but its process stopped touching it."""
    return status in ACTIVE and updated_at < timezone.now() - timedelta(seconds=STALE_S)


def _checked(row: StoredResponse) -> StoredResponse:
    """`row`, marked failed if its process stopped making it."""
    if _stopped(row.status, row.updated_at):
        now = timezone.now()
        if StoredResponse.objects.filter(pk=row.pk, status__in=ACTIVE).update(
                status="failed", error=STOPPED_ERROR, completed_at=now, updated_at=now):
            row.status, row.error, row.completed_at = "failed", STOPPED_ERROR, now
        else:
            row.refresh_from_db()
    return row


def _get(principal: Principal, response_id: str) -> StoredResponse:
    row = StoredResponse.objects.filter(pk=response_id, **_owner(principal)).first()
    if row is None:
        raise _not_found(response_id)
    return _checked(row)


def _snapshot(principal: Principal, response_id: str) -> dict[str, Any]:
    return _get(principal, response_id).snapshot()


def _delete(principal: Principal, response_id: str) -> bool:
    row = _get(principal, response_id)
    row.delete()
    return row.active


def _cancel(principal: Principal, response_id: str) -> dict[str, Any]:
    row = _get(principal, response_id)
    if not row.background:
        raise ApiError("Only responses created with background set to true can be cancelled.", param="response_id")
    now = timezone.now()
    StoredResponse.objects.filter(pk=row.pk, status__in=ACTIVE).update(status="cancelled", completed_at=now,
                                                                       updated_at=now)
    row.refresh_from_db()
    return row.snapshot()


def _input_items(principal: Principal, response_id: str) -> list[dict[str, Any]]:
    return list(_get(principal, response_id).input_items)


# One query for the whole chain: asked one row at a time, Django's query building alone took 0.7 ms a turn.
CHAIN_SQL = """
WITH RECURSIVE chain (id, previous_id, input_items, output, status, updated_at, depth) AS (
    SELECT id, previous_id, input_items, output, status, updated_at, 0 FROM {table}
    WHERE id = %s AND {owner}
  UNION ALL
    SELECT r.id, r.previous_id, r.input_items, r.output, r.status, r.updated_at, chain.depth + 1
    FROM {table} r JOIN chain ON r.id = chain.previous_id
    WHERE chain.previous_id <> '' AND chain.depth < %s AND {owner_r}
)
SELECT input_items, output, status, updated_at FROM chain ORDER BY depth DESC
"""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, (str, bytes)) else value  # SQLite gives text, PostgreSQL values


def _history(principal: Principal, previous_id: str) -> list[dict[str, Any]]:
    if principal.user_id is not None:
        owner, owner_r, params = "user_id = %s", "r.user_id = %s", [principal.user_id]
    else:
        assert principal.api_key is not None, "a principal is a user or a key"
        owner, owner_r = "user_id IS NULL AND api_key_id = %s", "r.user_id IS NULL AND r.api_key_id = %s"
        params = [principal.api_key.pk]
    sql = CHAIN_SQL.format(table=StoredResponse._meta.db_table, owner=owner, owner_r=owner_r)
    with connection.cursor() as cursor:
        cursor.execute(sql, [previous_id, *params, MAX_CHAIN, *params])
        rows = cursor.fetchall()
    if not rows:
        raise _not_found(previous_id, param="previous_response_id")
    status, updated_at = rows[-1][2], rows[-1][3]
    if isinstance(updated_at, str):  # SQLite: text, in UTC
        updated_at = parse_datetime(updated_at)
    if timezone.is_naive(updated_at):
        updated_at = timezone.make_aware(updated_at, UTC)
    if status in ACTIVE and not _stopped(status, updated_at):
        raise ApiError(f"Response '{previous_id}' is still {status.replace('_', ' ')}; continue it once it "
                       "has finished.", param="previous_response_id")
    return [item for input_items, output, _, _ in rows for item in _json(input_items) + _json(output)]


RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")
READ_AGAIN_S = 0.05


async def _read(fn: Callable[[Principal, str], T], principal: Principal, response_id: str) -> T:
    """`fn` in the database's thread, once this process's unwritten responses are written. A miss is asked
    again after READ_AGAIN_S: another gateway process may be writing that response this moment."""
    if _unsaved:
        await responses_written()
    try:
        return await database_sync_to_async(fn)(principal, response_id)
    except ResponseNotFound:
        if not RESPONSE_ID.match(response_id):
            raise
    await asyncio.sleep(READ_AGAIN_S)
    return await database_sync_to_async(fn)(principal, response_id)


async def response_get(principal: Principal, response_id: str) -> dict[str, Any]:
    return await _read(_snapshot, principal, response_id)


async def response_delete(principal: Principal, response_id: str) -> bool:
    """Delete the owner's response; whether it was a background one still running (to be stopped)."""
    return await _read(_delete, principal, response_id)


async def response_cancel(principal: Principal, response_id: str) -> dict[str, Any]:
    return await _read(_cancel, principal, response_id)


async def response_input_items(principal: Principal, response_id: str) -> list[dict[str, Any]]:
    return await _read(_input_items, principal, response_id)


async def history(principal: Principal, previous_id: str) -> list[dict[str, Any]]:
    """The items of a previous_response_id chain, oldest first: each response's input items, then its output.

    An unknown or foreign id is a 404; a response still running cannot be continued yet (400). The chain
    stops at a response that was deleted."""
    return await _read(_history, principal, previous_id)


def responses_fail_stopped(every: bool = False) -> int:
    """Mark failed the background responses whose process stopped: those not touched for STALE_S, or, with
    `every` (the only gateway process is starting), all that claim to be running."""
    rows = StoredResponse.objects.filter(status__in=ACTIVE)
    if not every:
        rows = rows.filter(updated_at__lt=timezone.now() - timedelta(seconds=STALE_S))
    now = timezone.now()
    return rows.update(status="failed", error=STOPPED_ERROR, completed_at=now, updated_at=now)


def responses_prune() -> dict[str, int]:
    """Drop stored responses older than OPTIMAGPT_RESPONSES_RETENTION_DAYS; fail those whose process stopped."""
    cutoff = timezone.now() - timedelta(days=settings.OPTIMAGPT_RESPONSES_RETENTION_DAYS)
    pruned, _ = StoredResponse.objects.filter(created_at__lt=cutoff).delete()
    return {"responses": pruned, "stopped": responses_fail_stopped()}
