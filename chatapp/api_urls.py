"""Every /api/v1/ route, collected from the apps."""

from django.urls import include, path

from accounts.directory_api import UserSearchApi

urlpatterns = [
    path("", include("accounts.urls")),
    path("users", UserSearchApi.as_view(), name="user-search"),
    path("", include("threads.urls")),
    path("", include("messaging.urls")),
]
