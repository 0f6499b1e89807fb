"""Production settings: `check --deploy` is clean, and the security headers are sent (CSP without
inline scripts, HSTS, Referrer-Policy, frame-ancestors)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

BASE_DIR = Path(__file__).resolve().parent.parent


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "CHATAPP_TESTING"))}
    return env | {
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
        "DJANGO_DEBUG": "0",
        "CHATAPP_TESTING": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(64),
        "DJANGO_ALLOWED_HOSTS": "chat.example.com",
        "DJANGO_CSRF_TRUSTED_ORIGINS": "https://chat.example.com",
        "CHATAPP_DATA_DIR": str(tmp_path),
        **extra,
    }


def run_manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.smoke
def test_check_deploy_passes_with_production_settings(tmp_path: Path) -> None:
    result = run_manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.smoke
def test_production_settings_are_hardened(tmp_path: Path) -> None:
    script = (
        "import django, json; django.setup(); from django.conf import settings as s; print(json.dumps({"
        "'hsts': s.SECURE_HSTS_SECONDS, 'ssl': s.SECURE_SSL_REDIRECT, 'cookies': [s.SESSION_COOKIE_SECURE, "
        "s.CSRF_COOKIE_SECURE], 'referrer': s.SECURE_REFERRER_POLICY, 'log': s.LOG_FORMAT, "
        "'static': s.STORAGES['staticfiles']['BACKEND'], 'csp': s.CONTENT_SECURITY_POLICY['DIRECTIVES']}))"
    )
    env = production_env(
        tmp_path,
        CLERK_FRONTEND_API_URL="https://clerk.chat.example.com",
        CHATAPP_CLOUDFRONT_DOMAIN="d111111abcdef8.cloudfront.net",
        CHATAPP_CLOUDFRONT_KEY_ID="K2JCJMDEHXQW5F",
        CHATAPP_CLOUDFRONT_PRIVATE_KEY="unused-here",
        AWS_STORAGE_BUCKET_NAME="chat-media",
        AWS_S3_REGION_NAME="eu-west-1",
    )
    env.pop("AWS_S3_ENDPOINT_URL", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=BASE_DIR, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import json

    conf = json.loads(result.stdout.strip().splitlines()[-1])
    assert conf["hsts"] >= 31536000
    assert conf["ssl"] is True
    assert conf["cookies"] == [True, True]
    assert conf["referrer"] == "same-origin"
    assert conf["log"] == "json"
    assert conf["static"] == "whitenoise.storage.CompressedManifestStaticFilesStorage"
    csp = conf["csp"]
    assert csp["script-src"] == ["'self'", "https://clerk.chat.example.com", "https://challenges.cloudflare.com"]
    assert "'unsafe-inline'" not in csp["script-src"]
    assert csp["connect-src"][:3] == ["'self'", "ws:", "wss:"]
    for origin in ("https://chat-media.s3.eu-west-1.amazonaws.com", "https://d111111abcdef8.cloudfront.net"):
        assert origin in csp["img-src"]
        assert origin in csp["connect-src"]
    assert "https://clerk.chat.example.com" in csp["connect-src"]
    assert csp["frame-ancestors"] == ["'none'"]


@pytest.mark.smoke
def test_pages_carry_the_content_security_policy(client: Client) -> None:
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    policy = response["Content-Security-Policy"]
    directives = {part.split()[0]: part.split()[1:] for part in policy.split("; ")}
    assert directives["script-src"][0] == "'self'"
    assert "'unsafe-inline'" not in directives["script-src"]
    assert "'unsafe-inline'" not in directives.get("style-src", [])
    assert directives["frame-ancestors"] == ["'none'"]
    assert {"'self'", "ws:", "wss:"} <= set(directives["connect-src"])
    assert {"'self'", "data:", "blob:"} <= set(directives["img-src"])
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"
    assert "<script>" not in response.content.decode()


@pytest.mark.smoke
def test_swagger_ui_is_served_locally_without_inline_scripts(client: Client, settings: Any) -> None:
    response = client.get("/api/docs/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "cdn.jsdelivr.net" not in page
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert "<script>" not in page  # the split view loads its init script from ?script=
    policy = response["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "style-src 'self' 'unsafe-inline'" in policy  # the page's one <style> block
    script = client.get("/api/docs/?script=")
    assert script.status_code == 200
    assert script["Content-Type"].startswith("application/javascript")


@pytest.mark.smoke
def test_procfile_declares_the_processes() -> None:
    processes = dict(
        line.split(":", 1) for line in (BASE_DIR / "Procfile").read_text().splitlines() if line and ":" in line
    )
    assert set(processes) == {"web", "release", "scheduler"}
    web = processes["web"].split()
    assert web[0] == "daphne"
    assert {"0.0.0.0", "$PORT", "chatapp.asgi:application"} <= set(web)  # noqa: S104
    # Daphne's --proxy-headers would take the client's address from the client-written left end of
    # X-Forwarded-For; chatapp.proxy reads it from the trusted proxies' end instead.
    assert "--proxy-headers" not in web
    assert "migrate" in processes["release"]
    assert "collectstatic" in processes["release"]
    assert processes["scheduler"].split()[-1] == "run_scheduler"
