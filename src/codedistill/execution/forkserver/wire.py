"""The pipe protocol between the pool and a fork server: length-prefixed JSON messages
(one init message, then jobs -> raw results, in order). Standard library only."""

from __future__ import annotations

import json
import os
import select
import struct
from typing import Any


def read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def recv(fd: int) -> Any:
    (n,) = struct.unpack("<I", read_exact(fd, 4))
    return json.loads(read_exact(fd, n))


def frame(obj: Any) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack("<I", len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def send(fd: int, obj: Any) -> None:
    write_all(fd, frame(obj))


class Input:
    """The server's end of the job pipe, read ahead without blocking.

    The pool keeps more than one job in flight per server; reading ahead lets the
    server see that more work is queued (and prepare the next sandbox early), and
    draining it while a result is written means neither side can block the other.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False
        os.set_blocking(fd, False)

    def pump(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.buf += chunk

    def _complete(self) -> int:
        """Length of the first complete message in the buffer (with its prefix), or 0."""
        if len(self.buf) < 4:
            return 0
        (n,) = struct.unpack_from("<I", self.buf)
        return 4 + n if len(self.buf) >= 4 + n else 0

    def pending(self) -> bool:
        """True when another message has (at least partly) arrived."""
        self.pump()
        return len(self.buf) > 0

    def recv_raw(self) -> bytes:
        while True:
            n = self._complete()
            if n:
                raw = bytes(self.buf[4:n])
                del self.buf[:n]
                return raw
            if self.eof:
                raise EOFError
            select.select([self.fd], [], [])
            self.pump()

    def send(self, out: int, obj: Any) -> None:
        """Write ``obj`` to ``out`` (non-blocking) while reading ahead on our input."""
        view = memoryview(frame(obj))
        while view:
            try:
                n = os.write(out, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            r, _, _ = select.select([] if self.eof else [self.fd], [out], [])
            if r:
                self.pump()
