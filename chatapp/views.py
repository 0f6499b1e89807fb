from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "chat/index.html", {})


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive (it answers). Readiness of its services is /readyz."""
    return JsonResponse({"status": "ok"})
