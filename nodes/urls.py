from django.urls import path

from . import views

urlpatterns = [
    path("manage/nodes/", views.nodes_view, name="nodes"),
    path("manage/nodes/new/", views.node_new_view, name="node-new"),
    path("manage/nodes/enrollment/", views.enrollment_token_new_view, name="enrollment-token-new"),
    path("manage/nodes/enrollment/<int:pk>/revoke/", views.enrollment_token_revoke_view,
         name="enrollment-token-revoke"),
    path("manage/nodes/new/name/", views.node_name_view, name="node-name"),
    path("manage/nodes/<int:pk>/", views.node_view, name="node"),
    path("manage/nodes/<int:pk>/activation/", views.node_activation_view, name="node-activation"),
    path("manage/nodes/<int:pk>/delete/", views.node_delete_view, name="node-delete"),
    path("manage/executors/", views.executors_view, name="executors"),
    path("manage/executors/<int:pk>/", views.executor_view, name="executor"),
    path("manage/executors/<int:pk>/start/", views.executor_start_view, name="executor-start"),
    path("manage/executors/<int:pk>/stop/", views.executor_stop_view, name="executor-stop"),
    path("manage/executors/<int:pk>/delete/", views.executor_delete_view, name="executor-delete"),
]
