"""REST views for attachments: uploads (multipart, or presigned direct-to-storage + complete),
metadata, and downloads through short-lived signed URLs. docs/attachments.md has examples."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler, TemporaryFileUploadHandler
from django.http import FileResponse, HttpResponseBase, HttpResponseRedirect
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.models import User
from attachments import selectors, services, storage
from attachments.events import upload_payload
from attachments.models import Attachment, AttachmentKind, ScanStatus
from attachments.validation import ALLOWED, check_upload_size, download_name
from chatapp.api import (
    ChatApiView,
    ErrorSerializer,
    IntField,
    StrictSerializer,
    TextField,
    current_user,
    error_responses,
    parse,
)
from chatapp.errors import NotFound
from chatapp.parsers import MultiPartParser

# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "Cache-Control": storage.CACHE_CONTROL,
    "Cross-Origin-Resource-Policy": "same-origin",
}

ATTACHMENT_EXAMPLE: dict[str, Any] = {
    "id": 31,
    "name": "whiteboard.jpg",
    "size": 482113,
    "kind": "IMAGE",
    "content_type": "image/jpeg",
    "width": 1600,
    "height": 1200,
    "has_thumbnail": True,
    "url": "/api/v1/attachments/31/download",
    "thumbnail_url": "/api/v1/attachments/31/thumbnail",
    "thread_id": 7,
    "message_id": None,
    "status": "CLEAN",
    "detail": "",
    "created_at": "2026-11-21T10:04:00+00:00",
}


class AttachmentOutputSerializer(serializers.Serializer):
    """An upload as its uploader sees it (message events carry the same fields up to ``thumbnail_url``)."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    size = serializers.IntegerField()
    kind = serializers.ChoiceField(choices=AttachmentKind.choices)
    content_type = serializers.CharField(allow_blank=True)
    width = serializers.IntegerField(allow_null=True)
    height = serializers.IntegerField(allow_null=True)
    has_thumbnail = serializers.BooleanField()
    url = serializers.CharField(allow_null=True, help_text="null until the file is CLEAN")
    thumbnail_url = serializers.CharField(allow_null=True)
    thread_id = serializers.IntegerField()
    message_id = serializers.IntegerField(allow_null=True)
    status = serializers.ChoiceField(choices=ScanStatus.choices)
    detail = serializers.CharField(allow_blank=True, help_text="why a file was refused")
    created_at = serializers.DateTimeField(allow_null=True)


class UploadTicketSerializer(serializers.Serializer):
    method = serializers.ChoiceField(choices=["POST"])
    url = serializers.CharField(help_text="POST a multipart form here: every entry of `fields`, then `file` last")
    fields = serializers.DictField(child=serializers.CharField())  # type: ignore[assignment]  # popped by the metaclass
    expires_at = serializers.DateTimeField()
    max_size = serializers.IntegerField(help_text="the form must carry exactly this many bytes")


class UploadRequestOutputSerializer(serializers.Serializer):
    attachment = AttachmentOutputSerializer()
    upload = UploadTicketSerializer()


class DownloadUrlSerializer(serializers.Serializer):
    url = serializers.CharField()
    expires_at = serializers.DateTimeField()
    expires_in = serializers.IntegerField()


def _unavailable() -> OpenApiResponse:
    body = {"error": {"code": "scanner_unavailable", "message": "The virus scanner is unavailable; try again shortly."}}
    busy = {"error": {"code": "images_busy", "message": "Too many images are being processed; try again shortly."}}
    return OpenApiResponse(
        ErrorSerializer,
        description="The virus scanner could not give a verdict, or no image worker was free; nothing was accepted.",
        examples=[OpenApiExample("scanner_unavailable", value=body), OpenApiExample("images_busy", value=busy)],
    )


def _refused_example(reason: str, message: str, **extra: Any) -> OpenApiExample:
    return OpenApiExample(
        reason,
        response_only=True,
        status_codes=["400"],
        value={"error": {"code": "invalid", "message": message, "reason": reason, **extra}},
    )


