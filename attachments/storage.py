"""Where attachment bytes live and how short-lived URLs to them are minted.

The default storage is django-storages' S3 backend when ``AWS_STORAGE_BUCKET_NAME`` is set and
the file system otherwise. Keys:

- ``quarantine/<token>``: a presigned upload's target, never served; the server reads it on
  "complete" and deletes it (the presigned POST stays usable for its lifetime, so the bytes that
  are served are always the ones the server checked, written under a key the client never had).
- ``attachments/<thread_id>/<token>/file.<ext>`` and ``.../thumb.webp``: checked files.

Nothing here asks the permission policy: callers mint URLs only after
``attachments.selectors.attachment_get_for_download`` allowed it.

Every call to S3 gives up within the client's timeouts and retries (``CHATAPP_S3_*``, settings), and
an S3 that is unreachable, hanging or failing (5xx) raises :class:`chatapp.errors.Unavailable`: the
request answers 503 ``unavailable`` (never a 500, and never "not uploaded yet"). Minting URLs
(presigned uploads and downloads) is local signing and needs no answer from S3.
"""

from __future__ import annotations

import contextlib
import functools
import secrets
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode

from django.conf import settings
from django.core import signing
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.urls import reverse
from django.utils.http import content_disposition_header

from chatapp.errors import unavailable_for

QUARANTINE_PREFIX = "quarantine/"
ATTACHMENT_PREFIX = "attachments/"
THUMBNAIL_TYPE = "image/webp"
LOCAL_TOKEN_SALT = "attachments.local-file"  # noqa: S105 - a signing namespace, not a secret
CACHE_CONTROL = "private, max-age=3600"


def get_storage() -> Storage:
    return storages["default"]


def is_s3(storage: Storage | None = None) -> bool:
    from storages.backends.s3 import S3Storage

    return isinstance(storage or get_storage(), S3Storage)


def new_token() -> str:
    return secrets.token_hex(16)


def quarantine_key(token: str) -> str:
    return f"{QUARANTINE_PREFIX}{token}"


def file_key(*, thread_id: int, token: str, extension: str) -> str:
    return f"{ATTACHMENT_PREFIX}{thread_id}/{token}/file.{extension}"


def thumbnail_key(*, thread_id: int, token: str) -> str:
    return f"{ATTACHMENT_PREFIX}{thread_id}/{token}/thumb.webp"


def _s3_key(storage: Any, key: str) -> str:
    from storages.utils import clean_name

    return str(storage._normalize_name(clean_name(key)))


@contextlib.contextmanager
def _s3_call() -> Iterator[None]:
    """Turn S3 being unreachable, hanging or failing into the one 503 (chatapp.errors.Unavailable)."""
    try:
        yield
    except Exception as exc:
        unavailable = unavailable_for(exc)
        if unavailable is None:
            raise
        raise unavailable from exc


def disposition(*, name: str, inline: bool) -> str:
    return content_disposition_header(not inline, name) or "attachment"


def store(key: str, fileobj: IO[bytes], *, content_type: str, content_disposition: str) -> None:
    """Write ``fileobj`` under exactly ``key`` (streamed; S3 objects carry their serving headers)."""
    storage = get_storage()
    fileobj.seek(0)
    if is_s3(storage):
        s3: Any = storage
        with _s3_call():
            s3.bucket.Object(_s3_key(s3, key)).upload_fileobj(
                fileobj,
                ExtraArgs={
                    "ContentType": content_type,
                    "ContentDisposition": content_disposition,
                    "CacheControl": CACHE_CONTROL,
                },
                Config=s3.transfer_config,
            )
        return
    name = storage.save(key, File(fileobj, name=key))
    if name != key:  # the key was taken: never serve a file under a name nobody checked
        storage.delete(name)
        raise FileExistsError(key)


def fetch(key: str, dest: IO[bytes]) -> None:
    """Stream the object at ``key`` into the open binary file ``dest``; FileNotFoundError if missing."""
    storage = get_storage()
    if is_s3(storage):
        from botocore.exceptions import ClientError

        s3: Any = storage
        with _s3_call():
            try:
                s3.bucket.Object(_s3_key(s3, key)).download_fileobj(dest, Config=s3.transfer_config)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                    raise FileNotFoundError(key) from None
                raise
        return
    with storage.open(key, "rb") as src:
        shutil.copyfileobj(src, dest, 1024 * 1024)


def object_size(key: str) -> int | None:
    """The stored size, or None when there is no object at ``key``."""
    storage = get_storage()
    try:
        with _s3_call():
            return int(storage.size(key))
    except (FileNotFoundError, OSError):  # botocore's timeouts are OSErrors too, but _s3_call took them
        return None


def delete(key: str) -> None:
    with _s3_call():
        get_storage().delete(key)


