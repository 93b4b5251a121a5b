"""Datasets in the genrec folder format, validated on read, with leave-one-out splits (TIGER / P5 protocol).

A dataset folder holds:
  items.jsonl           one item a line: {"item_id": int, "title": str, "categories": [[...path...]] | [...],
                        "genres": [...], "text": str, "image": path}  (only item_id is required). Optional: without
                        it, or when no item has a title or text, the catalog is the items of the interactions and
                        has no text (bundles then tokenize items from behaviour alone)
  sequential_data.txt   one user a line: `user_id item_id item_id ...`, items in time order
  or interactions.csv   `user,item,timestamp` rows (a header row is allowed), ordered by timestamp per user
"""

from __future__ import annotations

import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_HISTORY = 20
SPLIT_CUT = {"test": 1, "valid": 2}  # leave-one-out: how many items from the end a split's target is


class DatasetError(ValueError):
    """Bad input in a dataset file: the message names the file, the line and the fix."""

    def __init__(self, path: Path | str, line: int | None, problem: str, fix: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class Item:
    item_id: int
    title: str
    categories: tuple[str, ...]  # the first category path, root first
    text: str  # what the embedder reads: title (HTML-unescaped) + category path
    image: str | None = None


@dataclass
class Catalog:
    """Items in a fixed order; `index[item_id]` is the row of an item in every per-item array."""

    items: list[Item]
    has_text: bool = True  # False: no item has a title or text of its own (ids and interactions only)
    index: dict[int, int] = field(init=False)

    def __post_init__(self):
        self.index = {it.item_id: i for i, it in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> np.ndarray:
        return np.array([it.item_id for it in self.items], dtype=np.int64)

    def rows(self, item_ids) -> np.ndarray:
        """Rows of known item ids; raises KeyError naming the unknown ones."""
        unknown = [i for i in item_ids if i not in self.index]
        if unknown:
            raise KeyError(f"unknown item ids: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        return np.array([self.index[i] for i in item_ids], dtype=np.int64)


def _category_path(record: dict) -> tuple[str, ...]:
    cats = record.get("categories") or record.get("genres") or []
    if cats and isinstance(cats[0], list):  # Amazon: a list of paths; the first is the main one
        cats = cats[0]
    return tuple(str(c) for c in cats)


def item_text(title: str, categories: tuple[str, ...], extra: str = "") -> str:
    parts = [title] if title else []
    if categories:
        parts.append(" > ".join(categories))
    if extra:
        parts.append(extra)
    return " | ".join(parts)


def read_items(path: Path) -> Catalog:
    items, seen, described = [], set(), False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(path, n, f"not valid JSON ({e.msg})", "write one JSON object per line") from None
            if not isinstance(rec, dict) or "item_id" not in rec:
                raise DatasetError(path, n, "no 'item_id' field", 'give every item an integer "item_id"')
            try:
                item_id = int(rec["item_id"])
            except (TypeError, ValueError):
                raise DatasetError(path, n, f"item_id {rec['item_id']!r} is not an integer",
                                   "use non-negative integer item ids") from None
            if item_id < 0:
                raise DatasetError(path, n, f"item_id {item_id} is negative", "use non-negative integer item ids")
            if item_id in seen:
                raise DatasetError(path, n, f"item_id {item_id} appears twice", "keep one record per item")
            seen.add(item_id)
            cats = _category_path(rec)
            title = html.unescape(str(rec.get("title") or "")).strip()
            extra = html.unescape(str(rec.get("text") or "")).strip()
            described = described or bool(title or extra)
            if not title:  # 7 Beauty items have no title: fall back to the category path, then the ASIN
                title = " ".join(cats[-2:]) if cats else str(rec.get("asin") or f"item {item_id}")
            items.append(Item(item_id, title, cats, item_text(title, cats, extra), rec.get("image")))
    if not items:
        raise DatasetError(path, None, "no items", "add at least one item record")
    return Catalog(items, has_text=described)


def catalog_of_ids(item_ids) -> Catalog:
    """A catalog without text: one item per id, in ascending order."""
    return Catalog([Item(int(i), f"item {int(i)}", (), "") for i in sorted(set(item_ids))], has_text=False)


def read_item_vectors(path: str | Path, catalog: Catalog) -> np.ndarray:
    """Precomputed item vectors (`genrec build --vectors`): an .npy of (N, D) rows in the catalog's order (the order
    of items.jsonl), or a .safetensors file with `vectors` (N, D) and, optionally, `item_ids` (N,) that match rows to
    items by id. -> (N, D) unit-norm float32 in catalog order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, None, "no such file", "pass an .npy or .safetensors file of item vectors")
    if path.suffix == ".npy":
        try:
            vectors, ids = np.load(path, allow_pickle=False), None
        except ValueError as e:
            raise DatasetError(path, None, f"not a numeric .npy array ({e})",
                               "save a float array with np.save") from None
    elif path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DatasetError(path, None, f"not a safetensors file ({e})", "write it with safetensors") from None
        if "vectors" not in arrays:
            raise DatasetError(path, None, f"no 'vectors' tensor (found {sorted(arrays)})",
                               "store the (N, D) vectors under the name 'vectors'")
        vectors, ids = arrays["vectors"], arrays.get("item_ids")
    else:
        raise DatasetError(path, None, f"unknown vector file type {path.suffix!r}", "use .npy or .safetensors")
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
        raise DatasetError(path, None, f"vectors of shape {vectors.shape} and type {vectors.dtype}",
                           "store a 2-D float array, one row per item")
    if ids is not None:
        ids = np.asarray(ids).astype(np.int64).reshape(-1)
        if len(ids) != len(vectors) or len(np.unique(ids)) != len(ids):
            raise DatasetError(path, None, "item_ids must name each row's item once",
                               "store one distinct id per vector row")
        missing = catalog.ids[~np.isin(catalog.ids, ids)].tolist()
        if missing:
            raise DatasetError(path, None, f"no vector for {len(missing)} catalog items (e.g. {missing[:5]})",
                               "give every item of the catalog a vector")
        order = {int(i): r for r, i in enumerate(ids)}
        vectors = vectors[[order[int(i)] for i in catalog.ids]]
    elif len(vectors) != len(catalog):
        raise DatasetError(path, None, f"{len(vectors)} vector rows for {len(catalog)} catalog items",
                           "write one row per item in the catalog's order, or a safetensors file with item_ids")
    vectors = vectors.astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if len(bad):
        raise DatasetError(path, None, f"{len(bad)} rows are zero or not finite (items "
                           f"{catalog.ids[bad[:5]].tolist()})", "give every item a finite, non-zero vector")
    return vectors / norms


def _why_unknown(known) -> str:
    return "item ids are non-negative integers" if isinstance(known, _AnyItem) else "not in items.jsonl"


class _AnyItem:
    """Stands in for the catalog while reading the interactions of a dataset without items.jsonl: every
    non-negative id is an item."""

    def __contains__(self, item_id: int) -> bool:
        return item_id >= 0


def _read_sequences_txt(path: Path, known) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            try:
                ids = [int(t) for t in tokens]
            except ValueError:
                bad = next(t for t in tokens if not t.lstrip("-").isdigit())
                raise DatasetError(path, n, f"token {bad!r} is not an integer id",
                                   "write `user_id item_id item_id ...` with integer ids separated by spaces") from None
            user, seq = ids[0], ids[1:]
            if not seq:
                raise DatasetError(path, n, f"user {user} has an empty sequence",
                                   "remove the line or add the user's items after the user id")
            unknown = [i for i in seq if i not in known]
            if unknown:
                raise DatasetError(path, n, f"unknown item id {unknown[0]} ({_why_unknown(known)})",
                                   "add the item to items.jsonl or drop it from the sequence")
            if user in users:
                raise DatasetError(path, n, f"user {user} appears twice", "keep one line per user")
            users[user] = seq
    return users


def _read_interactions_csv(path: Path, known) -> dict[int, list[int]]:
    rows: dict[int, list[tuple[float, int, int]]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or (n == 1 and not row[0].strip().lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 3:
                raise DatasetError(path, n, f"expected 3 fields, got {len(row)}", "write `user,item,timestamp` rows")
            try:
                user, item, ts = int(row[0]), int(row[1]), float(row[2])
            except ValueError:
                raise DatasetError(path, n, f"cannot parse {row[:3]}",
                                   "user and item must be integers, timestamp a number") from None
            if item not in known:
                raise DatasetError(path, n, f"unknown item id {item} ({_why_unknown(known)})",
                                   "add the item to items.jsonl or drop the row")
            rows.setdefault(user, []).append((ts, n, item))
    return {u: [item for _, _, item in sorted(r)] for u, r in rows.items()}


@dataclass
class Dataset:
    """A catalog and per-user item sequences (as catalog rows, time order)."""

    name: str
    catalog: Catalog
    users: np.ndarray  # (U,) user ids
    sequences: list[np.ndarray]  # U arrays of catalog rows
    shard: tuple[int, int] = (0, 1)  # (rank, world): these are the users at positions rank, rank + world, ...

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def positions(self) -> np.ndarray:
        """Each user's position among all users of the dataset (ascending ids), whatever the shard."""
        rank, world = self.shard
        return np.arange(len(self.users), dtype=np.int64) * world + rank


def load_dataset(folder: str | Path, shard: tuple[int, int] = (0, 1)) -> Dataset:
    """shard (rank, world): keep every world-th user from the rank-th on (users in ascending id order), as each rank
    of a multi-node training run does; the catalog is always whole."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, None, "not a directory", "pass the dataset folder (with items.jsonl)")
    items_path = folder / "items.jsonl"
    catalog = read_items(items_path) if items_path.exists() else None
    known = catalog.index if catalog is not None else _AnyItem()
    if (folder / "sequential_data.txt").exists():
        raw = _read_sequences_txt(folder / "sequential_data.txt", known)
    elif (folder / "interactions.csv").exists():
        raw = _read_interactions_csv(folder / "interactions.csv", known)
    else:
        raise DatasetError(folder, None, "no interactions file",
                           "add sequential_data.txt (one user a line) or interactions.csv (user,item,timestamp)")
    if not raw:
        raise DatasetError(folder, None, "no user sequences", "add at least one user with items")
    if catalog is None:
        catalog = catalog_of_ids(i for seq in raw.values() for i in seq)
    rank, world = shard
    users = np.array(sorted(raw), dtype=np.int64)[rank::world]
    sequences = [catalog.rows(raw[u]) for u in users]
    return Dataset(folder.name, catalog, users, sequences, shard)


def seeded_subset(total: int, n: int, seed: int) -> np.ndarray:
    """n of range(total), a seeded draw, ascending: the one sample of validation users every trainer takes."""
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


@dataclass
class Split:
    """Evaluation examples: left-padded histories of catalog rows (-1 = padding) and their targets."""

    users: np.ndarray  # (N,)
    histories: np.ndarray  # (N, MAX_HISTORY) int64, most recent item last, -1 left padding
    targets: np.ndarray  # (N,)
    window: np.ndarray | None = None  # (N, H) the target and the items after it (-1 past the end), where asked

    def sample(self, n: int | None, seed: int = 0) -> "Split":
        """At most n examples, a seeded draw in the original order (None: all of them)."""
        if n is None or n >= len(self.targets):
            return self
        pick = seeded_subset(len(self.targets), n, seed)
        return Split(self.users[pick], self.histories[pick], self.targets[pick],
                     None if self.window is None else self.window[pick])

    def futures(self) -> np.ndarray:
        """(N, H) each example's window, or its target alone (N, 1)."""
        return self.targets[:, None] if self.window is None else self.window


def _pad_left(seqs: list[np.ndarray], length: int) -> np.ndarray:
    out = np.full((len(seqs), length), -1, dtype=np.int64)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s):] = s
    return out


def eval_split(ds: Dataset, split: str, max_history: int = MAX_HISTORY) -> Split:
    """Leave-one-out: test predicts the last item, validation the second to last; users with < 3 items are skipped."""
    if split not in SPLIT_CUT:
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    cut = SPLIT_CUT[split]
    keep = [i for i, s in enumerate(ds.sequences) if len(s) >= 3]
    hist = [ds.sequences[i][: len(ds.sequences[i]) - cut] for i in keep]
    targets = np.array([ds.sequences[i][len(ds.sequences[i]) - cut] for i in keep], dtype=np.int64)
    return Split(ds.users[keep], _pad_left(hist, max_history), targets)


WINDOW = 2  # items in the horizon evaluation's window: the validation and the test item


def window_split(ds: Dataset, max_history: int = MAX_HISTORY) -> Split:
    """The horizon evaluation (DESIGN.md, Rewards): the validation context (all but the last two items) and its window,
    the last two items; no item of the window is in the training part of any sequence. targets = the window's first
    item (the validation target), so next-item metrics of the same lists sit beside the window metrics."""
    split = eval_split(ds, "valid", max_history)
    keep = [i for i, s in enumerate(ds.sequences) if len(s) >= 3]
    window = np.array([ds.sequences[i][-WINDOW:] for i in keep], dtype=np.int64).reshape(len(keep), WINDOW)
    return Split(split.users, split.histories, split.targets, window)


def train_sequences(ds: Dataset, fit: str = "valid") -> list[np.ndarray]:
    """The training part of every user (all items for users too short to evaluate): for a fit selected on the
    validation split, all but the last two items; for the fit evaluated on the test split after it ("test"), all but
    the last one (the validation item joins the training data, the eSASRec / RecTools protocol)."""
    if fit not in SPLIT_CUT:
        raise ValueError(f"fit must be 'valid' or 'test', got {fit!r}")
    cut = SPLIT_CUT[fit]
    return [s[:-cut] if len(s) >= 3 else s for s in ds.sequences]


def seen_items(ds: Dataset, split: str) -> list[np.ndarray]:
    """For each user of eval_split(ds, split), in the same order: every item before the target (the whole history,
    not the model's window), what `--filter-seen` keeps out of the ranking."""
    cut = SPLIT_CUT[split]
    return [s[: len(s) - cut] for s in ds.sequences if len(s) >= 3]


def train_windows(seqs: list[np.ndarray], max_history: int = MAX_HISTORY, with_owner: bool = False):
    """Cut training sequences into windows of max_history + 1 items, so every position from the 2nd on is a target
    once. Returns (W, max_history + 1) left-padded with -1; inputs are [:, :-1] and targets [:, 1:]. with_owner: also
    the index of each window's sequence (W,)."""
    windows, owner = [], []
    span = max_history + 1
    for i, s in enumerate(seqs):
        if len(s) < 2:
            continue
        end = len(s)
        while end >= 2:
            windows.append(s[max(0, end - span): end])
            owner.append(i)
            end -= max_history  # the next window's last item is this window's first input
    out = _pad_left(windows, span)
    return (out, np.array(owner, dtype=np.int64)) if with_owner else out


def popularity(seqs: list[np.ndarray], n_items: int) -> np.ndarray:
    counts = np.zeros(n_items, dtype=np.int64)
    for s in seqs:
        np.add.at(counts, s, 1)
    return counts


def train_pairs(seqs: list[np.ndarray], max_history: int = MAX_HISTORY, horizon: int = 1) -> Split:
    """Every (history, next item) pair of the training sequences, one example each (value fitting and RL contexts):
    the history is the up to max_history items before the target. Users are the sequence indices. horizon > 1: each
    example's window holds the target and the horizon - 1 items after it within the training sequence (-1 past its
    end), what a horizon reward is computed from."""
    users, hist, window = [], [], []
    for u, s in enumerate(seqs):
        for t in range(1, len(s)):
            users.append(u)
            hist.append(s[max(0, t - max_history): t])
            ahead = s[t: t + horizon]
            window.append(np.pad(ahead, (0, horizon - len(ahead)), constant_values=-1))
    window = np.array(window, dtype=np.int64).reshape(len(users), horizon)
    return Split(np.array(users, dtype=np.int64), _pad_left(hist, max_history), window[:, 0].copy(),
                 window if horizon > 1 else None)
