"""A new user's first try with their own data: the contract they read, imports that never drop data by
surprise, small tables, the demo's leftovers, the command line, the API's times, offline docs, operating.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_settings
from fastapi.testclient import TestClient
from fixtures_own import own_tables, write_own_csvs
from test_bad_data import FEED, POSTS, USERS, preload, snapshot, write_csvs

import app as app_module
import cli
import data_contract
import database
import demo_data
import get_features_table as gft
import main_script
import refresh
import times
from app import create_app
from features import NotEnoughDataError, build_dataset, split_windows, thin_windows
from fingerprint import tables_fingerprint
from learn_model import MIN_BATCH, fit_batch_size
from settings import Settings

# --- the data contract ------------------------------------------------------------------------------


def test_the_readme_states_the_contract_the_orm_enforces():
    readme = (ROOT / "README.md").read_text()
    stated = readme.split("<!-- contract:start -->\n", 1)[1].split("\n<!-- contract:end -->", 1)[0]
    assert stated == data_contract.contract_markdown(), (
        "README's contract differs from the ORM: paste data_contract.contract_markdown() between the markers"
    )


def test_the_contract_names_every_column_its_values_and_the_target_rule():
    text = data_contract.contract_text()
    for table in gft.TABLES:
        for column in gft.COLUMNS[table]:
            assert re.search(rf"^  {column} \(", text, re.M), f"{table}.{column} missing from the contract"
    assert "one of 0, 1, 2, 3, 4" in text and "one of 'view', 'like'" in text, text
    assert "on a 'view' row" in text and "on a 'like' row" in text, "target's meaning on both kinds of row"
    assert "2021-12-01T12:00:00" in text, "the accepted timestamp forms"


def test_the_stored_timestamp_form_is_the_first_accepted_one():
    assert data_contract.TIMESTAMP_FORMATS[0] == times.TIME_FORMAT, "one form of the feed's timestamps"


def test_import_csv_help_prints_the_contract(capsys):
    with pytest.raises(SystemExit):
        main_script.main(["import-csv", "--help"])
    out = capsys.readouterr().out
    assert data_contract.contract_text() in out, out
    assert "--replace" in out, out


def test_no_reference_to_files_outside_the_repository():
    """The design notes and the seed prompt are not in the repository: nothing may send a reader there."""
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tools/*"), ROOT / "README.md"]:
        if path.is_file() and re.search(r"DESIGN\.md|SEED\.md|/work/shared", path.read_text()):
            offenders.append(path.name)
    assert offenders == [], f"references to files outside the repository in {offenders}"


# --- import-csv never drops data by surprise ---------------------------------------------------------


def test_import_csv_refuses_to_replace_tables_that_hold_rows(engine, tmp_path):
    preload(engine)
    before = snapshot(engine)
    with pytest.raises(gft.TablesHoldRowsError, match=r"already holds user_data \(1 rows\).*--replace"):
        gft.import_csv(engine, **write_csvs(tmp_path), progress=False)
    for table in gft.TABLES:
        assert snapshot(engine)[table].equals(before[table]), f"{table} changed by a refused import"
    counts = gft.import_csv(engine, **write_csvs(tmp_path), replace=True, progress=False)
    assert counts == {"user_data": 2, "post_text_df": 3, "feed_data": 4}, counts


def test_import_csv_cli_says_to_add_replace(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'own.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    paths = [f"--{name}={path}" for name, path in write_csvs(tmp_path).items()]
    assert main_script.main(["--quiet", "import-csv", *paths]) == 0, "an empty database needs no --replace"
    capsys.readouterr()
    assert main_script.main(["--quiet", "import-csv", *paths]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {url} already holds user_data (2 rows)"), err
    assert main_script.main(["--quiet", "import-csv", *paths, "--replace"]) == 0


def test_csv_fixture_is_valid_under_the_contract():
    """The CSVs the tests import are the contract's own example: a like row with an empty target."""
    assert "like," in FEED and USERS.startswith("user_id,") and POSTS.startswith("post_id,")


