"""What one rank of a multi-node run holds: its shard of the users (`load_dataset(shard=)`), and where its rows stand
among every rank's, so that batches, validation samples and so the weights do not depend on the number of ranks.

Each rank derives its rows (training windows, (history, next items) pairs, validation users) from its own users. Keys
made of the user's position in the whole dataset put every rank's rows into the one order a single process has; the
keys travel through the process group, never through a shared disk."""

from __future__ import annotations

import numpy as np

from genrec.core.data import Dataset, Split, eval_split, seeded_subset
from genrec.training.loop import Dist, gather_objects, global_rows


def row_keys(ds: Dataset, users: np.ndarray) -> np.ndarray:
    """(n, 2) keys of rows made user by user (e.g. train_pairs): the user's position in the whole dataset, then the
    row's rank within its user. `users` are the rows' sequence indices in `ds`, ascending."""
    nth = np.arange(len(users)) - np.searchsorted(users, users)
    return np.stack([ds.positions[users], nth], 1)


class RowShard:
    """This rank's rows among every rank's: global row numbers (the order of the keys) -> this rank's row indices.
    A task passes it to the loop as `local_rows`, and draws its batches over `n` rows."""

    def __init__(self, keys: np.ndarray, d: Dist):
        lengths, self.local = global_rows(keys, np.ones(len(keys), dtype=np.int64), d)
        self.n = len(lengths)
        mine = np.flatnonzero(self.local >= 0)
        self.global_index = np.empty(len(keys), dtype=np.int64)  # this rank's row -> its global row number
        self.global_index[self.local[mine]] = mine

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        mine = self.local[rows]
        return mine[mine >= 0]


def sample_mask(positions: np.ndarray, n: int | None, seed: int, d: Dist) -> np.ndarray:
    """Which of this rank's examples (at these dataset positions, ascending) belong to the one seeded sample of n
    drawn over every rank's examples: the sample one process draws (seeded_subset), split by owner."""
    if n is None:
        return np.ones(len(positions), dtype=bool)
    every = np.sort(np.concatenate(gather_objects(positions, d)))
    return np.isin(positions, every[seeded_subset(len(every), n, seed)])


def validation_shard(ds: Dataset, max_history: int, n: int | None, seed: int, d: Dist) -> Split:
    """This rank's users of the validation split, among one seeded sample of n users of the whole split."""
    valid = eval_split(ds, "valid", max_history)
    eligible = ds.positions[[len(s) >= 3 for s in ds.sequences]]  # eval_split keeps these users, in this order
    keep = sample_mask(eligible, n, seed, d)
    return Split(valid.users[keep], valid.histories[keep], valid.targets[keep])
