"""The quality report: the model against its baselines and the oracle, offline and online, seed by seed.

    python -m bench.quality [--seeds 11 12] [--scale small] [--public] [--workdir DIR] [--json]

For each seed: generate the demo (`main_script.py demo-data`), run `main_script.py all` as a new user
would (its wall time is the "end to end" figure: the first embedding of the texts included, the text
cache is per run's folder), then read the metrics the model file keeps (the test window, scored once;
every choice made on validation, evaluate.py). `--public` adds MovieLens 100K
(`python -m bench.public_data`, needs `pip install --no-deps recbole==1.2.1`) with TEST_DAYS=28
VAL_DAYS=28, where the demo's 14 days would leave some 80 users to rank.

Printed per data set: every method's offline metrics with the 95% bootstrap intervals (the served
ranking as "model", the other ranking beside it), the online value of every ranking at the test cutoff
on demo data (expected likes of the top 5 if shown, share of the ceiling), the pipeline's seconds per
stage, then the ratios the targets are stated in: the served ranking's online share of the ceiling and
its lead over the best baseline (with both intervals); the oracle's ROC-AUC minus the model's; the
model's log-loss minus the best baseline's; HitRate@5 against the oracle and the best baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ROOT, log

PERSONAL = ("recent_popularity", "item_knn", "ease")
BASELINES = ("random", "popularity", *PERSONAL)
SHOWN = ("roc_auc", "log_loss", "ece", "hitrate@5", "recall@10", "ndcg@10", "coverage")


def run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run a pipeline command: (its wall time in seconds, its stdout). Fails loudly with its stderr."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def stage_seconds(stdout: str) -> dict[str, float]:
    """The pipeline's own 'time (s): load=..., evaluate=...' line."""
    line = next((line for line in stdout.splitlines() if line.startswith("time (s): ")), "")
    pairs = (item.split("=") for item in line.removeprefix("time (s): ").split(", ") if "=" in item)
    return {name: float(value) for name, value in pairs}


def ratios(metrics: dict) -> dict[str, object]:
    model = metrics["model"]
    best = max(PERSONAL, key=lambda name: metrics[name]["hitrate@5"])
    out: dict[str, object] = {
        "best_baseline": best,
        "hitrate@5_vs_best_baseline": model["hitrate@5"] / metrics[best]["hitrate@5"],
        "log_loss_minus_best_baseline": model["log_loss"] - min(metrics[n]["log_loss"] for n in BASELINES),
        "roc_auc_minus_best_baseline": model["roc_auc"] - max(metrics[n]["roc_auc"] for n in BASELINES),
        "ece": model["ece"],
    }
    if "oracle" in metrics:
        out["hitrate@5_vs_oracle"] = model["hitrate@5"] / metrics["oracle"]["hitrate@5"]
        out["roc_auc_below_oracle"] = metrics["oracle"]["roc_auc"] - model["roc_auc"]
    if "online" in metrics:
        online = metrics["online"]["test"]
        best_online = max(BASELINES, key=lambda name: online[name]["likes@5"])
        out |= {
            "online_share_of_ceiling": online["model"]["share"],
            "online_best_baseline": best_online,
            "online_vs_best_baseline": online["model"]["likes@5"] / online[best_online]["likes@5"],
            # ahead by more than the intervals: the served ranking's low end above every baseline's high end
            "online_ahead_beyond_intervals": online["model"]["likes@5_ci"][0]
            > max(online[name]["likes@5_ci"][1] for name in BASELINES),
        }
    return out


def online_table(metrics: dict) -> str:
    """The online value of every ranking at the test cutoff (demo data)."""
    online = metrics["online"]["test"]
    lines = ["| ranking | expected likes per 5 shown [95% CI] | share of the ceiling |", "|---|---|---|"]
    for name, values in online.items():
        if name != "users":
            low, high = values["likes@5_ci"]
            lines.append(
                f"| {name} | {values['likes@5']:.3f} [{low:.3f}, {high:.3f}] | {values['share']:.2f} |"
            )
    return "\n".join(lines) + f"\n({int(online['users']['count'])} users with a view in the test window)"


def table(metrics: dict) -> str:
    other = [name for name in metrics if name.startswith("model_")]
    names = [n for n in ("model", *other, "random", "popularity", *PERSONAL, "oracle") if n in metrics]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in SHOWN:
        cells = []
        for name in names:
            cell = f"{metrics[name][key]:.4f}"
            if f"{key}_ci" in metrics[name]:
                low, high = metrics[name][f"{key}_ci"]
                cell += f" [{low:.3f}, {high:.3f}]"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def folder_env(folder: Path, **settings: str) -> dict[str, str]:
    """The environment of a run whose database, truth file, caches and model file all live in `folder`."""
    return os.environ | {
        "DATABASE_URL": f"sqlite:///{folder / 'demo.db'}",
        "GROUND_TRUTH_PATH": str(folder / "truth.npz"),
        "MODEL_PATH": str(folder / "model.pt"),
        "EMBED_CACHE_DIR": str(folder / "embed_cache"),
        "EXPORT_DIR": str(folder / "export"),
        "HF_HUB_OFFLINE": "1",
        **settings,
    }


def one_run(name: str, folder: Path, env: dict[str, str], generate: list[str]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    log(f"{name}: generating the data in {folder}")
    run(generate, env)
    log(f"{name}: python main_script.py all")
    seconds, stdout = run(["main_script.py", "--quiet", "all"], env)
    from get_model import load_model_file

    model_file = load_model_file(folder / "model.pt")
    metrics = model_file.metrics
    result = {
        "end_to_end_s": round(seconds, 1),
        "stage_s": stage_seconds(stdout),
        "epoch_s": [round(row["seconds"], 1) for row in model_file.history],
        "metrics": metrics,
        "ratios": ratios(metrics),
    }
    log(f"\n## {name} (main_script.py all: {seconds:.0f} s; stages {result['stage_s']})\n{table(metrics)}")
    if "online" in metrics:
        log(f"\nonline value at the test cutoff:\n{online_table(metrics)}")
    log(json.dumps(result["ratios"], indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--public", action="store_true", help="MovieLens 100K too (needs recbole)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="quality_") as scratch:
        workdir = args.workdir or Path(scratch)
        results = {}
        for seed in args.seeds:
            folder = workdir / f"{args.scale}_seed{seed}"
            env = folder_env(folder, DEMO_SCALE=args.scale, SEED=str(seed))
            results[f"{args.scale}_seed{seed}"] = one_run(
                f"{args.scale} demo, seed {seed}", folder, env, ["main_script.py", "--quiet", "demo-data"]
            )
        if args.public:
            folder = workdir / "movielens_100k"
            env = folder_env(folder, TEST_DAYS="28", VAL_DAYS="28")  # no truth file there: no oracle
            results["movielens_100k"] = one_run("MovieLens 100K", folder, env, ["-m", "bench.public_data"])
    if args.json:
        print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
