from django.urls import path

from attachments import api

urlpatterns = [
    path("threads/<id:thread_id>/attachments", api.AttachmentUploadApi.as_view(), name="attachment-upload"),
    path(
        "threads/<id:thread_id>/attachments/uploads",
        api.AttachmentUploadRequestApi.as_view(),
        name="attachment-upload-request",
    ),
    path("attachments/<id:attachment_id>", api.AttachmentDetailApi.as_view(), name="attachment-detail"),
    path(
        "attachments/<id:attachment_id>/upload", api.AttachmentLocalUploadApi.as_view(), name="attachment-upload-local"
    ),
    path("attachments/<id:attachment_id>/complete", api.AttachmentCompleteApi.as_view(), name="attachment-complete"),
    path("attachments/<id:attachment_id>/download", api.AttachmentDownloadApi.as_view(), name="attachment-download"),
    path("attachments/<id:attachment_id>/thumbnail", api.AttachmentThumbnailApi.as_view(), name="attachment-thumbnail"),
    path("attachments/<id:attachment_id>/file", api.AttachmentFileApi.as_view(), name="attachment-file"),
]
