"""Which registered version holds `champion`: the rule (`judge`) and the guard around setting it.
A version must first beat doing nothing (`baseline_shortfalls`); then the recorded tags decide: a
value that is not usable neither wins nor blocks, only the same data md5 and metric compare, and
strictly better wins. MLflow aliases have no compare-and-set: `promote` holds `promotion_lock`."""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import figures, lock
from .errors import UserError

CANDIDATE, CHAMPION = "candidate", "champion"
TAG_METRIC, TAG_VALUE, TAG_DATA = "promotion_metric", "promotion_value", "data_md5"
TAG_PROMOTED, TAG_REASON = "promoted", "promotion_reason"
TAG_BASELINES = "beats_baselines"  # "true"/"false": above the untrained network and raw pixels
TAG_DIGEST = "model_digest"  # sha256 of the registered weights, clustering and figures
TAG_LOCK = "promotion_lock"  # registered-model tag of `registry_mutex`, present only while held
LOCK_TIMEOUT = 120.0  # seconds to wait for another registration's decision (it takes < 1 s)
STALE_LOCK = 300.0  # a registry lock older than this was left by a process that died
SETTLE = 1.0  # registry_mutex: seconds between writing the token and reading it back
ROUNDS = 5  # decide-and-set attempts while other writers keep moving the alias


@dataclass(frozen=True)
class Record:
    """What one version recorded about itself at registration."""

    version: str
    metric: str | None
    value: float | None  # None when missing or NaN
    data_md5: str | None
    shortfalls: tuple[str, ...] = ()  # where it is not above a baseline: never champion

    @classmethod
    def of(cls, client: MlflowClient, version) -> Record:
        """A version's record from its tags; a value the schema refuses (a tag edited to an NMI
        of 5, a lower-is-better figure) is no usable value, so it cannot block a real one."""
        tags = version.tags or {}
        metric = tags.get(TAG_METRIC)
        return cls(
            version=str(version.version),
            metric=metric,
            value=figures.usable(metric, _number(tags.get(TAG_VALUE))),
            data_md5=tags.get(TAG_DATA) or _run_data_md5(client, version.run_id),
            shortfalls=("not above its baselines",) if tags.get(TAG_BASELINES) == "false" else (),
        )


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str  # why, in a few words, for the summary and the version's tags
    champion: Record | None  # the champion it was judged against


def judge(new: Record, champion: Record | None) -> Verdict:
    """The promotion rule (module docstring) for `new` against the current champion."""

    def verdict(promote: bool, reason: str) -> Verdict:
        return Verdict(promote, reason, champion)

    if new.shortfalls:
        return verdict(False, "; ".join(new.shortfalls))
    if new.value is None:
        return verdict(False, f"its {new.metric} is not a number, which never becomes champion")
    if champion is None:
        return verdict(True, "no champion before")
    if champion.value is None:
        return verdict(True, f"champion version {champion.version} has no usable value")
    if champion.shortfalls:  # set by hand, or by a release before this rule
        return verdict(True, f"champion version {champion.version} does not beat its baselines")
    if new.data_md5 is None:
        return verdict(False, "its run has no data_md5 tag, so its data cannot be compared")
    if champion.data_md5 != new.data_md5:
        return verdict(
            False,
            f"champion version {champion.version} was trained on other data "
            f"(data_md5 {champion.data_md5} vs {new.data_md5}); only one data version is compared",
        )
    if champion.metric != new.metric:
        return verdict(
            False,
            f"champion version {champion.version} was ranked by {champion.metric}, not "
            f"{new.metric}; register with --metric {champion.metric} to compare",
        )
    better = new.value > champion.value
    return verdict(better, f"champion was version {champion.version} with {champion.value:.4f}")


def promote(client: MlflowClient, name: str, new: Record) -> Verdict:
    """Judge `new` against the champion and move the alias if it wins, as one guarded step.

    Under `promotion_lock`, no other registration through this library decides meanwhile. The
    alias is still re-read before and after setting it, for writers that do not take the lock
    (the MLflow UI, other tools): a change means deciding again against the new champion.
    A metric that cannot decide champion, or a value outside its range, is refused (UserError).
    """
    figures.require_promotable(new.metric)
    if new.value is not None and figures.usable(new.metric, new.value) is None:
        rule = figures.FIGURES[new.metric].rule()
        raise UserError(f"version {new.version}: {new.metric} = {new.value!r}: {rule}")
    with promotion_lock(client, name):
        for _ in range(ROUNDS):
            champion = current_champion(client, name)
            verdict = judge(new, champion)
            if not verdict.promote:
                return verdict
            if _champion_version(client, name) != (champion and champion.version):
                continue  # moved while we decided
            client.set_registered_model_alias(name, CHAMPION, new.version)
            if _champion_version(client, name) == new.version:
                return verdict
    return Verdict(False, "the champion kept changing during registration; not moved", champion)


BASELINE_NAMES = {"random_init": "the random-init network", "pixels": "raw pixels"}
# with labels, what a model must beat both baselines on: every class-level figure the report shows
LABELLED_GATE = tuple(figures.PROBES)


