"""One HTTP generation request on the event-loop side: its engine
sub-requests, their events, cancellation, and the SSE framing."""
from __future__ import annotations

import asyncio
import collections
import json
import logging

from .engine_loop import EngineLoop, Sink
from .errors import APIError, EngineLoopError, api_error

log = logging.getLogger("bitdlm.server")


class ClientGone(Exception):
    pass


class Job:
    """One HTTP generation request: one engine request per prompt, their
    events merged on one asyncio.Queue, cancelled together."""

    def __init__(self, engine_loop: EngineLoop, rid: str, n: int):
        self.engine_loop = engine_loop
        self.rid = rid
        self.sub_ids = [rid if n == 1 else f"{rid}-{i}" for i in range(n)]
        self.modes: list = [None] * n  # per prompt its decoding mode, from the engine's ack
        self.queue: asyncio.Queue = asyncio.Queue()
        self.aloop = asyncio.get_running_loop()
        self.open: set[int] = set()   # submitted and not finished
        self.watcher = None
        self.closed = False
        self.gone = False  # the client disconnected
        self._early: collections.deque = collections.deque()

    def submit(self, prompts, params):
        try:
            for i, ids in enumerate(prompts):
                self.engine_loop.submit(self.sub_ids[i], ids, params,
                                        Sink(self.aloop, self.queue, i))
                self.open.add(i)
        except EngineLoopError as e:
            self.close()
            raise api_error(e) from None

    def watch(self, request):
        """Abort when the client disconnects (the body has been read, so the
        next ASGI message is the disconnect)."""
        async def _watch():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    break
            if self.open:
                log.info("client of %s went away: aborting", self.rid)
            self.gone = True
            self.close(from_watcher=True)
            self.queue.put_nowait((None, "gone", None))

        self.watcher = asyncio.ensure_future(_watch())

    def _raise_failure(self, idx, kind, payload):
        """A queue item that ends the job: the client went away or the engine failed."""
        if kind == "gone":
            raise ClientGone()
        if kind == "error":
            self.open.discard(idx)
            raise api_error(payload)

    async def events(self):
        """Yield (index, RequestOutput) until every sub-request has finished;
        raises APIError on an engine error and ClientGone on a disconnect."""
        while True:
            if self.gone:
                raise ClientGone()
            if not self.open:
                return
            if self._early:
                idx, kind, payload = self._early.popleft()
            else:
                idx, kind, payload = await self.queue.get()
            self._raise_failure(idx, kind, payload)
            if kind == "ack":
                continue
            if payload.finished:
                self.open.discard(idx)
                if payload.finish_reason == "abort":
                    raise APIError(503, "The request was aborted by the server.", code="aborted")
            yield idx, payload

    async def wait_admitted(self):
        """Wait until every sub-request was accepted by the engine (so that a
        ValueError of add_request is still a 400 before any stream starts);
        outputs arriving meanwhile are kept for `events`, in order."""
        acked: set[int] = set()
        while len(acked) < len(self.sub_ids):
            item = await self.queue.get()
            idx, kind, payload = item
            self._raise_failure(idx, kind, payload)
            if kind == "ack":
                acked.add(idx)
                self.modes[idx] = payload
            else:
                self._early.append(item)

    def close(self, from_watcher=False):
        if not from_watcher and self.watcher is not None:
            self.watcher.cancel()
        if self.closed:
            return
        self.closed = True
        for i in sorted(self.open):
            self.engine_loop.abort(self.sub_ids[i])
        self.open.clear()


DECODE_MODE_HEADER = "x-bitdlm-decode-mode"


def mode_headers(job: Job) -> dict:
    """The decoding mode of each prompt ("ar" | "diffusion", comma-separated in prompt
    order) as a response header, once every prompt was admitted; clients may ignore it."""
    if any(m is None for m in job.modes):
        return {}
    return {DECODE_MODE_HEADER: ",".join(job.modes)}


def sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
