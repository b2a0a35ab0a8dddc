"""A real SMTP server for the notification tests: aiosmtpd on loopback, recording what it accepts.

It can be down (not listening) and come back on the same port, refuse recipients,
speak TLS or STARTTLS with a throw-away certificate, require a login, and answer each
mail it accepts (the auto-responder of the loop tests).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Callable

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.services import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.raw, policy=policy.default)  # type: ignore[return-value]


class Inbox:
    """The aiosmtpd handler: records accepted mail; refuses the addresses in `refuse` with 550."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.refuse: set[str] = set()
        self.on_mail: Callable[[Received], None] | None = None
        self._lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options) -> str:  # noqa: ANN001
        if address.lower() in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        got = Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content or envelope.content)
        with self._lock:
            self.received.append(got)
        if self.on_mail is not None:
            self.on_mail(got)
        return "250 2.0.0 queued"

    def count(self) -> int:
        with self._lock:
            return len(self.received)


class SmtpServer:
    """aiosmtpd on 127.0.0.1:`port`, which a test may stop and start again."""

    def __init__(self, port: int | None = None, *, tls: ssl.SSLContext | None = None,
                 starttls: ssl.SSLContext | None = None, login: tuple[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.inbox = Inbox()
        self.tls, self.starttls, self.login = tls, starttls, login
        self.controller: Controller | None = None

    def start(self) -> "SmtpServer":
        kwargs: dict = {}
        if self.tls is not None:
            # aiosmtpd counts only STARTTLS as TLS for AUTH; on an implicit-TLS port everything is.
            kwargs.update(ssl_context=self.tls, auth_require_tls=False)
        if self.starttls is not None:
            kwargs.update(tls_context=self.starttls, require_starttls=True)
        if self.login is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True)
        self.controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port, **kwargs)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:  # noqa: ANN001
        ok = (isinstance(auth_data, LoginPassword) and self.login is not None
              and (auth_data.login.decode(), auth_data.password.decode()) == self.login)
        return AuthResult(success=ok, handled=False)


class StallingServer:
    """Accepts connections and never greets: a sender stays inside its SMTP conversation."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        # shutdown first: it wakes the thread blocked in accept(), which close() alone does not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)
        for conn in self._conns:
            conn.close()


def self_signed(workdir: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 (its own CA) and a server context using it."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return cert, context
