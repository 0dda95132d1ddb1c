from django.contrib import admin
from django.urls import path

from chat.views import home

from .api import api

urlpatterns = [
    path("", home, name="home"),
    path("admin/", admin.site.urls),
    path("", api.urls),
]
