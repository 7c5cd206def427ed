"""The quality report of issue 11: the model against its baselines and the oracle, seed by seed.

    python -m bench.quality [--seeds 11 12] [--scale small] [--public] [--workdir DIR] [--json]

For each seed: generate the demo (`main_script.py demo-data`), run `main_script.py all` as a new user
would (its wall time is the "end to end" figure: the first embedding of the texts included, the text
cache is per run's folder), then read the metrics the model file keeps (the test window, scored once;
every choice made on validation, evaluate.py). `--public` adds MovieLens 100K
(`python -m bench.public_data`, needs `pip install --no-deps recbole==1.2.1`) with TEST_DAYS=28
VAL_DAYS=28, where the demo's 14 days would leave some 80 users to rank.

Printed per data set: every method's metrics with the 95% bootstrap intervals, then the ratios the
issue asks for: model HitRate@5 / oracle's, / the best of recent_popularity, item_knn and ease; the
oracle's ROC-AUC minus the model's; the model's log-loss minus popularity's; the model's ECE.
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
SHOWN = ("roc_auc", "log_loss", "ece", "hitrate@5", "recall@10", "ndcg@10", "coverage")


def run(args: list[str], env: dict[str, str]) -> float:
    """Run a pipeline command; its wall time in seconds. Fails loudly with the command's stderr."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def ratios(metrics: dict) -> dict[str, float]:
    model = metrics["model"]
    best = max(PERSONAL, key=lambda name: metrics[name]["hitrate@5"])
    out = {
        "best_baseline": best,
        "hitrate@5_vs_best_baseline": model["hitrate@5"] / metrics[best]["hitrate@5"],
        "log_loss_minus_popularity": model["log_loss"] - metrics["popularity"]["log_loss"],
        "ece": model["ece"],
    }
    if "oracle" in metrics:
        out["hitrate@5_vs_oracle"] = model["hitrate@5"] / metrics["oracle"]["hitrate@5"]
        out["roc_auc_below_oracle"] = metrics["oracle"]["roc_auc"] - model["roc_auc"]
    return out


def table(metrics: dict) -> str:
    names = [n for n in ("model", "random", "popularity", *PERSONAL, "oracle") if n in metrics]
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
    seconds = run(["main_script.py", "--quiet", "all"], env)
    from get_model import load_model_file

    metrics = load_model_file(folder / "model.pt").metrics
    result = {"end_to_end_s": round(seconds, 1), "metrics": metrics, "ratios": ratios(metrics)}
    log(f"\n## {name} (main_script.py all: {seconds:.0f} s)\n{table(metrics)}")
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
