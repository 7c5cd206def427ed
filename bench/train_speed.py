"""Training speed on DATABASE_URL (meant for the full demo): where an epoch's time goes, how it compares.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/bench python -m bench.train_speed [--json]
        stage times (tables, embeddings, autoencoder, features), one epoch of TRAIN_SAMPLE views per
        objective, and a per-step breakdown (batch, forward, backward and optimiser step; medians)
    ... python -m bench.train_speed --compare b8df94c [--rounds 2] [--torchrun 2] [--json]
        one epoch (joint) of this code and of the commit's, alternately, each in a fresh process (the
        commit's own bench/train_speed.py, from `git archive` into a temporary folder), --rounds times;
        then one epoch of this code under `torchrun --nproc_per_node=N`. Reports samples/s of each and
        the ratio of the medians. Absolute times drift ~10% on these machines; alternating keeps the
        comparison fair.
Under torchrun the script joins the process group itself and rank 0 reports.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import ROOT, log


def measure(objectives: list[str], profile_steps: int) -> dict:
    """This code: stage times, one epoch per objective, a step breakdown (rank 0's, under torchrun)."""
    import torch

    import main_script
    from learn_model import (
        TrainConfig,
        TrainingStep,
        post_log_frequency,
        train_autoencoder,
        train_two_tower,
        world,
    )
    from model import make_user_batch
    from settings import Settings

    settings = Settings()
    device = main_script.training_device(settings.device)
    distributed = main_script.start_ranks(device)
    rank, size = world()
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
    result = {"feed_rows": len(feed), "train_views": len(data.train_views), "stages_s": seconds}
    del feed

    epochs = {}
    for objective in objectives:
        config = TrainConfig.from_settings(
            settings, device=str(device), objective=objective, epochs=1, monitor_train=0, monitor_val=0
        )
        model = main_script.new_model(settings, data, codes, objective=objective)
        history = train_two_tower(model, data, config, progress=False)
        epochs[objective] = {"epoch_s": history[0]["seconds"], "samples_per_s": history[0]["samples_per_s"]}
        if rank == 0:
            log(f"{objective}: {epochs[objective]}")
    result |= {"epoch": epochs, "ranks": size, "torch_threads": torch.get_num_threads()}

    if profile_steps and size == 1:
        model = main_script.new_model(settings, data, codes, objective="joint")
        step = TrainingStep(
            model, "joint", post_log_frequency(data.train_views.post_rows, model.config.n_posts), 1.0
        )
        optimizer = torch.optim.AdamW(model.parameters())
        rng = np.random.default_rng(0)
        with torch.no_grad():
            table = model.item_embeddings() if settings.history_items_every else None
        steps = []
        for _ in range(profile_steps):
            part = data.train_views.subset(
                rng.choice(len(data.train_views), settings.batch_size, replace=False)
            )
            t0 = time.perf_counter()
            batch = make_user_batch(data.users, data.histories, part.user_rows, part.times, model.config)
            t1 = time.perf_counter()
            loss = step(batch, torch.from_numpy(part.post_rows), torch.from_numpy(part.labels), table)
            t2 = time.perf_counter()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        batch_s, forward_s, backward_s = np.median(np.array(steps), axis=0)
        result["step_ms"] = {
            "batch": batch_s * 1e3,
            "forward": forward_s * 1e3,
            "backward_and_step": backward_s * 1e3,
        }
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result if rank == 0 else {}


def epoch_in_process(command: list[str], cwd: Path) -> float:
    """samples/s of one joint epoch, from a fresh `... bench.train_speed --objectives joint --json`."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, env=os.environ)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return float(report["epoch"]["joint"]["samples_per_s"])


def compare(commit: str, rounds: int, torchrun: int) -> dict:
    """Alternate one-epoch runs of this code and of `commit`; then this code under torchrun."""
    ours = [sys.executable, "-m", "bench.train_speed", "--objectives", "joint"]
    ours += ["--profile-steps", "0", "--json"]
    figures: dict[str, list[float]] = {"this code": [], commit: []}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as folder:
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        # the commit's bench as it runs: a package (`-m`) since it is one, a script before
        package = (Path(folder) / "bench" / "__init__.py").is_file()
        script = ["-m", "bench.train_speed"] if package else [str(Path(folder) / "bench" / "train_speed.py")]
        theirs = [sys.executable, *script, "--objectives", "joint"]
        theirs += ["--profile-steps", "1", "--json"]
        for round_number in range(1, rounds + 1):
            for name, command, cwd in (("this code", ours, ROOT), (commit, theirs, Path(folder))):
                figures[name].append(epoch_in_process(command, cwd))
                log(f"round {round_number}: {name}: {figures[name][-1]:,.0f} samples/s")
    result = {
        "samples_per_s": {name: [round(v, 1) for v in values] for name, values in figures.items()},
        "median_samples_per_s": {name: round(float(np.median(v)), 1) for name, v in figures.items()},
    }
    result["speedup"] = round(
        result["median_samples_per_s"]["this code"] / result["median_samples_per_s"][commit], 3
    )
    if torchrun > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", *ours[1:]]
        key = f"torchrun_{torchrun}_samples_per_s"
        result[key] = round(epoch_in_process(command, ROOT), 1)
        log(f"torchrun --nproc_per_node={torchrun}: {result[key]:,.0f} samples/s (one thread per process)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--objectives", nargs="+", default=["bce", "joint"], choices=["bce", "softmax", "joint"]
    )
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument(
        "--compare", metavar="COMMIT", help="alternate one-epoch runs with this commit's code"
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: runs of each (default 2)")
    parser.add_argument(
        "--torchrun", type=int, default=0, metavar="N", help="with --compare: also N processes"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = (
        compare(args.compare, args.rounds, args.torchrun)
        if args.compare
        else measure(args.objectives, args.profile_steps)
    )
    if result:
        print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
