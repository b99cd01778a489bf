"""`protein datasets remove`: delete one dataset's manifest (``datasets/<fingerprint>/``) that nothing uses.

`protein datasets gc` deletes only content objects no manifest names, so without a way to remove a
manifest nothing a dataset names is ever freed. Removing a dataset deletes everything under
``datasets/<fingerprint>/`` (a format-2 dataset holds only its manifest there); its content objects are
then orphans unless another manifest names them, and the next `datasets gc` deletes them once older
than its guard. Objects shared with a kept dataset stay.

A dataset is kept (`StoreBusy`, exit 9, nothing removed) while anything may still read it:

- it is the head of any channel (``datasets/channels/*.json``): every run resolving that channel
  trains on it;
- it is what a run resolving a channel gets now (`resolve_data`): the newest push validation has not
  refused (`refused_by_validation`, judged in each store runs write their verdicts to), which is not the
  head after a refused push;
- a registered model version (every complete one, the champion included) records it as its
  ``data_fingerprint``: evaluating, gating or rolling back to that version reads its data;
- a run resolution (``gates/retrains/<flow run>/resolved.json``, protein.data.run_resolution) names
  it and is younger than `LIVE_RESOLUTION_S`. The store records when a run resolved its data, never
  that it finished, so liveness cannot be judged from the store: every resolution younger than the
  guard `protein models gc` keeps runs by (24 h) counts as a run still going, and its retries take it.

Versions and resolutions are where runs write them: the run's own store, which is not the dataset's
when a flow's ``data`` names a channel in another store (``s3://data/datasets@latest`` with
``store=s3://models``). They are read from the dataset's store and from every models store named
(``models_stores``, `--models-store`). A dataset store holding no registry (``registry/``, ``models/``) is what such a
split looks like, and reading only it would find no use and remove data a run is training on: without
``models_stores`` that is refused (`DataError`, exit 2); naming the dataset's own store says runs use it.

Pushes and removals exclude each other exactly as pushes and gc do (protein.data.gc_coordination):
the removal takes ``datasets/gc.lock`` and removes nothing while a push marker is live. A push moves
its channel while its marker is held (`push_dataset`'s ``on_complete``), so a removal that sees no
marker also sees the channel the push moved; a push that starts after the lock waits it out and,
finding the manifest gone, pushes the data whole again.

What the store's records cannot show is a run between reading a channel and writing its resolution
(it resolved by the verdicts of then, and a verdict may have changed since: a rollback of the
reference profile voids a refusal, so the checks see the channel resolve to a newer push): the uses
are read again after the manifest is deleted and, if one appeared, the removal fails (exit 9) saying
so; pushing the same data again restores the dataset (its objects stay until a gc). A training
started by hand on the dataset's URI (``--data s3://.../datasets/<fp>/``) records no resolution:
check with whoever runs such jobs before removing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from protein.data.channels import (
    CHANNEL_NAME,
    CHANNEL_SCHEME,
    CHANNELS_PREFIX,
    STORE_CHANNEL_MARK,
    read_channel,
    resolve_data,
)
from protein.data.gc_coordination import DEFAULT_TIMES, CoordinationTimes, GcLock, holders
from protein.data.manifest import (
    DATASET_MANIFEST,
    DATASETS_PREFIX,
    FINGERPRINT,
    MANIFEST,
    is_dataset_file_name,
    manifest_key,
    parse_manifest,
)
from protein.data.run_resolution import RESOLUTIONS_PREFIX
from protein.errors import DataError, NotFound, RecordError, StoreBusy
from protein.storage import Store, redacted_uri
from protein.storage.records import load_record, record_cap

log = logging.getLogger(__name__)

# The run age guard of `protein models gc` (protein.registry.retention.RUN_MIN_AGE_S): a run untouched
# that long counts as abandoned; a resolution younger than this counts as a run still going.
LIVE_RESOLUTION_S = 24 * 3600
# Where a registry writes (protein.registry): a store with neither never held a model version.
REGISTRY_PREFIXES = ("registry/", "models/")
ORPHANS_NOTE = ("its content objects that no other dataset names are now orphans: the next `protein datasets gc` "
                "deletes them once older than its --older-than-hours")


@dataclass(frozen=True)
class ResolutionSeen:
    """A run resolution as the store lists it: its key, the dataset it resolved to, its age on the store's clock."""

    key: str  # where it is: the store's URI and the key
    fingerprint: str | None  # None: not readable as a resolution (kept as a use while young: it may be one)
    age_s: float


