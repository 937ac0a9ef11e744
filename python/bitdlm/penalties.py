"""Sampling penalties on one request's logits rows, as vLLM and Hugging Face define them.

- `repetition_penalty` r (the CTRL paper's, as transformers' RepetitionPenaltyLogitsProcessor
  and vLLM's SamplingParams.repetition_penalty): for every token id present in the prompt or
  the generated tokens, logit / r where logit > 0, else logit * r. r > 1 discourages repeats.
- `frequency_penalty` f and `presence_penalty` a (OpenAI's API, as vLLM's SamplingParams):
  logit -= f * count + a * (count > 0), counts over the GENERATED tokens only (vLLM's
  output_bin_counts; the prompt does not count).
vLLM applies the repetition penalty first, then the two subtractions; so do we, in float32
(the logits' type). Written from those definitions; no code is taken from either project.

In block diffusion the "generated tokens" of a step are the tokens committed so far after
the prompt: earlier blocks and the decided positions of the current block. Masked
positions never count (RequestState.generated, docs/server.md "Sampling penalties").
"""
from __future__ import annotations

import numpy as np


def apply(logits: np.ndarray, prompt: np.ndarray, generated: np.ndarray, *, presence: float = 0.0,
          frequency: float = 0.0, repetition: float = 1.0) -> np.ndarray:
    """Penalise float32 logits rows [k, V] in place (every row alike: they are one request's
    candidates of one step) -> logits. Touches only the columns of ids that occur."""
    if repetition != 1.0:
        seen = np.unique(np.concatenate([np.asarray(prompt, np.int64), np.asarray(generated, np.int64)]))
        sub = logits[:, seen]
        r = np.float32(repetition)
        logits[:, seen] = np.where(sub > 0, sub / r, sub * r)
    if frequency != 0.0 or presence != 0.0:
        ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
        if ids.size:
            logits[:, ids] -= np.float32(frequency) * counts.astype(np.float32)
            logits[:, ids] -= np.float32(presence)
    return logits
