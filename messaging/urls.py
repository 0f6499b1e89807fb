from django.urls import path

from messaging import api

urlpatterns = [
    path("threads/<id:thread_id>/messages", api.MessageListSendApi.as_view(), name="message-list"),
    path("threads/<id:thread_id>/read", api.ReceiptMarkApi.as_view(mark="read"), name="thread-read"),
    path("threads/<id:thread_id>/delivered", api.ReceiptMarkApi.as_view(mark="delivered"), name="thread-delivered"),
    path("messages/<id:message_id>", api.MessageDetailApi.as_view(), name="message-detail"),
    path("messages/<id:message_id>/edits", api.MessageEditsApi.as_view(), name="message-edits"),
    path("messages/<id:message_id>/replies", api.MessageRepliesApi.as_view(), name="message-replies"),
    path("messages/<id:message_id>/receipts", api.MessageReceiptsApi.as_view(), name="message-receipts"),
    path("messages/<id:message_id>/reactions", api.ReactionApi.as_view(), name="reaction-add"),
    path("messages/<id:message_id>/reactions/<str:emoji>", api.ReactionDeleteApi.as_view(), name="reaction-remove"),
    path("notifications", api.NotificationListApi.as_view(), name="notification-list"),
    path("notifications/read", api.NotificationReadApi.as_view(), name="notification-read"),
    path("search", api.SearchApi.as_view(), name="search"),
]
