from django.urls import path

from . import views

urlpatterns = [
    path("manage/certificates/", views.certificates_view, name="certificates"),
    path("manage/certificates/certificate.pem", views.certificate_download_view, name="certificate-download"),
]
