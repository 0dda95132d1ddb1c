from django.urls import path

from . import views

urlpatterns = [
    path("manage/settings/", views.settings_view, name="settings"),
    path("manage/diagnostics/", views.diagnostics_view, name="diagnostics"),
    path("manage/diagnostics/logs/", views.diagnostics_logs_view, name="diagnostics-logs"),
    path("manage/diagnostics/traces/", views.diagnostics_traces_view, name="diagnostics-traces"),
    path("manage/requests/", views.requests_view, name="requests"),
    path("metrics", views.metrics_view, name="metrics"),
    path("healthz", views.healthz_view, name="healthz"),
    path("readyz", views.readyz_view, name="readyz"),
]
