"""SASRec (Kang & McAuley, 2018): a causal transformer over item ids, trained for the next item at every position.

The standard ID-based baseline, trained under the same protocol (same windows, same trainer) as the recommender. The
loss is a softmax over the whole catalog, or a sampled softmax over the target and uniformly drawn negatives (the
"SASRec+SS" of Klenitskiy et al. 2023 and the eSASRec benchmark, arXiv 2508.06450). Positions count back from the
most recent item, as in RecTools' SASRec.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from genrec.core.atomic import atomic_path
from genrec.core.config import SASRecConfig
from genrec.models.layers import (Block, causal_padding_mask, init_small, positions_from_newest, positions_left_padded,
                                 sampled_softmax_loss)


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig, n_items: int):
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        d = cfg.d_model
        self.item_emb = nn.Embedding(n_items, d)
        self.pos_emb = nn.Embedding(cfg.max_history, d)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(init_small)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, T) catalog rows, -1 left padding -> (B, T, d)."""
        valid = history >= 0
        x = self.item_emb(history.clamp_min(0)) * valid.unsqueeze(-1)
        positions = positions_from_newest(valid) if self.cfg.positions == "newest" else positions_left_padded(valid)
        x = self.drop(x + self.pos_emb(positions))
        mask = causal_padding_mask(valid)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, N) next-item scores over the whole catalog (tied output embeddings)."""
        return self.encode(history)[:, -1] @ self.item_emb.weight.T

    def forward(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs, targets = windows[:, :-1], windows[:, 1:]
        valid = (inputs >= 0) & (targets >= 0)
        h = self.encode(inputs)  # (B, T, d)
        pairs = valid.sum()
        if self.cfg.loss == "full":  # (M, N) logits
            return {"loss": F.cross_entropy(h[valid] @ self.item_emb.weight.T, targets[valid]), "pairs": pairs}
        return {"loss": sampled_softmax_loss(h, targets, valid, self.item_emb, self.cfg.negatives), "pairs": pairs}

    def save(self, path: Path) -> None:
        """Weights as safetensors, with the config in the file's metadata so one file is the whole model."""
        meta = {"genrec": json.dumps({"config": self.cfg.model_dump(), "n_items": self.n_items})}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp), meta)

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> "SASRec":
        path = Path(path)
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["genrec"])
        # A model saved before the positions option counted from the oldest item.
        model = cls(SASRecConfig(**{"positions": "oldest", **meta["config"]}), meta["n_items"])
        model.load_state_dict(load_file(str(path), device=device))
        return model.to(device).eval()
