from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, services  # noqa: F401 - register the system checks and the revocation receiver
        from .routing import least_busy  # noqa: F401 - connects the route cache to node changes
