"""Settings (pydantic-settings) and the facts with one owner: precedence, types, secrets, shared names."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from conftest import ROOT
from pydantic import ValidationError

import demo_data
import features
import get_post_embeddings
import learn_model
import main_script
import serving
from model import TwoTowerConfig
from settings import OBJECTIVES, SCALE_NAMES, Settings, describe

SECRET_URL = "postgresql://reader:s3cret-pw@db.example.com:5432/feed"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory (Settings reads .env from there) and no setting in the environment."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_environment_over_dotenv_over_defaults(workdir, monkeypatch):
    (workdir / ".env").write_text("EPOCHS=7\nBATCH_SIZE=64\nOBJECTIVE=bce\n")
    monkeypatch.setenv("EPOCHS", "9")
    settings = Settings()
    assert (settings.epochs, settings.batch_size, settings.objective) == (9, 64, "bce")
    assert settings.learning_rate == Settings.model_fields["learning_rate"].default
    assert Settings(epochs=1).epochs == 1, "keyword arguments win over the environment"


def test_an_empty_variable_means_unset(workdir, monkeypatch):
    monkeypatch.setenv("DEMO_SCALE", "")
    monkeypatch.setenv("MODEL_URL", "")
    assert Settings().demo_scale == "small" and Settings().model_url == ""


@pytest.mark.parametrize(
    ("name", "value"),
    [("EPOCHS", "four"), ("EPOCHS", "0"), ("DEMO_SCALE", "huge"), ("OBJECTIVE", "mse"), ("BATCH_SIZE", "0")],
)
def test_a_bad_value_names_the_setting(workdir, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.lower()):
        Settings()


def test_the_database_password_never_reaches_a_log(workdir):
    settings = Settings(database_url=SECRET_URL)
    assert settings.db_url == SECRET_URL
    shown = dict(describe(settings))
    assert shown["DATABASE_URL"] == "postgresql://reader:***@db.example.com:5432/feed"
    for text in (repr(settings), str(settings), str(settings.model_dump()), " ".join(shown.values())):
        assert "s3cret-pw" not in text


def test_replace_validates_and_reads_no_environment(workdir, monkeypatch):
    settings = Settings()
    monkeypatch.setenv("EPOCHS", "9")
    changed = settings.replace(demo_scale="tiny")
    assert (changed.demo_scale, settings.demo_scale) == ("tiny", "small")
    assert changed.epochs == settings.epochs != 9, "replace() read EPOCHS from the environment"
    with pytest.raises(ValidationError, match="demo_scale"):
        settings.replace(demo_scale="huge")


def test_names_have_one_owner():
    assert tuple(demo_data.SCALES) == SCALE_NAMES
    parser = main_script.build_parser()
    for objective in OBJECTIVES:  # every objective, the default `joint` included
        assert parser.parse_args(["train", "--objective", objective]).objective == objective
    assert parser.parse_args(["demo-data", "--scale", SCALE_NAMES[0]]).scale == SCALE_NAMES[0]
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--objective", "mse"])


# Library parameters that mirror a setting: each is required or defaults to the setting's own default.
MIRRORED = [
    (features.build_dataset, "test_days", "test_days"),
    (features.build_dataset, "val_days", "val_days"),
    (features.build_dataset, "train_sample", "train_sample"),
    (features.build_dataset, "seed", "seed"),
    (get_post_embeddings.embed_texts, "encoder", "text_encoder"),
    (get_post_embeddings.embed_texts, "batch_size", "embed_batch_size"),
    (get_post_embeddings.embed_texts, "max_length", "embed_max_length"),
    (get_post_embeddings.embed_posts, "batch_size", "embed_batch_size"),
    (get_post_embeddings.embed_posts, "max_length", "embed_max_length"),
    (learn_model.train_autoencoder, "code_dim", "text_dim"),
    (learn_model.TrainConfig, "objective", "objective"),
    (learn_model.TrainConfig, "epochs", "epochs"),
    (learn_model.TrainConfig, "batch_size", "batch_size"),
    (learn_model.TrainConfig, "lr", "learning_rate"),
    (learn_model.TrainConfig, "seed", "seed"),
    (learn_model.TrainConfig, "history_items_every", "history_items_every"),
    (TwoTowerConfig, "text_dim", "text_dim"),
    (TwoTowerConfig, "max_history", "max_history"),
    (TwoTowerConfig, "max_likes", "max_likes"),
    (demo_data.generate, "seed", "seed"),
    (serving.Recommender, "faiss_min_posts", "faiss_min_posts"),
]


@pytest.mark.parametrize(("function", "parameter", "setting"), MIRRORED)
def test_library_defaults_never_differ_from_the_settings(function, parameter, setting):
    default = inspect.signature(function).parameters[parameter].default
    if default is not inspect.Parameter.empty:
        assert default == Settings.model_fields[setting].default, f"{function.__name__}({parameter}=...)"


def test_importing_the_service_loads_no_training_stack():
    heavy = "('sklearn', 'scipy', 'transformers', 'matplotlib')"
    probe = f"import app, sys; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
