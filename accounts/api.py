from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.services import AVATAR_URL_MAX_LENGTH, DISPLAY_NAME_MAX_LENGTH, user_update_profile
from chatapp.api import ChatApiView, StrictSerializer, TextField, error_responses, parse


class MeOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField()
    name = serializers.CharField()
    display_name = serializers.CharField()
    email = serializers.CharField()
    avatar_url = serializers.CharField()
    system_role = serializers.CharField()
    preferences = serializers.DictField()


def me_payload(user: object) -> dict[str, object]:
    return dict(MeOutputSerializer(user).data)


class MeApi(ChatApiView):
    """My profile and preferences. The role and staff flag cannot be changed here."""

    class InputSerializer(StrictSerializer):
        display_name = TextField(max_length=DISPLAY_NAME_MAX_LENGTH, required=False, allow_blank=True)
        # The URL rule (http or https) is the service's.
        avatar_url = TextField(max_length=AVATAR_URL_MAX_LENGTH, required=False, allow_blank=True)
        preferences = serializers.DictField(required=False)

    @extend_schema(summary="My profile", responses={200: MeOutputSerializer, **error_responses()})
    def get(self, request: Request) -> Response:
        return Response(me_payload(request.user))

    @extend_schema(
        summary="Update my display name, avatar or preferences (never my role)",
        request=InputSerializer,
        responses={200: MeOutputSerializer, **error_responses(400)},
    )
    def patch(self, request: Request) -> Response:
        data = parse(self.InputSerializer, request.data)
        user = user_update_profile(user=request.user, **data)  # type: ignore[arg-type]
        return Response(me_payload(user))
