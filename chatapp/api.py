"""Small shared pieces for the DRF views: strict input parsing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.views import APIView

if TYPE_CHECKING:
    from accounts.models import User


# PostgreSQL's bigint: an id or sequence past it cannot exist, and a lookup with it overflows.
MAX_INT = 2**63 - 1


class IntField(serializers.IntegerField):
    """An integer input no larger than any stored id or sequence can be (a 400 past it, not a 500)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("max_value", MAX_INT)
        super().__init__(**kwargs)


class TextField(serializers.CharField):
    """A string input. Refuses what DRF's CharField would turn into text (numbers, booleans) and NUL
    characters, which PostgreSQL cannot store (a 400 naming the field, not a 500)."""

    default_error_messages = {"not_text": "Must be a string.", "nul": "Must not contain NUL characters."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("not_text")
        if "\x00" in data:
            self.fail("nul")
        return str(super().to_internal_value(data))


class StrictSerializer(serializers.Serializer):
    """An input serializer that refuses fields it does not declare (sender, sequence, role...)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Views nest their own ``InputSerializer``; name it after the view so schema components don't collide.
        cls.__name__ = cls.__qualname__.replace(".", "")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        initial = getattr(self, "initial_data", None)
        if isinstance(initial, dict):
            unknown = sorted(set(initial) - set(self.fields))
            read_only = sorted(k for k in initial if k in self.fields and self.fields[k].read_only)
            errors = {k: ["Unknown field."] for k in unknown}
            errors.update({k: ["This field is read-only."] for k in read_only})
            if errors:
                raise serializers.ValidationError(errors)
        return attrs


def parse(serializer_class: type[serializers.Serializer], data: Any, **kwargs: Any) -> dict[str, Any]:
    """Validate request data with ``serializer_class``; DRF's ValidationError becomes the 400 error shape."""
    if not isinstance(data, dict) and not hasattr(data, "getlist"):
        raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class ChatApiView(APIView):
    """Base for every API view: authentication, then the rate limits, then the handler validates.

    DRF runs ``perform_authentication`` and ``check_permissions`` before ``check_throttles``,
    which is where the design's order puts the rate limit.
    """

    def check_throttles(self, request: Request) -> None:
        from chatapp.ratelimit import api_rate_check

        api_rate_check(request)
        super().check_throttles(request)


def int_param(request: Request, name: str, *, default: int | None = None, minimum: int | None = None) -> int | None:
    """An optional integer query parameter; a malformed one is a 400 naming the field."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise serializers.ValidationError({name: ["Must be an integer."]}) from None
    if abs(value) > MAX_INT:
        raise serializers.ValidationError({name: [f"Must be at most {MAX_INT}."]})
    if minimum is not None and value < minimum:
        raise serializers.ValidationError({name: [f"Must be at least {minimum}."]})
    return value


def text_param(request: Request, name: str, *, max_length: int = 500) -> str:
    """An optional text query parameter ('' when absent); NUL characters or an overlong value are a 400."""
    raw = request.query_params.get(name) or ""
    if "\x00" in raw:
        raise serializers.ValidationError({name: ["Must not contain NUL characters."]})
    if len(raw) > max_length:
        raise serializers.ValidationError({name: [f"At most {max_length} characters."]})
    return raw


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    fields = serializers.DictField(required=False)  # type: ignore[assignment]  # popped by the metaclass
    retry_after = serializers.IntegerField(required=False)
    reason = serializers.CharField(required=False, help_text="a 409's cause, e.g. edit_conflict, last_owner")
    current = serializers.DictField(required=False, help_text="an edit conflict's current message")


class ErrorSerializer(serializers.Serializer):
    """The one error shape of every failure."""

    error = ErrorDetailSerializer()


_ERROR_EXAMPLES = {
    400: ("invalid", "Some fields are invalid."),
    401: ("unauthenticated", "Authentication credentials were missing or invalid."),
    403: ("forbidden", "Your role (MEMBER) cannot participant add."),
    404: ("not_found", "Thread not found."),
    409: ("conflict", "The resource changed; reload and try again."),
    413: ("too_large", "A message body is limited to 100 KB."),
    429: ("rate_limited", "Too many requests; slow down."),
    503: ("unavailable", "The database is unavailable; try again shortly."),
}


def error_responses(*statuses: int) -> dict[int, Any]:
    """drf-spectacular responses for the given error statuses. 400, 401, 429 and 503 always apply: any
    request can carry unstorable text in its path or query string (docs/architecture.md, "Bad input"),
    lack credentials, exceed a rate, or meet a dependency that is down (a retryable 503 ``unavailable``,
    chatapp/errors.py)."""
    from drf_spectacular.utils import OpenApiExample, OpenApiResponse

    out: dict[int, Any] = {}
    for status in sorted({400, 401, 429, 503, *statuses}):
        code, message = _ERROR_EXAMPLES[status]
        body: dict[str, Any] = {"code": code, "message": message}
        if status == 400:
            body["fields"] = {"body": ["Must not be empty."]}
        if status in (429, 503):
            body["retry_after"] = 12 if status == 429 else 5
        out[status] = OpenApiResponse(
            ErrorSerializer, description=message, examples=[OpenApiExample(code, value={"error": body})]
        )
    return out


def current_user(request: Request) -> User:
    """The authenticated user (every ChatApiView requires authentication before the handler runs)."""
    return cast("User", request.user)
