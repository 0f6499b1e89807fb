"""Settings for chatapp, read from the environment in this one place.

With no environment set the project runs on the embedded default: SQLite (WAL),
the in-memory channel layer, local-memory cache, files on disk under
``CHATAPP_DATA_DIR`` and Django's own login. ``DATABASE_URL``, ``REDIS_URL``,
the ``AWS_*`` storage settings and the ``CLERK_*`` settings switch each part to
its real service. Every variable read here is listed in README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


# --- Core -----------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", False)
TESTING = env_bool("CHATAPP_TESTING", "pytest" in sys.modules)

SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG and not TESTING:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off (set DJANGO_DEBUG=1 for local development)."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"  # noqa: S105

DATA_DIR = Path(env_str("CHATAPP_DATA_DIR", str(BASE_DIR / "data"))).resolve()

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost" if (DEBUG or TESTING) else "")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")
# Origins allowed to open the websocket; defaults to the allowed hosts.
WEBSOCKET_ALLOWED_ORIGINS = env_list("CHATAPP_WS_ALLOWED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # operations: Swagger UI assets served locally (CSP)
    "csp",  # operations: Content-Security-Policy (django-csp)
    "accounts",
    "threads",
    "messaging",
    "attachments",
    "chatapp",  # operations: management commands (backup_db, restore_db, run_scheduler), slow-query hook
]

MIDDLEWARE = [
    # operations: the request id first (every log line has it), then the probes, answered before
    # host validation and the HTTPS redirect; CSP right after SecurityMiddleware.
    "chatapp.middleware.RequestIdMiddleware",
    "chatapp.middleware.HealthCheckMiddleware",
    # NUL in a path, query string or header (or a charset that decodes to surrogates) is a 400
    # before anything queries with it; also the DataError backstop (docs/architecture.md, "Bad input").
    "chatapp.middleware.StorableInputMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "accounts.middleware.ClerkSessionMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chatapp.middleware.RateLimitHeadersMiddleware",  # RateLimit-* headers of the budget a request spent
]

ROOT_URLCONF = "chatapp.urls"
ASGI_APPLICATION = "chatapp.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "login"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

if TESTING:
    # Fast hashing for the thousands of test users; production keeps Django's defaults.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
MEDIA_ROOT = DATA_DIR / "media"
MEDIA_URL = "/media/"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Database -------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL")
DB_POOL_MAX_SIZE = env_int("CHATAPP_DB_POOL_MAX", 20)
DB_STATEMENT_TIMEOUT_MS = env_int("CHATAPP_DB_STATEMENT_TIMEOUT_MS", 5000)
# PostgreSQL unreachable: a request waits this long for a pooled connection, then answers 503
# ``unavailable`` (chatapp/errors.py); a new connection gives up after the connect timeout.
DB_POOL_TIMEOUT_SECONDS = float(env_str("CHATAPP_DB_POOL_TIMEOUT", "3"))
DB_CONNECT_TIMEOUT_SECONDS = env_int("CHATAPP_DB_CONNECT_TIMEOUT", 3)
SLOW_QUERY_SECONDS = float(env_str("CHATAPP_SLOW_QUERY_SECONDS", "1.0"))


def _database_from_url(url: str) -> dict[str, Any]:
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql", "pgsql"}:
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a postgres:// URL (got scheme {parsed.scheme!r}); "
            "leave it unset for the embedded SQLite database."
        )
    if not parsed.path.strip("/"):
        raise ImproperlyConfigured("DATABASE_URL must name a database, e.g. postgres://user:pw@host:5432/chatapp")
    try:
        parsed.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL has a malformed port: {exc}") from None
    import dj_database_url

    try:
        config: dict[str, Any] = dict(dj_database_url.parse(url))
    except Exception as exc:  # dj-database-url raises several types
        raise ImproperlyConfigured(f"DATABASE_URL could not be parsed: {exc}") from None
    config["ENGINE"] = "django.db.backends.postgresql"
    # Django's psycopg 3 pool owns the connections, so persistent connections are off.
    config["CONN_MAX_AGE"] = 0
    # Merged, not replaced: the URL's own options (sslmode=, sslrootcert=...) stay.
    config["OPTIONS"] = {
        **config.get("OPTIONS", {}),
        "pool": {"min_size": 1, "max_size": DB_POOL_MAX_SIZE, "timeout": DB_POOL_TIMEOUT_SECONDS},
        "options": f"-c statement_timeout={DB_STATEMENT_TIMEOUT_MS}",
        "connect_timeout": DB_CONNECT_TIMEOUT_SECONDS,
    }
    config["TEST"] = {"NAME": env_str("CHATAPP_TEST_DATABASE_NAME") or None}
    return config


if DATABASE_URL:
    DATABASES = {"default": _database_from_url(DATABASE_URL)}
else:
    # The embedded default keeps everything under one data folder, created on first start.
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "chatapp.sqlite3",
            "OPTIONS": {
                # WAL lets readers and the single writer work side by side.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
        }
    }

# --- Redis: channel layer, cache, sessions --------------------------------

REDIS_URL = env_str("REDIS_URL")
# Each daphne process holds one pool shared by every socket it serves.
REDIS_MAX_CONNECTIONS = env_int("CHATAPP_REDIS_MAX_CONNECTIONS", 2000)
# Every Redis call of the cache (rate budgets, cached sessions and payloads) and of the channel layer
# gives up after this long (connect and each read); a cache call that times out makes the process skip
# Redis for REDIS_SKIP_SECONDS (chatapp/cache_backend.py). Budgets then fail open (docs/operations.md).
REDIS_TIMEOUT_SECONDS = float(env_str("CHATAPP_REDIS_TIMEOUT", "0.5"))
REDIS_SKIP_SECONDS = 2.0


def _redis_retry(*, asyncio: bool) -> Any:
    """One immediate retry on a broken connection (a pooled one that Redis closed: it restarted), so
    that only a Redis that is really down fails a call. A timeout is not retried: it already waited."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    if asyncio:
        from redis.asyncio.retry import Retry as AsyncRetry

        return AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    from redis.retry import Retry

    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


