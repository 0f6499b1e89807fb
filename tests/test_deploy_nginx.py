"""The deployment as it should run: nginx from deploy/nginx/chatapp.conf (TLS, websocket upgrade,
X-Forwarded-For/-Proto, static files) in front of two daphne processes started as the Procfile says,
with production settings, on the real PostgreSQL and Redis.

A browser-like client signs in through it (cookies, CSRF, HTTPS-only cookies), two websockets on
the two processes talk through it, and a client that writes its own X-Forwarded-For never changes
whose password budget it spends. nginx runs from the shipped file with only names, ports and paths
replaced, under its own prefix, pid and temp folders, and is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from websockets.asyncio.client import connect

from accounts.models import User
from bench.servers import BIN, ROOT, ServerProcess, start_all
from tests.conftest import needs
from tests.live import Client, daphne_env
from threads.models import Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.services]

CONF = ROOT / "deploy" / "nginx" / "chatapp.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
PASSWORD = "a-real-password-for-nginx-tests"
PER_ADDRESS = 4  # the daphne processes' password attempts per address, per day (no window edge inside a test)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procfile_daphne() -> list[str]:
    """The Procfile's web command, on an inherited socket ({fd}) instead of --bind/--port."""
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    argv = shlex.split(line.partition(":")[2])
    for option in ("--bind", "--port", "-b", "-p"):
        while option in argv:
            index = argv.index(option)
            del argv[index : index + 2]
    assert argv[0] == "daphne"
    return [str(BIN / "daphne"), "--fd", "{fd}", *argv[1:]]


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def replace_once(text: str, old: str, new: str) -> str:
    """Replace ``old`` (which must be in the shipped file: if it changes, this test must follow)."""
    assert old in text, f"deploy/nginx/chatapp.conf no longer contains {old!r}"
    return text.replace(old, new)


