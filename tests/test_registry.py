"""The registry: the promotion rule and its guard, lookup by alias in another process, the input
forms the model takes, and `deepcluster predict`.

Real models on real digits (registry_fixtures.py) in a private MLflow store. Each rule test
registers under its own model name, so the tests do not depend on one another. The tests of the
champion comparison floor the baseline figures (`clear_of_baselines`); the baseline gate is
tested on the models' real figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from deepcluster import promotion, registry, tracking
from deepcluster.errors import UserError
from deepcluster.paths import Artifacts
from deepcluster.serving import EXPECTED_INPUT, InputError

from .conftest import run_cli
from .registry_fixtures import PARAMS, build, clear_of_baselines, store, with_metrics

pytestmark = pytest.mark.slow  # trains and registers models

__all__ = ["store"]  # a fixture, used through `models`


@pytest.fixture(scope="module")
def models(store: str, digits_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """low/high: the untrained and the trained network on the same 300 digits (ordered by their
    real NMI); other: an untrained network on 200 of those digits (another data version)."""
    base = tmp_path_factory.mktemp("models")
    built = [build(Artifacts(base / f"epochs{n}"), digits_subset, n) for n in (0, 2)]
    low, high = sorted(built, key=lambda art: _metrics(art)["nmi"])
    assert _metrics(low)["nmi"] < _metrics(high)["nmi"], "equal NMIs cannot test promotion"
    fewer = base / "fewer_digits"
    for label_dir in sorted(p for p in digits_subset.iterdir() if p.is_dir()):
        (fewer / label_dir.name).mkdir(parents=True)
        for image in sorted(label_dir.iterdir())[:20]:
            shutil.copy2(image, fewer / label_dir.name / image.name)
    other = build(Artifacts(base / "other"), fewer, 0)
    return {"images": digits_subset, "low": low, "high": high, "other": other, "uri": store}


@pytest.fixture(scope="module")
def registered(models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`deepcluster`: low, high, then low re-evaluated (other figures beside the same NMI), each
    clear of its baselines: all three branches of the champion comparison."""
    base = tmp_path_factory.mktemp("registered")
    arts = [
        clear_of_baselines(models["low"], base / "low"),
        clear_of_baselines(models["high"], base / "high"),
        clear_of_baselines(models["low"], base / "again", knn_top1=0.5),
    ]
    return {**models, "arts": arts, "regs": [registry.register_model(art) for art in arts]}


def test_an_identical_model_adds_no_version(registered):
    client = MlflowClient()
    count = len(client.search_model_versions("name = 'deepcluster'"))
    same = registry.register_model(registered["arts"][1])
    assert same.version == registered["regs"][1].version and same.promoted
    assert "already registered as version 2" in same.summary()
    assert len(client.search_model_versions("name = 'deepcluster'")) == count


def _metrics(art: Artifacts) -> dict:
    return json.loads(art.metrics.read_text())


def _champion(name: str) -> str | None:
    return promotion._champion_version(MlflowClient(), name)


# ---------------------------------------------------------------------------------------------
# The promotion rule


def test_a_model_not_above_doing_nothing_stays_candidate_and_says_why(models):
    """The untrained network is its own random-init baseline: equal on every figure, so not
    above it, and never champion, not even as the first version. The reason names the baseline
    and the figures, in the version's tags and in the one line `register` prints."""
    untrained = registry.register_model(models["low"], name="gate")
    assert not untrained.promoted and _champion("gate") is None
    assert untrained.reason.startswith("not above the random-init network on nmi (")
    nmi = _metrics(models["low"])["nmi"]
    assert f"nmi ({nmi:.3f} = {nmi:.3f})" in untrained.reason
    assert untrained.summary().endswith(f"{untrained.reason}; stays candidate")
    tags = MlflowClient().get_model_version("gate", untrained.version).tags
    assert tags["promotion_reason"] == untrained.reason
    assert (tags["promoted"], tags["beats_baselines"]) == ("false", "false")

    # the same model with baselines it does beat becomes champion: only the gate held it back
    cleared = registry.register_model(clear_of_baselines(models["low"], models["low"].root.parent
                                                         / "gate-cleared"), name="gate")  # fmt: skip
    assert cleared.promoted and cleared.reason == "no champion before"
    assert MlflowClient().get_model_version("gate", cleared.version).tags["beats_baselines"] == "true"


