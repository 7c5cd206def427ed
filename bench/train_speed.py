"""Training speed on DATABASE_URL (meant for the full demo): where an epoch's time goes.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/bench python bench/train_speed.py [--json]

Times each stage the pipeline runs (load the tables, embed, autoencoder, features), then one epoch of
TRAIN_SAMPLE views per objective, and a per-step breakdown (building the batch, forward, backward and
optimiser step; medians over --profile-steps steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--objectives", nargs="+", default=["bce", "joint"], choices=["bce", "softmax", "joint"]
    )
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import torch

    import main_script
    from learn_model import bce_loss, train_autoencoder, train_two_tower
    from model import make_user_batch
    from settings import Settings

    settings = Settings()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    users, posts, feed = main_script.load_tables(settings, progress=False)
    seconds["load_tables"] = time.perf_counter() - clock
    clock = time.perf_counter()
    embeddings = main_script.embed_stage(settings, posts, progress=False)
    seconds["embed"] = time.perf_counter() - clock
    clock = time.perf_counter()
    _, codes, _ = train_autoencoder(embeddings, code_dim=settings.text_dim, progress=False)
    seconds["autoencoder"] = time.perf_counter() - clock
    clock = time.perf_counter()
    data = main_script.make_dataset(settings, users, posts, feed)
    seconds["features"] = time.perf_counter() - clock

    epochs = {}
    for objective in args.objectives:
        history = train_two_tower(
            main_script.new_model(settings, data, codes, objective=objective),
            users=data.users,
            histories=data.histories,
            views=data.train_views,
            likes=data.train_likes,
            objective=objective,
            epochs=1,
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
            seed=settings.seed,
            progress=False,
        )
        epochs[objective] = {"epoch_s": history[0]["seconds"], "samples_per_s": history[0]["samples_per_s"]}
        print(f"{objective}: {epochs[objective]}", file=sys.stderr, flush=True)

    model = main_script.new_model(settings, data, codes, objective="bce")
    optimizer = torch.optim.AdamW(model.parameters())
    rng = np.random.default_rng(0)
    steps = []
    for _ in range(args.profile_steps):
        part = data.train_views.subset(rng.choice(len(data.train_views), settings.batch_size, replace=False))
        t0 = time.perf_counter()
        batch = make_user_batch(data.users, data.histories, part.user_rows, part.times, model.config)
        t1 = time.perf_counter()
        loss = bce_loss(model, batch, torch.from_numpy(part.post_rows), torch.from_numpy(part.labels))
        t2 = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    batch_s, forward_s, backward_s = np.median(np.array(steps), axis=0)
    result = {
        "feed_rows": len(feed),
        "train_views": len(data.train_views),
        "train_likes": len(data.train_likes),
        "stages_s": seconds,
        "epoch": epochs,
        "step_ms": {
            "batch": batch_s * 1e3,
            "forward": forward_s * 1e3,
            "backward_and_step": backward_s * 1e3,
        },
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
