"""Training on several processes (DistributedDataParallel, gloo on CPU) is training on one.

Two ranks, each on its half of every global batch, must end with identical weights, equal (within
float rounding) to one process trained on the whole batches: the in-batch softmax gathers both ranks'
item vectors, and the losses are scaled so that DDP's averaged gradients are the one-process gradients.
A second test runs the real command, `torchrun --nproc_per_node=2 main_script.py train`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT
from fixtures_model import trained_demo
from torch.nn.parallel import DistributedDataParallel

from features import Dataset, build_dataset
from get_model import load_model_file
from learn_model import TrainConfig, TrainingStep, post_log_frequency, sample_post_stats, train_two_tower
from model import TwoTower, TwoTowerConfig, make_user_batch
from times import DAY_SECONDS

STEPS, BATCH = 4, 64


def problem() -> tuple[TwoTower, object]:
    """A small synthetic feed and a freshly initialised model, identical in every process."""
    rng = np.random.default_rng(0)
    n = 6000
    feed = pd.DataFrame(
        {
            "timestamp": pd.Timestamp("2021-10-01")
            + pd.to_timedelta(np.sort(rng.integers(0, 30 * DAY_SECONDS, n)), unit="s"),
            "user_id": rng.integers(200, 260, n),
            "post_id": rng.integers(1, 41, n),
            "action": np.where(rng.random(n) < 0.2, "like", "view"),
            "target": (rng.random(n) < 0.2).astype(int),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(200, 260),
            "gender": rng.integers(0, 2, 60),
            "age": rng.integers(14, 70, 60),
            "country": "Russia",
            "city": rng.choice(["Moscow", "Kazan", "Omsk"], 60),
            "exp_group": rng.integers(0, 5, 60),
            "os": "iOS",
            "source": "ads",
        }
    )
    posts = pd.DataFrame({"post_id": np.arange(1, 41), "text": "x", "topic": rng.choice(["a", "b", "c"], 40)})
    data = build_dataset(users, posts, feed, test_days=5, train_sample=STEPS * BATCH, seed=0)
    torch.manual_seed(0)
    config = TwoTowerConfig(
        n_posts=40,
        n_topics=len(data.vocabs["topic"]),
        user_cardinalities=[len(data.vocabs[name]) for name in data.vocabs if name != "topic"],
        text_dim=8,
        max_history=6,
        max_likes=3,
        exposure_head=True,
    )
    model = TwoTower(config)
    model.set_post_features(
        np.random.default_rng(1).standard_normal((40, 8)), data.post_topic, data.post_stats
    )
    return model, data


TINY = TrainConfig(epochs=1, batch_size=BATCH, lr=5e-3, history_items_every=0, monitor_train=0, monitor_val=0)


def train(model: TwoTower, data: Dataset) -> None:
    train_two_tower(model, data, TINY, progress=False)


def step_gradients(model: TwoTower, data: Dataset, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The gradients of one training step's loss on the views `rows` (DDP's, averaged, under torchrun)."""
    step = TrainingStep(model, "joint", post_log_frequency(data.train_views.post_rows, 40), 1.0)
    loss_of = DistributedDataParallel(step) if dist.is_initialized() else step
    part = data.train_views.subset(rows)
    batch = make_user_batch(data.users, data.histories, part.user_rows, part.times, model.config)
    stats = sample_post_stats((data.start, data.post_stats_by_day(data.val_cutoff)), part)
    posts, labels = torch.from_numpy(part.post_rows), torch.from_numpy(part.labels)
    loss_of(batch, posts, labels, None, torch.from_numpy(stats)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def rank_main(rank: int, world: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model, data = problem()
        gradients = step_gradients(model, data, np.arange(BATCH)[rank::world])  # its half of a batch
        torch.save(gradients, Path(out) / f"gradients{rank}.pt")
        model, data = problem()
        train(model, data)
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
        for objective in ("softmax", "bce"):  # the other objectives run under DDP too
            model, data = problem()
            config = dataclasses.replace(TINY, objective=objective, batch_size=32, per_day_stats=False)
            train_two_tower(model, data, config, progress=False)
            torch.save(model.state_dict(), Path(out) / f"{objective}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_like_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(rank_main, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    whole = step_gradients(*problem(), np.arange(BATCH))
    for rank in (0, 1):  # the gradient of a step: the strict test (Adam hides a gradient's scale)
        halves = torch.load(tmp_path / f"gradients{rank}.pt", weights_only=True)
        assert halves.keys() == whole.keys()
        for name, gradient in whole.items():
            torch.testing.assert_close(
                halves[name], gradient, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}"
            )
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    alone, data = problem()
    assert len(data.train_views) == STEPS * BATCH
    before = {k: v.clone() for k, v in alone.state_dict().items()}
    train(alone, data)
    for name, value in alone.state_dict().items():
        assert torch.equal(first[name], second[name]), f"the ranks' {name} differ"
        # after 4 AdamW steps: Adam divides by the gradient's size, so float32 rounding of the smallest
        # gradients (~1e-7 here) moves a weight by up to ~1.3e-4, against 5e-3 for one step at this lr;
        # the gradients themselves are held to 1e-5 above
        torch.testing.assert_close(first[name], value, atol=3e-4, rtol=1e-4, msg=f"{name}: 2 ranks vs 1")
    for objective in ("softmax", "bce"):
        ranks = [torch.load(tmp_path / f"{objective}{r}.pt", weights_only=True) for r in (0, 1)]
        assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0]), f"{objective}: the ranks differ"
    moved = [n for n, v in alone.state_dict().items() if not torch.equal(v, before[n])]
    assert "items.net.0.weight" in moved and "users.fuse.0.weight" in moved, "training changed nothing"


