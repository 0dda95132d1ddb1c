from django.contrib import admin
from django.urls import include, path

from chat.views import home

from .api import api

urlpatterns = [
    path("", home, name="home"),
    path("admin/", admin.site.urls),
    path("", include("accounts.urls")),
    path("", include("nodes.urls")),
    path("", api.urls),
]
