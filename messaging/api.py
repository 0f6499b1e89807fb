"""REST views for messages, reactions, receipts, notifications and search."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from attachments.services import MAX_ATTACHMENTS_PER_MESSAGE
from chatapp import metrics
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
from chatapp.errors import TooLarge
from chatapp.ratelimit import budget_seen
from messaging import selectors, services
from messaging.ratelimits import send_budget_state
from threads.selectors import thread_get_for_member

MESSAGE_EXAMPLE: dict[str, Any] = {
    "id": 90,
    "thread_id": 7,
    "seq": 42,
    "sender": {"id": 1, "username": "alice", "name": "Alice", "avatar_url": "", "active": True},
    "body": "Ship it **today**, @bob",
    "html": "<p>Ship it <strong>today</strong>, @bob</p>",
    "reply_to": None,
    "client_msg_id": "3f0c7a5e-1",
    "version": 1,
    "created_at": "2026-11-21T10:05:00+00:00",
    "edited_at": None,
    "deleted": False,
    "deleted_at": None,
    "reactions": [{"emoji": "👍", "count": 1, "user_ids": [2], "me": False}],
    "attachments": [],
    "reply_count": 0,
}


def _body_size_guard(request: Request) -> None:
    """413 for bodies over the design's 100 KB payload cap (plus room for the JSON around it)."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > settings.CHAT_MAX_MESSAGE_BYTES * 2 + 4096:
        raise TooLarge(f"A message body is limited to {settings.CHAT_MAX_MESSAGE_BYTES // 1024} KB.")


def _payload(message_id: int, user: Any) -> dict[str, Any]:
    return selectors.message_payloads(ids=[message_id], viewer=user)[message_id]


class MessageListSendApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        body = TextField(allow_blank=True, trim_whitespace=False, default="")
        client_msg_id = TextField(max_length=services.CLIENT_MSG_ID_MAX_LENGTH)
        reply_to = IntField(min_value=1, required=False, allow_null=True)
        attachment_ids = serializers.ListField(
            child=IntField(min_value=1), max_length=MAX_ATTACHMENTS_PER_MESSAGE, default=list
        )

    @extend_schema(
        summary="Message history by sequence (keyset pagination)",
        parameters=[
            OpenApiParameter("before", int, description="Messages with a sequence below this"),
            OpenApiParameter("after", int, description="Messages with a sequence above this"),
            OpenApiParameter("around", int, description="A page centred on this sequence"),
            OpenApiParameter("limit", int, description="1-100, default 50"),
        ],
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 404)},
        examples=[
            OpenApiExample(
                "page",
                response_only=True,
                value={
                    "messages": [MESSAGE_EXAMPLE],
                    "has_older": True,
                    "has_newer": False,
                    "oldest_reached": False,
                    "newest_reached": True,
                    "last_sequence": 42,
                },
            )
        ],
    )
    def get(self, request: Request, thread_id: int) -> Response:
        access = thread_get_for_member(thread_id=thread_id, user=current_user(request))
        return Response(
            selectors.message_history(
                access=access,
                user=current_user(request),
                before=int_param(request, "before", minimum=0),
                after=int_param(request, "after", minimum=0),
                around=int_param(request, "around", minimum=0),
                limit=int_param(request, "limit", default=selectors.DEFAULT_PAGE, minimum=1) or selectors.DEFAULT_PAGE,
            )
        )

    @extend_schema(
        summary="Send a message (idempotent by client_msg_id: a retry returns the original with 200)",
        request=InputSerializer,
        responses={201: OpenApiTypes.OBJECT, 200: OpenApiTypes.OBJECT, **error_responses(400, 404, 409, 413)},
        examples=[
            OpenApiExample(
                "send", request_only=True, value={"body": "Ship it **today**, @bob", "client_msg_id": "3f0c7a5e-1"}
            ),
            OpenApiExample(
                "reply", request_only=True, value={"body": "Agreed", "client_msg_id": "c-2", "reply_to": 90}
            ),
            OpenApiExample("stored", response_only=True, value=MESSAGE_EXAMPLE),
        ],
    )
    def post(self, request: Request, thread_id: int) -> Response:
        _body_size_guard(request)
        data = parse(self.InputSerializer, request.data)
        message, created = services.message_send(
            sender=current_user(request),
            thread_id=thread_id,
            body=data["body"],
            client_msg_id=data["client_msg_id"],
            reply_to_id=data.get("reply_to"),
            attachment_ids=data["attachment_ids"],
        )
        if created:
            metrics.messages_sent.labels(via="api").inc()
        budget = send_budget_state(user=current_user(request))
        if budget is not None:  # the send budget's RateLimit-* headers (it is usually the closest to running out)
            budget_seen(request, limit=budget.limit, remaining=budget.remaining, reset=budget.reset)
        return Response(_payload(message.pk, current_user(request)), status=status.HTTP_201_CREATED if created else 200)


class MessageDetailApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        body = TextField(trim_whitespace=False)
        version = IntField(min_value=1)

    @extend_schema(
        summary="Get a message",
        responses={200: OpenApiTypes.OBJECT, **error_responses(404)},
        examples=[OpenApiExample("message", response_only=True, value=MESSAGE_EXAMPLE)],
    )
    def get(self, request: Request, message_id: int) -> Response:
        return Response(selectors.message_payload_for(message_id=message_id, user=current_user(request)))

    @extend_schema(
        summary="Edit my message with the version I edited; stale edits are merged three-way or refused (409)",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 403, 404, 409, 413)},
        examples=[
            OpenApiExample("edit", request_only=True, value={"body": "Ship it tomorrow", "version": 1}),
            OpenApiExample("merged", response_only=True, value={"message": MESSAGE_EXAMPLE, "merged": True}),
            OpenApiExample(
                "conflict",
                response_only=True,
                status_codes=["409"],
                value={
                    "error": {
                        "code": "conflict",
                        "message": "The message was edited meanwhile and the edits overlap.",
                        "reason": "edit_conflict",
                        "current": MESSAGE_EXAMPLE,
                    }
                },
            ),
        ],
    )
    def patch(self, request: Request, message_id: int) -> Response:
        _body_size_guard(request)
        data = parse(self.InputSerializer, request.data)
        message, merged = services.message_edit(
            actor=current_user(request),
            message_id=message_id,
            body=data["body"],
            expected_version=data["version"],
        )
        return Response({"message": _payload(message.pk, current_user(request)), "merged": merged})

    @extend_schema(
        summary="Delete a message (mine, or any as thread ADMIN/OWNER): a tombstone stays",
        responses={200: OpenApiTypes.OBJECT, **error_responses(403, 404)},
    )
    def delete(self, request: Request, message_id: int) -> Response:
        message = services.message_delete(actor=current_user(request), message_id=message_id)
        return Response(_payload(message.pk, current_user(request)))


class MessageEditsApi(ChatApiView):
    @extend_schema(
        summary="Edit history of a message",
        responses={200: OpenApiTypes.OBJECT, **error_responses(404)},
        examples=[
            OpenApiExample(
                "history",
                response_only=True,
                value={
                    "message_id": 90,
                    "current_version": 2,
                    "deleted": False,
                    "versions": [
                        {"version": 1, "body": "Ship it", "replaced_at": "2026-11-21T10:06:00+00:00", "editor_id": 1}
                    ],
                    "current": {"version": 2, "body": "Ship it today", "edited_at": "2026-11-21T10:06:00+00:00"},
                },
            )
        ],
    )
    def get(self, request: Request, message_id: int) -> Response:
        return Response(selectors.message_edit_history(message_id=message_id, user=current_user(request)))


class MessageRepliesApi(ChatApiView):
    @extend_schema(
        summary="Replies to a message, oldest first",
        parameters=[OpenApiParameter("after", int), OpenApiParameter("limit", int)],
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 404)},
    )
    def get(self, request: Request, message_id: int) -> Response:
        return Response(
            selectors.message_replies(
                message_id=message_id,
                user=current_user(request),
                after=int_param(request, "after", minimum=0),
                limit=int_param(request, "limit", default=selectors.DEFAULT_PAGE, minimum=1) or selectors.DEFAULT_PAGE,
            )
        )


class ReactionApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        emoji = TextField(max_length=services.MAX_EMOJI_LENGTH)

    @extend_schema(
        summary="React to a message (idempotent)",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, 201: OpenApiTypes.OBJECT, **error_responses(400, 404, 409)},
        examples=[OpenApiExample("thumbs up", request_only=True, value={"emoji": "👍"})],
    )
    def post(self, request: Request, message_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        created = services.reaction_add(actor=current_user(request), message_id=message_id, emoji=data["emoji"])
        return Response(_payload(message_id, current_user(request)), status=201 if created else 200)


class ReactionDeleteApi(ChatApiView):
    @extend_schema(
        summary="Remove my reaction (idempotent)", responses={200: OpenApiTypes.OBJECT, **error_responses(400, 404)}
    )
    def delete(self, request: Request, message_id: int, emoji: str) -> Response:
        services.reaction_remove(actor=current_user(request), message_id=message_id, emoji=emoji)
        return Response(_payload(message_id, current_user(request)))


class MessageReceiptsApi(ChatApiView):
    @extend_schema(
        summary="Sent/delivered/read state of a message (names for the sender only)",
        responses={200: OpenApiTypes.OBJECT, **error_responses(404)},
        examples=[
            OpenApiExample(
                "receipts",
                response_only=True,
                value={
                    "message_id": 90,
                    "seq": 42,
                    "status": "read",
                    "recipients": 1,
                    "delivered_count": 1,
                    "read_count": 1,
                    "read_by": [{"id": 2, "username": "bob", "name": "Bob", "avatar_url": "", "active": True}],
                    "delivered_to": [{"id": 2, "username": "bob", "name": "Bob", "avatar_url": "", "active": True}],
                },
            )
        ],
    )
    def get(self, request: Request, message_id: int) -> Response:
        return Response(selectors.message_receipts(message_id=message_id, user=current_user(request)))


class ReceiptMarkApi(ChatApiView):
    """POST /threads/<id>/read or /delivered with the sequence I have seen up to."""

    mark = "read"

    class InputSerializer(StrictSerializer):
        seq = IntField(min_value=0)

    @extend_schema(
        summary="Mark read (or delivered) up to a sequence; marks never move back",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, **error_responses(400, 404)},
        examples=[OpenApiExample("mark", request_only=True, value={"seq": 42})],
    )
    def post(self, request: Request, thread_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        kwargs = {"read_up_to": data["seq"]} if self.mark == "read" else {"delivered_up_to": data["seq"]}
        participant = services.receipt_mark(user=current_user(request), thread_id=thread_id, **kwargs)
        return Response(
            {
                "thread_id": thread_id,
                "last_read_sequence": participant.last_read_sequence,
                "last_delivered_sequence": participant.last_delivered_sequence,
            }
        )


class NotificationListApi(ChatApiView):
    @extend_schema(
        summary="My notifications (mentions, replies to me, direct messages), newest first",
        parameters=[OpenApiParameter("unread", bool), OpenApiParameter("before", int), OpenApiParameter("limit", int)],
        responses={200: OpenApiTypes.OBJECT, **error_responses(400)},
        examples=[
            OpenApiExample(
                "page",
                response_only=True,
                value={
                    "notifications": [
                        {
                            "id": 5,
                            "kind": "MENTION",
                            "thread_id": 7,
                            "message_id": 90,
                            "seq": 42,
                            "actor_id": 1,
                            "excerpt": "Ship it, @bob",
                            "created_at": "2026-11-21T10:05:00+00:00",
                            "read_at": None,
                        }
                    ],
                    "unread_count": 1,
                    "next_before": None,
                },
            )
        ],
    )
    def get(self, request: Request) -> Response:
        return Response(
            selectors.notification_list(
                user=current_user(request),
                unread_only=request.query_params.get("unread", "").lower() in ("1", "true", "yes"),
                before_id=int_param(request, "before", minimum=1),
                limit=int_param(request, "limit", default=selectors.DEFAULT_PAGE, minimum=1) or selectors.DEFAULT_PAGE,
            )
        )


class NotificationReadApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        ids = serializers.ListField(child=IntField(min_value=1), max_length=500, required=False)
        thread_id = IntField(min_value=1, required=False)

    @extend_schema(
        summary="Mark notifications read: some ids, a thread's, or all (empty body)",
        request=InputSerializer,
        responses={200: OpenApiTypes.OBJECT, **error_responses(400)},
        examples=[OpenApiExample("some", request_only=True, value={"ids": [5, 6]})],
    )
    def post(self, request: Request) -> Response:
        data = parse(self.InputSerializer, request.data)
        changed = services.notifications_mark_read(
            user=current_user(request), ids=data.get("ids"), thread_id=data.get("thread_id")
        )
        return Response({"marked": changed})


class SearchApi(ChatApiView):
    @extend_schema(
        summary="Search messages in my threads (full-text with ranking and <mark> highlights on PostgreSQL)",
        parameters=[
            OpenApiParameter("q", str, required=True),
            OpenApiParameter("thread_id", int),
            OpenApiParameter("limit", int),
        ],
        responses={200: OpenApiTypes.OBJECT, **error_responses(400)},
        examples=[
            OpenApiExample(
                "results",
                response_only=True,
                value={
                    "query": "ship",
                    "results": [
                        {"message": MESSAGE_EXAMPLE, "rank": 0.0607927, "highlight": "<mark>Ship</mark> it today"}
                    ],
                },
            )
        ],
    )
    def get(self, request: Request) -> Response:
        return Response(
            selectors.message_search(
                user=current_user(request),
                query=text_param(request, "q"),
                thread_id=int_param(request, "thread_id", minimum=1),
                limit=int_param(request, "limit", default=20, minimum=1) or 20,
            )
        )
