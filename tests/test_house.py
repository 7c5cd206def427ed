"""The house in order: one statement of each fact, and the README's Layout table true to the repository."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from schema import FeedGet, PostGet, UserGet
from table_feed import Feed
from table_post import Post
from table_user import User

OMITTED = {Feed: {"target"}}  # FeedGet is the course's: the like target is not part of it


@pytest.mark.parametrize(("response", "table"), [(UserGet, User), (PostGet, Post), (FeedGet, Feed)])
def test_response_models_follow_the_orm_tables(response, table):
    columns = {c.name: c.type.python_type for c in table.__table__.columns}
    fields = {}
    for name, field in response.model_fields.items():
        annotation = field.annotation  # pydantic keeps Annotated's extras apart, in field.metadata
        if isinstance(annotation, type) and issubclass(annotation, UserGet | PostGet):
            continue  # the joined user and post
        fields[field.validation_alias or name] = annotation
    assert set(fields) == set(columns) - OMITTED.get(table, set()), f"{response.__name__} vs {table.__name__}"
    for column, python_type in fields.items():
        assert python_type is columns[column], f"{response.__name__}: {column} is {python_type}"


def layout_modules(readme: str) -> set[str]:
    """The module names the README's Layout table names (first column, `name.py` in backticks)."""
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([\w.*]+\.py)`", row)}


def test_the_readme_layout_table_names_every_module_and_no_other():
    named = layout_modules((ROOT / "README.md").read_text())
    present = {path.name for path in ROOT.glob("*.py")}
    patterns = {name for name in named if "*" in name}
    covered = {
        name for name in present for pattern in patterns if re.fullmatch(pattern.replace("*", r"\w+"), name)
    }
    assert present - covered - named == set(), "modules missing from the README's Layout table"
    assert named - patterns - present == set(), "the Layout table names modules that do not exist"


def test_only_get_model_reads_the_model_file_keys():
    """In the service, the pipeline and the benches (tests may look at the raw file on purpose)."""
    readers = [
        path.relative_to(ROOT).as_posix()
        for folder in (ROOT, ROOT / "bench")
        for path in folder.glob("*.py")
        if re.search(r"""payload\[["']""", path.read_text()) and path.name != "get_model.py"
    ]
    assert readers == [], "read the model file through get_model.ModelFile's attributes"
