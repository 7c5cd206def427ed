"""Ablations of the two-tower model under the one evaluation protocol (evaluate.py), on DATABASE_URL.

    python -m bench.ablation [--epochs 6] [--json]

Runs the real pipeline (main_script.train_stage) once per variant on the same tables, split, seed and
cached text embeddings: the default (joint objective, history, text codes), static features only, no
text codes, the original project's BCE objective, and the in-batch softmax objective. Prints one table
with the popularity and oracle baselines beside, and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.harness import log

VARIANTS = {
    "joint (default)": {},
    "joint, static features only": {"use_history": False},
    "joint, no text codes": {"use_text": False},
    "bce (the original project's)": {"objective": "bce"},
    "softmax": {"objective": "softmax"},
}
SHOWN = ("roc_auc", "log_loss", "hitrate@5", "recall@10", "ndcg@10", "coverage")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help="default: EPOCHS")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import main_script
    from settings import Settings

    settings = Settings()
    if args.epochs:
        settings = settings.replace(epochs=args.epochs)
    tables = main_script.load_tables(settings, progress=False)
    results: dict[str, dict] = {}
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        flags = {key: change.pop(key) for key in ("use_history", "use_text") if key in change}
        started = time.perf_counter()
        run = main_script.train_stage(settings.replace(**change), tables=tables, progress=False, **flags)
        results[name] = run.metrics["model"] | {"seconds": time.perf_counter() - started}
        results.setdefault("popularity", run.metrics["popularity"])
        results.setdefault("random", run.metrics["random"])
        if "oracle" in run.metrics:
            results.setdefault("oracle", run.metrics["oracle"])
        log(f"{name}: done in {results[name]['seconds']:.0f} s")
    if args.json:
        print(json.dumps(results))
        return
    print("| variant | " + " | ".join(SHOWN) + " | HR@5 / oracle | HR@5 / popularity |")
    print("|---" * (len(SHOWN) + 3) + "|")
    oracle = results.get("oracle", {}).get("hitrate@5", float("nan"))
    popular = results["popularity"]["hitrate@5"]
    for name, values in results.items():
        cells = " | ".join(f"{values[key]:.4f}" for key in SHOWN)
        print(
            f"| {name} | {cells} | {values['hitrate@5'] / oracle:.2f} | {values['hitrate@5'] / popular:.2f} |"
        )


if __name__ == "__main__":
    main()
