from celery import shared_task

from .usage import UsageRow, usage_add


@shared_task(time_limit=60, autoretry_for=(Exception,), retry_backoff=True, max_retries=5)
def usage_record(rows: list[UsageRow]) -> None:
    """Entry point for the gateway's batched usage: see gateway/usage.py."""
    usage_add(rows=rows)
