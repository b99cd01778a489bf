"""Dataset channels: a named pointer in the store to the newest pushed dataset, with its history.

``datasets/channels/<name>.json`` holds ``{"channel", "head", "history": [entry, ...]}``; each entry
is one push: its sequence number (push order, 1, 2, ...), the immutable dataset URI and fingerprint,
the push's event id, when and by whom. `protein datasets push` appends an entry by compare-and-swap
on the pointer's etag (as the champion pointer moves), so concurrent pushes form one line: the loser
re-reads and appends after the winner, nothing is lost. A retry whose first attempt landed finds
its event id and appends nothing.

A flow's ``data`` may name a channel instead of a dataset (`ChannelRef`): ``channel:<name>``
(relative to the flow's store) or ``<store URI>/datasets@<name>``. It is resolved once, at run
start, to the head entry; everything after works on that entry's immutable URI and fingerprint,
so a push during the run changes nothing in it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from protein.errors import DataError, NotFound, PreconditionFailed, RecordError, StoreError
from protein.storage import Store, open_store
from protein.storage.records import record_cap

log = logging.getLogger(__name__)

CHANNEL_FORMAT = "protein-channel/1"
CHANNELS_PREFIX = "datasets/channels"
DEFAULT_CHANNEL = "latest"
CHANNEL_SCHEME = "channel:"
STORE_CHANNEL_MARK = "/datasets@"
CHANNEL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Concurrent pushes each retry their append after losing the compare-and-swap; more losses in a
# row than this means something rewrites the pointer in a loop.
MAX_APPEND_ATTEMPTS = 8


def check_channel_name(name: str) -> str:
    if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name) or ".." in name:
        raise DataError(f"invalid dataset channel name {name!r} (expected lowercase letters, digits, '.', '_' or "
                        "'-', at most 64, starting with a letter or digit)")
    return name


def channel_key(name: str) -> str:
    return f"{CHANNELS_PREFIX}/{check_channel_name(name)}.json"


@dataclass(frozen=True)
class ChannelRef:
    """A flow parameter that names a channel: which store, which channel."""

    store: str | None  # None: the flow's own store (the ``channel:<name>`` form)
    name: str

    def describe(self) -> str:
        return f"{CHANNEL_SCHEME}{self.name}" if self.store is None else f"{self.store}{STORE_CHANNEL_MARK}{self.name}"


def parse_channel_ref(data: str) -> ChannelRef | None:
    """The channel ``data`` names, or None when it names a dataset. DataError when it has a
    channel's form but an unusable name (``channel:`` with nothing after it, say)."""
    text = data.strip()
    if text.startswith(CHANNEL_SCHEME):
        return ChannelRef(None, check_channel_name(text.removeprefix(CHANNEL_SCHEME)))
    if STORE_CHANNEL_MARK in text:
        store, _, name = text.rpartition(STORE_CHANNEL_MARK)
        if not store:
            raise DataError(f"{text!r}: name the store before /datasets@{name} (e.g. s3://bucket/prefix/datasets@latest)")
        return ChannelRef(store, check_channel_name(name))
    return None


@dataclass(frozen=True)
class ChannelEntry:
    """One push on a channel."""

    sequence: int
    uri: str
    fingerprint: str
    event_id: str
    pushed_at: str
    actor: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ChannelEntry:
        return cls(int(doc["sequence"]), str(doc["uri"]), str(doc["fingerprint"]), str(doc["event_id"]),
                   str(doc["pushed_at"]), str(doc["actor"]))


@dataclass(frozen=True)
class Channel:
    name: str
    history: tuple[ChannelEntry, ...]  # oldest first
    etag: str | None  # None: no pointer yet

    @property
    def head(self) -> ChannelEntry | None:
        return self.history[-1] if self.history else None

    def entry_for_event(self, event_id: str) -> ChannelEntry | None:
        return next((e for e in self.history if e.event_id == event_id), None)

    def push_order(self, fingerprint: str) -> int | None:
        """Where this data stands in push order: the sequence of its latest push (data pushed again
        is as new as its newest push), None when it was never pushed on this channel."""
        found = [e.sequence for e in self.history if e.fingerprint == fingerprint]
        return max(found) if found else None

    def to_doc(self) -> dict[str, Any]:
        head = self.head
        return {"format": CHANNEL_FORMAT, "channel": self.name, "head": head.to_dict() if head else None,
                "history": [e.to_dict() for e in self.history]}