if REDIS_URL:
    _redis = urlparse(REDIS_URL)
    if _redis.scheme not in {"redis", "rediss", "unix"} or (_redis.scheme != "unix" and not _redis.hostname):
        raise ImproperlyConfigured(
            f"REDIS_URL must look like redis://host:6379/0 (got {REDIS_URL!r}); leave it unset for in-memory layers."
        )
    try:
        _redis.port  # noqa: B018
    except ValueError as exc:
        raise ImproperlyConfigured(f"REDIS_URL has a malformed port: {exc}") from None
    # The channel layer's keys, and the real-time state's (presence, connection counts, typing).
    CHANNEL_PREFIX = env_str("CHATAPP_CHANNEL_PREFIX", "chatapp")
    # Pub/sub: measured to carry more at less CPU per delivery (docs/benchmarks.md).
    _layer_backend = env_str("CHATAPP_CHANNEL_LAYER", "channels_redis.pubsub.RedisPubSubChannelLayer")
    # The core layer's receive blocks in Redis for up to 5 s (channels-redis' brpop_timeout): its reads
    # must be allowed that long. The pub/sub layer reads its subscriptions with a timeout of its own.
    _layer_read_timeout = REDIS_TIMEOUT_SECONDS + (5 if _layer_backend.endswith(".core.RedisChannelLayer") else 0)
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": _layer_backend,
            "CONFIG": {
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "max_connections": REDIS_MAX_CONNECTIONS,
                        "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
                        "socket_timeout": _layer_read_timeout,
                        "retry": _redis_retry(asyncio=True),
                    }
                ],
                "capacity": env_int("CHATAPP_CHANNEL_CAPACITY", 1000),
                "expiry": 60,
                "prefix": CHANNEL_PREFIX,
            },
        }
    }
    CACHES: dict[str, dict[str, Any]] = {
        "default": {
            "BACKEND": "chatapp.cache_backend.SharedRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": env_str("CHATAPP_CACHE_PREFIX", "chatcache"),
            "OPTIONS": {
                "pool_class": "chatapp.cache_backend.SkippingConnectionPool",
                "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
                "socket_timeout": REDIS_TIMEOUT_SECONDS,
                "retry": _redis_retry(asyncio=False),
            },
        }
    }
    SESSION_ENGINE = "chatapp.sessions"  # Django's cached_db, working on while Redis does not answer
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "chatapp"}}
    SESSION_ENGINE = "django.contrib.sessions.backends.db"

