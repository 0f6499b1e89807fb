"""``/api/v1/auth/token``: a DRF API token for a local username/password (POST), revoke mine (DELETE).

POST needs no authentication (a stale credential in the request must not block logging in) and
is rate-limited per client IP and per account, counted on every attempt, before the password is
checked; a successful one sets the known-device cookie (chatapp.known_device).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny, BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.services import user_token_issue, user_token_revoke
from chatapp import known_device
from chatapp.api import StrictSerializer, TextField, current_user, error_responses, parse
from chatapp.errors import Unauthenticated
from chatapp.ratelimit import api_rate_check, password_attempt_check


class TokenOutputSerializer(serializers.Serializer):
    token = serializers.CharField()


class TokenApi(APIView):
    class InputSerializer(StrictSerializer):
        username = TextField(max_length=150)
        password = TextField(max_length=4096, trim_whitespace=False)

    def get_authenticators(self) -> list[Any]:
        # Called by DRF before the request is wrapped: View.setup() has set the Django request
        # (the schema generator's mock has none yet).
        if getattr(getattr(self, "request", None), "method", None) == "POST":
            return []
        return super().get_authenticators()

    def get_permissions(self) -> list[BasePermission]:
        if self.request.method == "POST":
            return [AllowAny()]
        return [IsAuthenticated()]

    def check_throttles(self, request: Request) -> None:
        if request.method == "POST":
            username = request.data.get("username") if isinstance(request.data, dict) else None
            password_attempt_check(request, username=username if isinstance(username, str) else "")
        else:
            api_rate_check(request)
        super().check_throttles(request)

    @extend_schema(
        summary="Get my API token with a local username and password",
        request=InputSerializer,
        responses={200: TokenOutputSerializer, **error_responses(400)},
        examples=[OpenApiExample("token", response_only=True, value={"token": "9944b09199c62bcf9418ad846dd0e4bb"})],
        auth=[],
    )
    def post(self, request: Request) -> Response:
        data = parse(self.InputSerializer, request.data)
        user = authenticate(request._request, username=data["username"], password=data["password"])
        if user is None:
            # Wrong password, unknown or deactivated user, or a Clerk-only user: one answer for all.
            raise Unauthenticated("Unable to log in with the provided credentials.")
        response = Response({"token": user_token_issue(user=user)})  # type: ignore[arg-type]
        known_device.remember(response, username=data["username"])
        return response

    @extend_schema(summary="Revoke my API token", request=None, responses={204: None, **error_responses()})
    def delete(self, request: Request) -> Response:
        user_token_revoke(user=current_user(request))
        return Response(status=204)
