"""What may travel in a federation message, checked on both ends.

Only adapter tensors and a few named scalars ever leave a node. Every message is checked against
this allowlist before it is sent (client) and when it arrives (server): a record, key or value
type that is not listed here is an error, so a bug can never quietly ship raw examples, token ids
or per-example gradients. `summary()` is what the node's audit log records for each message.

    server → node  train/evaluate:  adapter (ArrayRecord: LoRA A/B tensors), config (ConfigRecord)
    node → server  train/evaluate:  adapter (train only: the trained LoRA tensors),
                                    metrics (MetricRecord), node (ConfigRecord: org name)
"""

from __future__ import annotations

import re
from typing import Any

from plural.errors import PluralError

# PEFT state-dict names of LoRA factors: lora_A [r, in], lora_B [out, r].
LORA_KEY = re.compile(r"^[A-Za-z0-9_.]+\.lora_[AB]\.weight$")
CONFIG_KEYS = {"round": (int,), "lr": (float,), "base-fingerprint": (str,), "train": (bool,)}
METRIC_KEYS = {"num-tokens", "train-loss", "eval-loss-before", "eval-loss-after", "eval-tokens", "seconds"}
NODE_KEYS = {"org": (str,)}
MAX_STR = 200


def _fail(where: str, what: str) -> None:
    raise PluralError(f"federation message {where}: {what} is not allowed (only LoRA tensors and named scalars travel)")


def check_content(content, direction: str) -> None:
    """Raise PluralError unless `content` (a flwr RecordDict) holds only allowlisted data.

    direction: "to-node" or "to-server".
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    allowed = {"adapter", "config"} if direction == "to-node" else {"adapter", "metrics", "node"}
    for name, rec in content.items():
        where = f"({direction}) record {name!r}"
        if name not in allowed:
            _fail(where, "this record")
        if name == "adapter":
            if not isinstance(rec, ArrayRecord):
                _fail(where, type(rec).__name__)
            for k, arr in rec.items():
                if not LORA_KEY.match(k):
                    _fail(where, f"array {k!r}")
                if len(arr.shape) != 2 or not arr.dtype.startswith("float"):
                    _fail(where, f"array {k!r} of shape {tuple(arr.shape)} and dtype {arr.dtype}")
        elif name == "metrics":
            if not isinstance(rec, MetricRecord):
                _fail(where, type(rec).__name__)
            for k, v in rec.items():
                if k not in METRIC_KEYS or isinstance(v, list):
                    _fail(where, f"metric {k!r}")
        else:
            keys = CONFIG_KEYS if name == "config" else NODE_KEYS
            if not isinstance(rec, ConfigRecord):
                _fail(where, type(rec).__name__)
            for k, v in rec.items():
                if k not in keys or not isinstance(v, keys[k]) or (isinstance(v, str) and len(v) > MAX_STR):
                    _fail(where, f"config entry {k!r}={str(v)[:40]!r}")


def summary(content) -> dict[str, Any]:
    """A JSON-able description of a message's content: record types, keys, shapes, scalars."""
    from flwr.app import ArrayRecord

    out: dict[str, Any] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            out[name] = {"type": "ArrayRecord", "bytes": rec.count_bytes(),
                         "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in rec.items()}}
        else:
            out[name] = {"type": type(rec).__name__, "values": {k: v for k, v in rec.items()}}
    return out
