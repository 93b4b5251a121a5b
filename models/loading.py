"""The models a bundle holds, built from its files. The bundle itself (genrec.core.bundle) knows files and arrays
only; everything that constructs a model from them lives here, on the model side of the layers."""

from __future__ import annotations

import faiss
import torch

from genrec.core.bundle import Bundle, BundleError
from genrec.models.decoding import Trie
from genrec.models.index import load_index, on_device
from genrec.models.recommender import Recommender
from genrec.models.sasrec import SASRec
from genrec.models.semantic_ids import PrefixTrie
from genrec.models.value import ValueHead

SASREC_FILE = "baselines/sasrec.safetensors"


def load_trie(bundle: Bundle, device: str = "cpu") -> Trie:
    """The prefix trie of the bundle's semantic IDs, as tensors on `device`."""
    return Trie.from_prefix_trie(PrefixTrie(bundle.codes, bundle.vocab_sizes), device)


def load_recommender(bundle: Bundle, device: str = "cpu", trie: Trie | None = None) -> Recommender:
    """The recommender, holding the trie (`model.trie`, the one copy decoders read; pass `trie` to share one)."""
    if not bundle.has("recommender.safetensors"):
        raise BundleError(f"{bundle.path} has no recommender yet: run "
                          f"`genrec train sft --bundle {bundle.path} --data DATASET`")
    return Recommender.load(bundle.path / "recommender.safetensors", torch.as_tensor(bundle.codes),
                            trie if trie is not None else load_trie(bundle, device), device)


def load_value_head(bundle: Bundle, device: str = "cpu") -> ValueHead:
    if not bundle.has("value.safetensors"):
        raise BundleError(f"{bundle.path} has no value head: run `genrec train value --bundle {bundle.path} "
                          "--data DATASET` (VED decoding and RL need it)")
    return ValueHead.load(bundle.path / "value.safetensors", device)


def load_sasrec(bundle: Bundle, device: str = "cpu") -> SASRec:
    if not bundle.has(SASREC_FILE):
        raise BundleError(f"{bundle.path} has no SASRec baseline: run "
                          f"`genrec train sasrec --bundle {bundle.path} --data DATASET`")
    return SASRec.load(bundle.path / SASREC_FILE, device)


def load_search_index(bundle: Bundle, device: str = "cpu") -> faiss.Index:
    """The FAISS index with the preset's search parameters, on the GPU when `device` is one and FAISS can (see
    genrec.models.index.on_device). Search returns item ids; bundles written before the id map return catalog rows,
    see the server's Engine."""
    return on_device(load_index(bundle.path / "index.faiss", bundle.preset.index), device)
