"""Every /api/v1/ route, collected from the apps."""

from django.urls import include, path, register_converter

from accounts.directory_api import UserSearchApi
from chatapp.converters import IdConverter

# Registered before the apps' url modules are imported by include() below.
register_converter(IdConverter, "id")

urlpatterns = [
    path("", include("accounts.urls")),
    path("users", UserSearchApi.as_view(), name="user-search"),
    path("", include("threads.urls")),
    path("", include("messaging.urls")),
    path("", include("attachments.urls")),
]
