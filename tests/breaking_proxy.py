"""A TCP proxy on a free loopback port in front of a real redis-server that, once armed, breaks a
connection after Redis ran a chosen command: it reads Redis's reply to that command and closes the
client's connection instead of relaying it, as a network fault (or a proxy restarting) does to a
write that already ran. Paced (``pace``), it relays replies a slice at a time, as a slow link does."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

Command = list[bytes]  # a command's name and arguments, as the client sent them


class ErrorReply(bytes):
    """An error reply (``-ERR ...``): the command did not run."""


def parse(buffer: bytes, at: int = 0) -> tuple[Any, int] | None:
    """One RESP value (RESP3, which redis-py speaks, or RESP2) at ``at``, and where it ends; ``None``
    while ``buffer`` holds only part of it. Aggregates are lists (a map's keys and values in turn)."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        return None
    kind, head = buffer[at:at + 1], buffer[at + 1:end]
    if kind in b"$=!":  # bulk string, verbatim string, bulk error
        size = int(head)
        if size < 0:
            return None, end + 2
        if len(buffer) < end + 2 + size + 2:
            return None
        data = buffer[end + 2:end + 2 + size]
        return (ErrorReply(data) if kind == b"!" else data), end + 4 + size
    if kind in b"*~>%":  # array, set, push, map
        items, at = [], end + 2
        for _ in range(max(int(head), 0) * (2 if kind == b"%" else 1)):
            found = parse(buffer, at)
            if found is None:
                return None
            item, at = found
            items.append(item)
        return items, at
    return (ErrorReply(head) if kind == b"-" else head), end + 2  # + : _ , # ( : one line


class BreakingProxy:
    """``url``: the proxy's Redis URL (database ``db``). :meth:`arm` with a test of a command: the
    next one that passes it and that Redis answers without an error is run, and its connection
    broken before the reply reaches the client; ``broken``: the commands it broke; ``seen``: every
    command the clients sent through it; ``pace``: ``(size, seconds)`` relays replies ``size`` bytes at
    a time, ``seconds`` apart."""

    def __init__(self, redis_port: int, db: int = 0) -> None:
        self.redis_port = redis_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/{db}"
        self.chosen: Callable[[Command], bool] | None = None
        self.broken: list[Command] = []
        self.seen: list[Command] = []
        self.lock = threading.Lock()
        self.pace: tuple[int, float] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, chosen: Callable[[Command], bool]) -> None:
        self.chosen = chosen

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.redis_port))
            sent: deque[Command] = deque()
            threading.Thread(target=self._requests, args=(client, upstream, sent), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, sent), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, sent: deque[Command]) -> None:
        """Forward what the client sends, noting each command before its last byte reaches Redis."""
        buffer = b""
        try:
            while chunk := client.recv(65536):
                buffer += chunk
                while (found := parse(buffer)) is not None:
                    command, end = found
                    buffer = buffer[end:]
                    sent.append(command)
                    with self.lock:
                        self.seen.append(command)
                upstream.sendall(chunk)
        except OSError:
            pass
        _close(upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, sent: deque[Command]) -> None:
        """Relay each reply, but the reply to the chosen command: then close both connections."""
        buffer = b""
        try:
            while chunk := upstream.recv(65536):
                buffer += chunk
                relay = 0
                while (found := parse(buffer, relay)) is not None:
                    reply, end = found
                    command = sent.popleft()
                    with self.lock:
                        chosen = self.chosen is not None and self.chosen(command) and not isinstance(reply, ErrorReply)
                        if chosen:
                            self.chosen = None
                            self.broken.append(command)
                    if chosen:
                        client.sendall(buffer[:relay])
                        _close(client)
                        _close(upstream)
                        return
                    relay = end
                self._relay(client, buffer[:relay])
                buffer = buffer[relay:]
        except OSError:
            pass
        _close(client)


    def _relay(self, client: socket.socket, data: bytes) -> None:
        pace = self.pace
        if pace is None:
            client.sendall(data)
            return
        size, seconds = pace
        for at in range(0, len(data), size):
            if at:
                time.sleep(seconds)
            client.sendall(data[at:at + size])


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
