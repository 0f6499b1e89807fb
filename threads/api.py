"""REST views for threads and participants: parse, call the service, shape the reply."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from chatapp.api import (
    ChatApiView,
    IntField,
    StrictSerializer,
    TextField,
    current_user,
    error_responses,
    int_param,
    parse,
    text_param,
)
from threads import services
from threads.events import participant_payload, thread_payload
from threads.models import ThreadKind, ThreadRole
from threads.selectors import participant_list, thread_get_for_member, thread_list_for_user

THREAD_EXAMPLE = {
    "id": 7,
    "title": "Launch",
    "kind": "GROUP",
    "created_by": 1,
    "created_at": "2026-11-21T10:00:00+00:00",
    "last_sequence": 42,
    "my_role": "OWNER",
    "participants": [
        {
            "user": {"id": 1, "username": "alice", "name": "Alice", "avatar_url": "", "active": True},
            "role": "OWNER",
            "joined_at": "2026-11-21T10:00:00+00:00",
            "last_read_sequence": 42,
            "last_delivered_sequence": 42,
        }
    ],
}


def _detail(thread_id: int, user: Any) -> dict[str, Any]:
    access = thread_get_for_member(thread_id=thread_id, user=user)
    body = thread_payload(access.thread)
    body["my_role"] = access.role
    body["participants"] = [participant_payload(p) for p in participant_list(thread_id=thread_id)]
    if access.participant is not None:
        body["muted"] = access.participant.muted
        body["archived"] = access.participant.archived_at is not None
        body["last_read_sequence"] = access.participant.last_read_sequence
    return body


class ThreadListCreateApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        title = TextField(max_length=services.MAX_TITLE_LENGTH, required=False, allow_blank=True, default="")
        kind = serializers.ChoiceField(choices=ThreadKind.choices, default=ThreadKind.GROUP)
        participant_ids = serializers.ListField(
            child=IntField(min_value=1), max_length=services.MAX_INITIAL_PARTICIPANTS, default=list
        )

    @extend_schema(
        operation_id="threads_list",
        summary="List my threads",
        parameters=[
            OpenApiParameter("archived", bool, description="Archived threads instead of active ones"),
            OpenApiParameter("cursor", str, description="next_cursor of the previous page"),
            OpenApiParameter("limit", int, description="1-100, default 50"),
        ],
        responses={200: OpenApiTypes.OBJECT, **error_responses(400)},
        examples=[
            OpenApiExample(
                "page",
                response_only=True,
                value={
                    "threads": [
                        {
                            "id": 7,
                            "title": "Launch",
                            "kind": "GROUP",
                            "my_role": "OWNER",
                            "unread_count": 3,
                            "last_sequence": 42,
                            "last_read_sequence": 39,
                            "last_message": {"id": 90, "seq": 42, "body": "Ship it"},
                            "last_activity_at": "2026-11-21T10:05:00+00:00",
                            "muted": False,
                            "archived": False,
                            "other_user": None,
                        }
                    ],
                    "next_cursor": None,
                },
            )
        ],
    )
    def get(self, request: Request) -> Response:
        archived = request.query_params.get("archived", "").lower() in ("1", "true", "yes")
        limit = int_param(request, "limit", default=50, minimum=1) or 50
        return Response(
            thread_list_for_user(
                user=current_user(request),
                archived=archived,
                cursor=text_param(request, "cursor") or None,
                limit=min(limit, 100),
            )
        )

    @extend_schema(
        summary="Create a thread (a direct thread between two people is unique: 200 with the existing one)",
        request=InputSerializer,
        responses={201: OpenApiTypes.OBJECT, 200: OpenApiTypes.OBJECT, **error_responses(400)},
        examples=[
            OpenApiExample(
                "group", request_only=True, value={"title": "Launch", "kind": "GROUP", "participant_ids": [2, 3]}
            ),
            OpenApiExample("direct", request_only=True, value={"kind": "DIRECT", "participant_ids": [2]}),
            OpenApiExample("created", response_only=True, value=THREAD_EXAMPLE),
        ],
    )
    def post(self, request: Request) -> Response:
        data = parse(self.InputSerializer, request.data)
        thread, created = services.thread_create(creator=current_user(request), **data)
        return Response(
            _detail(thread.pk, current_user(request)), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class ThreadDetailApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        title = TextField(max_length=services.MAX_TITLE_LENGTH, allow_blank=True)

    @extend_schema(
        summary="Get a thread",
        responses={200: OpenApiTypes.OBJECT, **error_responses(404)},
        examples=[OpenApiExample("thread", response_only=True, value=THREAD_EXAMPLE)],
    )
    def get(self, request: Request, thread_id: int) -> Response:
        return Response(_detail(thread_id, current_user(request)))

    @extend_schema(
        summary="Rename a thread (ADMIN+; last write wins)",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 403, 404)},
        examples=[OpenApiExample("rename", request_only=True, value={"title": "Launch 2"})],
    )
    def patch(self, request: Request, thread_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        services.thread_rename(actor=current_user(request), thread_id=thread_id, title=data["title"])
        return Response(_detail(thread_id, current_user(request)))

    @extend_schema(summary="Delete a thread (OWNER)", responses={204: None, **error_responses(403, 404)})
    def delete(self, request: Request, thread_id: int) -> Response:
        services.thread_delete(actor=current_user(request), thread_id=thread_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MembershipApi(ChatApiView):
    """My own settings for a thread: archived and muted."""

    class InputSerializer(StrictSerializer):
        archived = serializers.BooleanField(required=False)
        muted = serializers.BooleanField(required=False)

    @extend_schema(
        summary="Archive/unarchive or mute/unmute a thread for me",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 404)},
        examples=[OpenApiExample("archive", request_only=True, value={"archived": True})],
    )
    def patch(self, request: Request, thread_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        p = services.participant_settings_update(user=current_user(request), thread_id=thread_id, **data)
        return Response({"thread_id": thread_id, "archived": p.archived_at is not None, "muted": p.muted})


class ParticipantListApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        user_id = IntField(min_value=1)
        role = serializers.ChoiceField(choices=ThreadRole.choices, default=ThreadRole.MEMBER)

    @extend_schema(summary="List participants", responses={200: OpenApiTypes.OBJECT, **error_responses(404)})
    def get(self, request: Request, thread_id: int) -> Response:
        thread_get_for_member(thread_id=thread_id, user=current_user(request))
        return Response({"participants": [participant_payload(p) for p in participant_list(thread_id=thread_id)]})

    @extend_schema(
        summary="Add a participant (ADMIN+; only an OWNER grants ADMIN or OWNER). 201 when added, 200 when "
        "already there with that role (a retry), 409 when there with another role",
        request=InputSerializer,
        responses={201: OpenApiTypes.OBJECT, 200: OpenApiTypes.OBJECT, **error_responses(400, 403, 404, 409)},
        examples=[OpenApiExample("add", request_only=True, value={"user_id": 3, "role": "MEMBER"})],
    )
    def post(self, request: Request, thread_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        participant, created = services.participant_add(actor=current_user(request), thread_id=thread_id, **data)
        return Response(
            participant_payload(participant), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )


class ParticipantDetailApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        role = serializers.ChoiceField(choices=ThreadRole.choices)

    @extend_schema(
        summary="Change a participant's role (OWNER; the last OWNER cannot be demoted)",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 403, 404, 409)},
        examples=[OpenApiExample("promote", request_only=True, value={"role": "ADMIN"})],
    )
    def patch(self, request: Request, thread_id: int, user_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        participant = services.participant_change_role(
            actor=current_user(request),
            thread_id=thread_id,
            user_id=user_id,
            role=data["role"],
        )
        return Response(participant_payload(participant))

    @extend_schema(
        summary="Remove a participant (ADMIN+; an ADMIN removes MEMBERs only; never the last OWNER)",
        responses={204: None, **error_responses(403, 404, 409)},
    )
    def delete(self, request: Request, thread_id: int, user_id: int) -> Response:
        services.participant_remove(actor=current_user(request), thread_id=thread_id, user_id=user_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class LeaveApi(ChatApiView):
    @extend_schema(
        summary="Leave a thread (the last OWNER must hand over first: 409; a direct thread is archived, not left: 403)",
        request=None,
        responses={204: None, **error_responses(403, 404, 409)},
    )
    def post(self, request: Request, thread_id: int) -> Response:
        services.thread_leave(user=current_user(request), thread_id=thread_id)
        return Response(status=status.HTTP_204_NO_CONTENT)
