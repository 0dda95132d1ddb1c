from celery import shared_task

from .services import node_history_prune as prune


@shared_task(time_limit=300)
def node_history_prune() -> dict[str, int]:
    """Periodic (CELERY_BEAT_SCHEDULE; in-process in the embedded default): drop metrics and logs past retention."""
    return prune()
