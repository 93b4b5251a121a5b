"""The generative recommender: next-item semantic-ID generation (TIGER, Rajput et al. 2023), hierarchical layout.

Two stacks share one code-embedding table:
  history encoder  one position per history item (the sum of its code embeddings), causal, so every position's
                   state predicts the item after it and one pass trains on all targets of a sequence;
  code decoder     one position per SID code: [context, c_1, ..., c_{D-1}] -> logits for c_1 .. c_D, causal, with a
                   KV cache for decoding. Its hidden state at position l summarises the prefix c_<=l (the value
                   head reads it).
Output heads are tied to the code embeddings of each level. With `node_embedding`, a child's output vector is its
code embedding plus a vector of its own trie node: after two codes a Beauty prefix holds about two items, so a code
shared by 256 parents is a bottleneck, and the node vectors give the tree softmax item-level capacity.
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
from genrec.core.config import RecommenderConfig
from genrec.kernels.constrained_topk import csr_entries
from genrec.models.trie import Trie
from genrec.models.layers import (Block, KVCache, causal_padding_mask, init_small, positions_from_newest,
                                 positions_left_padded, sampled_softmax_loss)


class Recommender(nn.Module):
    def __init__(self, cfg: RecommenderConfig, vocab_sizes: tuple[int, ...], item_codes: torch.Tensor,
                 trie: Trie | None = None):
        super().__init__()
        self.cfg, self.vocab_sizes = cfg, tuple(int(v) for v in vocab_sizes)
        self.depth = len(self.vocab_sizes)
        assert item_codes.shape[1] == self.depth, "item_codes must have one column per SID position"
        d = cfg.d_model
        offsets = torch.tensor([0, *self.vocab_sizes[:-1]]).cumsum(0)
        self.register_buffer("code_offset", offsets, persistent=False)  # (D,)
        self.register_buffer("item_codes", item_codes.long() + offsets, persistent=False)  # (N, D) flat code ids
        # The trie (a module of buffers: it moves with the model) is the one decoders read too: one copy.
        self.trie = trie
        self.node_out = None
        if cfg.node_embedding:
            assert trie is not None, "node_embedding: build the model with the trie"
            self.n_nodes = trie.n_nodes
            # One output vector per trie node below the root, then one per item (the leaves), unless the items share
            # their input embeddings (tie_item_vectors).
            self.node_out = nn.Embedding(trie.n_nodes + (0 if cfg.tie_item_vectors else len(item_codes)), d)
        self.code_emb = nn.Embedding(sum(self.vocab_sizes), d)
        self.item_emb = nn.Embedding(len(item_codes), d) if cfg.item_embedding else None
        self.item_pos = nn.Embedding(cfg.max_history, d)
        self.level_pos = nn.Embedding(self.depth, d)
        self.history = nn.ModuleList(Block(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_layers))
        self.history_ln = nn.LayerNorm(d)
        self.context_proj = nn.Linear(d, d)
        self.decoder = nn.ModuleList(Block(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_code_layers))
        self.decoder_ln = nn.LayerNorm(d)
        self.head_bias = nn.Parameter(torch.zeros(sum(self.vocab_sizes)))
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(init_small)

    # ---- history encoder -------------------------------------------------------------------------------------
    def encode_history(self, history: torch.Tensor) -> torch.Tensor:
        """history: (B, T) catalog rows, most recent last, -1 left padding -> states (B, T, d)."""
        valid = history >= 0
        codes = self.item_codes[history.clamp_min(0)]  # (B, T, D)
        x = self.code_emb(codes).sum(2)  # (B, T, d)
        if self.item_emb is not None:
            x = x + self.item_emb(history.clamp_min(0))
        x = x * valid.unsqueeze(-1)
        positions = positions_from_newest(valid) if self.cfg.positions == "newest" else positions_left_padded(valid)
        x = self.drop(x + self.item_pos(positions))
        mask = causal_padding_mask(valid)
        for block in self.history:
            x = block(x, mask)
        return self.history_ln(x)

    def context(self, history: torch.Tensor) -> torch.Tensor:
        """The state that generates the next item: (B, T) -> (B, d) from the most recent position."""
        return self.encode_history(history)[:, -1]

    def item_scores(self, ctx: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The item-level score of candidates: ctx (B, d), items (B, K) catalog rows -> (B, K) ctx . item vector
        (what item_loss trains and rescore adds to the path log-probability)."""
        return (ctx.unsqueeze(1) * self.item_emb(items.clamp_min(0))).sum(-1)

    # ---- code decoder ----------------------------------------------------------------------------------------
    def _decoder_inputs(self, ctx: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """ctx (B, d), prefix (B, l) raw codes -> decoder inputs (B, l + 1, d)."""
        tokens = [self.context_proj(ctx).unsqueeze(1)]
        if prefix.shape[1]:
            tokens.append(self.code_emb(prefix + self.code_offset[: prefix.shape[1]]))
        x = torch.cat(tokens, 1)
        return self.drop(x + self.level_pos.weight[: x.shape[1]])

    def level_logits(self, hidden: torch.Tensor, level: int, node: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (R, d) of prefixes ending at trie nodes `node` (R,) -> logits over the codes of `level` (R, V_level),
        tied to the code embeddings. `node` is needed with node_embedding; codes that are not children of the node
        then lack their node term and must be masked (constrained decoding and constrained_loss both do)."""
        lo, hi = int(self.code_offset[level]), int(self.code_offset[level]) + self.vocab_sizes[level]
        logits = hidden @ self.code_emb.weight[lo:hi].T + self.head_bias[lo:hi]
        if self.node_out is not None and level > 0:  # at the root a code is its own node: nothing to add
            assert node is not None, "node_embedding: pass the trie node of each prefix"
            logits = logits + self._child_terms(hidden, level, node, hi - lo)
        return logits

    def _child_terms(self, hidden: torch.Tensor, level: int, node: torch.Tensor, width: int) -> torch.Tensor:
        """(R, width) with hidden . node_out[child] at each valid child code of each row's node, 0 elsewhere (and on
        rows whose node is -1, a pruned beam). Walks the CSR lists: the cost is the number of valid children."""
        row, entry = csr_entries(node, self.trie.child_ptr)
        target = self.trie.child_target[entry]
        if level < self.depth - 1:
            vectors = self.node_out(target)
        elif self.cfg.tie_item_vectors:
            vectors = self.item_emb(target)
        else:
            vectors = self.node_out(target + self.n_nodes)
        terms = (hidden[row] * vectors).sum(-1)
        return hidden.new_zeros(len(node), width).index_put((row, self.trie.child_code[entry]), terms)

    def decode_all(self, ctx: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Uncached: ctx (B, d), prefix (B, l) -> decoder states (B, l + 1, d); state j predicts code j."""
        x = self._decoder_inputs(ctx, prefix)
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        for block in self.decoder:
            x = block(x, mask)
        return self.decoder_ln(x)

    def decode_step(self, x_in: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached: one new decoder input per row (B, 1, d) -> its state (B, d). Causality comes from the cache."""
        for i, block in enumerate(self.decoder):
            x_in = block(x_in, None, cache, i)
        return self.decoder_ln(x_in)[:, 0]

    def start(self, ctx: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Begin decoding: ctx (B, d) -> (state for level 0 (B, d), cache)."""
        cache = KVCache(len(self.decoder))
        x = self.drop(self.context_proj(ctx).unsqueeze(1) + self.level_pos.weight[0])
        return self.decode_step(x, cache), cache

    def step(self, code: torch.Tensor, level: int, cache: KVCache) -> torch.Tensor:
        """Feed code (B,) chosen at `level` -> state predicting level + 1 (B, d)."""
        x = self.code_emb(code + self.code_offset[level]) + self.level_pos.weight[level + 1]
        return self.decode_step(self.drop(x).unsqueeze(1), cache)

    # ---- training --------------------------------------------------------------------------------------------
    def path_log_probs(self, ctx: torch.Tensor, codes: torch.Tensor, with_entropy: bool = False):
        """Teacher forcing through the trie: ctx (R, d), codes (R, D) raw codes of real items -> the constrained
        log-probability of each code given its prefix (R, D) (a level's softmax is over the prefix's valid children),
        the decoder state of each prefix (R, D, d) (position l: the first l codes), and with_entropy, the entropy of
        each level's constrained distribution (R, D)."""
        assert self.trie is not None, "path_log_probs: build the model with the trie"
        states = self.decode_all(ctx, codes[:, :-1])
        node = torch.zeros(len(codes), dtype=torch.long, device=codes.device)  # trie root
        logps, entropies = [], []
        for lv in range(self.depth):
            children = self.trie.child_table(node, self.vocab_sizes[lv])
            logits = self.level_logits(states[:, lv], lv, node).masked_fill(children < 0, float("-inf"))
            logp = logits.log_softmax(-1)
            logps.append(logp.gather(1, codes[:, lv: lv + 1])[:, 0])
            if with_entropy:
                entropies.append(-(logp.exp() * logp.masked_fill(children < 0, 0.0)).sum(1))
            node = children.gather(1, codes[:, lv: lv + 1])[:, 0]
        if with_entropy:
            return torch.stack(logps, 1), states, torch.stack(entropies, 1)
        return torch.stack(logps, 1), states

    def forward(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        """windows: (B, T + 1) catalog rows, -1 left padding. Next-item cross-entropy over every SID level, summed
        over levels and averaged over all valid (history, next item) pairs."""
        inputs, targets = windows[:, :-1], windows[:, 1:]
        valid = (inputs >= 0) & (targets >= 0)
        encoded = self.encode_history(inputs)  # (B, T, d)
        h = encoded[valid]  # (M, d)
        target_codes = self.item_codes[targets[valid]] - self.code_offset  # (M, D) raw codes
        if self.cfg.constrained_loss:  # each level's softmax over the trie-valid children only
            losses = -self.path_log_probs(h, target_codes)[0].mean(0)
        else:
            states = self.decode_all(h, target_codes[:, :-1])  # (M, D, d)
            losses = torch.stack([F.cross_entropy(self.level_logits(states[:, lv], lv), target_codes[:, lv])
                                  for lv in range(self.depth)])
        out = {"loss": losses.sum(), "level_losses": losses.detach(), "pairs": torch.tensor(int(valid.sum()))}
        if self.cfg.item_loss:
            item_loss = sampled_softmax_loss(encoded, targets, valid, self.item_emb, self.cfg.item_negatives)
            out["loss"] = out["loss"] + self.cfg.item_loss * item_loss
            out["item_loss"] = item_loss.detach()
        return out

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Weights as safetensors, with the config in the file's metadata so one file is the whole model."""
        meta = {"genrec": json.dumps({"config": self.cfg.model_dump(), "vocab_sizes": list(self.vocab_sizes)})}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp), meta)

    @classmethod
    def load(cls, path: Path, item_codes: torch.Tensor, trie: Trie | None = None,
             device: str = "cpu") -> "Recommender":
        path = Path(path)
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["genrec"])
        # A model saved before the positions option counted history positions from the oldest item.
        cfg = RecommenderConfig(**{"positions": "oldest", **meta["config"]})
        model = cls(cfg, tuple(meta["vocab_sizes"]), item_codes, trie)
        model.load_state_dict(load_file(str(path), device=device))
        return model.to(device).eval()
