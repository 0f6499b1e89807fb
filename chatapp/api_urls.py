"""Every /api/v1/ route, collected from the apps."""

from django.urls import include, path

urlpatterns = [
    path("", include("accounts.urls")),
]