def read_channel(store: Store, name: str) -> Channel:
    """The channel as stored now; an empty one (no history, etag None) when nothing was pushed."""
    key = channel_key(name)
    etag = store.etag(key)
    if etag is None:
        return Channel(name, (), None)
    # The etag is read before the bytes: a write landing in between makes our compare-and-swap
    # fail safe (a spurious retry), never lose a push.
    try:
        # Under the records' size cap, like every record read from the store (a RecordError, exit 8).
        doc = json.loads(store.get_bytes(key, max_bytes=record_cap()))
        history = tuple(ChannelEntry.from_dict(e) for e in doc["history"])
    except NotFound:
        return Channel(name, (), None)
    except (ValueError, KeyError, TypeError) as exc:
        # A RecordError (exit 8), not a StoreError: nothing a retry could mend. Only the operator's
        # role may delete a channel record (docs/security.md).
        raise RecordError(f"{store.uri.rstrip('/')}/{key}: not a dataset channel ({exc}); an operator restores it "
                          "(docs/runbook.md, 'not a dataset channel')") from None
    return Channel(name, history, etag)


def advance_channel(store: Store, name: str, uri: str, fingerprint: str, event_id: str, actor: str,
                    pushed_at: str) -> ChannelEntry:
    """Append a push to the channel by compare-and-swap; returns its entry (the existing one when
    this event id already landed: a retried request)."""
    for _ in range(MAX_APPEND_ATTEMPTS):
        channel = read_channel(store, name)
        if (landed := channel.entry_for_event(event_id)) is not None:
            return landed
        entry = ChannelEntry(channel.head.sequence + 1 if channel.head else 1, uri, fingerprint, event_id,
                             pushed_at, actor)
        new = Channel(name, (*channel.history, entry), None)
        body = json.dumps(new.to_doc(), indent=1).encode()
        try:
            if channel.etag is None:
                store.put_bytes(channel_key(name), body, if_none_match=True)
            else:
                store.put_bytes(channel_key(name), body, if_match=channel.etag)
        except PreconditionFailed:
            log.info("channel %s moved during this push; appending after the newer push", name)
            continue
        log.info("channel %s -> %s (push %d)", name, uri, entry.sequence)
        return entry
    raise StoreError(f"{store.uri.rstrip('/')}/{channel_key(name)}: lost {MAX_APPEND_ATTEMPTS} compare-and-swaps in "
                     "a row; the dataset is pushed but the channel did not move (push again)")


@dataclass(frozen=True)
class ResolvedData:
    """What a run trains on: an immutable dataset, and the channel push it came from (if any)."""

    uri: str
    fingerprint: str | None  # None for a dataset named directly: validation computes it
    channel: str | None = None
    sequence: int | None = None
    event_id: str | None = None
    passed_over: list[int] = field(default_factory=list)  # newer pushes skipped: refused by validation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_data(data: str, store_uri: str, refused: Callable[[Store, str], bool] | None = None,
                 own_event_id: str | None = None) -> ResolvedData:
    """``data`` as a run uses it: a channel's newest push that validation has not refused
    (``refused(store, fingerprint)``; DataError when the channel has no push, or none but refused
    ones), or the dataset named directly, unchanged. The push whose event started the run
    (``own_event_id``) is never passed over: that run validates it itself.

    Without passing over refused pushes, one invalid push made every nightly after it validate the
    same bad data again, fail and alert, until someone pushed again (found by the soak test)."""
    ref = parse_channel_ref(data)
    if ref is None:
        return ResolvedData(data.strip(), None)
    store = open_store(ref.store or store_uri)
    history = read_channel(store, ref.name).history
    if not history:
        raise DataError(f"{ref.describe()}: no dataset was pushed on channel {ref.name!r} in {store.uri} "
                        f"(run `protein datasets push --data DATA --store {store.uri}` first)")
    # Verdicts are where runs store their validation reports: the run's own store, which is not the
    # channel's when ``data`` names a channel in another store.
    verdicts = store if ref.store is None else open_store(store_uri)
    passed_over: list[int] = []
    for entry in reversed(history):
        if entry.event_id == own_event_id or refused is None or not refused(verdicts, entry.fingerprint):
            if passed_over:
                log.warning("channel %s: pushes %s were refused by validation; using push %d (%s)", ref.name,
                            ", ".join(f"#{n}" for n in passed_over), entry.sequence, entry.fingerprint[:12])
            return ResolvedData(entry.uri, entry.fingerprint, ref.name, entry.sequence, entry.event_id, passed_over)
        passed_over.append(entry.sequence)
    raise DataError(f"{ref.describe()}: every push on channel {ref.name!r} in {store.uri} was refused by validation "
                    f"(newest: push #{history[-1].sequence}, {history[-1].fingerprint[:12]}); push a valid dataset")


def channel_of(data: str, store_uri: str) -> tuple[Store, str]:
    """The store and channel whose push order judges a run on ``data``: the channel it names,
    else the default channel of the run's store."""
    ref = parse_channel_ref(data)
    if ref is None:
        return open_store(store_uri), DEFAULT_CHANNEL
    return open_store(ref.store or store_uri), ref.name
