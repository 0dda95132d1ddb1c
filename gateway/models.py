from django.db import models


class GatewayProcess(models.Model):
    """One gateway process's request counts since it started, written every few seconds (gateway/stats.py)."""

    owner = models.CharField(max_length=100, unique=True, help_text="host:pid:random of the process")
    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    requests = models.BigIntegerField(default=0)
    delayed = models.BigIntegerField(default=0)
    peak_concurrency = models.PositiveIntegerField(default=0)
    per_node = models.JSONField(default=dict, help_text="node pk -> requests handled")
    peak_per_node = models.JSONField(default=dict, help_text="node pk -> most requests in flight at once")

    def __str__(self) -> str:
        return self.owner
