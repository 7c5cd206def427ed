"""Which tables a file was made from: a short fingerprint of the three tables' content.

The demo generator stores it in its truth file (demo_data.GroundTruth); the evaluation uses that truth
(the oracle, the online value) only on the tables it was generated with, and ignores it with a note on
any other data, such as a user's own tables in the same folder. Cheap at 10M feed rows: row counts, the
sorted user and post ids, and order-independent sums over the feed (a table's row order is not
guaranteed, and the import sorts the feed).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from times import to_seconds


def tables_fingerprint(users: pd.DataFrame, posts: pd.DataFrame, feed: pd.DataFrame) -> str:
    """A hex digest that changes when a user, a post or the feed's rows change (not their order)."""
    digest = hashlib.sha256()
    for ids in (users["user_id"], posts["post_id"]):
        digest.update(np.sort(ids.to_numpy(dtype=np.int64)).tobytes())
    seconds = to_seconds(feed["timestamp"])
    likes = (feed["action"].astype(str) == "like").to_numpy()
    sums = [
        len(users),
        len(posts),
        len(feed),
        int(likes.sum()),
        int(seconds.sum()),
        int(feed["user_id"].to_numpy(dtype=np.int64).sum()),
        int(feed["post_id"].to_numpy(dtype=np.int64).sum()),
        int((seconds * feed["post_id"].to_numpy(dtype=np.int64) % 1_000_003).sum()),
    ]
    digest.update(np.asarray(sums, dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]
