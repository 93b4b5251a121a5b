"""Transformer building blocks shared by the recommender and the SASRec baseline: pre-LN blocks with a KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_small(m: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases everywhere: with PyTorch's N(0, 1) default for embeddings, position
    embeddings would drown the item embeddings."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class KVCache:
    """Per-layer keys and values, (B, H, T, Dh) each, grown one step at a time; rows can be re-ordered (beams)."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (a beam's parents), in that order."""
        self.k = [None if k is None else k.index_select(0, rows) for k in self.k]
        self.v = [None if v is None else v.index_select(0, rows) for v in self.v]

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        assert d_model % n_heads == 0, f"n_heads={n_heads} must divide d_model={d_model}"
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        """x: (B, T, D); mask: (B, 1, T, T_total) bool, True = may attend; None = no mask (a cached single step)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask, cache: KVCache | None = None, layer: int = 0):
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool of real positions -> (B, 1, T, T) mask: causal, pads hidden as keys, and every query may see
    itself, so no row is fully masked (a fully masked row gives NaN in softmax)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye).unsqueeze(1)


def positions_left_padded(valid: torch.Tensor) -> torch.Tensor:
    """Position ids counted from the oldest real item (0), pads at 0: (B, T) bool -> (B, T) long."""
    return (valid.long().cumsum(1) - 1).clamp_min(0)


def positions_from_newest(valid: torch.Tensor) -> torch.Tensor:
    """Position ids counted back from the most recent item (0); pads get the oldest item's: (B, T) bool -> (B, T)."""
    return (valid.long().flip(1).cumsum(1).flip(1) - 1).clamp_min(0)


def sampled_softmax_loss(states: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, item_emb: nn.Embedding,
                         negatives: int) -> torch.Tensor:
    """SASRec+SS's loss: states (B, T, d), targets (B, T) item rows, valid (B, T). Each target against `negatives`
    items drawn uniformly, one draw per sequence shared by its positions (the published recipe draws per position:
    the same expected loss, and gathering (M, K, d) embeddings was 3x slower on CPU). A negative that happens to be
    the target stays, as there (1 / N)."""
    drawn = torch.randint(0, item_emb.num_embeddings, (len(states), negatives), device=states.device)  # (B, K)
    neg_logits = torch.bmm(states, item_emb(drawn).transpose(1, 2))[valid]  # (M, K)
    target = targets[valid]
    pos_logits = (states[valid] * item_emb(target)).sum(-1, keepdim=True)  # (M, 1)
    return F.cross_entropy(torch.cat([pos_logits, neg_logits], 1), torch.zeros_like(target))
