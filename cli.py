"""The command line of main_script.py, light on purpose: it parses the arguments (and answers --help or
a usage error) before main_script imports the pipeline's libraries (torch, pandas, transformers: seconds
of CPU). Each subcommand names its function in main_script (`run`), called by main_script.run_command.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from settings import OBJECTIVES, SCALE_NAMES

DESCRIPTION = """\
The offline pipeline: demo data, CSV import, text embeddings, two-tower training, evaluation, export.

`python main_script.py` runs every stage from the settings (.env / environment): embed the post texts,
compress them with the autoencoder, build histories, train, evaluate, and write the model file the
service loads. Each stage is also a subcommand; `python main_script.py SUBCOMMAND --help` explains it.
`torchrun --nproc_per_node=N main_script.py train` (or `all`) trains with DistributedDataParallel on N
processes (gloo on CPU, NCCL on CUDA); rank 0 evaluates and writes the model file, the others nothing."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when the help is shown."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def contract_text() -> str:
    import data_contract  # the ORM (SQLAlchemy, FastAPI): only for `import-csv --help`

    return data_contract.contract_text()


def _common(parser: argparse.ArgumentParser, *, default: object) -> None:
    """The options every command accepts, before or after the subcommand's name."""
    parser.add_argument("--quiet", action="store_true", default=default, help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand; the common options (COMMON) are accepted before or after the subcommand."""
    parser = _Parser(
        description=DESCRIPTION,
        epilog="Settings come from the environment and .env (see .env.example); flags override them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, default=False)
    parser.set_defaults(run="run_training")  # no command: `all`
    shared = _Parser(add_help=False)
    # SUPPRESS: a subcommand that was not given the option leaves the top-level value alone
    _common(shared, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_parser = commands.add_parser

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return add_parser(name, parents=[shared], **kwargs)

    commands.add_parser = command  # type: ignore[method-assign]

    all_cmd = commands.add_parser(
        "all", help="every stage: embed, train, evaluate, write the model file (default)"
    )
    all_cmd.add_argument("--if-missing", action="store_true", help="do nothing when MODEL_PATH exists")
    all_cmd.set_defaults(run="run_training")

    demo = commands.add_parser("demo-data", help="generate the demo tables into DATABASE_URL")
    demo.add_argument("--scale", choices=SCALE_NAMES, help="default: DEMO_SCALE")
    demo.add_argument("--seed", type=int, help="default: SEED")
    demo.add_argument("--if-missing", action="store_true", help="do nothing when the feed table has rows")
    demo.set_defaults(run="run_demo_data")

    csv = commands.add_parser(
        "import-csv",
        help="load your own three tables from CSV (one transaction)",
        description="Load user_data, post_text_df and feed_data from CSV files into DATABASE_URL. Every file"
        " is checked first (columns, types, allowed values, NULLs, duplicate ids, feed rows naming unknown"
        " users or posts) and the load is one transaction: a bad file changes nothing.",
        epilog=contract_text,  # a function: the ORM loads only when this help is shown
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv.add_argument("--users", type=Path, required=True, help="user_data CSV")
    csv.add_argument("--posts", type=Path, required=True, help="post_text_df CSV")
    csv.add_argument("--feed", type=Path, required=True, help="feed_data CSV")
    csv.add_argument(
        "--replace", action="store_true", help="drop the tables when they already hold rows (refused without)"
    )
    csv.set_defaults(run="run_import_csv")

    change_log = commands.add_parser(
        "change-log",
        help="create the feed's change log (a table and triggers on feed_data) the service follows exactly",
    )
    change_log.set_defaults(run="run_change_log")

    embed = commands.add_parser(
        "embed", help="embed the post texts with TEXT_ENCODER (cached in EMBED_CACHE_DIR)"
    )
    embed.set_defaults(run="run_embed")

    sync = commands.add_parser(
        "embed-posts",
        help="store the embeddings of posts the post_embedding table lacks (new posts reach the service)",
    )
    sync.add_argument("--every", type=float, metavar="SECONDS", help="repeat every SECONDS until stopped")
    sync.set_defaults(run="run_embed_posts")

    train = commands.add_parser("train", help="train and evaluate, then write MODEL_PATH atomically")
    train.add_argument("--objective", choices=OBJECTIVES, help="default: OBJECTIVE")
    train.add_argument("--epochs", type=int, help="default: EPOCHS")
    train.set_defaults(run="run_training")

    evaluate = commands.add_parser(
        "evaluate", help="evaluate MODEL_PATH on the database (the evaluation protocol)"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(run="run_evaluate")

    export = commands.add_parser("export-embeddings", help="write user and post embeddings as CSV")
    export.add_argument("--out", type=Path, help="default: EXPORT_DIR")
    export.set_defaults(run="run_export_embeddings")

    report = commands.add_parser(
        "experiment-report",
        help="per arm of an A/B experiment: likes per impression and per user, lift, sample ratio check",
    )
    report.add_argument("--experiment", help="default: the experiment EXPERIMENT_PATH declares")
    report.add_argument("--since", help="only requests at or after this time (YYYY-mm-dd HH:MM:SS)")
    report.add_argument(
        "--window", default="1h", help="attribution window after an impression: 90s, 30m, 1h (default), 2d"
    )
    report.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    report.add_argument(
        "--plot", type=Path, metavar="PNG", help="write the per-day likes per impression here"
    )
    report.add_argument("--seed", type=int, default=0, help="of the bootstrap (default 0)")
    report.set_defaults(run="run_experiment_report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, then import the pipeline and run the command (exit code 2 with one line on bad data)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    import main_script  # the pipeline's libraries load here, once the arguments are known to be good

    return main_script.run_command(args)
