from django.urls import path

from . import views

urlpatterns = [
    path("login/", views.login_view, name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("manage/users/", views.users_view, name="users"),
    path("manage/users/<int:pk>/delete/", views.user_delete_view, name="user-delete"),
    path("manage/users/<int:pk>/type/", views.user_type_view, name="user-type"),
    path("manage/api-keys/", views.api_keys_view, name="api-keys"),
    path("manage/api-keys/<int:pk>/revoke/", views.api_key_revoke_view, name="api-key-revoke"),
]
