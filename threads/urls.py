from django.urls import path

from threads import api

urlpatterns = [
    path("threads", api.ThreadListCreateApi.as_view(), name="thread-list"),
    path("threads/<id:thread_id>", api.ThreadDetailApi.as_view(), name="thread-detail"),
    path("threads/<id:thread_id>/membership", api.MembershipApi.as_view(), name="thread-membership"),
    path("threads/<id:thread_id>/participants", api.ParticipantListApi.as_view(), name="participant-list"),
    path(
        "threads/<id:thread_id>/participants/<id:user_id>",
        api.ParticipantDetailApi.as_view(),
        name="participant-detail",
    ),
    path("threads/<id:thread_id>/leave", api.LeaveApi.as_view(), name="thread-leave"),
]