@dataclass(frozen=True)
class DatasetUses:
    """Everything that may read a dataset of a store, gathered by `read_uses`."""

    channel_heads: dict[str, str]  # channel name -> its head's fingerprint
    version_data: dict[tuple[str, str], str | None]  # (store URI, complete model version) -> its data_fingerprint
    resolutions: list[ResolutionSeen]
    # (channel name, store of the verdicts) -> what a run resolving the channel trains on now
    channel_targets: dict[tuple[str, str], str] = field(default_factory=dict)


def reasons_kept(fingerprint: str, uses: DatasetUses, live_resolution_s: float = LIVE_RESOLUTION_S) -> list[str]:
    """Why ``fingerprint`` may not be removed (empty: nothing uses it). Pure."""
    reasons = [f"head of channel {name!r}" for name, head in sorted(uses.channel_heads.items()) if head == fingerprint]
    for (name, verdicts), target in sorted(uses.channel_targets.items()):
        if target == fingerprint and uses.channel_heads.get(name) != fingerprint:
            reasons.append(f"what runs resolving channel {name!r} train on (its newer pushes were refused by "
                           f"validation, verdicts in {verdicts})")
    for where in sorted({where for where, _ in uses.version_data}):
        versions = sorted(v for (at, v), data in uses.version_data.items() if at == where and data == fingerprint)
        if versions:
            shown = ", ".join(versions[:5]) + (f" and {len(versions) - 5} more" if len(versions) > 5 else "")
            reasons.append(f"data of model version(s) {shown} in {where}")
    for seen in uses.resolutions:
        if seen.age_s >= live_resolution_s or seen.fingerprint not in (fingerprint, None):
            continue
        what = "resolved to it" if seen.fingerprint == fingerprint else "not readable, so possibly resolved to it"
        reasons.append(f"run resolution {seen.key} ({what}, {seen.age_s / 3600:.1f} h old: the store cannot tell "
                       f"whether that run finished, so one younger than {live_resolution_s / 3600:g} h counts as live)")
    return reasons


def _channel_heads(store: Store) -> dict[str, str]:
    heads: dict[str, str] = {}
    for key in store.list(f"{CHANNELS_PREFIX}/"):
        name = key.removeprefix(f"{CHANNELS_PREFIX}/").removesuffix(".json")
        if not key.endswith(".json") or not CHANNEL_NAME.fullmatch(name):
            continue  # not a channel pointer (read_channel would refuse its name)
        head = read_channel(store, name).head  # RecordError when unreadable: then nothing is removed
        if head is not None:
            heads[name] = head.fingerprint
    return heads


def _version_data(store: Store) -> dict[tuple[str, str], str | None]:
    from protein.registry import Registry  # imported here: only this verb of protein.data needs it

    registry = Registry(store)
    where = redacted_uri(store.uri)
    found: dict[tuple[str, str], str | None] = {}
    for version, spec in registry.specs(registry.versions()).items():
        if isinstance(spec, Exception):
            raise RecordError(f"{spec}; no dataset is removed while a model version's record cannot be read "
                              "(the data it trained on is unknown)") from None
        data = spec.get("data_fingerprint")
        found[(where, version)] = data if isinstance(data, str) else None
    return found


def _resolutions(store: Store, live_resolution_s: float) -> list[ResolutionSeen]:
    now = store.clock()  # ages on the store's clock, never this host's
    seen: list[ResolutionSeen] = []
    for info in store.list_info(f"{RESOLUTIONS_PREFIX}/"):
        if not info.key.endswith("/resolved.json"):
            continue
        age = now - info.modified
        if age >= live_resolution_s:
            continue  # old: not read at all
        where = redacted_uri(_where(store, info.key))
        try:
            resolved = json.loads(store.get_bytes(info.key, max_bytes=record_cap()))["resolved"]
            fingerprint = resolved.get("fingerprint")
            seen.append(ResolutionSeen(where, fingerprint if isinstance(fingerprint, str) else None, age))
        except NotFound:
            continue  # removed since the listing
        except (ValueError, KeyError, TypeError, AttributeError, RecordError):
            seen.append(ResolutionSeen(where, None, age))
    return seen


