"""The port a merged engine starts on: a port of MERGED_PORTS that nothing listens on, including one whose last
engine was just stopped (the gateway's connections to it linger in TIME_WAIT, which vLLM's bind ignores)."""

from __future__ import annotations

import socket

from gateway.prompts.merged import free_port_of


def listener(port: int = 0) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM binds
    server.bind(("127.0.0.1", port))
    server.listen()
    return server


def test_a_port_something_listens_on_is_skipped() -> None:
    with listener() as busy, listener() as other:
        port, free = busy.getsockname()[1], other.getsockname()[1]
        other.close()
        assert free_port_of([port], set()) is None
        assert free_port_of([port, free], set()) == free
        assert free_port_of([port, free], {free}) is None


def test_a_port_whose_server_just_stopped_is_free_although_its_connections_linger() -> None:
    server = listener()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first (a stopped engine): its end lingers in FIN_WAIT/TIME_WAIT
    server.close()
    try:
        with socket.socket() as plain:  # what the probe did before: refused for about a minute
            try:
                plain.bind(("127.0.0.1", port))
                lingering = False
            except OSError:
                lingering = True
        assert lingering, "the closed connection should hold the port against a plain bind"
        assert free_port_of([port], set()) == port
        listener(port).close()  # and vLLM can indeed start there
    finally:
        client.close()