# --- Storage --------------------------------------------------------------

AWS_STORAGE_BUCKET_NAME = env_str("AWS_STORAGE_BUCKET_NAME")
AWS_S3_ENDPOINT_URL = env_str("AWS_S3_ENDPOINT_URL") or None
AWS_S3_REGION_NAME = env_str("AWS_S3_REGION_NAME", "us-east-1")
AWS_ACCESS_KEY_ID = env_str("AWS_ACCESS_KEY_ID") or None
AWS_SECRET_ACCESS_KEY = env_str("AWS_SECRET_ACCESS_KEY") or None
AWS_QUERYSTRING_EXPIRE = env_int("AWS_QUERYSTRING_EXPIRE", 300)
# S3 unreachable or hanging: each request gives up after the connect (or read) timeout and is tried
# S3_MAX_ATTEMPTS times in all (botocore's "standard" retries: under 1 s of backoff before the second
# try). By default a storage call to a hanging endpoint fails within 3 x 2 + 1 = 7 s, to an
# unreachable one within 2 x 2 + 1 = 5 s; the request then answers 503 (docs/operations.md).
S3_CONNECT_TIMEOUT_SECONDS = float(env_str("CHATAPP_S3_CONNECT_TIMEOUT", "2"))
S3_READ_TIMEOUT_SECONDS = float(env_str("CHATAPP_S3_READ_TIMEOUT", "3"))
S3_MAX_ATTEMPTS = env_int("CHATAPP_S3_MAX_ATTEMPTS", 2)


def _s3_client_config() -> Any:
    from botocore.config import Config

    return Config(
        connect_timeout=S3_CONNECT_TIMEOUT_SECONDS,
        read_timeout=S3_READ_TIMEOUT_SECONDS,
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "path" if AWS_S3_ENDPOINT_URL else "auto"},
    )


def _s3_transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    # s3transfer tries a download 5 times on its own, each with botocore's retries: once here.
    return TransferConfig(num_download_attempts=1)


if AWS_STORAGE_BUCKET_NAME:
    _default_storage: dict[str, Any] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": AWS_STORAGE_BUCKET_NAME,
            "endpoint_url": AWS_S3_ENDPOINT_URL,
            "region_name": AWS_S3_REGION_NAME,
            "access_key": AWS_ACCESS_KEY_ID,
            "secret_key": AWS_SECRET_ACCESS_KEY,
            "querystring_auth": True,
            "querystring_expire": AWS_QUERYSTRING_EXPIRE,
            "default_acl": None,
            "file_overwrite": False,
            # Signature version and addressing style are in the client config (which replaces them).
            "client_config": _s3_client_config(),
            "transfer_config": _s3_transfer_config(),
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(MEDIA_ROOT), "base_url": MEDIA_URL},
    }

