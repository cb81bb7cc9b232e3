"""The plain optimisation micro-step: forward, loss, backward.

It lives below the methods because both sides use it: the trainer calls it for every micro-batch unless
a method's runtime brings its own `step` (same signature), and such methods (AdaLoRA, gradient
approximation) fall back to it on the steps they compute exactly. `leantune.train.step` re-exports it.
"""

from __future__ import annotations

import torch


def backprop_step(model, batch: dict[str, torch.Tensor], accelerator, scale: float) -> torch.Tensor:
    """Accumulate `scale * dL/dtheta` into `.grad`; return the (detached) unscaled loss."""
    loss = model(**batch).loss
    accelerator.backward(loss * scale)
    return loss.detach()
