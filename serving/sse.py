"""Server-sent events: `data: {json}` lines, ending with `data: [DONE]`."""

from __future__ import annotations

import json

from aiohttp import web


class SSEWriter:
    def __init__(self):
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

    async def start(self, request: web.Request) -> None:
        await self.response.prepare(request)

    async def send(self, payload: dict) -> None:
        await self.response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
