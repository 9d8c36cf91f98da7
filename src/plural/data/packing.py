"""Packing short examples into full-length rows without attention across examples.

A packed row concatenates several examples; its `position_ids` restart at 0 at every example.
transformers (>= 4.56, `masking_utils.find_packed_sequence_indices`) turns position resets into a
block-diagonal causal mask when no 2-D attention mask is passed, so a token never attends to a
token of another example -- for sdpa and eager attention alike, and flash-attention uses the same
positions as `cu_seqlens`. The row's padding tail is one more "example" whose labels are ignored.

Bin packing is first-fit-decreasing, which wastes a few percent at most on typical chat data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plural.data.chat import IGNORE, Encoded


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def truncate(e: Encoded, max_length: int) -> Encoded:
    return Encoded(e.input_ids[:max_length], e.labels[:max_length])


def pack(examples: list[Encoded], max_length: int) -> list[Row]:
    """First-fit-decreasing into rows of at most `max_length` tokens. Deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i])
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max_length - n)
    rows = []
    for b in bins:
        ids, labels, pos = [], [], []
        for i in sorted(b):
            e = examples[i]
            ids += e.input_ids
            # The first token of an example has no context inside its own example: never a target
            # (else the loss would predict it from the previous example's last token).
            labels += [IGNORE] + e.labels[1:]
            pos += list(range(len(e)))
        rows.append(Row(ids, labels, pos))
    return rows


def unpacked(examples: list[Encoded]) -> list[Row]:
    return [Row(list(e.input_ids), [IGNORE] + e.labels[1:], list(range(len(e)))) for e in examples]


# A micro-batch of short rows is laid out as one row of ≤ this many tokens (`flat_max`): padding
# to the longest row cost 37% more tokens than the rows hold on the demo's data (72 chats of
# 65-105 tokens + 16 replayed documents of 103-249), and a step is matmul-bound on CPU. One row's
# attention is quadratic in its whole length, so long rows (packed ones) stay padded.
FLAT_MAX = 1024


def concat(rows: list[Row]) -> Row:
    """The rows one after another in one row: positions restart at each, so (module docstring) no
    token attends across them, and each row's first label is already IGNORE (`pack`, `unpacked`),
    so no row's first token is predicted from the previous row."""
    return Row([t for r in rows for t in r.input_ids], [t for r in rows for t in r.labels],
               [t for r in rows for t in r.position_ids])


def collate(rows: list[Row], pad_id: int, flat_max: int = 0) -> dict[str, torch.Tensor]:
    """Pad rows to the longest; the pad tail gets positions 0.. (its own segment) and no loss.
    With `flat_max`, rows whose lengths sum to at most that are one row instead ([1, Σ len]): the
    same loss sum and gradient (tested), without the padding. For loss modules that sum over
    tokens only; a pairwise loss (DPO) needs its rows side by side.

    Returns input_ids, labels, position_ids, all [batch, seq]. No attention_mask on purpose:
    see the module docstring.
    """
    if flat_max and len(rows) > 1 and sum(len(r) for r in rows) <= flat_max:
        rows = [concat(rows)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r)
        ids[k, :n] = torch.tensor(r.input_ids)
        labels[k, :n] = torch.tensor(r.labels)
        pos[k, :n] = torch.tensor(r.position_ids)
        pos[k, n:] = torch.arange(T - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}
