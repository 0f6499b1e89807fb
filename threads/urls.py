from django.urls import path

from threads import api

urlpatterns = [
    path("threads", api.ThreadListCreateApi.as_view(), name="thread-list"),
    path("threads/<int:thread_id>", api.ThreadDetailApi.as_view(), name="thread-detail"),
    path("threads/<int:thread_id>/membership", api.MembershipApi.as_view(), name="thread-membership"),
    path("threads/<int:thread_id>/participants", api.ParticipantListApi.as_view(), name="participant-list"),
    path(
        "threads/<int:thread_id>/participants/<int:user_id>",
        api.ParticipantDetailApi.as_view(),
        name="participant-detail",
    ),
    path("threads/<int:thread_id>/leave", api.LeaveApi.as_view(), name="thread-leave"),
]
