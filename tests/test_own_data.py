"""A new user's first try with their own data: the contract they read, imports that never drop data by
surprise, small tables, the demo's leftovers, the command line, the API's times, offline docs, operating.
"""

from __future__ import annotations

import re

import pytest
from conftest import ROOT
from test_bad_data import FEED, POSTS, USERS, preload, snapshot, write_csvs

import data_contract
import get_features_table as gft
import main_script
import times

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
