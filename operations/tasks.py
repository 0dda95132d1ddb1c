from celery import shared_task

from .requestlog import request_log_prune as prune


@shared_task(time_limit=300)
def request_log_prune() -> dict[str, int]:
    """Delete request log entries past OPTIMAGPT_REQUEST_LOG_RETENTION_DAYS (CELERY_BEAT_SCHEDULE runs it)."""
    return {"request_log_entries": prune()}
