"""Outputs: which tokens of a request are final (its contiguous prefix), when it
ends (stop token, length, stop string), and its text, detokenized incrementally
(`tokenizer.IncrementalDetokenizer`) with stop strings cut out."""
from __future__ import annotations

from dataclasses import dataclass

from .request_state import RequestState


@dataclass(slots=True)  # (one per request and step: slots build faster)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # newly final, contiguous
    text: str  # newly final text
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" once finished
    num_prompt_tokens: int
    num_generated_tokens: int
    forwards: int  # forward calls this request took part in
    error: str | None = None  # why the engine dropped the request (finish_reason "error")
    decode_mode: str = "diffusion"  # "ar" (block size 1) | "diffusion" (engine/policy.py)


def make_output(seq: RequestState, new_ids=(), text: str = "", error: str | None = None) -> RequestOutput:
    # positional, in RequestOutput's field order (half the cost of keywords: one per request and step)
    ids = new_ids if type(new_ids) is list else list(new_ids)  # (collect's: a fresh list already)
    return RequestOutput(seq.rid, ids, text, seq.finished, seq.reason if seq.finished else None,
                         seq.P, seq.emitted, seq.forwards, error, seq.mode)


class TextState:
    """One request's text: its incremental detokenizer and the stop strings it watches.
    Text that could still be the start of a stop string is held back."""

    def __init__(self, detok, stops: list[str]):
        self.detok = detok
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.held = ""  # text held back while a stop string may still complete
        self.seen = ""  # all detokenized text so far

    def add(self, new_ids: list[int], finished: bool):
        """Text of newly final tokens -> (text to emit, token cut or None): a stop string
        found ends the text before it and drops the tokens after the one completing it."""
        stops, hold = self.stops, self.hold
        if not stops:  # nothing to cut or hold back: the whole delta from one detokenizer call
            delta = self.detok.add_many(new_ids)
            return (delta + self.detok.flush() if finished else delta), None
        for i, t in enumerate(new_ids):
            delta = self.detok.add(t)
            if not delta:
                continue
            seen0 = len(self.seen)
            self.seen += delta
            self.held += delta
            lo = max(0, seen0 - hold)
            hits = [j for j in (self.seen.find(s, lo) for s in stops) if j >= 0]
            if hits:
                # drop the stop string and everything after it
                drop = len(self.seen) - min(hits)
                self.held = self.held[:max(0, len(self.held) - drop)]
                out, self.held = self.held, ""
                return out, i + 1
        if finished:
            return self.flush(), None
        if hold and len(self.held) > hold:
            out = self.held[:-hold]
            self.held = self.held[-hold:]
            return out, None
        if hold:
            return "", None
        out, self.held = self.held, ""
        return out, None

    def flush(self) -> str:
        """The text held back and the detokenizer's tail, at the end of the request."""
        tail = self.detok.flush()
        self.seen += tail
        out = self.held + tail
        self.held = ""
        if tail and self.stops:  # a stop string could still complete inside the flushed tail
            hits = [j for j in (out.find(s) for s in self.stops) if j >= 0]
            if hits:
                out = out[:min(hits)]
        return out


def text_state(tokenizer, prompt_ids: list[int], params) -> TextState | None:
    if tokenizer is None:
        return None
    detok = tokenizer.detokenizer(prompt_ids, skip_special_tokens=params.skip_special_tokens)
    return TextState(detok, params.stop_list())


class OutputProcessor:
    """Turns a request's state after a step into its RequestOutput (None: nothing new)."""

    def collect(self, seq: RequestState) -> RequestOutput | None:
        if seq.prefilling:
            return None
        front, limit = seq.frontier(), seq.limit
        if front > limit:
            front = limit
        pos = seq.P + seq.emitted
        if pos >= front and not seq.finished:  # nothing newly final (and pos < limit: it would have ended)
            return None
        new_ids = seq.tokens_between(pos, front) if pos < front else []
        stops = seq.stop_ids
        if stops and not stops.isdisjoint(new_ids):  # stop token, nothing masked before it: keep it, drop the rest
            new_ids = new_ids[:next(i for i, t in enumerate(new_ids) if t in stops) + 1]
            seq.finish("stop")
        pos += len(new_ids)
        if pos >= limit and not seq.finished:
            seq.finish("length")
        text = ""
        deferred = seq.final_only and seq.text is not None and not seq.text.stops  # text once, at the end
        if seq.text is not None and not deferred:
            if new_ids:
                text, cut = seq.text.add(new_ids, seq.finished)
                if cut is not None:
                    new_ids = new_ids[:cut]
                    seq.finish("stop")
            elif seq.finished:
                text = seq.text.flush()
        seq.emitted += len(new_ids)
        if seq.final_only:
            return self._final(seq, text, deferred)
        if not new_ids and not text and not seq.finished:
            return None
        return make_output(seq, new_ids, text)

    @staticmethod
    def _final(seq: RequestState, text: str, deferred: bool) -> RequestOutput | None:
        """A final_only request's step: keep its text piece (where stop strings needed the text
        per step); at its end, the one output: every emitted token, read back from the request
        (final tokens never change), and its text. The deferred text is the one the steps'
        deltas would have joined into: the incremental detokenizer gives the same string for
        any split of the ids."""
        if text:
            seq.final_text.append(text)
        if not seq.finished:
            return None
        ids = seq.tokens_between(seq.P, seq.P + seq.emitted)
        return make_output(seq, ids, seq.text.add(ids, True)[0] if deferred else "".join(seq.final_text))