def test_beating_doing_nothing_is_strictly_above_on_each_gated_figure():
    labelled = {key: 0.8 for key in promotion.LABELLED_GATE} | {"shortcut": 0.9}
    labelled |= {f"{key}_{base}": 0.5 for key in labelled for base in ("random_init", "pixels")}
    assert promotion.baseline_shortfalls(labelled) == ()  # shortcut: a warning, not gated
    labelled |= {"accuracy_random_init": 0.8, "knn_top1_pixels": 0.9, "ari_pixels": 0.8000001}
    assert promotion.baseline_shortfalls(labelled) == (
        "not above the random-init network on accuracy (0.800 = 0.800)",
        "not above raw pixels on ari (0.8 < 0.8000001), knn_top1 (0.800 < 0.900)",
    )
    # without labels: the label-free figures against the untrained network (pixels only shown)
    unlabelled = {"seed_stability": 0.9, "seed_stability_random_init": 0.8, "knn_agreement": 0.5,
                  "knn_agreement_random_init": 0.6, "seed_stability_pixels": 0.95}  # fmt: skip
    assert promotion.baseline_shortfalls(unlabelled) == (
        "not above the random-init network on knn_agreement (0.500 < 0.600)",
    )
    assert promotion.baseline_shortfalls({"nmi": 0.9})[0].startswith("not above the random-init "
                                                                      "network on nmi (no baseline")
    # a champion recorded below its baselines (set by hand) blocks nothing
    below = promotion.Record("1", "nmi", 0.9, "m", ("not above raw pixels on nmi",))
    assert not promotion.judge(below, None).promote
    verdict = promotion.judge(promotion.Record("2", "nmi", 0.1, "m"), below)
    assert verdict.promote and verdict.reason == "champion version 1 does not beat its baselines"