def test_torchrun_trains_and_rank_0_alone_writes_the_model_file(tmp_path_factory, tmp_path):
    demo = trained_demo(tmp_path_factory.getbasetemp() / "trained_demo")
    model_path = tmp_path / "ddp.pt"
    env = os.environ | {
        "DATABASE_URL": demo.db_url,
        "MODEL_PATH": str(model_path),
        "EMBED_CACHE_DIR": str(demo.embed_cache_dir),
        "GROUND_TRUTH_PATH": str(demo.ground_truth_path),
        "TRAIN_SAMPLE": "4096",
        "BATCH_SIZE": "256",
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "main_script.py"]
    done = subprocess.run(
        [*command, "--quiet", "train", "--epochs", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    model_file = load_model_file(model_path)
    assert len(model_file.history) == 1 and model_file.metrics["model"]["roc_auc"] > 0.5
    assert done.stdout.count("model file:") == 1, "only rank 0 reports and writes"
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ddp", ".ddp")))
    assert written == ["ddp.history.csv", "ddp.history.json", "ddp.history.png", "ddp.pt"], written


def test_the_device_setting(monkeypatch):
    import main_script

    assert main_script.training_device("cpu") == torch.device("cpu")
    assert main_script.training_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="DEVICE=cuda, but torch sees no CUDA device"):
            main_script.training_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun, a rank takes its own GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main_script.training_device("auto") == torch.device("cuda", 1)


def test_training_keeps_the_weights_of_the_epoch_best_on_validation():
    model, data = problem()
    seen: list[dict[str, torch.Tensor]] = []
    scores = iter([0.2, 0.5, 0.1])  # epoch 2 is the best

    def validate(candidate: TwoTower) -> float:
        seen.append({k: v.clone() for k, v in candidate.state_dict().items()})
        return next(scores)

    config = dataclasses.replace(TINY, epochs=3, per_day_stats=False)
    history = train_two_tower(model, data, config, validate=validate, progress=False)
    assert [row["validation"] for row in history] == [0.2, 0.5, 0.1]
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen[1][name]), f"{name} is not epoch 2's"
    assert not all(torch.equal(value, seen[2][name]) for name, value in model.state_dict().items())
