"""The embedder exported to ONNX and run by onnxruntime (`--backend onnx`): same tokenizer, prompt and pooling as the
torch backend, so the two agree to float precision. Encoder backbones only (the default MiniLM among them): the
legacy exporter bakes the batch size into the causal-mask code of transformers 5's decoder LMs, so Qwen2 and Qwen2-VL
serve on torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from genrec.core.atomic import atomic_path
from genrec.core.config import EmbedderConfig
from genrec.models.embedder import (Embedder, EmbedInput, PromptTokenizer, Role, backbone_dir, backbone_kind,
                                    encode_batches, pool)

ONNX_FILE = "embedder.onnx"  # the exported embedder's name inside a bundle
INPUTS = ("input_ids", "attention_mask", "position_ids")


class _Graph(torch.nn.Module):
    """What is exported: token ids -> pooled unit-norm embedding. The model is called by keyword (transformers 5's
    forward signatures do not take these positionally)."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        self.model, self.pooling = embedder.model, embedder.pooling

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)


def export_onnx(embedder: Embedder, path: str | Path, opset: int = 17) -> Path:
    """Write the embedder's text path to `path` (atomically)."""
    if embedder.kind != "encoder":
        raise ValueError(f"ONNX export covers encoder backbones such as MiniLM; {embedder.cfg.backbone!r} is a "
                         f"{embedder.kind} model: serve it with --backend torch")
    example = embedder.inputs.batch([EmbedInput("an example input"), EmbedInput("a second, longer example input")],
                                    "query", truncate=True)
    graph = _Graph(embedder).float().eval()
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUTS}
    with atomic_path(Path(path)) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on shapes; the parity test checks the graph generalises
        torch.onnx.export(graph, tuple(example[k] for k in INPUTS), str(tmp), input_names=list(INPUTS),
                          output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return Path(path)


class OnnxEmbedder:
    """The Embedder interface (encode, dim, kind, accepts_images) over an onnxruntime session."""

    accepts_images = False

    def __init__(self, cfg: EmbedderConfig, onnx_path: str | Path, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoConfig

        path = backbone_dir(cfg.backbone)
        config = AutoConfig.from_pretrained(path)
        self.cfg, self.kind, self.dim = cfg, backbone_kind(config), int(config.hidden_size)
        self.inputs = PromptTokenizer(path, cfg, self.kind)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=providers or ort.get_available_providers())

    def _forward(self, batch: dict) -> np.ndarray:
        return self.session.run(None, {k: batch[k].numpy() for k in INPUTS})[0]

    def encode(self, inputs: Sequence[str | EmbedInput], role: Role = "query", truncate: bool = False,
               progress: bool = False) -> np.ndarray:
        return encode_batches(self.inputs, self._forward, self.dim, inputs, role, truncate, self.cfg.batch_size,
                              progress)