UPLOAD_REFUSALS = [
    _refused_example("html", "HTML files are not accepted."),
    _refused_example("scripted_svg", "SVG files with scripts, event handlers or embedded HTML are not accepted."),
    _refused_example("unsupported_type", "Files of type application/x-executable are not accepted."),
    _refused_example("infected", "The file was recognised as malware and refused.", signature="Eicar-Signature"),
    OpenApiExample(
        "too_large",
        response_only=True,
        status_codes=["413"],
        value={"error": {"code": "too_large", "message": "Images are limited to 20 MB.", "limit": 20971520}},
    ),
]


class SizeCapUploadHandler(FileUploadHandler):
    """First upload handler: 413 as soon as the declared length or the received bytes pass every cap."""

    def __init__(self, request: Any = None) -> None:
        super().__init__(request)
        self.received = 0

    def handle_raw_input(
        self,
        input_data: Any,
        META: Any,  # noqa: N803 - Django's parameter name
        content_length: int,
        boundary: Any,
        encoding: Any = None,
    ) -> None:
        if content_length:
            check_upload_size(max(0, content_length - MULTIPART_OVERHEAD))

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.received += len(raw_data)
        check_upload_size(self.received)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


class UploadView(ChatApiView):
    """Multipart uploads stream to a temporary file on disk, never into memory, and stop at the cap."""

    parser_classes = [MultiPartParser]

    class InputSerializer(StrictSerializer):
        file = serializers.FileField(allow_empty_file=True)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        # Before authentication: a session's CSRF check may read the form already.
        django_request = request._request
        django_request.upload_handlers = [
            SizeCapUploadHandler(django_request),
            TemporaryFileUploadHandler(django_request),
        ]
        super().initial(request, *args, **kwargs)

    @staticmethod
    @contextlib.contextmanager
    def on_disk(uploaded: UploadedFile) -> Iterator[Path]:
        temporary = getattr(uploaded, "temporary_file_path", None)
        if temporary is not None:
            yield Path(temporary())
            return
        with tempfile.NamedTemporaryFile(prefix="upload-") as copy:
            uploaded.seek(0)
            shutil.copyfileobj(uploaded, copy, 1024 * 1024)
            copy.flush()
            yield Path(copy.name)


