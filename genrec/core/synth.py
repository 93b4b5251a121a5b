"""A seeded synthetic catalog and user sequences with learnable behaviour, for the demo bundle and the fast tests.

Items belong to a two-level category tree and have titles built from words of their category, so a text embedder
places them near their category. Users prefer two leaf categories and move through the catalog by a Markov chain:
after an item they most often take one of its few fixed "follow-up" items (same brand line or a complementary
category), otherwise an item from a preferred category, rarely a popular one. A sequential model can learn the
follow-ups; popularity cannot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from genrec.core.atomic import atomic_file

TREE = {
    "Makeup": {"Lipstick": "lip colour stick", "Mascara": "lash mascara volume", "Foundation": "liquid foundation cover",
               "Nail Polish": "nail lacquer polish"},
    "Skin Care": {"Moisturizer": "hydrating face cream", "Serum": "vitamin serum drops", "Sunscreen": "spf sun lotion",
                  "Cleanser": "foaming face wash"},
    "Hair": {"Shampoo": "hair shampoo wash", "Conditioner": "hair conditioner rinse", "Styling": "styling gel spray",
             "Hair Color": "permanent hair dye"},
    "Fragrance": {"Perfume": "eau de parfum", "Body Mist": "body mist spray", "Cologne": "men cologne scent",
                  "Candle": "scented soy candle"},
    "Tools": {"Brushes": "makeup brush set", "Mirrors": "lighted vanity mirror", "Dryers": "ionic hair dryer",
              "Tweezers": "slant tip tweezers"},
    "Bath": {"Soap": "bar soap natural", "Bath Bomb": "fizzy bath bomb", "Scrub": "sugar body scrub",
             "Lotion": "body lotion daily"},
}
BRANDS = ["Lumina", "Verde", "Aurora", "Noble", "Petal", "Coral", "Saffron", "Onyx", "Willow", "Mistral", "Juniper",
          "Solace"]
ADJECTIVES = ["Classic", "Ultra", "Gentle", "Radiant", "Pure", "Bold", "Silk", "Fresh", "Deep", "Velvet", "Matte",
              "Glow"]


def generate(n_items: int = 600, n_users: int = 2000, seed: int = 0, min_len: int = 5, max_len: int = 20):
    """Returns (items, sequences): item dicts in the genrec items.jsonl format and {user_id: [item_id, ...]}."""
    rng = np.random.default_rng(seed)
    leaves = [(top, leaf, words) for top, subs in TREE.items() for leaf, words in subs.items()]
    leaf_of = rng.integers(0, len(leaves), n_items)
    items = []
    for i in range(n_items):
        top, leaf, words = leaves[leaf_of[i]]
        brand, adj = BRANDS[rng.integers(len(BRANDS))], ADJECTIVES[rng.integers(len(ADJECTIVES))]
        shade = int(rng.integers(1, 99))
        items.append({"item_id": i + 1, "title": f"{brand} {adj} {words.title()} No. {shade}",
                      "categories": [["Beauty", top, leaf]]})

    by_leaf = [np.flatnonzero(leaf_of == c) for c in range(len(leaves))]
    partner = rng.permutation(len(leaves))  # each leaf category has a complementary one
    # Fixed follow-ups: two in the same leaf, one in the partner leaf.
    follow = np.zeros((n_items, 3), dtype=np.int64)
    for i in range(n_items):
        same, other = by_leaf[leaf_of[i]], by_leaf[partner[leaf_of[i]]]
        follow[i, :2] = rng.choice(same, 2)
        follow[i, 2] = rng.choice(other) if len(other) else rng.choice(same)
    popularity = rng.zipf(1.6, n_items).astype(float)
    popularity /= popularity.sum()
    # rng.choice(n_items, p=popularity) builds this CDF on every call (O(N) each, hours at a million items); the same
    # draw from one CDF built once: the same random stream, the same sample.
    cdf = popularity.cumsum()
    cdf /= cdf[-1]

    sequences = {}
    for u in range(n_users):
        liked = rng.choice(len(leaves), 2, replace=False)
        length = int(rng.integers(min_len, max_len + 1))
        seq = [int(rng.choice(by_leaf[liked[0]]))] if len(by_leaf[liked[0]]) else [int(rng.integers(n_items))]
        while len(seq) < length:
            r, cur = rng.random(), seq[-1]
            if r < 0.6:
                nxt = int(follow[cur, rng.integers(3)])
            elif r < 0.85 and len(by_leaf[liked[rng.integers(2)]]):
                nxt = int(rng.choice(by_leaf[liked[rng.integers(2)]]))
            else:
                nxt = int(cdf.searchsorted(rng.random(), side="right"))
            if nxt not in seq:  # like the Amazon 5-core data: no repeats within a user
                seq.append(nxt)
        sequences[u + 1] = [s + 1 for s in seq]
    return items, sequences


VECTORS_FILE = "item_vectors.npy"


def item_vectors(items: list[dict], dim: int, seed: int = 0) -> np.ndarray:
    """Vectors that stand in for a text embedder's (`genrec build --vectors`): a direction per leaf category, brand
    and adjective, plus noise, so items cluster by category as embedded titles do. (N, dim) unit-norm float32."""
    rng = np.random.default_rng(seed + 7919)
    parts = [[it["categories"][0][-1] for it in items], [it["title"].split()[0] for it in items],
             [it["title"].split()[1] for it in items]]
    vectors = 0.25 * rng.standard_normal((len(items), dim))
    for weight, names in zip([1.0, 0.5, 0.3], parts):
        kinds, of = np.unique(names, return_inverse=True)
        vectors += weight * rng.standard_normal((len(kinds), dim))[of]
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def write(folder: str | Path, n_items: int = 600, n_users: int = 2000, seed: int = 0, vector_dim: int = 0) -> Path:
    folder = Path(folder)
    items, sequences = generate(n_items, n_users, seed)
    if vector_dim:
        with atomic_file(folder / VECTORS_FILE, "wb") as f:
            np.save(f, item_vectors(items, vector_dim, seed))
    with atomic_file(folder / "items.jsonl") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    with atomic_file(folder / "sequential_data.txt") as f:
        for u, seq in sequences.items():
            f.write(" ".join(map(str, [u, *seq])) + "\n")
    return folder
