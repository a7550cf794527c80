"""The access log writes its lines in batches (addons/accesslog.py): nothing is lost, the order
is kept, a batch leaves within FLUSH_DELAY on the proxy's loop, and shutdown (``done``) writes
what is pending. Counted writes, no timing assertion."""

from __future__ import annotations

import asyncio
import io
import json

from stagedoor_addons import accesslog
from stagedoor_addons.accesslog import AccessLog

from .test_live_units import Files, handled_flow


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _ids(stream: io.StringIO) -> list[str]:
    return [json.loads(line)["request_id"] for line in stream.getvalue().splitlines()]


def test_lines_are_batched_on_the_loop_and_written_in_order(tmp_path):
    runtime = Files(tmp_path).runtime()
    out = CountingStream()
    log = AccessLog(runtime, out)

    async def main() -> tuple[int, int]:
        for i in range(5):
            log.response(handled_flow(runtime.state, request_id=f"r{i}"))
        before = out.writes  # all five pending, one timer armed
        await asyncio.sleep(accesslog.FLUSH_DELAY * 4)  # the timer fires
        return before, out.writes

    before, after = asyncio.run(main())
    assert before == 0 and after == 1
    assert _ids(out) == [f"r{i}" for i in range(5)]


def test_a_full_batch_is_written_at_once_and_done_writes_the_rest(tmp_path):
    runtime = Files(tmp_path).runtime()
    out = CountingStream()
    log = AccessLog(runtime, out)

    async def main() -> int:
        for i in range(accesslog.MAX_BATCH + 3):
            log.response(handled_flow(runtime.state, request_id=f"r{i}"))
        written = out.writes
        log.done()  # mitmproxy's shutdown hook
        return written

    assert asyncio.run(main()) == 1
    assert out.writes == 2
    assert _ids(out) == [f"r{i}" for i in range(accesslog.MAX_BATCH + 3)]
