"""How much of the oracle's lead is knowable: the oracle again, without the users' individual terms.

    python -m bench.oracle_ceiling [--json]

On demo data (DATABASE_URL plus the generator's truth file), under the one evaluation protocol: the
oracle, then the oracle with each user's individual taste and/or individual like bias replaced by the
part the demographics explain (a least-squares fit of the true values on the one-hot demographics the
generator draws them from). Those individual terms are what no feature states: a model can only infer
them from the user's own history. Last, the oracle with those terms inferred from the training window
by the known model itself: the maximum a posteriori estimate given every training view (exposure
depends on taste) and its like label, under the generator's priors.

Everything else these variants keep exact (post latents and biases, the history state, popularity and
its drift), which a model has to estimate from the same finite feed, so they are yardsticks rather
than a ceiling: "perfect knowledge of everything but the user's individual parameters", and "that,
plus the best use of each user's own history". The last one needs users x posts in memory: small scale.

Beside the offline metrics, each variant's online value at the test cutoff (evaluate.online_report):
the expected likes of the top 5 posts by the variant's like probability, measured with the true one,
as a share of the full ceiling. The MAP variant's share is the knowable ceiling of a model's like head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from bench.harness import log

if TYPE_CHECKING:
    from demo_data import GroundTruth
    from features import Dataset

SHOWN = ("roc_auc", "log_loss", "hitrate@5", "recall@10", "ndcg@10", "coverage", "online_share")


def demographic_design(users: pd.DataFrame, user_ids: np.ndarray) -> np.ndarray:
    """[n_users, k] one-hots of the demographic codes taste is drawn from, and an intercept."""
    from demo_data import AGE_EDGES

    frame = users.set_index("user_id").loc[user_ids]
    codes = pd.DataFrame(
        {
            "age": np.digitize(frame["age"].to_numpy(), AGE_EDGES),
            **{name: frame[name].to_numpy() for name in ("country", "gender", "os", "exp_group", "source")},
        }
    ).astype(str)
    return np.c_[pd.get_dummies(codes).to_numpy(dtype=np.float64), np.ones(len(frame))]


def demographic_part(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return design @ coef


def infer_individual_terms(
    truth: GroundTruth, data: Dataset, feed: pd.DataFrame, *, prior_taste_sd: float, prior_bias_sd: float
) -> tuple[np.ndarray, np.ndarray]:
    """MAP of each user's individual (taste [U, d], like bias [U]) from the training views, given `truth`
    (whose own taste and bias are the demographic parts) and the generator's model of exposure and likes.

    Log-posterior per user: sum over views of [alpha <t, z_p> - logsumexp_q(e_q(week) + alpha <t, z_q>)]
    (which posts the feed showed) + log P(label | logit + b + <t, z_p>) (what the user liked) - priors.
    """
    import torch
    import torch.nn.functional as F

    from demo_data import N_WEEKS, WEEK_SECONDS, _tau

    views = data.train_views
    n_users, n_posts = len(truth.user_ids), len(truth.post_ids)
    if n_users * n_posts > 50_000_000:
        raise SystemExit(f"{n_users} users x {n_posts} posts is too large for the MAP estimate: use small")
    user_ids, post_ids = data.users.user_ids, data.post_ids
    assert np.array_equal(user_ids, truth.user_ids) and np.array_equal(post_ids, truth.post_ids), (
        "the truth file does not describe these tables"
    )
    base_logit = torch.tensor(
        truth.like_logits(user_ids[views.user_rows], post_ids[views.post_rows], views.times, feed)
    )
    labels = torch.tensor(views.labels, dtype=torch.float64)
    latent = torch.tensor(truth.post_latent)
    rows, posts = torch.from_numpy(views.user_rows), torch.from_numpy(views.post_rows)
    week = torch.from_numpy(np.clip((views.times - truth.start_s) // WEEK_SECONDS, 0, N_WEEKS - 1))
    views_per_week = torch.zeros(n_users, N_WEEKS, dtype=torch.float64).index_put_(
        (rows, week), torch.ones(len(views), dtype=torch.float64), accumulate=True
    )
    exposure = (
        torch.tensor(truth.popularity)[None, :]
        + torch.tensor(truth.trend)[None, :] * torch.tensor(_tau())[:, None]
    )  # [weeks, posts], without the taste term
    demographic_taste = torch.tensor(truth.taste)
    taste = torch.zeros(n_users, latent.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_users, dtype=torch.float64, requires_grad=True)
    weeks = [w for w in range(N_WEEKS) if views_per_week[:, w].any()]

    def loss() -> torch.Tensor:
        affinity = (taste[rows] * latent[posts]).sum(1)
        logit = base_logit + bias[rows] + affinity
        likes = -F.binary_cross_entropy_with_logits(logit, labels, reduction="sum")
        shown = truth.alpha * (demographic_taste + taste) @ latent.T  # [users, posts]
        normaliser = sum(
            (views_per_week[:, w] * torch.logsumexp(exposure[w] + shown, dim=1)).sum() for w in weeks
        )
        prior = (taste**2).sum() / (2 * prior_taste_sd**2) + (bias**2).sum() / (2 * prior_bias_sd**2)
        return -(likes + truth.alpha * affinity.sum() - normaliser) + prior

    optimiser = torch.optim.LBFGS([taste, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss()
        value.backward()
        return value

    optimiser.step(closure)
    return taste.detach().numpy(), bias.detach().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.oracle_ceiling", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import main_script
    from demo_data import TASTE_NOISE_SD, USER_BIAS_SD
    from evaluate import evaluate_ranking, online_report, online_task, ranking_task
    from learn_model import pointwise_metrics
    from settings import Settings

    settings = Settings()
    users, posts, feed = main_script.load_tables(settings, progress=False)
    truth = main_script.load_truth(settings, (users, posts, feed))
    if truth is None:
        raise SystemExit(f"no ground truth at {settings.ground_truth_path}: this needs the demo data")
    data = main_script.make_dataset(settings, users, posts, feed)
    design = demographic_design(users, truth.user_ids)
    taste, bias = demographic_part(design, truth.taste), demographic_part(design, truth.user_bias)
    without_both = dataclasses.replace(truth, taste=taste, user_bias=bias)
    taste_hat, bias_hat = infer_individual_terms(
        without_both, data, feed, prior_taste_sd=TASTE_NOISE_SD, prior_bias_sd=USER_BIAS_SD
    )
    variants = {
        "oracle": truth,
        "oracle without individual taste": dataclasses.replace(truth, taste=taste),
        "oracle without individual like bias": dataclasses.replace(truth, user_bias=bias),
        "oracle without both": without_both,
        "oracle, both inferred from the training window (MAP)": dataclasses.replace(
            truth, taste=taste + taste_hat, user_bias=bias + bias_hat
        ),
    }
    test, task = data.test_views, ranking_task(data.histories, data.cutoff, len(data.post_ids))
    cutoff = pd.Timestamp(data.cutoff, unit="s").to_pydatetime()
    user_ids, post_ids = data.users.user_ids, data.post_ids
    results = {}
    for name, variant in variants.items():
        logits = variant.like_logits(user_ids[test.user_rows], post_ids[test.post_rows], test.times, feed)
        results[name] = pointwise_metrics(test.labels, logits) | evaluate_ranking(
            lambda rows, v=variant: v.score_matrix(user_ids[rows], post_ids, cutoff, feed), task
        )
        log(f"{name}: done")
    online = online_report(
        {
            name: lambda rows, v=variant: v.like_logit_matrix(user_ids[rows], post_ids, data.cutoff, feed)
            for name, variant in variants.items()
        },
        online_task(data, truth, feed, "test", seed=settings.seed),
    )
    for name in variants:
        results[name] |= {"online_share": online[name]["share"], "online_likes@5": online[name]["likes@5"]}
    explained = {
        "taste": float(1 - (truth.taste - taste).var() / truth.taste.var()),
        "like_bias": float(1 - (truth.user_bias - bias).var() / truth.user_bias.var()),
        "individual_taste_map_corr": float(
            np.corrcoef(taste_hat.ravel(), (truth.taste - taste).ravel())[0, 1]
        ),
        "individual_bias_map_corr": float(np.corrcoef(bias_hat, truth.user_bias - bias)[0, 1]),
    }
    if args.json:
        print(json.dumps({"variants": results, "demographics_explain": explained}))
        return
    taste_corr, bias_corr = explained["individual_taste_map_corr"], explained["individual_bias_map_corr"]
    print(
        f"demographics explain {explained['taste']:.0%} of the taste variance, "
        f"{explained['like_bias']:.0%} of the like-bias variance; the MAP estimates correlate "
        f"{taste_corr:.2f} (taste) and {bias_corr:.2f} (bias) with the true individual terms"
    )
    print("| variant | " + " | ".join(SHOWN) + " |")
    print("|---" * (len(SHOWN) + 1) + "|")
    for name, values in results.items():
        print(f"| {name} | " + " | ".join(f"{values[key]:.4f}" for key in SHOWN) + " |")


if __name__ == "__main__":
    main()
