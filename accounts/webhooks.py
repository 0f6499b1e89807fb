"""``POST /api/v1/webhooks/clerk``: verify the Svix signature, then hand the event to the services.

No user authentication, no CSRF, no per-user rate limit: the Svix signature (HMAC over id,
timestamp and the exact body, with svix's 5-minute timestamp tolerance) is the credential.
Anything that does not verify is refused in the JSON error shape and changes nothing.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from svix.webhooks import Webhook, WebhookVerificationError

from accounts.services import clerk_webhook_process
from chatapp import storable
from chatapp.api import ErrorSerializer
from chatapp.errors import InvalidInput, ServiceError, TooLarge

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
SVIX_HEADERS = ("svix-id", "svix-timestamp", "svix-signature")


class WebhookNotConfigured(ServiceError):
    """No (valid) CLERK_WEBHOOK_SECRET: nothing can verify, so this server has no webhook receiver (404)."""

    status = 404
    code = "not_configured"
    default_message = "Clerk webhooks are not configured on this server (CLERK_WEBHOOK_SECRET)."


class WebhookSignatureInvalid(ServiceError):
    status = 400
    code = "invalid_signature"
    default_message = "The webhook signature did not verify."


class WebhookResultSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["processed", "ignored", "duplicate"])


def _error(code: str, message: str) -> OpenApiResponse:
    return OpenApiResponse(
        ErrorSerializer,
        description=message,
        examples=[OpenApiExample(code, value={"error": {"code": code, "message": message}})],
    )


class ClerkWebhookApi(APIView):
    authentication_classes = []
    permission_classes = [AllowAny]

    @extend_schema(
        summary="Clerk webhook (Svix-signed): user.created/updated/deleted, session.revoked/ended/removed",
        request=OpenApiTypes.OBJECT,
        responses={
            200: WebhookResultSerializer,
            400: _error("invalid_signature", WebhookSignatureInvalid.default_message),
            413: _error("too_large", "The webhook body is too large."),
            404: _error("not_configured", WebhookNotConfigured.default_message),
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        secret = settings.CLERK_WEBHOOK_SECRET
        if not secret:
            raise WebhookNotConfigured()
        try:
            verifier = Webhook(secret)
        except Exception:  # a malformed secret (bad base64): the server is misconfigured, not the sender
            logger.exception("CLERK_WEBHOOK_SECRET is not a valid Svix secret")
            raise WebhookNotConfigured("CLERK_WEBHOOK_SECRET is not a valid Svix secret.") from None
        body = self._body(request)
        headers = {name: request.headers.get(name, "") for name in SVIX_HEADERS}
        try:
            verifier.verify(body, headers)
        except (WebhookVerificationError, ValueError) as exc:  # svix raises ValueError for garbled headers
            logger.info("clerk webhook refused: %s", exc)
            raise WebhookSignatureInvalid() from None
        try:
            event = storable.loads(body)
        except storable.Unstorable as exc:
            if exc.field is None:
                raise InvalidInput("The signed body is not JSON.") from None
            raise InvalidInput(fields=exc.fields()) from None
        if not isinstance(event, dict):
            raise InvalidInput("The signed body is not a JSON object.")
        status = clerk_webhook_process(svix_id=headers["svix-id"], event=event)
        return Response({"status": status})

    @staticmethod
    def _body(request: Request) -> bytes:
        length = str(request.META.get("CONTENT_LENGTH") or "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise TooLarge("The webhook body is too large.")
        try:
            body: bytes = request._request.body
        except RequestDataTooBig:
            raise TooLarge("The webhook body is too large.") from None
        if len(body) > MAX_BODY_BYTES:
            raise TooLarge("The webhook body is too large.")
        return body
