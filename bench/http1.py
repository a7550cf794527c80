"""HTTP/1.1 message framing shared by the bundled load generator and upstream."""

from __future__ import annotations


def split_message(buffer: bytes) -> tuple[bytes, bytes] | None:
    """``(head, rest)`` once ``buffer`` holds one whole message (head + Content-Length body),
    else None. ``head`` excludes the blank line; ``rest`` is what follows the body."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    if len(buffer) < end + 4 + length:
        return None
    return head, buffer[end + 4 + length:]