def baseline_shortfalls(metrics: dict) -> tuple[str, ...]:
    """Where the model does not beat doing nothing (strictly above), one entry per baseline, e.g.
    "not above the random-init network on accuracy (0.853 < 0.879), ari (0.754 < 0.765)".

    With labels: `LABELLED_GATE` (NMI, ARI, accuracy, kNN, linear probe, nmi_k, purity_k) against
    the random-init network and raw pixels. Without: the label-free figures (`figures.LABEL_FREE`:
    seed stability, kNN agreement) against the random-init network; raw pixels, clustered raw,
    win those on 300 digits even against a v1 model above both on NMI, ARI, accuracy, kNN and
    linear. A missing baseline figure counts as not beaten; the collapse guard runs before."""
    labelled = metrics.get("nmi") is not None
    compared = LABELLED_GATE if labelled else tuple(figures.LABEL_FREE)
    rows = [row for row in figures.beside_baselines(metrics) if row["metric"] in compared]
    if not rows:
        return ("metrics.json has none of " + ", ".join(compared),)
    found = []
    for base in BASELINE_NAMES if labelled else ("random_init",):
        short = [_short(row["metric"], row["trained"], row[base]) for row in rows
                 if row[base] is None or not row["trained"] > row[base]]  # fmt: skip
        if short:
            found.append(f"not above {BASELINE_NAMES[base]} on {', '.join(short)}")
    return tuple(found)


def _short(metric: str, value: float, base: float | None) -> str:
    if base is None:
        return f"{metric} (no baseline figure)"
    shown, base_shown = _apart(value, base)
    return f"{metric} ({shown} {'=' if value == base else '<'} {base_shown})"


def _apart(value: float, base: float) -> tuple[str, str]:
    """Both figures to 3 decimals, or as many as it takes to tell them apart."""
    for digits in (3, 6):
        shown = f"{value:.{digits}f}", f"{base:.{digits}f}"
        if shown[0] != shown[1] or value == base:
            return shown
    return repr(value), repr(base)


def current_champion(client: MlflowClient, name: str) -> Record | None:
    try:
        return Record.of(client, client.get_model_version_by_alias(name, CHAMPION))
    except MlflowException:
        return None


def _champion_version(client: MlflowClient, name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _run_data_md5(client: MlflowClient, run_id: str | None) -> str | None:
    """Versions registered before `data_md5` became a version tag: their run's tag (a run has
    one data version, unlike its metrics)."""
    try:
        return client.get_run(run_id).data.tags.get(TAG_DATA) if run_id else None
    except MlflowException:
        return None


# ---------------------------------------------------------------------------------------------
# The lock


@contextmanager
def promotion_lock(client: MlflowClient, name: str) -> Iterator[None]:
    """Mutual exclusion for deciding and setting `champion` of model `name`.

    A registry in a local file (sqlite, a file store) is locked with the file lock beside it
    (`<store>.lock`, the one a local store's first migration takes too). Any other registry (a
    tracking server) through the registry itself: `registry_mutex`.
    """
    path = local_store_path(mlflow.get_registry_uri())
    if path is None:
        with registry_mutex(client, name):
            yield
    else:
        with lock.waiting(path, LOCK_TIMEOUT, "another registration"):
            yield


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local registry URI; None for a remote one."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        location = uri.split("sqlite:///", 1)[-1] if uri.startswith("sqlite:///") else ""
        return Path(location).resolve() if location and location != ":memory:" else None
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri).resolve()
    return None


@contextmanager
def registry_mutex(client: MlflowClient, name: str, timeout: float = LOCK_TIMEOUT):
    """A lock any MLflow registry can hold, without a compare-and-set: Fischer's algorithm on the
    tag `promotion_lock` of registered model `name`. Wait until the tag is absent (or stale: set
    more than STALE_LOCK seconds ago, by a process that died), write our token, wait SETTLE
    seconds, and hold the lock if the token is still ours; otherwise another contender wrote after
    us, and we wait again. Safe while every contender writes within SETTLE seconds of reading the
    tag absent; should one ever take longer, `promote` still re-reads the alias before and after
    setting it. Nothing is registered for it: the tag shows on the model only while held."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline, token, problem = time.monotonic() + timeout, None, ""
    while True:
        held = _lock_tag(client, name)
        if held is None or time.time() - _since(held) > STALE_LOCK:
            token = json.dumps({"holder": holder, "since": time.time()})
            try:
                client.set_registered_model_tag(name, TAG_LOCK, token)
            except MlflowException as error:  # a store whose upsert fails on a concurrent insert
                problem = f" (last write failed: {error.message})"
            else:
                time.sleep(SETTLE)
                if _lock_tag(client, name) == token:
                    break
        if time.monotonic() > deadline:
            raise UserError(f"promotion lock of {name!r} held for {timeout:g} s by {held}{problem}")
        time.sleep(0.2)
    try:
        yield
    finally:
        if _lock_tag(client, name) == token:
            client.delete_registered_model_tag(name, TAG_LOCK)


def _lock_tag(client: MlflowClient, name: str) -> str | None:
    return client.get_registered_model(name).tags.get(TAG_LOCK)


def _since(token: str) -> float:
    try:
        return float(json.loads(token)["since"])
    except (ValueError, KeyError, TypeError):
        return 0.0  # not ours to read: stale
