"""The HTTP connection layer under the app: uvicorn's h11 protocol with the
read timeouts uvicorn lacks (it has none before a request's head is in, so
connections that trickle header bytes -- slowloris -- were held forever and
1,100 of them starved /health), and the open-files limit raised as nginx's
worker_rlimit_nofile does. docs/server.md "Limits"."""
from __future__ import annotations

import logging

log = logging.getLogger("bitdlm.server")

# nginx's client_header_timeout / client_body_timeout are 60 s; a model server
# behind no proxy gets less: a real client sends its head in one packet.
HEADER_TIMEOUT_S = 10.0


def protocol_class(header_timeout: float = HEADER_TIMEOUT_S):
    """uvicorn's H11Protocol where a connection is closed when the request head
    (request line + headers) has not fully arrived `header_timeout` seconds
    after the connection opened (or the previous response ended), or when a
    request body stalls that long between two reads. Streaming a response is
    never timed out."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _read_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def _arm(self):
            self._disarm()
            self._read_timer = self.loop.call_later(header_timeout, self._expired)

        def _disarm(self):
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _expired(self):
            self._read_timer = None
            if self.transport is not None and not self.transport.is_closing():
                log.debug("closing %s: request not received within %gs", self.client,
                          header_timeout)
                self.transport.close()  # the app, if it was reading a body, sees a disconnect

        def data_received(self, data):
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY:
                self._arm()  # the body's clock restarts at every read
            elif state is not h11.IDLE:
                self._disarm()  # whole request in (DONE), or the connection is ending

        def on_response_complete(self):
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:
                self._arm()  # keep-alive: the next head has the same deadline

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (every connection is a file)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as e:  # not permitted / not Unix
        log.debug("cannot raise the open-files limit: %s", e)
