from django.urls import path

from . import views

urlpatterns = [
    path("manage/mcp-servers/", views.servers_view, name="mcp-servers"),
    path("manage/mcp-servers/<int:pk>/", views.server_view, name="mcp-server"),
    path("manage/mcp-servers/<int:pk>/refresh/", views.server_refresh_view, name="mcp-server-refresh"),
    path("manage/mcp-servers/<int:pk>/toggle/", views.server_toggle_view, name="mcp-server-toggle"),
    path("manage/mcp-servers/<int:pk>/delete/", views.server_delete_view, name="mcp-server-delete"),
]
