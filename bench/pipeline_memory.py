"""Peak memory of the whole pipeline, `python main_script.py all`, on DATABASE_URL (meant for the full demo).

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/bench python -m bench.pipeline_memory [--json]

Runs the pipeline as a child process (tables, embeddings, autoencoder, features, training, the
evaluation with its baselines and the oracle when the demo's truth file is found, the model file) and
reports its peak resident set size (getrusage of the children: the largest one's peak), its wall time
and its stage times. The model file goes to a scratch folder. Target (the training issue): < 8 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import DATA_DIR, ROOT


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--epochs", type=int, help="default: EPOCHS")
    parser.add_argument("--truth", type=Path, default=DATA_DIR / "demo_truth.npz")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pipeline_memory_") as folder:
        env = os.environ | {
            "MODEL_PATH": str(Path(folder) / "model.pt"),
            "GROUND_TRUTH_PATH": str(args.truth),
        }
        if args.epochs is not None:
            env["EPOCHS"] = str(args.epochs)
        clock = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "main_script.py", "--quiet", "all"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - clock
    if done.returncode != 0:
        raise SystemExit(f"main_script.py failed:\n{done.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    stages = next((line for line in done.stdout.splitlines() if line.startswith("time (s):")), "")
    result = {"peak_rss_gb": round(peak_kb / 1024**2, 2), "wall_s": round(seconds, 1), "stages": stages}
    print(
        json.dumps(result)
        if args.json
        else f"peak RSS {result['peak_rss_gb']} GB in {result['wall_s']} s; {stages}"
    )


if __name__ == "__main__":
    main()
