"""Response builders: the OpenAI JSON of a finished completion, the SSE chunks
of a streamed one, the streaming response (errors mid-stream become an error
event), and the JSON response of an APIError."""
from __future__ import annotations

import logging
import time

from starlette.responses import JSONResponse, StreamingResponse

from .errors import APIError
from .jobs import SSE_DONE, ClientGone, mode_headers, sse

log = logging.getLogger("bitdlm.server")


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def completion_body(rid: str, chat: bool, model: str, fingerprint: str, texts, reasons, use) -> dict:
    """A finished (non-streamed) completion or chat completion."""
    n = len(texts)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i], "refusal": None},
                    "logprobs": None, "finish_reason": reasons[i]} for i in range(n)]
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                   for i in range(n)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices, "usage": use}


class Chunks:
    """The SSE chunks of one streamed completion (chat: deltas; text: text pieces)."""

    def __init__(self, rid: str, chat: bool, model: str, fingerprint: str, include_usage: bool):
        self.chat, self.include_usage = chat, include_usage
        self.head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "system_fingerprint": fingerprint}

    def chunk(self, choices, use=None) -> str:
        c = {**self.head, "choices": choices}
        if self.include_usage:
            c["usage"] = use
        return sse(c)

    def choice(self, i, text, finish, first=False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}


def stream_response(job, gen) -> StreamingResponse:
    """Stream `gen`'s SSE lines; the job is closed (its engine requests aborted) when it ends."""
    async def body():
        try:
            async for chunk in gen:
                yield chunk
        except ClientGone:
            return
        except APIError as e:  # mid-stream: OpenAI clients raise on an error event
            yield sse(e.body())
            yield SSE_DONE
        except Exception as e:  # a bug of ours: end this stream alone, cleanly
            log.exception("stream of %s failed", job.rid)
            yield sse(APIError(500, f"Internal server error: {type(e).__name__}").body())
            yield SSE_DONE
        finally:
            job.close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      **mode_headers(job)})


def json_response(job, body: dict) -> JSONResponse:
    """A finished job's JSON answer, with its decoding modes as a header."""
    return JSONResponse(body, headers=mode_headers(job))
