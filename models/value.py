"""The value model of V-STAR: V(prefix), the expected reward of completing a semantic-ID prefix.

The head reads the code decoder's state of a prefix (position l holds the context and codes c_1..c_l, and the decoder
is causal), so a prefix's value sees nothing after it. Rewards are dense per level (DESIGN.md, Value model): a prefix
that matches the target's first l codes earns w_l; a wrong one earns -w_l * (1 - cos(generated item, target item)).
V(s_l) is fitted to the TD target r_l + gamma * V(s_{l+1}); a complete item has no future, so V(s_D) = r_D.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from genrec.core.atomic import atomic_path
from genrec.models.layers import init_small


class ValueHead(nn.Module):
    """V(s) from the prefix state and the prefix's log-probability under the policy. The state alone does not hold how
    likely the policy found the codes it was fed, and the chance that a prefix is right is mostly that; both inputs
    depend on the prefix only, so the value stays causal."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.state_norm = nn.LayerNorm(d_model)
        self.net = nn.Sequential(nn.Linear(d_model + 2, d_model), nn.GELU(), nn.Linear(d_model, 1))
        self.apply(init_small)

    def forward(self, states: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """(..., d) prefix states and (...) prefix log-probabilities -> (...) values."""
        logp = logp.float().clamp_min(-30.0).unsqueeze(-1)
        return self.net(torch.cat([self.state_norm(states), logp / 10, logp.exp()], -1)).squeeze(-1)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp),
                      {"genrec": json.dumps({"d_model": self.d_model})})

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> "ValueHead":
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["genrec"])
        head = cls(meta["d_model"])
        head.load_state_dict(load_file(str(path), device=device))
        return head.to(device).eval()


def level_rewards(generated: torch.Tensor, target: torch.Tensor, cosine: torch.Tensor,
                  weights: tuple[float, ...]) -> torch.Tensor:
    """generated, target: (R, D) codes; cosine: (R,) between the generated and the target item vectors ->
    (R, D) reward of each level. Levels past len(weights) (the collision code) earn nothing."""
    d = generated.shape[1]
    w = torch.zeros(d, device=generated.device)
    w[: min(d, len(weights))] = torch.as_tensor(weights[:d], dtype=torch.float32)
    matched = (generated == target).long().cumprod(1).bool()  # the prefix up to level l is the target's
    return torch.where(matched, w, -w * (1 - cosine.float().clamp(-1, 1)).unsqueeze(1))


def window_level_rewards(generated: torch.Tensor, window: torch.Tensor, codes: torch.Tensor, vectors: torch.Tensor,
                         items: torch.Tensor, weights: tuple[float, ...],
                         discounts: tuple[float, ...]) -> torch.Tensor:
    """The dense reward against a window of next items (DESIGN.md, Rewards): generated (R, D) codes of items (R,),
    window (R, H) next items (-1 = none), codes (N, D) every item's codes, vectors (N, d) unit item vectors ->
    (R, D) sum over h of discounts[h] * level_rewards(generated, window item h). One item ahead (H = 1): the
    next-item reward."""
    total = torch.zeros(generated.shape, device=generated.device)
    for h in range(window.shape[1]):
        target = window[:, h]
        present = (target >= 0).float()[:, None]
        t = target.clamp_min(0)
        cosine = (vectors[items] * vectors[t]).sum(1)
        total = total + discounts[h] * present * level_rewards(generated, codes[t], cosine, weights)
    return total


def td_targets(values: torch.Tensor, rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """values: (R, D) V(s_0..s_{D-1}); rewards: (R, D) r_1..r_D -> (R, D) targets r_l + gamma * V(s_{l+1}), with
    r_0 = 0 for the root and V(s_D) = r_D for the complete item."""
    own = torch.cat([torch.zeros_like(rewards[:, :1]), rewards[:, :-1]], 1)  # r_l for s_l (the root earns none)
    nxt = torch.cat([values[:, 1:].detach(), rewards[:, -1:]], 1)  # V(s_{l+1}); V(s_D) = r_D
    return own + gamma * nxt