def test_first_version_is_champion_a_better_one_takes_over_a_worse_one_does_not(registered):
    first, better, worse = registered["regs"]
    assert (first.version, first.promoted, first.champion_before) == ("1", True, None)
    assert first.metric == "nmi"  # labels exist, so "auto" means NMI against them
    assert (better.version, better.promoted, better.champion_before) == ("2", True, "1")
    assert better.value > first.value == better.champion_value
    assert (worse.version, worse.promoted, worse.champion_before) == ("3", False, "2")
    assert worse.value < worse.champion_value == better.value

    client = MlflowClient()
    assert str(client.get_model_version_by_alias("deepcluster", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("deepcluster", "candidate").version) == "3"
    tags = client.get_model_version("deepcluster", "3").tags
    assert tags["promotion_metric"] == "nmi" and tags["promoted"] == "false"
    run_md5 = client.get_run(worse.run_id).data.tags["data_md5"]
    assert tags["data_md5"] == run_md5 == worse.data_md5
    assert first.summary().endswith("no champion before; now champion")
    assert f"champion was version 2 with {better.value:.4f}; stays candidate" in worse.summary()


def test_each_version_is_judged_by_its_own_recorded_value(models, tmp_path):
    """One run registered twice: first with NMI x, then re-evaluated (the run's eval/nmi drops to
    y) and registered with z, y < z < x. The champion (x) must stay: comparing z with the run's
    latest metric (y) moved the champion to a worse model."""
    x = _metrics(models["high"])["nmi"]
    first = registry.register_model(clear_of_baselines(models["high"], tmp_path / "a"), name="own")
    rescored = with_metrics(models["high"], tmp_path / "b", nmi=x - 0.3)
    tracking.log_evaluation(first.run_id, _metrics(rescored), rescored.eval_dir)
    assert MlflowClient().get_run(first.run_id).data.metrics["eval/nmi"] == pytest.approx(x - 0.3)

    second = registry.register_model(clear_of_baselines(models["high"], tmp_path / "c", nmi=x - 0.1),
                                     name="own")  # fmt: skip
    assert (first.promoted, second.promoted, second.run_id) == (True, False, first.run_id)
    assert second.champion_value == pytest.approx(x) and _champion("own") == first.version


def test_nan_never_becomes_champion_and_never_blocks_a_real_one(models, tmp_path):
    # a NaN in metrics.json is refused before anything is registered (tests/test_figures.py has
    # the other bad files)
    nan = with_metrics(models["low"], tmp_path / "a", nmi=float("nan"))
    with pytest.raises(UserError, match="metrics.json: NaN is not a finite number"):
        registry.register_model(nan, name="nan")
    assert MlflowClient().search_registered_models("name = 'nan'") == []

    real = registry.register_model(clear_of_baselines(models["low"], tmp_path / "real"), name="nan")
    assert real.promoted and _champion("nan") == real.version

    # a champion set by hand to a version with no usable value (NaN, a value forged out of its
    # range, or no tags at all) does not block a real one, even a worse one
    client = MlflowClient()
    unusable = [{"promotion_value": "nan"}, {"promotion_value": "5.0"}, None]
    for index, recorded in enumerate(unusable):
        tags = {"promotion_metric": "nmi", "data_md5": real.data_md5, **recorded} if recorded else {}
        hand = client.create_model_version("nan", real.model_uri, run_id=real.run_id, tags=tags)
        client.set_registered_model_alias("nan", "champion", hand.version)
        rescored = clear_of_baselines(models["low"], tmp_path / f"worse{index}", nmi=0.01 + index / 100)
        worse = registry.register_model(rescored, name="nan")
        assert worse.promoted and worse.reason == f"champion version {hand.version} has no usable value"


def test_models_of_other_data_are_not_compared(models, tmp_path):
    champion = registry.register_model(clear_of_baselines(models["high"], tmp_path / "high"), name="data")
    better_elsewhere = clear_of_baselines(models["other"], tmp_path / "other", nmi=0.999)
    other = registry.register_model(better_elsewhere, name="data")
    assert champion.data_md5 and other.data_md5 and champion.data_md5 != other.data_md5
    assert not other.promoted and _champion("data") == champion.version
    assert (
        f"champion version {champion.version} was trained on other data "
        f"(data_md5 {champion.data_md5} vs {other.data_md5})" in other.summary()
    )
    tags = MlflowClient().get_model_version("data", other.version).tags
    assert tags["promoted"] == "false" and "other data" in tags["promotion_reason"]


def test_a_collapsed_model_is_refused(models, tmp_path):
    k = PARAMS.cluster.k
    cases = (
        ({"largest_cluster_share_kmeans": 0.8}, r"largest cluster holds 80% of the images \(limit"),
        (
            {"empty_clusters_kmeans": k // 2 + 1, "k": k},
            f"k-means left {k // 2 + 1} of {k} clusters",
        ),
    )
    for index, (figures, named) in enumerate(cases):
        collapsed = with_metrics(models["high"], tmp_path / f"collapsed{index}", **figures)
        with pytest.raises(UserError, match=f"not registering a collapsed model: {named}"):
            registry.register_model(collapsed, name="collapsed")
    assert MlflowClient().search_registered_models("name = 'collapsed'") == []
    healthy = {"largest_cluster_share_kmeans": 0.3, "empty_clusters_kmeans": 2, "k": k}
    assert registry.register_model(clear_of_baselines(models["high"], tmp_path / "ok", **healthy),
                                   name="collapsed").promoted  # fmt: skip


@pytest.mark.parametrize("lock", ["file", "registry"])
def test_concurrent_registrations_end_with_the_better_champion(models, tmp_path, monkeypatch, lock):
    """B (0.2) decides to beat the champion (0.1); before B sets the alias, A (0.3) registers.
    Unguarded, A promotes itself and B then overwrites it: the worse model ends as champion.
    Under the guard A waits for B's decision, then beats B; under the file lock of a local
    store and under the tag lock a tracking server gets (forced here on the local store)."""
    name = f"race-{lock}"
    if lock == "registry":
        monkeypatch.setattr(promotion, "local_store_path", lambda uri: None)
        monkeypatch.setattr(promotion, "SETTLE", 0.1)
    base = registry.register_model(
        clear_of_baselines(models["low"], tmp_path / "c", nmi=0.1), name=name
    )
    b_art = clear_of_baselines(models["low"], tmp_path / "b", nmi=0.2)
    a_art = clear_of_baselines(models["high"], tmp_path / "a", nmi=0.3)
    results: dict[str, registry.Registration] = {}
    a_thread = threading.Thread(target=lambda: results.update(a=_register(a_art, name)))
    set_alias, started = MlflowClient.set_registered_model_alias, []

    def b_sets_champion_late(self, model, alias, version):
        if alias == "champion" and model == name and not started:
            started.append(a_thread)
            a_thread.start()  # A registers now, between B's decision and B's write
            _wait_for_version_or_end(a_thread, name, version=3)
        return set_alias(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", b_sets_champion_late)
    results["b"] = _register(b_art, name)
    a_thread.join(timeout=120)
    assert base.promoted and results["b"].promoted  # B beat the champion it saw
    assert results["a"].promoted and results["a"].champion_before == results["b"].version
    assert _champion(name) == results["a"].version
    assert promotion.TAG_LOCK not in MlflowClient().get_registered_model(name).tags


def _register(art: Artifacts, name: str) -> registry.Registration:
    return registry.register_model(art, name=name)


def _wait_for_version_or_end(thread: threading.Thread, name: str, version: int) -> None:
    """Until `thread` finished, or registered `version` and had 2 s to reach the lock."""
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        found = MlflowClient().search_model_versions(f"name = '{name}'")
        if any(int(v.version) >= version for v in found):
            thread.join(timeout=2)
            return
        time.sleep(0.2)


def test_the_registry_mutex_excludes_breaks_stale_locks_and_registers_nothing(store, monkeypatch):
    """The lock a tracking server gets, exercised here on the sqlite store: a tag on the model,
    present only while held, never a registered model of its own."""
    client = MlflowClient()
    client.create_registered_model("mutex")
    monkeypatch.setattr(promotion, "SETTLE", 0.05)
    held = "promotion lock of 'mutex' held for 1 s by .*holder"
    with (
        promotion.registry_mutex(client, "mutex"),
        pytest.raises(UserError, match=held),
        promotion.registry_mutex(client, "mutex", timeout=1),
    ):
        pass
    with promotion.registry_mutex(client, "mutex", timeout=1):  # released on exit
        assert promotion.TAG_LOCK in client.get_registered_model("mutex").tags
    assert promotion.TAG_LOCK not in client.get_registered_model("mutex").tags
    stale = json.dumps({"holder": "a process that died", "since": time.time() - 3600})
    client.set_registered_model_tag("mutex", promotion.TAG_LOCK, stale)
    with promotion.registry_mutex(client, "mutex", timeout=5):
        pass
    assert promotion.TAG_LOCK not in client.get_registered_model("mutex").tags
    assert not [m.name for m in client.search_registered_models() if m.name.endswith(".lock")]


def test_the_registry_mutex_admits_one_holder_at_a_time(store, monkeypatch):
    """Four contenders, each reading and writing a shared counter inside the lock."""
    client = MlflowClient()
    client.create_registered_model("mutex4")
    monkeypatch.setattr(promotion, "SETTLE", 0.3)  # above a contended sqlite write
    counter, inside, overlaps, errors = [0], [0], [], []

    def contender() -> None:
        try:
            for _ in range(3):
                with promotion.registry_mutex(client, "mutex4", timeout=60):
                    inside[0] += 1
                    overlaps.append(inside[0])
                    value = counter[0]
                    time.sleep(0.02)
                    counter[0] = value + 1
                    inside[0] -= 1
        except Exception as error:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and counter[0] == 12 and max(overlaps) == 1


# ---------------------------------------------------------------------------------------------
# Using a registered model


README_SNIPPET = """
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/deepcluster@champion")
out = model.predict(pd.DataFrame({"path": paths}), params={"allow_paths": True})
"""


def test_the_champion_in_another_process_assigns_like_the_pipeline(registered, tmp_path):
    high: Artifacts = registered["high"]
    table = pl.read_parquet(high.assignments)
    paths = [str(registered["images"] / p) for p in table["path"]]
    script = (
        f"import json, sys\npaths = json.loads(sys.argv[1])\n{README_SNIPPET}"
        "out[['cluster']].to_parquet(sys.argv[2])\n"
        "assert 'matplotlib' not in sys.modules and 'deepcluster.evaluate' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model brings its code
    env["MLFLOW_TRACKING_URI"] = registered["uri"]
    result = tmp_path / "clusters.parquet"
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(paths), str(result)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pd.read_parquet(result)["cluster"].to_numpy()
    assert np.mean(predicted == table["cluster"].to_numpy()) >= 0.99


def test_predict_command_writes_assignments(registered, tmp_path):
    high: Artifacts = registered["high"]
    out = tmp_path / "assignments.parquet"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    done = run_cli("predict", str(registered["images"]), "--out", str(out), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = pl.read_parquet(out)
    assert predicted.columns == ["path", "cluster", "distance", "embedding"]
    expected = pl.read_parquet(high.assignments)
    assert predicted["path"].to_list() == [str(registered["images"] / p) for p in expected["path"]]
    assert (predicted["cluster"] == expected["cluster"]).mean() >= 0.99
    assert len(predicted["embedding"][0]) == PARAMS.model.embed_dim


def test_the_model_takes_lists_series_and_frames(registered):
    """A plain list of paths once failed with `need at least one array to stack`."""
    model = mlflow.pyfunc.load_model("models:/deepcluster@champion")
    files = sorted(registered["images"].rglob("*.png"))[:3]
    paths = [str(p) for p in files]
    allow = {"allow_paths": True}
    expected = model.predict(pd.DataFrame({"path": paths}), params=allow)
    assert list(expected.columns) == ["cluster", "distance", "embedding"] and len(expected) == 3
    for given in (paths, tuple(paths), pd.Series(paths), np.array(paths), {"path": paths}):
        out = model.predict(given, params=allow)
        assert out["cluster"].tolist() == expected["cluster"].tolist(), type(given)
    encoded = [p.read_bytes() for p in files]
    for given in (encoded, pd.Series(encoded, name="image"), pd.DataFrame({"image": encoded})):
        assert model.predict(given)["cluster"].tolist() == expected["cluster"].tolist()

    for empty in ([], pd.DataFrame({"path": []}), pd.Series([], dtype=object)):
        out = model.predict(empty)
        assert list(out.columns) == ["cluster", "distance", "embedding"] and len(out) == 0
    for wrong in (42, [[paths[0]]], pd.DataFrame({"file": paths, "size": [1, 2, 3]})):
        with pytest.raises(InputError, match="expected a list or Series of image paths") as err:
            model.predict(wrong)
        assert EXPECTED_INPUT in str(err.value)


def test_bad_input_gets_a_clear_error(registered):
    model = mlflow.pyfunc.load_model("models:/deepcluster@candidate")
    with pytest.raises(UserError, match="row 0: not a decodable image: cannot identify"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))
    with pytest.raises(UserError, match=r"row 0 \(nowhere.png\): no such file"):
        model.predict(["nowhere.png"], params={"allow_paths": True})
    with pytest.raises(UserError, match=r"reading files needs params=\{'allow_paths': True\}"):
        model.predict([str(next(registered["images"].rglob("*.png")))])


def test_an_unknown_metric_names_the_usable_ones(registered):
    with pytest.raises(UserError, match="metric 'accurcy': not a figure of metrics.json.*accuracy"):
        registry.register_model(registered["high"], metric="accurcy")
