"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its shared init, only B trained and averaged.

With the same fixed A on every device, Σ pₖ·s·BₖA = s·(Σ pₖBₖ)·A: FedAvg of B alone is the
exact mean of the products (the error `lowrank` measures is 0 up to rounding), and a device
uploads B and the head only, about half of fedavg's bytes. The device side is the method
option `freeze_a: true` (lora or federa): A is the run's fixed init (lora ships it like
FeDeRA's factors), it has no gradient, and neither the state nor the update spec holds it, so
an upload carrying an A tensor is refused (nack `invalid_tensors`). The price is
expressiveness: only B adapts.

    method: {name: lora, freeze_a: true}
    aggregation: {strategy: ffa}
"""

from __future__ import annotations

from jetfed.coordinator.strategies.base import ServerContext, register_strategy
from jetfed.coordinator.strategies.fedavg import FedAvg
from jetfed.edge.errors import UserError


@register_strategy
class FfaLora(FedAvg):
    """FedAvg of B (and the head); refuses a method that still trains A."""

    name = "ffa"

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        config = getattr(ctx.method, "config", None)
        if config is not None and not getattr(config, "freeze_a", False):
            raise UserError(
                "aggregation.strategy ffa trains B only: set method.freeze_a: true "
                f"(method {ctx.method.name})"
            )
