"""Packing short causal-LM examples into full rows without attention crossing example boundaries.

Examples are concatenated in order into rows of at most `model.max_length` tokens. Each keeps its own
positions (`position_ids` restart at 0 per example) and `collate` turns those into a 4-D additive
attention mask (batch, 1, query, key): 0 where the key is in the same example and not in the future,
the most negative float elsewhere, so each example sees exactly what it would see alone. The first label
of every packed example is -100: alone, a causal LM never predicts its first token, and packed, that
prediction would come from the previous example. Padding of a short row gets position 0, one padding
token per "example", which attends to itself only and has no label.

Models that ignore a 4-D mask or `position_ids` would silently attend across examples; `check_packing`
compares a packed forward pass with separate ones on the loaded model and refuses packing when they
differ. The mask is float32: packing needs model.dtype=float32 (config.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable

from leantune.errors import UserError

IGNORE_INDEX = -100


def pack(features: Iterable[dict], max_length: int) -> list[dict]:
    """Greedy, in order: an example joins the current row while the row stays within `max_length`."""
    rows: list[dict] = []
    current: dict | None = None
    for f in features:
        ids = list(f["input_ids"])
        if current is None or len(current["input_ids"]) + len(ids) > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(current)
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX, *list(f["labels"])[1:]]
        current["position_ids"] += list(range(len(ids)))
    return rows


def packed_attention_mask(position_ids):
    """(batch, 1, L, L) float32 additive mask: causal within each run of positions that starts at 0."""
    import torch

    segment = torch.cumsum((position_ids == 0).long(), dim=1)
    same = segment[:, :, None] == segment[:, None, :]
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = torch.zeros(same.shape, dtype=torch.float32)
    mask.masked_fill_(~(same & causal), torch.finfo(torch.float32).min)
    return mask[:, None]


def check_packing(model, vocab_size: int, name: str) -> None:
    """Refuse packing (one line) when `model` does not honour the packed mask and positions."""
    import torch

    from leantune.data.tasks import collate

    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (3, 5)]
    feats = [{"input_ids": e, "attention_mask": [1] * len(e), "labels": e} for e in examples]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            alone = [model(input_ids=torch.tensor([e], device=device)).logits[0] for e in examples]
            batch = collate(pack(feats, 64), 0)
            packed = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device),
            ).logits[0]
        ok = torch.allclose(torch.cat(alone), packed, atol=1e-4, rtol=1e-4)
        why = "its outputs differ from unpacked ones"
    except Exception as exc:  # a model that rejects a 4-D mask or position_ids
        ok, why = False, (str(exc).splitlines() or [type(exc).__name__])[0]
    finally:
        model.train(was_training)
    if not ok:
        raise UserError(
            f"model {name} does not honour a packed 4-D attention mask ({why}); set data.packing=false"
        )
