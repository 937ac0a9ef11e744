"""The engine thread: the only thread that touches the `Engine`.

HTTP handlers talk to it through a locked command queue (`submit`, `abort`);
it drains the queue between two steps, calls `engine.step()` once for every
active request and hands the outputs back to asyncio with one
`loop.call_soon_threadsafe` per step. Nothing here runs on the event loop, and
nothing here speaks HTTP: refusals and failures are errors.py's domain errors
(QueueFull, ShuttingDown, ...), which the app maps to status codes.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

from .errors import (EngineFailure, EngineStopped, QueueFull, RequestRejected,
                     ShuttingDown)

log = logging.getLogger("bitdlm.server")
REPRICE_IDLE_S = 1.0  # an idle engine thread with an adaptive policy looks for a stale price this often


class Sink:
    """Where the engine thread delivers the events of one (sub-)request:
    `(index, kind, payload)` onto an asyncio.Queue, kind in ack/out/error."""

    __slots__ = ("aloop", "queue", "index")

    def __init__(self, aloop, queue, index):
        self.aloop, self.queue, self.index = aloop, queue, index

    def put(self, kind, payload=None):
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # event loop closed (shutdown): nobody is listening
            pass


def _put_all(items):
    for queue, item in items:
        queue.put_nowait(item)


class _Batch:
    """The events of one engine step, handed over with one
    call_soon_threadsafe per event loop (one wake-up per step, not per request)."""

    def __init__(self):
        self.by_loop: dict = {}

    def put(self, sink, kind, payload=None):
        self.by_loop.setdefault(sink.aloop, []).append((sink.queue, (sink.index, kind, payload)))

    def flush(self):
        for aloop, items in self.by_loop.items():
            try:
                aloop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # event loop closed (shutdown)
                pass
        self.by_loop = {}


class _Active:
    __slots__ = ("sink", "t_submit", "t_first", "n_prompt")

    def __init__(self, sink, t_submit, n_prompt):
        self.sink, self.t_submit, self.t_first, self.n_prompt = sink, t_submit, None, n_prompt


class EngineLoop:
    """The engine thread. Only this thread touches the Engine; other threads
    talk to it through `submit` / `abort` (a locked deque + condition).

    Life cycle: start() -> serving -> drain() (new submits get 503, in-flight
    requests go on) -> stop() (what is left gets 503, the thread ends)."""

    def __init__(self, engine, *, max_batch: int, max_queue: int, metrics=None):
        self.engine = engine
        self.model = getattr(engine, "model", None)
        self.max_batch = max_batch
        self.capacity = max_batch + max_queue
        self.metrics = metrics
        self._cv = threading.Condition()
        self._cmds: collections.deque = collections.deque()
        self._inflight = 0            # submitted and not finished (under _cv)
        self._active: dict[str, _Active] = {}  # engine thread only
        self._draining = False
        self._stopping = False
        self.dead: BaseException | None = None
        self.running = 0              # requests in the engine's batch (engine thread writes)
        self.kv_bytes = 0             # KV cache in use, read after each step (engine thread writes)
        self.step_faults = 0          # steps that raised (engine thread writes)
        self._last_forwards = 0
        self.ready = threading.Event()  # set once the thread is serving (after calibration)
        self._reprice = getattr(engine, "policy", None) is not None  # (the adaptive policy's idle re-timing)
        self._thread = threading.Thread(target=self._run, name="bitdlm-engine", daemon=True)

    # -- called from the event loop / other threads
    def start(self):
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the thread serves (the adaptive policy's calibration ran) or has ended."""
        return self.ready.wait(timeout)

    def alive(self) -> bool:
        return self._thread.is_alive() and self.dead is None and not self._stopping

    @property
    def draining(self) -> bool:
        return self._draining or self._stopping

    @property
    def inflight(self) -> int:
        with self._cv:
            return self._inflight

    @property
    def queued(self) -> int:
        with self._cv:
            return max(0, self._inflight - self.running)

    def submit(self, rid: str, prompt_ids: list[int], params, sink: Sink) -> None:
        with self._cv:
            if self._draining or self._stopping:
                raise ShuttingDown()
            if self.dead is not None or not self._thread.is_alive():
                raise EngineStopped()
            if self._inflight >= self.capacity:
                raise QueueFull(self.capacity)
            self._inflight += 1
            self._cmds.append(("add", rid, prompt_ids, params, sink))
            self._cv.notify()

    def abort(self, rid: str) -> None:
        with self._cv:
            self._cmds.append(("abort", rid))
            self._cv.notify()

    def drain(self) -> None:
        """Refuse new requests (503); the in-flight ones go on."""
        with self._cv:
            self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; requests still in flight get the shutdown 503."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the thread
    def _release(self):
        with self._cv:
            self._inflight -= 1

    def _prepare(self):
        """Before serving, on this thread (where forwards run): the adaptive policy's cost
        calibration (engine.calibrate). A failure leaves the policy to calibrate at the first
        request that needs it."""
        calibrate = getattr(self.engine, "calibrate", None)
        if calibrate is not None:
            try:
                calibrate()
            except Exception:
                log.exception("decode policy calibration failed")
        pol = getattr(self.engine, "policy", None)
        if pol is not None and pol.calibrated:
            log.info("decode policy adaptive: forwards timed in %.2f s; seconds by requests in a "
                     "forward: AR %s, diffusion %s", pol.calibration_seconds, pol.cost_ar.points(),
                     pol.cost_diffusion.points())
        self.ready.set()

    def _run(self):
        try:
            self._prepare()
            while True:
                with self._cv:
                    while not self._cmds and not self._active and not self._stopping:
                        if not self._cv.wait(REPRICE_IDLE_S if self._reprice else None):
                            break  # idle a while: re-time a stale decode mode (below)
                    if self._stopping:
                        break
                    cmds = list(self._cmds)
                    self._cmds.clear()
                if not cmds and not self._active:
                    self._reprice_idle()
                    continue
                try:
                    self._iteration(cmds)
                except Exception:
                    # Not one request's fault (those are handled where they
                    # happen): fail what is active, whose state is unknown, and
                    # keep serving.
                    log.exception("engine loop iteration failed; failing %d request(s)",
                                  len(self._active))
                    self._fail_active(EngineFailure("Internal engine error."))
        except BaseException as e:  # cannot go on (e.g. MemoryError in the loop itself)
            log.exception("engine thread died")
            self.dead = e
        finally:
            self.ready.set()
            self._shutdown()

    def _reprice_idle(self):
        """The adaptive policy's idle re-timing (Engine.reprice_idle); a request that arrives
        meanwhile waits for it (a few forwards of one request)."""
        try:
            self.engine.reprice_idle()
        except Exception:
            log.exception("decode policy re-timing failed; it is not tried again")
            self._reprice = False

    def _iteration(self, cmds):
        aborted = False
        arriving = sum(1 for cmd in cmds if cmd[0] == "add")  # this batch's arrivals, for the policy
        for cmd in cmds:
            if cmd[0] == "add":
                arriving -= 1
                self._add(*cmd[1:], arriving=arriving)
            else:
                aborted |= self._abort(cmd[1])
        # a step also collects the engine's abort outputs, so an idle engine is left clean
        if self._active or aborted:
            self._step()
        self._after_step()

    def _after_step(self):
        n = len(self._active)
        try:
            n = min(n, int(self.engine.num_running()))
        except Exception:
            n = min(n, self.max_batch)
        self.running = n
        if self.model is not None and hasattr(self.model, "kv_bytes_used"):
            try:  # no forward runs now (this thread runs them): the read never waits
                self.kv_bytes = int(self.model.kv_bytes_used())
            except Exception:
                log.exception("kv_bytes_used failed")

    def _add(self, rid, prompt_ids, params, sink, arriving=0):
        try:
            mode = self.engine.add_request(rid, prompt_ids, params, arriving=arriving)
        except ValueError as e:
            self._release()
            sink.put("error", RequestRejected(str(e)))
            self._count_finish("rejected")
            return
        except Exception as e:
            log.exception("add_request(%s) failed", rid)
            self._release()
            sink.put("error", EngineFailure(f"engine error: {e}"))
            self._count_finish("error")
            return
        self._active[rid] = _Active(sink, time.monotonic(), len(prompt_ids))
        mode = mode if isinstance(mode, str) else None  # "ar" | "diffusion": the response header
        if mode is not None and self.metrics is not None:
            self.metrics.decode_modes.labels(mode=mode).inc()
        sink.put("ack", mode)

    def _abort(self, rid):
        a = self._active.pop(rid, None)
        if a is None:  # already finished (or never admitted)
            return False
        try:
            self.engine.abort(rid)
        except Exception:
            log.exception("abort(%s) failed", rid)
        self._release()
        self._count_finish("abort")
        return True

    def _fail_active(self, err: Exception, reason="error"):
        for rid in list(self._active):
            a = self._active.pop(rid)
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            self._release()
            a.sink.put("error", err)
            self._count_finish(reason)

    def _step(self):
        t0 = time.perf_counter()
        try:
            outs = self.engine.step()
        except Exception as e:
            # The engine isolates one request's errors itself (an output with
            # `error`); an exception from step() is not attributable: fail the
            # requests of this step (their state is unknown), keep serving.
            self.step_faults += 1
            log.exception("engine step failed; failing %d request(s)", len(self._active))
            self._fail_active(EngineFailure(f"engine error: {type(e).__name__}: {e}"))
            return
        now = time.monotonic()
        m = self.metrics
        if m is not None:
            m.step_latency.observe(time.perf_counter() - t0)
            m.steps.inc()
            fw = getattr(getattr(self.engine, "stats", None), "forwards", None)
            if fw is not None:
                m.forwards.inc(max(0, fw - self._last_forwards))
                self._last_forwards = fw
        batch = _Batch()
        try:
            for out in outs:
                try:
                    self._deliver(batch, out, now)
                except Exception:  # one malformed output: that request alone fails
                    rid = getattr(out, "request_id", None)
                    log.exception("delivering the output of %s failed", rid)
                    a = self._active.pop(rid, None) if isinstance(rid, str) else None
                    if a is not None:
                        try:
                            self.engine.abort(rid)
                        except Exception:
                            pass
                        self._release()
                        batch.put(a.sink, "error", EngineFailure("Internal engine error."))
        finally:
            batch.flush()

    def _deliver(self, batch, out, now):
        a = self._active.get(out.request_id)
        if a is None:
            return
        m = self.metrics
        if out.new_token_ids and a.t_first is None:
            a.t_first = now
            if m is not None:
                m.ttft.observe(now - a.t_submit)
        if m is not None and out.new_token_ids:
            m.generation_tokens.inc(len(out.new_token_ids))
        err = getattr(out, "error", None)
        if err:  # the engine dropped this request alone (e.g. out of KV cache memory)
            batch.put(a.sink, "error", EngineFailure(f"engine error: {err}"))
        else:
            batch.put(a.sink, "out", out)
        if out.finished or err:
            del self._active[out.request_id]
            self._release()
            if err:
                self._count_finish("error")
            else:
                self._count_finish(out.finish_reason or "stop", out, a, now)

    def _count_finish(self, reason, out=None, a=None, now=None):
        m = self.metrics
        if m is None:
            return
        try:  # metrics never fail a request
            m.finished.labels(reason=reason).inc()
            if out is not None:
                m.finished_request(out, now - a.t_submit)
        except Exception:
            log.exception("metrics of a finished request failed")

    def _shutdown(self):
        with self._cv:
            self._stopping = True
            cmds = list(self._cmds)
            self._cmds.clear()
        err = ShuttingDown()
        for cmd in cmds:
            if cmd[0] == "add":
                self._release()
                cmd[4].put("error", err)
        self._fail_active(err, reason="abort")
        self.running = 0
