from django.urls import path

from accounts import api, auth_api, webhooks

urlpatterns = [
    path("me", api.MeApi.as_view(), name="me"),
    path("auth/token", auth_api.TokenApi.as_view(), name="auth-token"),
    path("webhooks/clerk", webhooks.ClerkWebhookApi.as_view(), name="clerk-webhook"),
]
