"""Worker <-> server connections over TCP sockets: a transport that admits new members.

A gloo process group is fixed when the job starts; a socket listener is not. Each server
listens on its node's address (the one on its route to the master; loopback on one
machine), and every worker, a torchrun rank or one that joins later
(``distml ps-worker``), connects to each server and introduces itself with a HELLO:
its id, or -1 to be given a fresh one by server 0 (ids are never reused). The messages are
those of ``protocol``; a payload's size is known to both sides, so it is written from and
read into the tensor's own memory (no copy, no framing). A peer that dies closes its
sockets (the kernel does it for a killed process): the blocked ``recv`` of the other side
sees the end of the stream at once and raises ``PeerLostError``, a ``RuntimeError`` as
gloo's was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from distml.distributed.network import is_loopback, resolve, route_to
from distml.distributed.param_server.protocol import Channel, Kind, Msg

logger = logging.getLogger(__name__)


class PeerLostError(RuntimeError):
    """The connection to a peer ended (it died, or closed it)."""


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's own memory as bytes (CPU, contiguous)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class Conn:
    """One connection; ``send`` is atomic per message (a lock), ``recv`` has one reader."""

    def __init__(self, sock: socket.socket, peer: int) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.peer = sock, peer
        self.lock = threading.Lock()

    def send(self, msg: Msg, payload: torch.Tensor | None = None) -> None:
        try:
            with self.lock:
                self.sock.sendall(_bytes(msg.tensor()))
                if payload is not None:
                    self.sock.sendall(_bytes(payload.detach().cpu().contiguous()))
        except OSError as e:
            raise PeerLostError(f"peer {self.peer}: {e}") from None

    def recv(self) -> Msg:
        return Msg.of(self.recv_into(torch.empty(8, dtype=torch.float64)))

    def recv_into(self, out: torch.Tensor) -> torch.Tensor:
        view, got = _bytes(out), 0
        try:
            while got < len(view):
                n = self.sock.recv_into(view[got:])
                if n == 0:
                    raise PeerLostError(f"peer {self.peer} closed the connection")
                got += n
        except OSError as e:
            raise PeerLostError(f"peer {self.peer}: {e}") from None
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class SocketChannel(Channel):
    """``Channel``'s interface over ``Conn``s by peer id; a peer with no connection goes
    over the process group (server <-> server traffic, and ``distml verify``'s lock step)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group)
        self.conns: dict[int, Conn] = {}

    def send(self, peer: int, msg: Msg, payload: torch.Tensor | None = None) -> None:
        conn = self.conns.get(peer)
        if conn is None:
            return super().send(peer, msg, payload)
        conn.send(msg, payload)

    def recv(self, peer: int) -> Msg:
        conn = self.conns.get(peer)
        return super().recv(peer) if conn is None else conn.recv()

    def recv_into(self, peer: int, out: torch.Tensor) -> torch.Tensor:
        conn = self.conns.get(peer)
        return super().recv_into(peer, out) if conn is None else conn.recv_into(out)

    def request_all(self, peers: list[int], msgs: list[Msg],
                    payloads: list[torch.Tensor | None]) -> None:
        if not any(p in self.conns for p in peers):
            return super().request_all(peers, msgs, payloads)
        # Written one after another: each server reads its request as it comes (the kernel
        # buffers it), so the transfers still overlap with the servers' work.
        for peer, msg, payload in zip(peers, msgs, payloads, strict=True):
            self.send(peer, msg, payload)
        return None

    def close(self) -> None:
        for conn in list(self.conns.values()):
            conn.close()
        self.conns.clear()


def own_address() -> str:
    """This node's address as the other nodes reach it: on the route to the master, or
    loopback when the job has no master (one process) or it is here."""
    master = os.environ.get("MASTER_ADDR")
    if not master or is_loopback(resolve(master)):
        return "127.0.0.1"
    return route_to(master, int(os.environ.get("MASTER_PORT", "29500"))).own_addr


class Listener:
    """A server's listening socket and its accept thread: each worker's HELLO is answered
    by ``admit(wanted id) -> (id, reply)``; an admitted connection is added to ``channel``
    and handed to ``serve(id)`` (the server's thread for that client)."""

    def __init__(self, channel: SocketChannel, *, admit: Callable[[Msg], tuple[int, Msg]],
                 serve: Callable[[int], None], host: str | None = None) -> None:
        self.channel, self.admit, self.serve = channel, admit, serve
        host = host or own_address()
        self.sock = socket.create_server(
            (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        addr, port = self.sock.getsockname()[:2]
        self.address = f"{addr}:{port}"
        self._closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True, name="ps-accept")

    def start(self) -> Listener:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.sock.accept()
            except OSError:  # closed
                return
            conn = Conn(sock, -1)
            try:
                sock.settimeout(10.0)  # a HELLO comes at once, or the peer is not a worker
                hello = conn.recv()
                sock.settimeout(None)
                wid, reply = self.admit(hello)
                conn.peer = wid
                if reply.kind == Kind.OK:
                    self.channel.conns[wid] = conn
                conn.send(reply)
            except PeerLostError as e:
                logger.warning("a worker's connection ended before it was admitted: %s", e)
                conn.close()
                continue
            if reply.kind == Kind.OK:
                self.serve(wid)
            else:
                conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def connect(channel: SocketChannel, addresses: list[str], *, wid: int) -> Msg:
    """Connect to every server (server 0 first, in order), introduce this worker as ``wid``
    (-1: a new one: server 0 gives the id). Server 0's reply (its ``item``: the id; STOP if
    the job takes no one any more), or the first refusal."""
    for s, addr in enumerate(addresses):
        host, _, port = addr.rpartition(":")
        try:
            sock = socket.create_connection((host, int(port)), timeout=60)
        except OSError as e:
            raise PeerLostError(f"server {s} at {addr}: {e}") from None
        sock.settimeout(None)
        conn = Conn(sock, s)
        conn.send(Msg(Kind.HELLO, item=wid))
        reply = conn.recv()
        if reply.kind != Kind.OK:
            conn.close()
            return reply
        channel.conns[s] = conn
        if s == 0:
            first, wid = reply, reply.item
    return first
