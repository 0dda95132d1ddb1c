"""Celery app. With REDIS_URL unset (the embedded default) tasks run in-process, eagerly."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "optimagpt.settings")

app = Celery("optimagpt")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
