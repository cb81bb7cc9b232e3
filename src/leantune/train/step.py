"""The default optimisation micro-step: forward, loss, backward.

Methods that are not plain backprop (MeZO, LOMO, gradient approximation) give their `MethodRuntime` a
`step` with the same signature; the trainer calls whichever it is given.
"""

from __future__ import annotations

import torch


def backprop_step(model, batch: dict[str, torch.Tensor], accelerator, scale: float) -> torch.Tensor:
    """Accumulate `scale * dL/dtheta` into `.grad`; return the (detached) unscaled loss."""
    loss = model(**batch).loss
    accelerator.backward(loss * scale)
    return loss.detach()
