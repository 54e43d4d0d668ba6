"""A built-in synthetic dataset of heterogeneous users, so that everything runs on a fresh machine.

Users belong to latent groups. Each group walks the catalogue along its own hidden cycle (a
permutation of the items): mostly the next item of the cycle, sometimes one further, sometimes a random
item. Different groups order the same items differently, so the next item depends on *who* the user is
as well as on the last item — the situation instance-wise adaptation is meant for. Titles are made of
words so that a language model can read them.
"""

from __future__ import annotations

import numpy as np

from ..source import SourceData, splits_from_sequences

_ADJECTIVES = (
    "Amber Silent Crimson Hollow Golden Quiet Electric Velvet Broken Distant Frozen Wild Lunar Rusty "
    "Paper Neon Hidden Gentle Iron Silver Burning Lost Midnight Northern Painted Sleeping Wandering"
).split()
_NOUNS = (
    "Harbor River Garden Engine Mirror Forest Signal Lantern Orchard Canyon Station Voyage Meadow Tower "
    "Comet Island Chorus Bridge Desert Archive Circus Empire Falcon Glacier Horizon Jungle Kingdom"
).split()

MIN_ITEMS = 20  # a history window holds 10 distinct items: fewer items would leave no next item to draw
MAX_ITEMS = len(_ADJECTIVES) * len(_NOUNS)  # one distinct two-word title per item
# Users are generated one by one in Python: 100,000 take 18 s and 1.5 GB to prepare on a 2-core CPU
# (10,000,000 did not finish); beyond that a real dataset is the better test.
MAX_USERS = 100_000

# transition probabilities: next item of the group's cycle, the one after it, a uniformly random item
P_STEP, P_SKIP = 0.75, 0.15


def generate(n_users: int, n_items: int, n_groups: int, seed: int, min_len: int = 8, max_len: int = 24):
    """Return (titles, sequences, groups) for a synthetic catalogue and its users."""
    rng = np.random.default_rng(seed)
    words = [f"{a} {n}" for a in _ADJECTIVES for n in _NOUNS]
    if n_items > len(words):
        raise ValueError(f"at most {len(words)} synthetic items")
    titles = [words[i] for i in rng.choice(len(words), size=n_items, replace=False)]
    cycles = [rng.permutation(n_items) for _ in range(n_groups)]  # group g visits cycles[g][0], [1], ...
    position = [np.argsort(c) for c in cycles]  # position[g][item] = index of item in cycles[g]
    groups = rng.integers(0, n_groups, size=n_users)
    sequences = []
    for u in range(n_users):
        g = groups[u]
        length = int(rng.integers(min_len, max_len + 1))
        item = int(rng.integers(n_items))
        seq = [item]
        while len(seq) < length:
            r = rng.random()
            if r < P_STEP + P_SKIP:
                step = 1 if r < P_STEP else 2
                item = int(cycles[g][(position[g][item] + step) % n_items])
            else:
                item = int(rng.integers(n_items))
            if item in seq[-10:]:
                continue  # no repeats inside one history window, like the real data
            seq.append(item)
        sequences.append(np.array(seq, dtype=np.int64))
    return titles, sequences, groups


def load(config) -> SourceData:
    titles, sequences, groups = generate(
        config.synthetic_users, config.synthetic_items, config.synthetic_groups, config.seed
    )
    splits = splits_from_sequences(sequences, len(titles), seed=config.seed, max_history=config.max_history)
    return SourceData(
        titles=titles,
        splits=splits,
        domain="generic",
        n_users=len(sequences),
        source={
            "format": "synthetic",
            "users": config.synthetic_users,
            "items": config.synthetic_items,
            "groups": config.synthetic_groups,
            "split_seed": config.seed,
            "p_step": P_STEP,
            "p_skip": P_SKIP,
        },
    )
