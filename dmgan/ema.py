"""Exponential moving average of the generator's weights (parameters only, as the reference).

ema = ParameterEMA(netG, decay=0.999)
...; optimizer.step(); ema.update(netG)
with ema.swapped_into(netG):   # sample or save with the averaged weights
    ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class ParameterEMA:
    """avg ← decay · avg + (1 - decay) · θ over ``parameters()``; BN running stats are not averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.params: list[Tensor] = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """One averaging step; none where ``skip`` (a 0-dim bool tensor, decided on the device)."""
        current = [p.detach() for p in model.parameters()]
        if len(current) != len(self.params):
            raise ValueError("model has a different number of parameters than the EMA was built from")
        if skip is None:
            torch._foreach_lerp_(self.params, current, 1.0 - self.decay)
            return
        step = torch._foreach_sub(current, self.params)
        torch._foreach_mul_(step, (1.0 - self.decay) * (~skip).to(self.params[0].dtype))
        torch._foreach_add_(self.params, step)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (for good: see :meth:`swapped_into`)."""
        torch._foreach_copy_(list(model.parameters()), self.params)
        return model

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (the raw ones come back after)."""
        params = list(model.parameters())
        raw = [p.detach().clone() for p in params]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, raw)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "params": list(self.params)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        params = state["params"]
        assert isinstance(params, list)
        if len(params) != len(self.params):
            raise ValueError(f"EMA state has {len(params)} tensors, expected {len(self.params)}")
        for mine, theirs in zip(self.params, params):
            if mine.shape != theirs.shape:
                raise ValueError(f"EMA tensor shape {tuple(theirs.shape)} != {tuple(mine.shape)}")
            mine.copy_(theirs)
        self.decay = float(state["decay"])  # type: ignore[arg-type]