def other_run_stores(store: Store, models_stores: Sequence[Store] | None) -> list[Store]:
    """The stores besides ``store`` whose versions and resolutions count for its datasets: ``models_stores``
    less ``store`` and repeats. Without ``models_stores``, `DataError` when ``store`` holds no registry:
    likely a split setup whose runs write elsewhere, where reading ``store`` alone finds no use of anything;
    and when a named models store (other than ``store``) holds none either."""
    if models_stores is None:
        if not any(store.list(prefix) for prefix in REGISTRY_PREFIXES):
            raise DataError(f"{redacted_uri(store.uri)} holds no model registry (registry/, models/), so the runs that "
                            "train on its datasets may record their versions and resolutions in another store: name "
                            "it with --models-store URI (this store's own URI when runs use it); nothing removed")
        return []
    others: dict[str, Store] = {}
    for other in models_stores:
        if other.uri == store.uri or other.uri in others:
            continue
        # A mistyped models store (another prefix of an existing bucket) reads as one where nothing is
        # used: the dataset the real one's versions and runs train on would be removed.
        if not any(other.list(prefix) for prefix in REGISTRY_PREFIXES):
            raise DataError(f"--models-store {redacted_uri(other.uri)} holds no model registry (registry/, models/): "
                            "name the store the runs record their versions and resolutions in; nothing removed")
        others[other.uri] = other
    return list(others.values())


def read_uses(store: Store, models_stores: Sequence[Store] = (),
              live_resolution_s: float = LIVE_RESOLUTION_S) -> DatasetUses:
    """What may read a dataset of ``store`` now: its channel heads, and the registered versions and young
    resolutions in ``store`` and in each of ``models_stores`` (the other stores runs on its datasets write to)."""
    version_data: dict[tuple[str, str], str | None] = {}
    resolutions: list[ResolutionSeen] = []
    for run_store in [store, *models_stores]:
        version_data.update(_version_data(run_store))
        resolutions.extend(_resolutions(run_store, live_resolution_s))
    heads = _channel_heads(store)
    return DatasetUses(heads, version_data, resolutions, _channel_targets(store, sorted(heads), models_stores))


def _channel_targets(store: Store, channels: list[str], models_stores: Sequence[Store]) -> dict[tuple[str, str], str]:
    """What a run resolving each channel of ``store`` gets now, as the flows resolve it, for runs in
    ``store`` and in each of ``models_stores`` (where each run's validation verdicts are)."""
    from protein.validation.reference import refused_by_validation  # imported here: only this verb needs it

    targets: dict[tuple[str, str], str] = {}
    for name in channels:
        for run_store in [store, *models_stores]:
            # A run in the channel's store names it channel:<name>; a run elsewhere, <store>/datasets@<name>.
            data = (f"{CHANNEL_SCHEME}{name}" if run_store is store
                    else f"{store.uri.rstrip('/')}{STORE_CHANNEL_MARK}{name}")
            try:
                resolved = resolve_data(data, run_store.uri, refused=refused_by_validation)
            except DataError:
                continue  # every push refused: such a run fails before reading any dataset
            if resolved.fingerprint is not None:
                targets[(name, redacted_uri(run_store.uri))] = resolved.fingerprint
    return targets


def check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise DataError(f"{fingerprint!r} is not a dataset fingerprint (expected 16 lowercase hex digits, as "
                        "`protein datasets list` shows after datasets/)")
    return fingerprint


def _where(store: Store, key: str) -> str:
    return f"{store.uri.rstrip('/')}/{key}"


def _dataset_keys(store: Store, fingerprint: str) -> list[str]:
    """The keys under ``datasets/<fingerprint>/``; `NotFound` unless a manifest is among them."""
    keys = store.list(f"{DATASETS_PREFIX}/{fingerprint}/")
    if manifest_key(fingerprint) not in keys:
        raise NotFound(f"{_where(store, f'{DATASETS_PREFIX}/{fingerprint}/')}: no dataset (no {MANIFEST}); "
                       "`protein datasets list` shows the datasets in the store")
    return keys


