"""Prometheus metrics, one registry per app (no module globals): requests, tokens, queue, batch, latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("plural_requests", "Finished requests by model id and HTTP status.", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("plural_prompt_tokens", "Prompt tokens processed, by model id.", ["model"], registry=r)
        self.generation_tokens = Counter("plural_generation_tokens", "Tokens generated, by model id.", ["model"], registry=r)
        self.latency = Histogram("plural_request_latency_seconds", "Time from request to last token, by model id.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("plural_time_to_first_token_seconds", "Time from request to first token, by model id.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("plural_queue_depth", "Sequences waiting for a batch row.", registry=r)
        self.running = Gauge("plural_running_sequences", "Sequences in the running batch.", registry=r)
        self.batch_size = Histogram("plural_batch_size", "Sequences per decode step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.adapter_loads = Counter("plural_adapter_loads", "Adapter weight loads into a LoRA slot, by model id.",
                                     ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
