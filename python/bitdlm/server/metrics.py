"""Prometheus metrics of one app (a registry of their own). Every value is
read from something cached or lock-free: a scrape never waits for a forward."""
from __future__ import annotations

import threading


class _PhaseCollector:
    """Forward time per phase (Model.profile(), cumulative since load) as a
    counter: exported as bitdlm_forward_phase_seconds_total{phase}. The core
    publishes a copy after each forward, so this read never waits for one."""

    def __init__(self, model):
        self.model = model

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        prof = dict(self.model.profile())
        prof.pop("calls", None)
        c = CounterMetricFamily("bitdlm_forward_phase_seconds",
                                "Wall time of model forwards by phase (GEMMs, attention, lm_head, ...)",
                                labels=["phase"])
        for phase, sec in prof.items():
            c.add_metric([phase], sec)
        yield c
        # each kind of parallel region's wall = fork + work + imbalance + join (kernels/team_clock.h;
        # process-wide, read under a lock the forward holds for one region's sum at a time)
        from .. import _core
        from ..model import REGION_PARTS

        team = _core.team_profile()
        n = CounterMetricFamily("bitdlm_parallel_regions", "Parallel regions of the forwards by kind "
                                "(ternary_gemm, lm_head, attention)", labels=["kind"])
        t = CounterMetricFamily("bitdlm_parallel_region_seconds",
                                "Wall time of the forwards' parallel regions by kind and part (wall = fork "
                                "+ work + imbalance + join: threads starting, working (mean), waiting for "
                                "the last, joining)", labels=["kind", "part"])
        for kind, st in team.items():
            n.add_metric([kind], st["calls"])
            for part in REGION_PARTS:
                t.add_metric([kind, part], st[part])
        yield n
        yield t


class Metrics:
    def __init__(self, loop_ref, model=None, engine=None):
        from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                                       disable_created_metrics)

        disable_created_metrics()  # no *_created series: they double the output for nothing

        r = self.registry = CollectorRegistry()
        self.requests = Counter("bitdlm_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter(
            "bitdlm_requests_finished",
            "Generation requests leaving the engine, by reason "
            "(stop, length, abort = cancelled, client gone or shut down, error, rejected)",
            ["reason"], registry=r)
        self.prompt_tokens = Counter("bitdlm_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=r)
        self.generation_tokens = Counter("bitdlm_generation_tokens", "Generated (final) tokens",
                                         registry=r)
        self.steps = Counter("bitdlm_engine_steps", "Engine steps (each advances every running "
                             "request)", registry=r)
        self.forwards = Counter("bitdlm_forward_passes",
                                "Batched model forward calls made by the engine", registry=r)
        self.request_forwards = Counter(
            "bitdlm_request_forward_passes",
            "Forward passes summed over finished requests (each request counts the passes "
            "it took part in)", registry=r)
        self.tokens_per_forward_hist = Histogram(
            "bitdlm_request_tokens_per_forward",
            "Generated tokens per forward pass of each finished request",
            buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 16, 32), registry=r)
        tpf = Gauge("bitdlm_tokens_per_forward",
                    "Generated tokens / forward passes over all finished requests", registry=r)
        tpf.set_function(self._tokens_per_forward)
        self._lock = threading.Lock()
        self._finished_tokens = 0
        self._finished_forwards = 0
        self.step_latency = Histogram(
            "bitdlm_step_latency_seconds", "Latency of one engine step",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.ttft = Histogram(
            "bitdlm_time_to_first_token_seconds", "Submission to first final token",
            buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.e2e = Histogram(
            "bitdlm_request_latency_seconds", "Submission to the last token",
            buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        g = Gauge("bitdlm_requests_running", "Requests in the engine's batch", registry=r)
        g.set_function(lambda: loop_ref().running if loop_ref() else 0)
        g = Gauge("bitdlm_requests_queued", "Requests accepted and waiting for a batch slot",
                  registry=r)
        g.set_function(lambda: loop_ref().queued if loop_ref() else 0)
        if model is not None and hasattr(model, "kv_bytes_used"):
            # the engine thread reads it after each step; a scrape reads that copy
            g = Gauge("bitdlm_kv_cache_bytes", "KV cache bytes in use (as of the last step)",
                      registry=r)
            g.set_function(lambda: float(loop_ref().kv_bytes) if loop_ref() else 0.0)
        if model is not None and getattr(model, "threads", None):
            g = Gauge("bitdlm_threads", "OpenMP threads of every forward (--threads)", registry=r)
            g.set(int(model.threads))
        if model is not None and hasattr(model, "forward_threads"):
            g = Gauge("bitdlm_forward_threads",
                      "OpenMP threads of the last forward, as seen on the engine thread that ran "
                      "it (0 before the first)", registry=r)
            g.set_function(lambda: float(model.forward_threads))
        self.decode_modes = Counter(
            "bitdlm_requests_decode_mode", "Requests admitted by the engine, by decoding mode "
            "(ar = block size 1, diffusion; --decode-policy adaptive assigns it)", ["mode"], registry=r)
        policy = getattr(engine, "decode_policy", None)
        if isinstance(policy, str):
            g = Gauge("bitdlm_decode_policy_info", "The decode policy (--decode-policy): 1 for the "
                      "one in use", ["policy"], registry=r)
            g.labels(policy=policy).set(1)
        adaptive = getattr(engine, "policy", None)
        if adaptive is not None:  # a float the engine thread rebinds: the read never waits
            g = Gauge("bitdlm_decode_policy_tokens_per_forward",
                      "The adaptive policy's estimate of a diffusion request's tokens per forward",
                      registry=r)
            g.set_function(lambda: float(adaptive.tpf))
            g = Gauge("bitdlm_decode_policy_cost_scale",
                      "The adaptive policy's cost scale per mode: what its serving steps cost against "
                      "the start-up calibration", ["mode"], registry=r)
            for m in adaptive.cost_scale:  # (dict values the engine thread rebinds: the read never waits)
                g.labels(mode=m).set_function(lambda m=m: float(adaptive.cost_scale[m]))
        if model is not None and getattr(model, "profiling", False):
            r.register(_PhaseCollector(model))

    def finished_request(self, out, latency):
        fw = int(out.forwards or 0)
        self.prompt_tokens.inc(out.num_prompt_tokens)
        self.request_forwards.inc(fw)
        self.e2e.observe(latency)
        if fw:
            self.tokens_per_forward_hist.observe(out.num_generated_tokens / fw)
            with self._lock:
                self._finished_tokens += out.num_generated_tokens
                self._finished_forwards += fw

    def _tokens_per_forward(self):
        with self._lock:
            fw, toks = self._finished_forwards, self._finished_tokens
        return toks / fw if fw else 0.0

    def render(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
