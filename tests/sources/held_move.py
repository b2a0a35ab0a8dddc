"""A loopback relay in front of Dovecot's plain IMAP port that holds back MOVE commands.

A fetch journals a batch in one commit and moves it right after; a test that must kill the
worker between the two cannot win that race by polling. This relay passes every byte through
unchanged, except that a client's `MOVE`/`UID MOVE` command waits at the relay — the network
stalling at the worst moment. `holding` is set once a MOVE waits. `drop_held()` then cuts the
waiting connections without sending their MOVE (the connection of a killed worker dies with
it: the server must never see the command) and lets later MOVEs through.
"""

from __future__ import annotations

import re
import socket
import threading

_MOVE = re.compile(rb"^\S+ (?:UID )?MOVE ", re.IGNORECASE)


class HeldMove:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.holding = threading.Event()
        self._released = threading.Event()
        self._held: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_held(self) -> None:
        """Cut the connections whose MOVE waits, unsent; MOVEs after this pass through."""
        for pair in self._held:
            for s in pair:
                _close(s)
        self._released.set()

    def close(self) -> None:
        self.drop_held()
        _close(self._listener)

    def __enter__(self) -> HeldMove:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                server.settimeout(None)
            except OSError:
                _close(client)  # the client sees the connection refused, as without the relay
                continue
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
            _close(source)
            _close(sink)

    def _commands(self, client: socket.socket, server: socket.socket) -> None:
        """The client's side line by line (every IMAP command ends with CRLF), a MOVE held back."""
        try:
            with client.makefile("rb") as reader:
                while line := reader.readline():
                    if _MOVE.match(line) and not self._released.is_set():
                        self._held.append((client, server))
                        self.holding.set()
                        self._released.wait()
                        if server.fileno() == -1:
                            return  # dropped: the command is never sent
                    server.sendall(line)
        except (OSError, ValueError):
            pass  # a socket closed under the reader
        finally:
            _close(client)
            _close(server)


def _close(s: socket.socket) -> None:
    """Shut down, then close: a close alone from another thread would not wake a thread blocked
    in recv() or accept() on it, and the server would keep the session."""
    for end in (lambda: s.shutdown(socket.SHUT_RDWR), s.close):
        try:
            end()
        except OSError:
            pass
