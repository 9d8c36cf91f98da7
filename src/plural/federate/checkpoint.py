"""Per-round server checkpoints: the global adapter, the server optimiser's state, the history.

    <output>/checkpoints/round-0003/
        adapter.safetensors     the global LoRA tensors after round 3 (PEFT names)
        server_opt.safetensors  optimiser state, keys "<slot>/<tensor name>" (momentum, m, v)
        state.json              round, history, per-node totals, privacy rounds spent

Written to a temporary folder and renamed (store.paths.atomic_dir), so a server killed at any
moment leaves the previous round's checkpoint intact; a restarted run continues after it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plural.errors import PluralError
from plural.store.paths import atomic_dir, write_json_atomic

CKPT_DIR = "checkpoints"
KEEP = 2


@dataclass
class ServerState:
    round: int  # rounds completed
    adapter: dict[str, torch.Tensor]
    opt: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # slot -> tensors
    history: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # org -> {rounds, tokens}
    dp_rounds: int = 0


def started(out: Path) -> bool:
    """Whether `out` already holds a federation (its config, a checkpoint or a result)."""
    out = Path(out)
    return any((out / n).exists() for n in ("config.yaml", CKPT_DIR, "adapter", "progress.jsonl"))


def list_checkpoints(out: Path) -> list[Path]:
    d = Path(out) / CKPT_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("round-") and (p / "state.json").is_file())


def save(out: Path, st: ServerState) -> Path:
    from safetensors.torch import save_file

    final = Path(out) / CKPT_DIR / f"round-{st.round:04d}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in st.adapter.items()}, str(tmp / "adapter.safetensors"))
        flat = {f"{slot}/{k}": v.contiguous() for slot, d in st.opt.items() for k, v in d.items()}
        save_file(flat, str(tmp / "server_opt.safetensors"))
        write_json_atomic(tmp / "state.json", {"round": st.round, "history": st.history, "nodes": st.nodes, "dp_rounds": st.dp_rounds})
    for old in list_checkpoints(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(ckpt: Path) -> ServerState:
    from safetensors.torch import load_file

    try:
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        adapter = load_file(str(ckpt / "adapter.safetensors"))
        flat = load_file(str(ckpt / "server_opt.safetensors"))
    except (OSError, ValueError) as e:
        raise PluralError(f"{ckpt}: unreadable checkpoint ({e})") from e
    opt: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        slot, name = k.split("/", 1)
        opt.setdefault(slot, {})[name] = v
    return ServerState(meta["round"], adapter, opt, meta["history"], meta["nodes"], meta.get("dp_rounds", 0))