def _refuse_if_used(store: Store, fingerprint: str, models_stores: Sequence[Store], live_resolution_s: float,
                    after_delete: bool = False) -> None:
    reasons = reasons_kept(fingerprint, read_uses(store, models_stores, live_resolution_s), live_resolution_s)
    if reasons:
        where = _where(store, f"{DATASETS_PREFIX}/{fingerprint}/")
        if after_delete:
            raise StoreBusy(f"{where}: its manifest was deleted, but a use appeared meanwhile: {'; '.join(reasons)}; "
                            "push the same data again to restore it")
        raise StoreBusy(f"{where} is still in use, nothing removed: {'; '.join(reasons)}")


def _summary(store: Store, fingerprint: str, keys: list[str]) -> dict[str, object]:
    key = manifest_key(fingerprint)
    try:
        manifest = parse_manifest(load_record(store, key, DATASET_MANIFEST), _where(store, key), fingerprint)
        files, size, form = len(manifest.files), manifest.doc.get("bytes"), manifest.format
    except (RecordError, DataError) as exc:  # a broken manifest may be removed too: say so, go on
        log.warning("%s; removing it anyway", exc)
        files, size, form = None, None, None
    return {"fingerprint": fingerprint, "uri": f"{_where(store, f'{DATASETS_PREFIX}/{fingerprint}')}/",
            "format": form, "files": files, "bytes": size, "keys": len(keys)}


def remove_dataset(store: Store, fingerprint: str, *, yes: bool = False, models_stores: Sequence[Store] | None = None,
                   times: CoordinationTimes = DEFAULT_TIMES, live_resolution_s: float = LIVE_RESOLUTION_S,
                   ) -> dict[str, object]:
    """What `protein datasets remove` prints. ``models_stores``: the stores runs on this store's datasets
    write their versions and resolutions to (`other_run_stores`). Without ``yes`` a dry run: checks, takes
    no lock, writes nothing. With ``yes``, under the gc lock: refuses while a push is live (`StoreBusy`), checks again
    that nothing uses the dataset, deletes its manifest, checks once more (`StoreBusy` if a use
    appeared meanwhile), then deletes the rest of ``datasets/<fingerprint>/``."""
    check_fingerprint(fingerprint)
    others = other_run_stores(store, models_stores)
    if not yes:
        keys = _dataset_keys(store, fingerprint)
        _refuse_if_used(store, fingerprint, others, live_resolution_s)
        return {**_summary(store, fingerprint, keys), "removed": False, "dry_run": True,
                "note": f"dry run, nothing deleted; with --yes {ORPHANS_NOTE}"}
    lock = GcLock.acquire(store, times)
    try:
        markers = lock.push_markers()
        if markers.live:
            raise StoreBusy(f"removed nothing: {len(markers.live)} push(es) in progress: "
                            f"{holders(store, markers.live)}; run remove again when they end")
        keys = _dataset_keys(store, fingerprint)
        _refuse_if_used(store, fingerprint, others, live_resolution_s)
        summary = _summary(store, fingerprint, keys)
        key = manifest_key(fingerprint)
        lock.check_held()
        store.delete(key)  # first: from here on the dataset is invisible to every reader
        # A run that read a channel before the checks and wrote its resolution after them: it fails
        # in one line opening the dataset. Said now, loudly, rather than found in tomorrow's alerts.
        _refuse_if_used(store, fingerprint, others, live_resolution_s, after_delete=True)
        folder = f"{DATASETS_PREFIX}/{fingerprint}/"
        # A format-1 full copy's own files (nothing for a format-2 dataset): only the names a dataset holds,
        # the ones the operator's role may delete there (deployments/iam/operator.json).
        rest = [k for k in store.list(folder) if k != key and is_dataset_file_name(k.removeprefix(folder))]
        lock.check_held()
        store.delete_keys(rest)
    finally:
        lock.release()
    log.info("removed dataset %s from %s", fingerprint, store.uri)
    return {**summary, "removed": True, "dry_run": False, "note": ORPHANS_NOTE}