def site_config(*, https_port: int, http_port: int, upstreams: list[int], cert: Path, key: Path, static: Path) -> str:
    """The shipped file with this test's ports and paths (IPv6 listeners dropped: loopback v4 only)."""
    text = CONF.read_text()
    text = replace_once(text, "    listen [::]:80;\n", "")
    text = replace_once(text, "    listen [::]:443 ssl http2;\n", "")
    text = replace_once(text, "listen 80;", f"listen 127.0.0.1:{http_port};")
    text = replace_once(text, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    text = replace_once(text, "/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(cert))
    text = replace_once(text, "/etc/letsencrypt/live/chat.example.com/privkey.pem", str(key))
    text = replace_once(text, "/srv/chatapp/data/staticfiles/", f"{static}/")
    servers = re.findall(r"^    server 127\.0\.0\.1:\d+;\n", text, flags=re.MULTILINE)
    assert len(servers) >= 2, "the upstream should list several daphne processes"
    text = text.replace("".join(servers), "".join(f"    server 127.0.0.1:{port};\n" for port in upstreams))
    return text


def main_config(prefix: Path) -> str:
    """What Debian's nginx.conf provides around a conf.d file, in this test's own folders; an access
    log that names the upstream each request went to."""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format upstreams '$remote_addr "$request" $status $upstream_addr';
    access_log {prefix}/access.log upstreams;
{temp}
    include {prefix}/chatapp.conf;
}}
"""


@dataclass
class Deployment:
    base: str  # https://127.0.0.1:port
    http_base: str
    cert: Path
    prefix: Path
    daphnes: list[ServerProcess]

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE (or a proxy) from the environment wins
        session.verify = str(self.cert)
        return session

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def upstreams_used(self, path: str) -> set[str]:
        log = (self.prefix / "access.log").read_text()
        return {line.rsplit(" ", 1)[-1] for line in log.splitlines() if f" {path} HTTP" in line}


class Nginx:
    def __init__(self, prefix: Path) -> None:
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / kind).mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        argv = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def errors(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def production_env() -> dict[str, str]:
    return {"DJANGO_DEBUG": "0", "CHATAPP_TESTING": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(64)}


@pytest.fixture(scope="module")
def deployment(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    needs("postgres")
    needs("redis")
    assert Path(NGINX).exists(), f"{NGINX} is missing: run `scripts/testenv.py ensure` (apt-get install nginx)"
    root = tmp_path_factory.mktemp("nginx-deploy")
    prefix, data = root / "nginx", root / "data"
    prefix.mkdir()
    https_port, http_port = free_port(), free_port()
    origin = f"https://127.0.0.1:{https_port}"
    daphnes = [ServerProcess(procfile_daphne(), name="daphne") for _ in range(2)]
    env = daphne_env(
        daphnes,
        **production_env(),
        CHATAPP_DATA_DIR=str(data),
        DJANGO_ALLOWED_HOSTS="127.0.0.1",
        DJANGO_CSRF_TRUSTED_ORIGINS=origin,
        CHATAPP_WS_ALLOWED_ORIGINS=origin,
        CHATAPP_TRUSTED_PROXY_COUNT="1",  # what goes with the shipped config (docs/operations.md)
        CHATAPP_AUTH_TOKEN_RATE_PER_IP=f"{PER_ADDRESS}/d",
        CHATAPP_AUTH_RATE_PER_ACCOUNT="1000/d",
    )
    # The release phase: hashed static files for the manifest storage, which nginx then serves.
    release = subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert release.returncode == 0, release.stderr
    start_all(daphnes, env)
    cert, key = self_signed_certificate(root)
    (prefix / "chatapp.conf").write_text(
        site_config(
            https_port=https_port,
            http_port=http_port,
            upstreams=[d.port for d in daphnes],
            cert=cert,
            key=key,
            static=data / "staticfiles",
        )
    )
    (prefix / "nginx.conf").write_text(main_config(prefix))
    nginx = Nginx(prefix)
    deployment = Deployment(
        base=origin, http_base=f"http://127.0.0.1:{http_port}", cert=cert, prefix=prefix, daphnes=daphnes
    )
    try:
        last: list[object] = []

        def answers() -> bool:
            assert nginx.proc.poll() is None, nginx.errors()
            try:
                response = deployment.session().get(f"{origin}/healthz", timeout=5)
            except requests.RequestException as exc:
                last[:] = [exc]
                return False
            last[:] = [response.status_code, response.text[:300]]
            return response.status_code == 200

        try:
            wait_until(answers, "nginx to answer /healthz through a daphne process")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {last}\n{nginx.errors()}\n{daphnes[0].output()}") from None
        yield deployment
    finally:
        nginx.stop()
        for daphne in daphnes:
            daphne.close()


def local_user(make_user: Callable[..., User], username: str) -> User:
    """A user whose password the production hashers check (the suite's own hasher is MD5)."""
    user = make_user(username)
    hasher = PBKDF2PasswordHasher()
    user.password = hasher.encode(PASSWORD, hasher.salt(), iterations=1000)
    user.save(update_fields=["password"])
    return user


def sign_in(
    deployment: Deployment, username: str, password: str = PASSWORD, **headers: str
) -> tuple[requests.Session, requests.Response]:
    """What a browser does: fetch the form (CSRF cookie), post it back from the page."""
    browser = deployment.session()
    form = browser.get(f"{deployment.base}/accounts/login/", timeout=30)
    assert form.status_code == 200, form.text[:500]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert token is not None
    response = browser.post(
        f"{deployment.base}/accounts/login/",
        data={"username": username, "password": password, "csrfmiddlewaretoken": token.group(1), "next": "/"},
        headers={"Origin": deployment.base, "Referer": f"{deployment.base}/accounts/login/", **headers},
        allow_redirects=False,
        timeout=30,
    )
    return browser, response


def test_a_browser_signs_in_and_two_sockets_on_two_processes_talk_through_nginx(
    deployment: Deployment, make_user: Callable[..., User]
) -> None:
    alice, bob = local_user(make_user, "alice"), local_user(make_user, "bob")
    from threads.services import thread_create

    thread: Thread = thread_create(creator=alice, title="Through nginx", participant_ids=[bob.pk])[0]

    plain = requests.get(f"{deployment.http_base}/accounts/login/", allow_redirects=False, timeout=30)
    assert plain.status_code == 301
    assert plain.headers["Location"].startswith("https://")

    browser, signed_in = sign_in(deployment, "alice")
    assert signed_in.status_code == 302, signed_in.text[:500]
    assert signed_in.headers["Location"] == "/"
    # Django saw HTTPS (X-Forwarded-Proto from the trusted proxy): secure cookies, HSTS, no redirect loop.
    cookies = {cookie.name: cookie for cookie in browser.cookies}
    assert cookies["sessionid"].secure
    assert cookies["csrftoken"].secure
    assert "chatapp_device" in cookies
    page = browser.get(f"{deployment.base}/", allow_redirects=False, timeout=30)
    assert page.status_code == 200, page.text[:500]
    assert page.headers["Strict-Transport-Security"].startswith("max-age=")
    assert browser.get(f"{deployment.base}/api/v1/me", timeout=30).json()["username"] == "alice"

    # Static files come from nginx (no X-Request-ID: never reached daphne), hashed names cached for ever.
    script = re.search(r'src="(/static/[^"]+\.js)"', page.text)
    assert script is not None, page.text[:1000]
    asset = browser.get(f"{deployment.base}{script.group(1)}", timeout=30)
    assert asset.status_code == 200
    assert "X-Request-ID" not in asset.headers
    assert "immutable" in asset.headers["Cache-Control"]

    bob_browser, bob_signed_in = sign_in(deployment, "bob")
    assert bob_signed_in.status_code == 302

    async def talk() -> None:
        async def open_socket(session: requests.Session) -> Client:
            ws = await connect(
                f"wss://127.0.0.1:{deployment.base.rsplit(':', 1)[1]}/ws/",
                ssl=deployment.ssl_context(),
                origin=deployment.base,  # type: ignore[arg-type]
                additional_headers={"Cookie": f"sessionid={session.cookies['sessionid']}"},
                open_timeout=30,
                ping_interval=None,
            )
            client = Client(ws)
            await client.wait_for(lambda f: f["type"] == "ready", timeout=30)
            return client

        # nginx's least_conn puts the second socket on the process that has none.
        a = await open_socket(browser)
        b = await open_socket(bob_browser)
        await a.request("subscribe", thread_id=thread.pk, last_seq=0, timeout=30)
        await b.request("subscribe", thread_id=thread.pk, last_seq=0, timeout=30)
        ack = await a.request(
            "message.send", thread_id=thread.pk, body="hello through nginx", client_msg_id="n-1", timeout=30
        )
        assert ack["type"] == "ack", ack
        created = await b.wait_for(lambda f: f["type"] == "message.created", timeout=30)
        assert created["data"]["message"]["body"] == "hello through nginx"
        await a.close()
        await b.close()

    asyncio.run(talk())
    # nginx writes a websocket's access line when it closes.
    expected = {f"127.0.0.1:{daphne.port}" for daphne in deployment.daphnes}
    wait_until(lambda: deployment.upstreams_used("/ws/") == expected, "both sockets' access lines")


def test_a_spoofed_x_forwarded_for_never_changes_whose_budget_is_spent(
    deployment: Deployment, make_user: Callable[..., User]
) -> None:
    local_user(make_user, "alice")
    token_url = f"{deployment.base}/api/v1/auth/token"
    client = deployment.session()
    codes = []
    for n in range(PER_ADDRESS + 2):
        spoofed = {"X-Forwarded-For": f"10.{n}.0.1", "X-Real-IP": f"10.{n}.0.2", "Forwarded": f"for=10.{n}.0.3"}
        response = client.post(
            token_url, json={"username": f"guess{n}", "password": "wrong"}, headers=spoofed, timeout=30
        )
        codes.append(response.status_code)
    assert codes == [401] * PER_ADDRESS + [429, 429]
    refused = client.post(
        token_url, json={"username": "alice", "password": PASSWORD}, headers={"X-Forwarded-For": "1.2.3.4"}, timeout=30
    )
    assert refused.status_code == 429  # the right password, from a "new" address, is still refused
    assert int(refused.headers["Retry-After"]) >= 1
    # The sign-in page spends the same budget, spoofed or not.
    _, page = sign_in(deployment, "alice", **{"X-Forwarded-For": "192.0.2.77"})
    assert page.status_code == 429
    assert int(page.headers["Retry-After"]) >= 1


def test_the_procfiles_daphne_alone_trusts_no_forwarding_header(make_user: Callable[..., User]) -> None:
    """Reached directly (no proxy, the default CHATAPP_TRUSTED_PROXY_COUNT=0), a client's own
    X-Forwarded-For is not its address: daphne runs without --proxy-headers."""
    needs("postgres")
    local_user(make_user, "alice")
    daphne = ServerProcess(procfile_daphne(), name="daphne")
    start_all([daphne], daphne_env([daphne], CHATAPP_AUTH_TOKEN_RATE_PER_IP="3/d"))
    try:
        codes = [
            requests.post(
                f"http://127.0.0.1:{daphne.port}/api/v1/auth/token",
                json={"username": "alice", "password": "wrong"},
                headers={"X-Forwarded-For": f"10.0.0.{n}", "Host": "127.0.0.1"},
                timeout=30,
            ).status_code
            for n in range(5)
        ]
    finally:
        daphne.close()
    assert codes == [401, 401, 401, 429, 429]


@pytest.mark.smoke
def test_nginx_waits_longer_than_the_socket_heartbeat_and_idle_timeout() -> None:
    """nginx must not cut a quiet socket before the server's heartbeat and idle timeout do."""
    text = CONF.read_text()
    ws = re.search(r"location /ws/ \{(.*?)\n    \}", text, flags=re.DOTALL)
    assert ws is not None
    seconds = {name: int(value) for name, value in re.findall(r"(proxy_\w+_timeout) (\d+)s;", ws.group(1))}
    assert min(seconds["proxy_read_timeout"], seconds["proxy_send_timeout"]) > max(
        settings.CHAT_HEARTBEAT_SECONDS, settings.CHAT_IDLE_TIMEOUT_SECONDS
    )
    assert text.count("X-Forwarded-For $proxy_add_x_forwarded_for;") == 1
