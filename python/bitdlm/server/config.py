"""ServerConfig: what one app serves and its limits (light: the CLI imports it
for its flag defaults without importing the web stack)."""
from __future__ import annotations

import dataclasses

MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context


@dataclasses.dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    vocab_size: int
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    default_params: dict = dataclasses.field(default_factory=dict)  # SamplingParams defaults
    max_body_bytes: int = MAX_BODY_BYTES