# --- small data: it trains, or one line says what to change ------------------------------------------


def test_batch_size_fits_a_small_training_window(caplog):
    assert fit_batch_size(1024, 5000) == 1024, "enough rows: BATCH_SIZE as set"
    with caplog.at_level(logging.WARNING):
        assert fit_batch_size(1024, 494) == 64, "a power of two leaving at least MIN_STEPS steps"
    assert "BATCH_SIZE=1024 is more than the training window's 494 views" in caplog.text
    assert fit_batch_size(1024, 40) == MIN_BATCH
    assert fit_batch_size(1024, 300, ranks=4) % 4 == 0
    with pytest.raises(NotEnoughDataError, match=r"holds 20 views, at least 32 are needed.*TEST_DAYS"):
        fit_batch_size(1024, 20)


def test_a_feed_shorter_than_the_windows_names_the_settings(tmp_path, monkeypatch, capsys):
    feed = own_tables(days=10)[2]
    with pytest.raises(NotEnoughDataError, match=r"spans 9\.9 days.*TEST_DAYS=14 \+ VAL_DAYS=7.*lower"):
        split_windows(feed, test_days=14, val_days=7)
    paths = write_own_csvs(tmp_path / "csv", days=10)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'own.db'}")
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "model.pt"))
    monkeypatch.chdir(tmp_path)
    assert main_script.main(["--quiet", "import-csv", *(f"--{k}={v}" for k, v in paths.items())]) == 0
    capsys.readouterr()
    assert main_script.main(["--quiet", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the feed spans") and "TEST_DAYS" in err[0], err


def test_thin_windows_are_warned_about():
    users, posts, feed = own_tables(feed=400)
    data = build_dataset(users, posts, feed, test_days=14, val_days=7)
    warnings = thin_windows(data)
    assert any(w.startswith("the validation window holds") and "VAL_DAYS" in w for w in warnings), warnings
    assert thin_windows(data, minimum=0) == [], "no warning when the windows hold enough"


# --- the demo's truth judges only the demo's tables; outputs live beside the model --------------------


def test_the_truth_fingerprint_survives_the_database(engine):
    """Written and read back (SQLite, PostgreSQL), the demo's tables still match the truth made with them."""
    demo = demo_data.generate("tiny", seed=0, progress=False)
    assert demo.truth.tables == tables_fingerprint(demo.users, demo.posts, demo.feed)
    gft.write_tables(engine, users=demo.users, posts=demo.posts, feed=demo.feed, progress=False)
    stored = [gft.read_table(engine, name) for name in gft.TABLES]
    assert tables_fingerprint(*stored) == demo.truth.tables, "same rows, other order and dtypes: same print"
    changed = stored[2].drop(index=5)
    assert tables_fingerprint(stored[0], stored[1], changed) != demo.truth.tables, "one row less: other print"


def test_own_data_beside_the_demo_truth_trains_with_default_settings(tmp_path, caplog):
    """The issue's run: own CSVs, the demo's truth file left in place, BATCH_SIZE at its default."""
    demo = demo_data.generate("tiny", seed=0, progress=False)
    truth_path = tmp_path / "demo_truth.npz"
    demo.truth.save(truth_path)
    settings = tiny_settings(tmp_path, ground_truth_path=truth_path, epochs=1, batch_size=1024)
    settings = settings.replace(model_path=tmp_path / "own" / "model.pt")
    engine = database.make_engine(settings.db_url)
    try:
        gft.import_csv(engine, **write_own_csvs(tmp_path / "csv"), progress=False)
    finally:
        engine.dispose()
    with caplog.at_level(logging.INFO):
        result = main_script.run_all(settings, progress=False)
    assert "is the demo generator's truth of other tables: ignored" in caplog.text, caplog.text
    assert re.search(
        r"kept the weights of epoch 1 of 1 \(validation minus like log-loss -0\.\d{4}\)", caplog.text
    ), "named"
    assert "oracle" not in result.metrics and "online" not in result.metrics, list(result.metrics)
    assert settings.model_path.is_file(), "the model file is written"
    assert sorted(p.name for p in settings.model_path.parent.iterdir()) == [
        "model.history.csv",
        "model.history.json",
        "model.history.png",
        "model.pt",
    ], "every output beside the model file, named after it"
    assert (
        main_script.load_truth(settings.replace(ground_truth_path=None), (demo.users, demo.posts, demo.feed))
        is None
    )
    assert main_script.load_truth(settings, (demo.users, demo.posts, demo.feed)) is not None, "the demo's own"


def test_a_truth_file_from_before_fingerprints_is_ignored_with_what_to_do(tmp_path, caplog):
    demo = demo_data.generate("tiny", seed=0, progress=False)
    path = tmp_path / "old_truth.npz"
    dataclasses.replace(demo.truth, tables="").save(path)
    settings = tiny_settings(tmp_path, ground_truth_path=path)
    tables = (demo.users, demo.posts, demo.feed)
    with caplog.at_level(logging.WARNING):
        assert main_script.load_truth(settings, tables) is None
    assert "names no tables" in caplog.text and "demo-data" in caplog.text, caplog.text
    demo.truth.save(path)
    assert main_script.load_truth(settings, tables) is not None, "a truth of these very tables is read"


def test_an_empty_ground_truth_path_turns_the_truth_off(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GROUND_TRUTH_PATH", "")
    assert Settings().ground_truth_path is None
    monkeypatch.delenv("GROUND_TRUTH_PATH")
    (tmp_path / ".env").write_text("GROUND_TRUTH_PATH=\nSEED=\n")
    assert Settings().ground_truth_path is None, "from .env too"
    assert Settings().seed == 0, "other empty settings still count as unset"
    monkeypatch.setenv("GROUND_TRUTH_PATH", "x.npz")
    assert Settings().ground_truth_path == Path("x.npz"), "the environment wins over .env"


# --- the command line: --help at once, common options anywhere ----------------------------------------

RECOMMEND = "/post/recommendations/"
HEAVY = ("torch", "pandas", "numpy", "transformers", "sklearn", "scipy", "matplotlib")
COMMANDS = (
    "all",
    "demo-data",
    "import-csv",
    "embed",
    "embed-posts",
    "train",
    "evaluate",
    "export-embeddings",
)


def imported_heavy(stderr: str) -> list[str]:
    """The heavy top-level packages in a `python -X importtime` report."""
    names = {line.split("|")[-1].strip().split(".")[0] for line in stderr.splitlines() if "|" in line}
    return sorted(names & set(HEAVY))


def test_help_answers_before_the_pipeline_libraries_load():
    command = [sys.executable, "-X", "importtime", str(ROOT / "main_script.py"), "--help"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "import-csv" in done.stdout, done.stdout + done.stderr[-2000:]
    assert imported_heavy(done.stderr) == [], "main_script.py --help imports the pipeline's libraries"
    script = (  # every subcommand's --help in one interpreter, then what got imported
        "import cli, sys\n"
        f"for name in {COMMANDS!r}:\n"
        "    try:\n"
        "        cli.build_parser().parse_args([name, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_a_usage_error_answers_before_the_libraries_load():
    command = [sys.executable, "-X", "importtime", str(ROOT / "main_script.py"), "train", "--epochs", "x"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "invalid int value: 'x'" in done.stderr, done.stderr[-500:]
    assert imported_heavy(done.stderr) == [], "a usage error must not wait for torch"


@pytest.mark.parametrize("command", COMMANDS)
def test_common_options_before_or_after_the_subcommand(command):
    parser = cli.build_parser()
    required = ["--users=u", "--posts=p", "--feed=f"] if command == "import-csv" else []
    assert parser.parse_args(["--quiet", command, *required]).quiet is True
    assert parser.parse_args([command, *required, "--quiet"]).quiet is True
    assert parser.parse_args([command, *required]).quiet is False
    assert parser.parse_args([]).quiet is False and parser.parse_args([]).run == "run_training"


# --- the API: ISO 8601 times, time omitted = now, docs that work offline --------------------------------


@pytest.fixture(scope="module")
def tiny_client(tiny_model):
    with TestClient(create_app(tiny_model)) as client:
        yield client


def test_time_accepts_iso_8601_with_a_t(tiny_client):
    feed_time = tiny_client.get("/user/200/feed", params={"limit": 1}).json()[0]["time"]
    assert "T" in feed_time, "the feed endpoints answer ISO 8601"
    with_t = tiny_client.get(RECOMMEND, params={"id": 200, "time": feed_time, "limit": 5})
    with_space = tiny_client.get(
        RECOMMEND, params={"id": 200, "time": feed_time.replace("T", " "), "limit": 5}
    )
    assert with_t.status_code == 200, with_t.text
    assert with_t.json() == with_space.json(), "the same moment, whichever separator"
    schema = tiny_client.get("/openapi.json").json()["paths"][RECOMMEND]["get"]["parameters"]
    time_schema = next(p for p in schema if p["name"] == "time")
    assert re.fullmatch(time_schema["schema"]["pattern"], feed_time), "the OpenAPI pattern documents the T"
    assert not time_schema["required"] and "omitted: now" in time_schema["description"], time_schema


def test_time_omitted_means_now(tiny_client, monkeypatch):
    moment = "2021-12-20 12:00:00"
    monkeypatch.setattr(app_module, "now_seconds", lambda: times.parse_time(moment))
    omitted = tiny_client.get(RECOMMEND, params={"id": 200, "limit": 5})
    assert omitted.status_code == 200, omitted.text
    assert omitted.json() == tiny_client.get(RECOMMEND, params={"id": 200, "time": moment, "limit": 5}).json()
    monkeypatch.undo()
    assert tiny_client.get(RECOMMEND, params={"id": 200}).status_code == 200, "the real clock works too"


def asset_urls(html: str) -> list[str]:
    """Every script, stylesheet, image and the OpenAPI document a docs page loads."""
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""url\s*:\s*["']([^"']+)["']""", html)  # Swagger UI's openapi url
    urls += re.findall(r"""spec-url\s*=\s*["']([^"']+)["']""", html)  # ReDoc's
    return sorted(set(urls))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_load_every_asset_from_the_app(tiny_client, page):
    response = tiny_client.get(page)
    assert response.status_code == 200, response.text
    urls = asset_urls(response.text)
    assert any(u.endswith(".js") for u in urls), urls
    external = [u for u in urls if re.match(r"(https?:)?//", u)]
    assert external == [], f"{page} loads from outside the app: {external}"
    for url in urls:
        asset = tiny_client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 0, (
            f"{page}: {url} answers {asset.status_code}"
        )


# --- operating it: /metrics, a refresh that keeps failing ----------------------------------------------


def test_metrics_count_requests_by_route_and_status(tiny_client):
    tiny_client.get("/user/200")
    tiny_client.get("/user/2000000000")  # 404
    tiny_client.get(RECOMMEND, params={"id": 200, "time": "2021-12-20 12:00:00"})
    response = tiny_client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in (
        'http_requests_total{method="GET",route="/user/{id}",status="200"}',
        'http_requests_total{method="GET",route="/user/{id}",status="404"}',
        'http_request_duration_seconds_bucket{le="0.001",method="GET",route="/post/recommendations/"}',
        "recommendations_served_total",
        "refresh_cycles_total",
        "refresh_failures_total",
        'model_info{path="',
        "model_age_seconds",
    ):
        assert line in text, f"{line} missing from /metrics"
    served = float(re.search(r"^recommendations_served_total (\S+)$", text, re.M).group(1))
    tiny_client.get(RECOMMEND, params={"id": 200})
    again = tiny_client.get("/metrics").text
    assert float(re.search(r"^recommendations_served_total (\S+)$", again, re.M).group(1)) == served + 1


def test_metrics_off(tiny_model):
    with TestClient(create_app(tiny_model.replace(metrics="off"))) as client:
        assert client.get("/metrics").status_code == 404
        assert client.get("/user/200").status_code == 200


def test_metrics_add_up_the_workers_in_multiprocess_mode(tmp_path):
    script = (
        "import metrics\n"
        "for _ in range(2):\n"
        "    m = metrics.Metrics()\n"
        "    m.requests.labels(route='/user/{id}', method='GET', status='200').inc()\n"
        "print(m.exposition().decode())\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'http_requests_total{method="GET",route="/user/{id}",status="200"} 2.0' in done.stdout, done.stdout


def test_a_refresh_that_keeps_failing_shows_in_health(tiny_model, monkeypatch):
    def broken(follower):
        raise RuntimeError("relation feed_data does not exist\nLINE 1: ...")

    settings = tiny_model.replace(refresh_seconds=0.02, refresh_failures_degraded=2)
    monkeypatch.setattr(refresh.TableFollower, "_cycle", broken)
    with TestClient(create_app(settings)) as client:
        for _ in range(200):
            health = client.get("/health").json()
            if health["status"] == "degraded":
                break
            time.sleep(0.02)
        assert health["status"] == "degraded" and health["database"] == "up", health
        assert health["refresh"]["consecutive_failures"] >= 2, health
        assert health["refresh"]["last_error"] == "RuntimeError: relation feed_data does not exist", health
        assert re.search(r"^refresh_failures_total [1-9]", client.get("/metrics").text, re.M)
        monkeypatch.undo()  # the database is back: the next cycle succeeds
        for _ in range(200):
            health = client.get("/health").json()
            if health["status"] == "ok":
                break
            time.sleep(0.02)
        assert health["refresh"]["consecutive_failures"] == 0 and health["refresh"]["last_success"], health


# --- history.png: the metric that chooses the epoch, and the kept epoch -----------------------------------

HISTORY = [
    {
        "epoch": 1,
        "loss": 0.9,
        "val_log_loss": 0.5,
        "validation": 0.10,
        "train_roc_auc": 0.6,
        "val_roc_auc": 0.6,
    },
    {
        "epoch": 2,
        "loss": 0.7,
        "val_log_loss": 0.4,
        "validation": 0.14,
        "train_roc_auc": 0.7,
        "val_roc_auc": 0.7,
    },
    {
        "epoch": 3,
        "loss": 0.6,
        "val_log_loss": 0.45,
        "validation": 0.14,
        "train_roc_auc": 0.8,
        "val_roc_auc": 0.6,
    },
]


def test_history_plot_names_the_choosing_metric_and_marks_the_kept_epoch(tmp_path):
    import matplotlib.pyplot as plt

    assert main_script.kept_epoch(HISTORY) == 2, "the first best, as train_two_tower keeps it"
    figure = main_script.history_figure(HISTORY, "validation NDCG@10")
    try:
        titles = [axis.get_title() for axis in figure.axes]
        assert "validation NDCG@10 (chooses the epoch)" in titles, titles
        assert not any("accuracy" in title for title in titles), "the accuracy panel says nothing"
        for axis in figure.axes:
            labels = [line.get_label() for line in axis.get_lines()]
            assert "kept: epoch 2" in labels, (axis.get_title(), labels)
        plotted = {line.get_label() for axis in figure.axes for line in axis.get_lines()}
        assert {"validation NDCG@10", "validation log-loss", "training loss"} <= plotted, plotted
    finally:
        plt.close(figure)
    paths = main_script.write_history(HISTORY, tmp_path / "m.pt")
    assert [p.name for p in paths] == ["m.history.csv", "m.history.json", "m.history.png"]
