"""The model bundle: one directory with everything the server needs, written atomically, described by a manifest.

  manifest.json          format version, preset, library versions, dataset summary, SID stats, file hashes, metrics
  catalog.jsonl          item_id, title, text, categories (the order defines catalog rows)
  item_vectors.npy       (N, D) float32 unit-norm item vectors from the embedder
  index.faiss            FAISS index over the item vectors (inner product)
  semantic_ids.npz       codes (N, L) or (N, L+1) with a collision code, codebooks (L, K, D), vocab_sizes
  recommender.safetensors (+ .json)           after `genrec train sft`
  baselines/sasrec.safetensors (+ .json)      after `genrec train sasrec`

A new version of a bundle is a new directory (unchanged files hard-linked) that replaces the old one by rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from genrec import __version__
from genrec.core.atomic import atomic_dir
from genrec.core.config import Preset
from genrec.core.data import Catalog, Item

FORMAT_VERSION = 1


class BundleError(ValueError):
    """A bundle that is missing, incomplete or inconsistent; the message says what to run."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import faiss
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "genrec": __version__}


def write_catalog(path: Path, catalog: Catalog) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in catalog.items:
            f.write(json.dumps({"item_id": it.item_id, "title": it.title, "text": it.text,
                                "categories": list(it.categories), "image": it.image}) + "\n")


def read_catalog(path: Path) -> Catalog:
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            items.append(Item(r["item_id"], r["title"], tuple(r["categories"]), r["text"], r.get("image")))
    return Catalog(items)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.exists():
        raise BundleError(f"{path} is not a bundle (no manifest.json): create one with "
                          f"`genrec build --data DATASET --out {path}`")
    m = json.loads(manifest.read_text())
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format {m.get('format_version')} is not {FORMAT_VERSION}; rebuild it")
    return m


def write_bundle(path: str | Path, manifest: dict, writers: dict[str, Callable[[Path], None]],
                 base: str | Path | None = None, drop: tuple[str, ...] = ()) -> dict:
    """Write a bundle atomically. `writers` maps relative file names to functions that write them; files of `base`
    (an existing bundle) not named in `writers` or `drop` are carried over by hard link. Returns the manifest."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        files = {}
        if base is not None:
            old = read_manifest(base)
            for name in old["files"]:
                if name not in writers and name not in drop:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    _link_or_copy(Path(base) / name, tmp / name)
                    files[name] = old["files"][name]
        for name, write in writers.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            write(tmp / name)
            files[name] = sha256(tmp / name)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "files": dict(sorted(files.items())),
                    "libraries": library_versions(), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2)
    return manifest


def update_bundle(path: str | Path, writers: dict[str, Callable[[Path], None]], drop: tuple[str, ...] = (),
                  **manifest_updates) -> dict:
    """A new version of bundle `path` with some files replaced or added, the files in `drop` removed, and manifest
    keys updated (dicts are merged; a None value inside one removes that key)."""
    old = read_manifest(path)
    manifest = {k: v for k, v in old.items() if k not in ("files", "libraries", "written_at")}
    manifest["version"] = int(old.get("version", 1)) + 1
    for key, value in manifest_updates.items():
        if isinstance(value, dict):
            merged = {**manifest.get(key, {}), **value}
            manifest[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            manifest[key] = value
    return write_bundle(path, manifest, writers, base=path, drop=drop)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class Bundle:
    """A loaded bundle: catalog, vectors, semantic IDs and the preset. The models it holds are built from its files
    by genrec.models.loading (this layer knows no model code)."""

    path: Path
    manifest: dict
    catalog: Catalog
    item_vectors: np.ndarray
    codes: np.ndarray
    codebooks: np.ndarray
    vocab_sizes: tuple[int, ...]

    @property
    def preset(self) -> Preset:
        preset = dict(self.manifest["preset"])
        if "prompt" not in preset.get("embedder", {"prompt": None}):  # written before prompts existed: none used
            preset["embedder"] = {**preset["embedder"], "prompt": False}
        return Preset.model_validate(preset)

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    @classmethod
    def load(cls, path: str | Path, verify: bool = False) -> "Bundle":
        path = Path(path)
        manifest = read_manifest(path)
        for name, digest in manifest["files"].items():
            if not (path / name).exists():
                raise BundleError(f"{path}: {name} is listed in the manifest but missing; rebuild the bundle")
            if verify and sha256(path / name) != digest:
                raise BundleError(f"{path}: {name} does not match its manifest hash; rebuild the bundle")
        sid = np.load(path / "semantic_ids.npz")
        return cls(path, manifest, read_catalog(path / "catalog.jsonl"), np.load(path / "item_vectors.npy"),
                   sid["codes"], sid["codebooks"], tuple(int(v) for v in sid["vocab_sizes"]))

    def check_catalog(self, ds) -> None:
        """Raise unless dataset `ds` has this bundle's catalog, in the same order (rows must mean the same items)."""
        if not np.array_equal(ds.catalog.ids, self.catalog.ids):
            raise BundleError(f"dataset {ds.name} does not hold the catalog of bundle {self.path}: use the dataset "
                              "the bundle was built from, or rebuild the bundle with `genrec build`")
