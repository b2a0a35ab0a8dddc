"""A real Dovecot IMAP/POP3 server for the source tests: own configuration, free loopback ports.

Each test gets a server of its own in a temporary directory: a self-signed certificate made
with `openssl`, a passwd-file of static test users, Maildir storage, and (for XOAUTH2) the
oauth2 passdb asking a token-introspection endpoint that the test serves on loopback. The
server can be stopped and started again on the same ports, with its mail kept.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from imapclient import IMAPClient

from tests.services import accepts, free_port, wait_until

INSTALL_HINT = ("Dovecot is needed by the IMAP/POP3 tests and is not installed: run "
                "`apt-get update && apt-get install -y dovecot-imapd dovecot-pop3d` (scripts/test does)")


def dovecot_binary() -> str:
    """The dovecot executable; fails the test (never skips it) when Dovecot is missing."""
    path = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
    if path is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return path


class TokenServer:
    """An OAuth2 token-introspection endpoint (RFC 7662) for Dovecot's oauth2 passdb.

    `tokens` maps an access token to its user; any other token is answered `active: false`,
    as an identity provider answers an expired or revoked one.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        tokens = self.tokens

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                token = (form.get("token") or [""])[0]
                user = tokens.get(token)
                body = json.dumps({"active": True, "username": user} if user else {"active": False}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Dovecot:
    """One Dovecot instance: IMAP (plain port with STARTTLS, and implicit TLS) and POP3 (both too)."""

    def __init__(self, users: dict[str, str], token_url: str | None = None) -> None:
        self.binary = dovecot_binary()
        # Short path: Dovecot's unix sockets live under base_dir (108 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix="mlt-dc-", dir="/tmp"))
        self.dir.chmod(0o755)  # the auth process runs as `dovecot` and reads the users file here
        self.users = users
        self.token_url = token_url
        self.imap_port, self.imaps_port = free_port(), free_port()
        self.pop3_port, self.pop3s_port = free_port(), free_port()
        self.cert = self.dir / "cert.pem"
        self.proc: subprocess.Popen[bytes] | None = None
        self._configure()

    # -- configuration --------------------------------------------------------------------
    def _configure(self) -> None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(self.dir / "key.pem"), "-out", str(self.cert)],
                       check=True, capture_output=True, timeout=60)
        mail_user = pwd.getpwnam("dovecot")
        mail = self.dir / "mail"
        mail.mkdir()
        os.chown(mail, mail_user.pw_uid, mail_user.pw_gid)
        (self.dir / "run").mkdir()
        (self.dir / "users").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()))
        oauth = ""
        if self.token_url:
            (self.dir / "oauth2.conf").write_text(
                f"introspection_url = {self.token_url}\nintrospection_mode = post\n"
                "username_attribute = username\nactive_attribute = active\nactive_value = true\n")
            oauth = f"""
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {self.dir}/oauth2.conf
}}"""
        (self.dir / "dovecot.conf").write_text(f"""
base_dir = {self.dir}/run
state_dir = {self.dir}/state
log_path = {self.dir}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
first_valid_uid = {mail_user.pw_uid}
mail_location = maildir:{mail}/%u
mail_plugins =
auth_mechanisms = plain login xoauth2 oauthbearer
disable_plaintext_auth = no
# Bad-credential tests must not wait for Dovecot's growing penalty for failed logins.
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
ssl = yes
ssl_cert = <{self.cert}
ssl_key = <{self.dir}/key.pem
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.dir}/users
}}{oauth}
userdb {{
  driver = static
  args = uid={mail_user.pw_uid} gid={mail_user.pw_gid} home={mail}/%u
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
""")

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> Dovecot:
        # A session of its own: `crash()` takes the master and every imap/pop3 process at once.
        self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.dir / "dovecot.conf")],
                                     stdout=subprocess.DEVNULL, stderr=(self.dir / "stderr.log").open("ab"),
                                     start_new_session=True)
        try:
            wait_until(lambda: accepts(self.imaps_port) and accepts(self.pop3s_port), 20,
                       "Dovecot did not start")
        except AssertionError:
            raise AssertionError(f"Dovecot did not start:\n{self.log()}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        wait_until(lambda: not accepts(self.imaps_port), 10, "Dovecot did not stop")

    def crash(self) -> None:
        """SIGKILL to the whole server: every open connection is cut mid-command."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        wait_until(lambda: not accepts(self.imaps_port), 10, "Dovecot did not die")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        text = ""
        for name in ("dovecot.log", "stderr.log"):
            path = self.dir / name
            if path.exists():
                text += path.read_text(errors="replace")
        return text[-6000:]

    # -- the test's own mail client ---------------------------------------------------------
    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, user: str) -> IMAPClient:
        client = IMAPClient("127.0.0.1", port=self.imaps_port, ssl=True, ssl_context=self.ssl_context(),
                            timeout=30)
        client.login(user, self.users[user])
        return client

    def append(self, user: str, mails: list[bytes], folder: str = "INBOX") -> None:
        with self.client(user) as client:
            for raw in mails:
                client.append(folder, raw)

    def count(self, user: str, folder: str) -> int:
        with self.client(user) as client:
            if not client.folder_exists(folder):
                return 0
            return int(client.folder_status(folder, ["MESSAGES"])[b"MESSAGES"])

    def message_ids(self, user: str, folder: str) -> list[str]:
        with self.client(user) as client:
            if not client.folder_exists(folder):
                return []
            client.select_folder(folder, readonly=True)
            data = client.fetch(client.search("ALL"), ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
        return sorted(v[b"BODY[HEADER.FIELDS (MESSAGE-ID)]"].decode().split(":", 1)[1].strip()
                      for v in data.values())



def wait_for(predicate, timeout: float, message: str) -> None:
    wait_until(predicate, timeout, message, every=0.2)


def sleep(seconds: float) -> None:
    time.sleep(seconds)
