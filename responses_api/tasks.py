from celery import shared_task

from .services import responses_prune as prune


@shared_task(time_limit=300)
def responses_prune() -> dict[str, int]:
    """Periodic (CELERY_BEAT_SCHEDULE; in-process in the embedded default): drop stored responses past
    OPTIMAGPT_RESPONSES_RETENTION_DAYS, and mark failed the background ones whose process stopped."""
    return prune()