def iter_objects(prefix: str) -> Iterator[tuple[str, datetime]]:
    """Every stored key under ``prefix`` with its modification time."""
    storage = get_storage()
    if is_s3(storage):
        s3: Any = storage
        location = _s3_key(s3, "x")[:-1]  # the configured key prefix, if any
        for obj in s3.bucket.objects.filter(Prefix=_s3_key(s3, prefix)):
            yield obj.key.removeprefix(location), obj.last_modified
        return
    if not storage.exists(prefix.rstrip("/")):
        return
    pending = [prefix.rstrip("/")]
    while pending:
        folder = pending.pop()
        directories, files = storage.listdir(folder)
        pending.extend(f"{folder}/{d}" for d in directories)
        for name in files:
            key = f"{folder}/{name}"
            yield key, storage.get_modified_time(key)


def presigned_upload(*, attachment_id: int, key: str, size: int, content_type: str) -> dict[str, Any]:
    """How the client sends the bytes: a form POST (S3: a presigned policy pinned to ``key`` and exactly ``size``)."""
    expire = settings.ATTACHMENT_UPLOAD_EXPIRE
    expires_at = datetime.now(UTC) + timedelta(seconds=expire)
    storage = get_storage()
    if is_s3(storage):
        s3: Any = storage
        post = s3.connection.meta.client.generate_presigned_post(
            Bucket=s3.bucket_name,
            Key=_s3_key(s3, key),
            Conditions=[["content-length-range", size, size]],
            ExpiresIn=expire,
        )
        return {"method": "POST", "url": post["url"], "fields": post["fields"], "expires_at": expires_at}
    # No object store to presign against: an authenticated Django view takes the form instead.
    url = reverse("attachment-upload-local", kwargs={"attachment_id": attachment_id})
    return {"method": "POST", "url": url, "fields": {}, "expires_at": expires_at}


# --------------------------------------------------------------------------- downloads


def _private_key_pem(value: str) -> bytes:
    if value.lstrip().startswith("-----BEGIN"):
        return value.replace("\\n", "\n").encode()
    return Path(value).read_bytes()


@functools.lru_cache(maxsize=4)
def _cloudfront_signer(key_id: str, private_key: str) -> Any:
    from botocore.signers import CloudFrontSigner
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = serialization.load_pem_private_key(_private_key_pem(private_key), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("CHATAPP_CLOUDFRONT_PRIVATE_KEY must be an RSA private key")

    def rsa_signer(message: bytes) -> bytes:
        # CloudFront's canned policies are signed with RSA-SHA1; that is the service's format.
        return key.sign(message, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303

    return CloudFrontSigner(key_id, rsa_signer)


def cloudfront_url(key: str, *, expire: int) -> str:
    storage: Any = get_storage()
    path = _s3_key(storage, key) if is_s3(storage) else key
    url = f"https://{settings.CLOUDFRONT_DOMAIN}/{quote(path)}"
    signer = _cloudfront_signer(settings.CLOUDFRONT_KEY_ID, settings.CLOUDFRONT_PRIVATE_KEY)
    return str(signer.generate_presigned_url(url, date_less_than=datetime.now(UTC) + timedelta(seconds=expire)))


def local_token(*, attachment_id: int, variant: str, user_id: int) -> str:
    return signing.dumps({"a": attachment_id, "v": variant, "u": user_id}, salt=LOCAL_TOKEN_SALT, compress=True)


def local_token_user(*, token: str, attachment_id: int, variant: str) -> int | None:
    """The user a local download link was minted for, or None if it is forged, for another file or expired."""
    try:
        data = signing.loads(token, salt=LOCAL_TOKEN_SALT, max_age=settings.AWS_QUERYSTRING_EXPIRE)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict) or data.get("a") != attachment_id or data.get("v") != variant:
        return None
    user_id = data.get("u")
    return user_id if isinstance(user_id, int) else None


def download_url(
    *, attachment_id: int, key: str, variant: str, user_id: int, name: str, content_type: str, inline: bool
) -> tuple[str, datetime]:
    """A URL that serves ``key`` for ``AWS_QUERYSTRING_EXPIRE`` seconds, and when it stops working."""
    expire = settings.AWS_QUERYSTRING_EXPIRE
    expires_at = datetime.now(UTC) + timedelta(seconds=expire)
    if settings.CLOUDFRONT_DOMAIN:
        return cloudfront_url(key, expire=expire), expires_at
    storage: Any = get_storage()
    if is_s3(storage):
        parameters = {
            "ResponseContentType": content_type,
            "ResponseContentDisposition": disposition(name=name, inline=inline),
            "ResponseCacheControl": CACHE_CONTROL,
        }
        return str(storage.url(key, parameters=parameters, expire=expire)), expires_at
    path = reverse("attachment-file", kwargs={"attachment_id": attachment_id})
    token = local_token(attachment_id=attachment_id, variant=variant, user_id=user_id)
    return f"{path}?{urlencode({'variant': variant, 'token': token})}", expires_at
