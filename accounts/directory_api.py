"""The people directory: find active users to start a thread with or to @-mention."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.events import user_brief
from accounts.selectors import user_search
from chatapp.api import ChatApiView, error_responses, int_param, text_param


class UserSearchApi(ChatApiView):
    @extend_schema(
        summary="Find people by username or display name prefix",
        parameters=[OpenApiParameter("q", str), OpenApiParameter("limit", int)],
        responses={200: OpenApiTypes.OBJECT, **error_responses(400)},
        examples=[
            OpenApiExample(
                "people",
                response_only=True,
                value={"users": [{"id": 2, "username": "bob", "name": "Bob", "avatar_url": "", "active": True}]},
            )
        ],
    )
    def get(self, request: Request) -> Response:
        limit = min(int_param(request, "limit", default=20, minimum=1) or 20, 50)
        users = user_search(query=text_param(request, "q"), limit=limit, exclude_id=request.user.pk)
        return Response({"users": [user_brief(u) for u in users]})
