"""What a method adds to (or, negative, takes from) the memory model's totals when it is applied.

The memory layer sits below the methods and never imports one. A method that changes memory in a way
the planner cannot read off the model it is handed (a quantised base that is not applied yet) answers
through its `MethodSpec.plan_for(model, cfg) -> MemoryContribution` hook; whoever composes the two (the
`leantune plan` recipe) asks the method and hands the answer to the planner.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryContribution:
    """Bytes per component of `leantune.memory.planner.RankCost.breakdown`; negative saves."""

    weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0  # per batch, not per example
    note: str = ""  # what the planner prints when it relies on this contribution
    # How the method's step computes its update (memory/full_step.py): "backprop" (autograd, every
    # gradient alive at the update), "fused_backward" (each gradient applied and freed inside backward)
    # or "forward_only" (no backward: the peak of a no-grad forward pass, no saved activations).
    step: str = "backprop"
    transient: int = 0  # short-lived bytes of the method's own update (a MeZO z chunk, AdaLomo temporaries)

    def __bool__(self) -> bool:
        return (
            any((self.weights, self.gradients, self.optimizer_state, self.activations, self.transient))
            or self.step != "backprop"
        )