class AttachmentUploadApi(UploadView):
    @extend_schema(
        summary="Upload a file for a thread (multipart field `file`); checked and scanned before it is usable",
        request={"multipart/form-data": UploadView.InputSerializer},
        responses={201: AttachmentOutputSerializer, 503: _unavailable(), **error_responses(400, 403, 404, 413)},
        examples=[
            OpenApiExample("clean", response_only=True, status_codes=["201"], value=ATTACHMENT_EXAMPLE),
            *UPLOAD_REFUSALS,
        ],
    )
    def post(self, request: Request, thread_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        uploaded: UploadedFile = data["file"]
        with self.on_disk(uploaded) as path:
            attachment = services.attachment_upload(
                uploader=current_user(request),
                thread_id=thread_id,
                path=path,
                name=uploaded.name or "file",
                declared_type=uploaded.content_type or "",
            )
        return Response(upload_payload(attachment), status=status.HTTP_201_CREATED)


class AttachmentUploadRequestApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        name = TextField(max_length=255)
        size = IntField(min_value=1)
        content_type = TextField(max_length=100, required=False, allow_blank=True, default="")

    @extend_schema(
        summary="Start a direct upload: a presigned POST to storage for exactly `size` bytes, then call complete",
        request=InputSerializer,
        responses={201: UploadRequestOutputSerializer, **error_responses(400, 403, 404, 413)},
        examples=[
            OpenApiExample(
                "request", request_only=True, value={"name": "demo.mp4", "size": 7340032, "content_type": "video/mp4"}
            ),
            OpenApiExample(
                "s3",
                response_only=True,
                status_codes=["201"],
                value={
                    "attachment": {**ATTACHMENT_EXAMPLE, "status": "PENDING", "url": None, "thumbnail_url": None},
                    "upload": {
                        "method": "POST",
                        "url": "https://chatapp-files.s3.amazonaws.com/",
                        "fields": {
                            "key": "quarantine/5f0e...",
                            "x-amz-algorithm": "AWS4-HMAC-SHA256",
                            "x-amz-credential": "AKIA.../20261121/us-east-1/s3/aws4_request",
                            "x-amz-date": "20261121T100400Z",
                            "policy": "eyJleHBpcmF0aW9uIjog...",
                            "x-amz-signature": "8c1f...",
                        },
                        "expires_at": "2026-11-21T10:19:00+00:00",
                        "max_size": 7340032,
                    },
                },
            ),
        ],
    )
    def post(self, request: Request, thread_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        attachment, upload = services.attachment_upload_request(
            uploader=current_user(request),
            thread_id=thread_id,
            name=data["name"],
            size=data["size"],
            content_type=data["content_type"],
        )
        ticket = {
            "method": upload["method"],
            "url": request.build_absolute_uri(upload["url"]),
            "fields": upload["fields"],
            "expires_at": upload["expires_at"].isoformat(),
            "max_size": attachment.declared_size,
        }
        return Response({"attachment": upload_payload(attachment), "upload": ticket}, status=status.HTTP_201_CREATED)


class AttachmentLocalUploadApi(UploadView):
    @extend_schema(
        summary="The presigned-upload target when files are stored on the server's file system (no S3)",
        request={"multipart/form-data": UploadView.InputSerializer},
        responses={204: None, **error_responses(400, 404, 409, 413)},
    )
    def post(self, request: Request, attachment_id: int) -> Response:
        data = parse(self.InputSerializer, request.data)
        with self.on_disk(data["file"]) as path:
            services.attachment_upload_receive(uploader=current_user(request), attachment_id=attachment_id, path=path)
        return Response(status=status.HTTP_204_NO_CONTENT)


class AttachmentCompleteApi(ChatApiView):
    class InputSerializer(StrictSerializer):
        pass

    @extend_schema(
        summary="Finish a direct upload: the stored object is size-checked, sniffed and scanned, then usable",
        request=None,
        responses={200: AttachmentOutputSerializer, 503: _unavailable(), **error_responses(400, 404, 413)},
        examples=[
            OpenApiExample("clean", response_only=True, status_codes=["200"], value=ATTACHMENT_EXAMPLE),
            *UPLOAD_REFUSALS,
        ],
    )
    def post(self, request: Request, attachment_id: int) -> Response:
        parse(self.InputSerializer, request.data)
        attachment = services.attachment_upload_complete(uploader=current_user(request), attachment_id=attachment_id)
        return Response(upload_payload(attachment))


class AttachmentDetailApi(ChatApiView):
    @extend_schema(
        summary="An attachment's metadata and status (my uploads, or files sent in my threads)",
        responses={200: AttachmentOutputSerializer, **error_responses(404)},
        examples=[OpenApiExample("attachment", response_only=True, value=ATTACHMENT_EXAMPLE)],
    )
    def get(self, request: Request, attachment_id: int) -> Response:
        attachment = selectors.attachment_get_for_member(attachment_id=attachment_id, user=current_user(request))
        return Response(upload_payload(attachment))


def _download_target(attachment: Attachment, variant: str) -> dict[str, Any]:
    if variant == "thumbnail":
        stem = attachment.original_name.rsplit(".", 1)[0] or "file"
        return {
            "key": attachment.thumbnail_key,
            "name": f"{stem}-thumbnail.webp",
            "content_type": storage.THUMBNAIL_TYPE,
            "inline": True,
        }
    ftype = ALLOWED.get(attachment.content_type)
    return {
        "key": attachment.storage_key,
        "name": download_name(attachment.original_name, attachment.content_type),
        "content_type": attachment.content_type or "application/octet-stream",
        "inline": bool(ftype and ftype.inline),
    }


class AttachmentDownloadApi(ChatApiView):
    """After the policy check, a short-lived URL: S3 presigned, CloudFront signed, or a signed link to this server."""

    variant = "file"

    @extend_schema(
        summary="Download: 302 to a short-lived signed URL (or the URL as JSON with ?format=json)",
        parameters=[
            OpenApiParameter("format", str, enum=["json"], description="`json`: answer 200 with the URL instead of 302")
        ],
        responses={
            302: OpenApiResponse(description="Location: the signed URL, valid for AWS_QUERYSTRING_EXPIRE seconds"),
            200: DownloadUrlSerializer,
            **error_responses(404),
        },
        examples=[
            OpenApiExample(
                "json",
                response_only=True,
                status_codes=["200"],
                value={
                    "url": "https://chatapp-files.s3.amazonaws.com/attachments/7/5f0e.../file.jpg?X-Amz-Expires=300&...",
                    "expires_at": "2026-11-21T10:09:00+00:00",
                    "expires_in": 300,
                },
            )
        ],
    )
    def get(self, request: Request, attachment_id: int) -> HttpResponseBase:
        user = current_user(request)
        attachment = selectors.attachment_get_for_download(attachment_id=attachment_id, user=user, variant=self.variant)
        target = _download_target(attachment, self.variant)
        url, expires_at = storage.download_url(
            attachment_id=attachment.pk,
            key=target["key"],
            variant=self.variant,
            user_id=user.pk,
            name=target["name"],
            content_type=target["content_type"],
            inline=target["inline"],
        )
        url = request.build_absolute_uri(url)
        if request.query_params.get("format") == "json":
            response: HttpResponseBase = Response(
                {"url": url, "expires_at": expires_at.isoformat(), "expires_in": settings.AWS_QUERYSTRING_EXPIRE}
            )
        else:
            response = HttpResponseRedirect(url)
        response["Cache-Control"] = "private, no-store"
        return response


class AttachmentThumbnailApi(AttachmentDownloadApi):
    variant = "thumbnail"


class AttachmentFileApi(ChatApiView):
    """File-system storage only: streams a file for a link minted by the download endpoint.

    The signed link names the attachment, the variant and the user it was minted for, expires
    after AWS_QUERYSTRING_EXPIRE, and the user must still pass the permission policy.
    """

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(
        summary="Serve a file through a signed link from /download (file-system storage only)",
        auth=[],
        parameters=[
            OpenApiParameter("variant", str, enum=["file", "thumbnail"], required=True),
            OpenApiParameter("token", str, required=True, description="signed, short-lived"),
        ],
        responses={(200, "*/*"): OpenApiTypes.BINARY, **error_responses(404)},
    )
    def get(self, request: Request, attachment_id: int) -> HttpResponseBase:
        variant = request.query_params.get("variant", "")
        token = request.query_params.get("token", "")
        if variant not in ("file", "thumbnail") or not token or storage.is_s3():
            raise NotFound("Attachment not found.")
        user_id = storage.local_token_user(token=token, attachment_id=attachment_id, variant=variant)
        user = User.objects.filter(pk=user_id).first() if user_id is not None else None
        if user is None:
            raise NotFound("Attachment not found.")
        attachment = selectors.attachment_get_for_download(attachment_id=attachment_id, user=user, variant=variant)
        target = _download_target(attachment, variant)
        try:
            handle = storage.get_storage().open(target["key"], "rb")
        except FileNotFoundError:
            raise NotFound("Attachment not found.") from None
        content_type = target["content_type"]
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        response = FileResponse(
            handle, content_type=content_type, as_attachment=not target["inline"], filename=target["name"]
        )
        for header, value in SAFE_HEADERS.items():
            response[header] = value
        return response
