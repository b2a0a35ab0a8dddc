"""The suite's own service helpers: what the private servers are started with."""

from __future__ import annotations

import socket

from tests.services import free_port


def test_ports_handed_out_in_one_run_are_all_different_and_free() -> None:
    # A Dovecot takes four ports at once and refuses a configuration naming one twice
    # ("duplicate listener"); bind-to-0-and-close handed out a repeat in about 1 of 15
    # picks here. 500 picks would hold several repeats that way.
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", ports[-1]))  # and the port really is free
