"""An exponential moving average of a model's weights, kept beside training and swapped in to use.

Polyak averaging of the trajectory: after every optimiser step, shadow <- d * shadow + (1 - d) * w.
The decay warms up as TensorFlow's ExponentialMovingAverage does with `num_updates`,
d_t = min(decay, (1 + t) / (10 + t)) for the t-th update, so that a short run's average is not
dominated by the random initialisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class WeightEMA:
    """The moving average of every floating-point parameter of `model`, in fp32."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]

    def current_decay(self) -> float:
        """The decay the next update uses."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average towards the model's current weights (after an optimiser step)."""
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.current_decay())
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {"decay": self.decay, "updates": self.updates,
                "shadow": dict(zip(self.names, self.shadow))}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow: dict[str, Tensor] = state["shadow"]
        if set(shadow) != set(self.names):
            missing = sorted(set(self.names) - set(shadow))[:5]
            raise ValueError(f"EMA state does not match the model (missing {missing})")
        self.updates = int(state["updates"])
        self.shadow = [shadow[n].float().clone() for n in self.names]

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the averaged weights while inside the block; its own weights after."""
        params = dict(model.named_parameters())
        saved = [params[n].detach().clone() for n in self.names]
        with torch.no_grad():
            for name, avg in zip(self.names, self.shadow):
                params[name].copy_(avg)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, weight in zip(self.names, saved):
                    params[name].copy_(weight)
