"""A loopback relay in front of Dovecot's plain IMAP port that holds back MOVE commands.

A fetch journals a batch in one commit and moves it right after; a test that must kill the
worker between the two cannot win that race by polling. This relay passes every byte through
unchanged, except that a client's `MOVE`/`UID MOVE` command waits at the relay until the
test calls `release()` — the network stalling at the worst moment. `holding` is set once a
MOVE is waiting.
"""

from __future__ import annotations

import re
import socket
import threading

from tests.services import free_port

_MOVE = re.compile(rb"^\S+ (?:UID )?MOVE ", re.IGNORECASE)


class HeldMove:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.holding = threading.Event()
        self.released = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()
            threading.Thread(target=self._commands, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def _commands(self, client: socket.socket, server: socket.socket) -> None:
        """The client's side line by line (every IMAP command ends with CRLF), a MOVE held back."""
        reader = client.makefile("rb")
        try:
            while line := reader.readline():
                if _MOVE.match(line) and not self.released.is_set():
                    self.holding.set()
                    self.released.wait()
                server.sendall(line)
        except OSError:
            pass
        finally:
            for s in (client, server):
                s.close()
