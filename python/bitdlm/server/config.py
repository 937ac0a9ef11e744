"""ServerConfig: what one app serves and its limits (light: the CLI imports it
for its flag defaults without importing the web stack)."""
from __future__ import annotations

import dataclasses

# Largest request body. json.loads holds the GIL, so parsing a body stalls the
# event loop even off it: 30 MB stalled /health 2-7 s. 8 MiB is 3x the largest
# admissible token-id request of a 4k-context model (80 prompts x 4096 ids) and
# 8x nginx's default client_max_body_size. docs/server.md "Limits".
MAX_BODY_BYTES = 8 << 20


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
    aliases: tuple = ()  # other model ids requests may name (the old servers' ids, more --served-model-name)
    default_max_tokens: int | None = None  # for requests that set none (None: each route's own default)
    health_status: str = "ok"  # /health's "status" ("healthy": what the users' old server answered)

    def model_names(self) -> list:
        return [self.served_model_name, *self.aliases]
