from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from chat.views import chat_token_view, home, manifest_view, offline_view, service_worker_view

from .api import api

urlpatterns = [
    path("", home, name="home"),
    path("chat/", RedirectView.as_view(pattern_name="home"), name="chat"),
    path("chat/token/", chat_token_view, name="chat-token"),
    path("manifest.webmanifest", manifest_view, name="manifest"),
    path("sw.js", service_worker_view, name="service-worker"),
    path("offline/", offline_view, name="offline"),
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("", include("nodes.urls")),
    path("", include("mcp_servers.urls")),
    path("", include("operations.urls")),
    path("", include("certificates.urls")),
    path("", api.urls),
]

# Unknown paths under /v1 and /optima/v1 answer in OpenAI's error form, like every other API error.
handler404 = "optimagpt.api.not_found"
