"""The default optimisation micro-step: forward, loss, backward.

Methods that are not plain backprop (MeZO, LOMO, gradient approximation) give their `MethodRuntime` a
`step` with the same signature; the trainer calls whichever it is given. The step itself lives in
`leantune.models.backprop` so that methods can call it too without importing the trainer's layer.
"""

from __future__ import annotations

from leantune.models.backprop import backprop_step

__all__ = ["backprop_step"]