STORAGES = {
    "default": _default_storage,
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if (DEBUG or TESTING)
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# --- Clerk ----------------------------------------------------------------

CLERK_ISSUER = env_str("CLERK_ISSUER").rstrip("/")
CLERK_JWKS_URL = env_str("CLERK_JWKS_URL") or (f"{CLERK_ISSUER}/.well-known/jwks.json" if CLERK_ISSUER else "")
CLERK_AUTHORIZED_PARTIES = env_list("CLERK_AUTHORIZED_PARTIES")
CLERK_WEBHOOK_SECRET = env_str("CLERK_WEBHOOK_SECRET")
CLERK_PUBLISHABLE_KEY = env_str("CLERK_PUBLISHABLE_KEY")
CLERK_FRONTEND_API_URL = env_str("CLERK_FRONTEND_API_URL")
CLERK_LEEWAY_SECONDS = env_int("CLERK_LEEWAY_SECONDS", 10)
CLERK_ENABLED = bool(CLERK_ISSUER)
if CLERK_ENABLED and not CLERK_AUTHORIZED_PARTIES and not (DEBUG or TESTING):
    raise ImproperlyConfigured(
        "CLERK_AUTHORIZED_PARTIES is required with CLERK_ISSUER (the origins of your pages, e.g. "
        "https://chat.example.com): without it a session token minted for another site of the same "
        "Clerk instance would be accepted here."
    )

# --- Chat limits (from the design) ----------------------------------------

CHAT_MAX_MESSAGE_BYTES = 100 * 1024
CHAT_COMPRESS_OVER_BYTES = 10 * 1024
CHAT_SENDS_PER_MINUTE = env_int("CHATAPP_SENDS_PER_MINUTE", 60)
# The span the send budget counts over: no CHAT_SENDS_PER_MINUTE + 1 sends in any such span
# (a sliding log, messaging/ratelimits.py). Tests shorten it.
CHAT_SEND_WINDOW_SECONDS = 60
CHAT_MAX_CONNECTIONS_PER_USER = env_int("CHATAPP_MAX_CONNECTIONS_PER_USER", 5)
CHAT_HEARTBEAT_SECONDS = env_int("CHATAPP_HEARTBEAT_SECONDS", 30)
# A server process counts as gone (its connections stop counting toward the limit, its users go
# offline) this long after its last process beat; it beats every third of it (docs/realtime.md).
CHAT_PROCESS_TTL_SECONDS = env_int("CHATAPP_PROCESS_TTL_SECONDS", 12)
CHAT_IDLE_TIMEOUT_SECONDS = env_int("CHATAPP_IDLE_TIMEOUT_SECONDS", 120)
# Proxies in front of daphne (chatapp/proxy.py): the client's address is the X-Forwarded-For entry
# this many from the right, its scheme X-Forwarded-Proto; with 0 both headers are ignored.
TRUSTED_PROXY_COUNT = env_int("CHATAPP_TRUSTED_PROXY_COUNT", 0)
if TRUSTED_PROXY_COUNT < 0:
    raise ImproperlyConfigured(f"CHATAPP_TRUSTED_PROXY_COUNT must be 0 or more, got {TRUSTED_PROXY_COUNT}")
# General API budgets (django-ratelimit syntax), on top of the message-send budget.
API_RATE_PER_USER = env_str("CHATAPP_API_RATE_PER_USER", "600/m")
API_RATE_PER_IP = env_str("CHATAPP_API_RATE_PER_IP", "1200/m")
# Password attempts (the token API, the sign-in page, the admin's) per client IP.
AUTH_TOKEN_RATE_PER_IP = env_str("CHATAPP_AUTH_TOKEN_RATE_PER_IP", "10/m")
# ... and per account, whatever the address; a browser that signed in to the account before (its
# known-device cookie, kept this many days) has a budget of its own instead (docs/auth.md).
AUTH_RATE_PER_ACCOUNT = env_str("CHATAPP_AUTH_RATE_PER_ACCOUNT", "10/15m")
KNOWN_DEVICE_DAYS = env_int("CHATAPP_KNOWN_DEVICE_DAYS", 365)

# --- Attachments (docs/attachments.md) ------------------------------------

_MB = 1024 * 1024
# Size caps per kind, decided after sniffing the bytes; the largest also bounds any upload request.
ATTACHMENT_MAX_IMAGE_BYTES = env_int("CHATAPP_ATTACHMENT_MAX_IMAGE_MB", 20) * _MB
ATTACHMENT_MAX_VIDEO_BYTES = env_int("CHATAPP_ATTACHMENT_MAX_VIDEO_MB", 100) * _MB
ATTACHMENT_MAX_DOCUMENT_BYTES = env_int("CHATAPP_ATTACHMENT_MAX_DOCUMENT_MB", 25) * _MB
# Decoded pixels per image frame (a decompression bomb is refused before Pillow allocates it).
ATTACHMENT_MAX_IMAGE_PIXELS = env_int("CHATAPP_ATTACHMENT_MAX_IMAGE_PIXELS", 40_000_000)
# An animation's frames, each composited onto the whole canvas: canvas pixels x frames at most.
ATTACHMENT_MAX_ANIMATION_PIXELS = env_int("CHATAPP_ATTACHMENT_MAX_ANIMATION_PIXELS", 40_000_000)
ATTACHMENT_MAX_ANIMATION_FRAMES = env_int("CHATAPP_ATTACHMENT_MAX_ANIMATION_FRAMES", 1000)
# Images are processed in a worker process each, this many at once per server process, each held
# to this much address space and this many seconds (also the longest wait for a free slot).
ATTACHMENT_IMAGE_WORKERS = env_int("CHATAPP_ATTACHMENT_IMAGE_WORKERS", 2)
ATTACHMENT_IMAGE_MEMORY_MB = env_int("CHATAPP_ATTACHMENT_IMAGE_MEMORY_MB", 1536)
ATTACHMENT_IMAGE_TIMEOUT = env_int("CHATAPP_ATTACHMENT_IMAGE_TIMEOUT", 60)
ATTACHMENT_THUMBNAIL_PX = env_int("CHATAPP_ATTACHMENT_THUMBNAIL_PX", 320)
# Lifetime of a presigned (direct-to-storage) upload; downloads use AWS_QUERYSTRING_EXPIRE.
ATTACHMENT_UPLOAD_EXPIRE = env_int("CHATAPP_ATTACHMENT_UPLOAD_EXPIRE", 900)
# Uploads never sent with a message are removed by `manage.py cleanup_attachments` after this.
ATTACHMENT_ORPHAN_HOURS = env_int("CHATAPP_ATTACHMENT_ORPHAN_HOURS", 24)
CLAMD_SOCKET = env_str("CHATAPP_CLAMD_SOCKET")
CLAMAV_ENABLED = env_bool("CHATAPP_CLAMAV_ENABLED", bool(CLAMD_SOCKET))
CLAMD_TIMEOUT_SECONDS = env_int("CHATAPP_CLAMD_TIMEOUT", 60)
if CLAMAV_ENABLED and not CLAMD_SOCKET:
    raise ImproperlyConfigured("CHATAPP_CLAMAV_ENABLED is on but CHATAPP_CLAMD_SOCKET (clamd's unix socket) is unset.")
# Signed CloudFront download URLs instead of S3 presigned ones; all three or none.
CLOUDFRONT_DOMAIN = env_str("CHATAPP_CLOUDFRONT_DOMAIN")
CLOUDFRONT_KEY_ID = env_str("CHATAPP_CLOUDFRONT_KEY_ID")
CLOUDFRONT_PRIVATE_KEY = env_str("CHATAPP_CLOUDFRONT_PRIVATE_KEY")  # PEM text, or a path to the PEM file
if any((CLOUDFRONT_DOMAIN, CLOUDFRONT_KEY_ID, CLOUDFRONT_PRIVATE_KEY)) and not all(
    (CLOUDFRONT_DOMAIN, CLOUDFRONT_KEY_ID, CLOUDFRONT_PRIVATE_KEY)
):
    raise ImproperlyConfigured(
        "Set all of CHATAPP_CLOUDFRONT_DOMAIN, CHATAPP_CLOUDFRONT_KEY_ID and CHATAPP_CLOUDFRONT_PRIVATE_KEY, or none."
    )

# --- REST API -------------------------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "accounts.authentication.ClerkJWTAuthentication",
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "chatapp.parsers.JSONParser",
        "chatapp.parsers.FormParser",
        "chatapp.parsers.MultiPartParser",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "chatapp.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "chatapp API",
    "DESCRIPTION": "Threads, messages, reactions, receipts and attachments. Errors share one JSON shape.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "COMPONENT_SPLIT_REQUEST": True,
    # operations: Swagger UI from drf-spectacular-sidecar's static files, not a CDN (CSP 'self').
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Security -------------------------------------------------------------

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG and not TESTING:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    # No SECURE_PROXY_SSL_HEADER: the scheme comes from X-Forwarded-Proto only when a proxy is
    # trusted (CHATAPP_TRUSTED_PROXY_COUNT), set as the ASGI scope's by chatapp/proxy.py.

# --- Operations: probes, metrics, backups, scheduler, CSP (docs/operations.md) ---------

# The probes and the scrape are answered by the instance address over plain HTTP
# (chatapp.middleware.HealthCheckMiddleware); never redirect them to HTTPS.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
# Each /readyz check (PostgreSQL, Redis, storage) gives up after this long.
HEALTH_CHECK_TIMEOUT_SECONDS = 1.5
# Bearer token for /metrics; unset: /metrics answers loopback clients only.
METRICS_TOKEN = env_str("CHATAPP_METRICS_TOKEN")

# Backups (manage.py backup_db / restore_db): a local folder, a dedicated bucket, the attachments
# bucket (under backups/) when storage is S3, else DATA_DIR/backups. See chatapp/backups.py.
BACKUP_DIR = env_str("CHATAPP_BACKUP_DIR")
BACKUP_BUCKET = env_str("CHATAPP_BACKUP_BUCKET")
BACKUP_KEEP = env_int("CHATAPP_BACKUP_KEEP", 7)
# pg_dump / pg_restore may take this long before the backup (or restore) fails.
BACKUP_TOOL_TIMEOUT_SECONDS = env_int("CHATAPP_BACKUP_TOOL_TIMEOUT", 3 * 3600)
# Folder holding pg_dump/pg_restore, when not /usr/lib/postgresql/<server major>/bin or on PATH.
PG_BIN_DIR = env_str("CHATAPP_PG_BIN_DIR")

# manage.py run_scheduler (crontab syntax, UTC; "off" disables a job).
SCHEDULE_BACKUP_CRON = env_str("CHATAPP_BACKUP_CRON", "0 3 * * *")
SCHEDULE_CLEANUP_CRON = env_str("CHATAPP_CLEANUP_CRON", "17 * * * *")
PRESENCE_EXPIRE_SECONDS = env_int("CHATAPP_PRESENCE_EXPIRE_SECONDS", 30)
# Called without arguments by the scheduler; provided by the real-time layer.
PRESENCE_EXPIRE_FUNCTION = "messaging.realtime.presence_expire_stale"


def _origin(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"https://{url}")
    return f"{parsed.scheme}://{parsed.netloc}" if parsed.netloc else ""


# Where the browser fetches attachments from (signed S3 or CloudFront URLs) and uploads to.
_MEDIA_ORIGINS: list[str] = []
if AWS_STORAGE_BUCKET_NAME:
    if AWS_S3_ENDPOINT_URL:
        _MEDIA_ORIGINS.append(_origin(AWS_S3_ENDPOINT_URL))
    else:
        _MEDIA_ORIGINS += [
            f"https://{AWS_STORAGE_BUCKET_NAME}.s3.amazonaws.com",
            f"https://{AWS_STORAGE_BUCKET_NAME}.s3.{AWS_S3_REGION_NAME}.amazonaws.com",
        ]
if CLOUDFRONT_DOMAIN:
    _MEDIA_ORIGINS.append(_origin(CLOUDFRONT_DOMAIN))
_CLERK = [_origin(CLERK_FRONTEND_API_URL)] if CLERK_FRONTEND_API_URL else []
# Clerk's components need its bot challenge (Cloudflare Turnstile), its image host and inline styles.
_CLERK_CHALLENGE = ["https://challenges.cloudflare.com"] if _CLERK else []

CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'", *_CLERK, *_CLERK_CHALLENGE],  # no inline scripts
        "style-src": ["'self'", *(["'unsafe-inline'"] if _CLERK else [])],
        "img-src": ["'self'", "data:", "blob:", *_MEDIA_ORIGINS, *(["https://img.clerk.com"] if _CLERK else [])],
        "media-src": ["'self'", "blob:", *_MEDIA_ORIGINS],
        "connect-src": ["'self'", "ws:", "wss:", *_MEDIA_ORIGINS, *_CLERK],
        "font-src": ["'self'"],
        "worker-src": ["'self'", "blob:"],
        "frame-src": _CLERK_CHALLENGE or ["'none'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'", *_CLERK],
        "base-uri": ["'self'"],
        "object-src": ["'none'"],
    }
}

# --- Logging (chatapp/logging.py) -------------------------------------------

LOG_LEVEL = env_str("CHATAPP_LOG_LEVEL", "INFO")
# One JSON object per line in production, readable text in DEBUG; CHATAPP_LOG_FORMAT overrides.
LOG_FORMAT = env_str("CHATAPP_LOG_FORMAT", "plain" if DEBUG else "json").lower()
if LOG_FORMAT not in {"json", "plain"}:
    raise ImproperlyConfigured(f"CHATAPP_LOG_FORMAT must be json or plain, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "chatapp.logging.ContextFilter"}},
    "formatters": {
        "json": {"()": "chatapp.logging.JsonFormatter"},
        "plain": {"()": "chatapp.logging.PlainFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # Django's own console handler (DEBUG only) would print each django.* line a second time.
        "django": {"handlers": [], "level": "INFO", "propagate": True},
        "django.db.backends": {"level": "INFO"},
        "chatapp.slow_query": {"level": "WARNING"},
        # The scheduler logs each job itself; APScheduler's per-run lines are noise.
        "apscheduler": {"level": "WARNING"},
    },
}
