from django.apps import AppConfig


class GatewayConfig(AppConfig):
    name = "gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Register the system checks, the revocation receiver and the broadcast of changes.
        from . import checks, invalidation, revocation  # noqa: F401
        from .routing import router  # noqa: F401 - connects the route cache to node changes
