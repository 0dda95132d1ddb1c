from django.apps import AppConfig


class OperationsConfig(AppConfig):
    name = "operations"
    verbose_name = "Operations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Hand finished API requests to the instruments that are on (operations/record.py)."""
        from django.conf import settings

        from .metrics import metrics_record
        from .record import finisher_add
        from .requestlog import request_log_add
        from .tracing import trace_record

        if settings.OPTIMAGPT_METRICS:
            finisher_add(metrics_record)
        if settings.OPTIMAGPT_REQUEST_LOG:
            finisher_add(request_log_add)
        finisher_add(trace_record)  # it does nothing while System Tracing is off
