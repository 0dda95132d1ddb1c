from django.urls import path

from . import views

urlpatterns = [
    path("manage/executors/", views.executors_view, name="executors"),
    path("manage/executors/<int:pk>/", views.executor_view, name="executor"),
    path("manage/executors/<int:pk>/start/", views.executor_start_view, name="executor-start"),
    path("manage/executors/<int:pk>/stop/", views.executor_stop_view, name="executor-stop"),
    path("manage/executors/<int:pk>/delete/", views.executor_delete_view, name="executor-delete"),
]
