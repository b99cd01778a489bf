"""Dataset channels (protein.data.channels) over a real local store: push order, retried pushes,
concurrent pushes, and how a flow's `data` names a channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protein.data.channels import (
    ChannelRef,
    advance_channel,
    channel_key,
    parse_channel_ref,
    read_channel,
    resolve_data,
)
from protein.errors import DataError
from protein.storage import LocalStore
from protein.validation.reference import refused_by_validation, report_key


def push(store: LocalStore, fp: str, event: str) -> int:
    return advance_channel(store, "latest", f"{store.uri}/datasets/{fp}/", fp, event, "tester@host",
                           "2026-12-04T00:00:00Z").sequence


def test_pushes_append_in_order_and_the_head_is_the_newest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert [push(store, "a" * 16, "e1"), push(store, "b" * 16, "e2")] == [1, 2]
    channel = read_channel(store, "latest")
    assert channel.head is not None and channel.head.fingerprint == "b" * 16
    assert [e.event_id for e in channel.history] == ["e1", "e2"]


def test_a_retried_push_with_the_same_event_id_appends_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    push(store, "a" * 16, "e1")
    assert push(store, "a" * 16, "e1") == 1
    assert len(read_channel(store, "latest").history) == 1


class RacingStore(LocalStore):
    """A real local store where another push lands between this push's read and its write, once."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.raced = False

    def put_bytes(self, key: str, data: bytes, **kwargs):  # type: ignore[no-untyped-def]
        if key == channel_key("latest") and not self.raced:
            self.raced = True
            advance_channel(LocalStore(self.root), "latest", "other", "c" * 16, "rival", "rival@host", "t")
        return super().put_bytes(key, data, **kwargs)


def test_a_push_that_loses_the_compare_and_swap_lands_after_the_winner(tmp_path: Path) -> None:
    store = RacingStore(tmp_path)
    push(LocalStore(tmp_path), "a" * 16, "e1")
    assert push(store, "b" * 16, "e2") == 3
    assert [e.event_id for e in read_channel(store, "latest").history] == ["e1", "rival", "e2"]


class ReadThenRacingStore(LocalStore):
    """A real local store where another push lands right after this push has read the channel's
    bytes, once: between its two reads if it read the bytes before the etag."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.raced = False

    def get_bytes(self, key: str, **kwargs):  # type: ignore[no-untyped-def]
        read = super().get_bytes(key, **kwargs)
        if key == channel_key("latest") and not self.raced:
            self.raced = True
            advance_channel(LocalStore(self.root), "latest", "other", "c" * 16, "rival", "rival@host", "t")
        return read


def test_a_push_landing_between_the_reads_of_the_channel_is_kept(tmp_path: Path) -> None:
    """The etag is read before the bytes: read after them, it would be the rival's, and this push's
    compare-and-swap would win over bytes without the rival's push in them."""
    store = ReadThenRacingStore(tmp_path)
    push(LocalStore(tmp_path), "a" * 16, "e1")
    assert push(store, "b" * 16, "e2") == 3 and store.raced
    assert [e.event_id for e in read_channel(store, "latest").history] == ["e1", "rival", "e2"]


def test_push_order_of_data_pushed_again_is_its_newest_push(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for fp, event in (("a" * 16, "e1"), ("b" * 16, "e2"), ("a" * 16, "e3")):
        push(store, fp, event)
    channel = read_channel(store, "latest")
    assert (channel.push_order("a" * 16), channel.push_order("b" * 16), channel.push_order("f" * 16)) == (3, 2, None)


@pytest.mark.parametrize(("data", "ref"), [
    ("channel:latest", ChannelRef(None, "latest")),
    ("s3://bucket/prefix/datasets@latest", ChannelRef("s3://bucket/prefix", "latest")),
    ("s3://bucket/prefix/datasets/0123456789abcdef/", None),
    ("/data/hpa", None),
])
def test_a_channel_is_named_in_two_forms(data: str, ref: ChannelRef | None) -> None:
    assert parse_channel_ref(data) == ref


@pytest.mark.parametrize("data", ["channel:", "channel:Latest", "s3://b/p/datasets@../x"])
def test_a_bad_channel_name_is_refused_naming_it(data: str) -> None:
    with pytest.raises(DataError, match="invalid dataset channel name"):
        parse_channel_ref(data)


def test_resolving_takes_the_head_once_and_a_dataset_uri_unchanged(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    push(store, "a" * 16, "e1")
    push(store, "b" * 16, "e2")
    resolved = resolve_data("channel:latest", str(tmp_path / "store"))
    assert (resolved.fingerprint, resolved.sequence, resolved.event_id) == ("b" * 16, 2, "e2")
    assert resolved.uri.endswith(f"/datasets/{'b' * 16}/")
    assert resolve_data(" /data/hpa ", str(tmp_path)).to_dict() == {
        "uri": "/data/hpa", "fingerprint": None, "channel": None, "sequence": None, "event_id": None,
        "passed_over": []}


def test_an_empty_channel_fails_naming_the_channel_and_the_store(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"channel:nightly: no dataset was pushed on channel 'nightly' in .*push"):
        resolve_data("channel:nightly", str(tmp_path))


def stored_verdict(store: LocalStore, fp: str, success: bool) -> None:
    """The validation report a run on this data stored (the part resolution reads)."""
    store.put_bytes(report_key(fp), json.dumps({"success": success, "profile": {}}).encode())


def test_a_push_refused_by_validation_is_passed_over_except_by_its_own_run(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for n, fp in enumerate(("a" * 16, "b" * 16, "c" * 16), start=1):
        push(store, fp, f"e{n}")
    stored_verdict(store, "a" * 16, True)
    stored_verdict(store, "c" * 16, False)  # the newest push failed validation
    nightly = resolve_data("channel:latest", str(tmp_path / "store"), refused=refused_by_validation)
    # b was never validated: not refused; the nightly takes it instead of validating c again.
    assert (nightly.fingerprint, nightly.sequence, nightly.passed_over) == ("b" * 16, 2, [3])
    own = resolve_data("channel:latest", str(tmp_path / "store"), refused=refused_by_validation, own_event_id="e3")
    assert (own.fingerprint, own.passed_over) == ("c" * 16, [])
    stored_verdict(store, "b" * 16, False)
    assert resolve_data("channel:latest", str(tmp_path / "store"), refused=refused_by_validation).sequence == 1
    stored_verdict(store, "a" * 16, False)
    with pytest.raises(DataError, match=r"every push on channel 'latest' .* refused by validation \(newest: push #3"):
        resolve_data("channel:latest", str(tmp_path / "store"), refused=refused_by_validation)


def test_only_a_stored_failing_verdict_refuses_data(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert refused_by_validation(store, "d" * 16) is False  # never validated here
    store.put_bytes(report_key("d" * 16), b"not json")
    assert refused_by_validation(store, "d" * 16) is False  # unreadable: no verdict to rest on
    stored_verdict(store, "d" * 16, True)
    assert refused_by_validation(store, "d" * 16) is False
    stored_verdict(store, "d" * 16, False)
    assert refused_by_validation(store, "d" * 16) is True


def test_a_channel_in_another_store_is_judged_by_the_verdicts_of_the_runs_store(tmp_path: Path) -> None:
    # data=s3://data/datasets@latest with store=s3://models: runs write their reports to the models
    # store, so a refusal read from the data store was never found and every nightly took the bad push.
    data_store, run_store = LocalStore(tmp_path / "data"), LocalStore(tmp_path / "models")
    for n, fp in enumerate(("a" * 16, "b" * 16), start=1):
        push(data_store, fp, f"e{n}")
    stored_verdict(run_store, "b" * 16, False)
    resolved = resolve_data(f"{tmp_path / 'data'}/datasets@latest", str(tmp_path / "models"),
                            refused=refused_by_validation)
    assert (resolved.fingerprint, resolved.sequence, resolved.passed_over) == ("a" * 16, 1, [2])
    stored_verdict(data_store, "a" * 16, False)  # a verdict in the data store is no run's: not read
    assert resolve_data(f"{tmp_path / 'data'}/datasets@latest", str(tmp_path / "models"),
                        refused=refused_by_validation).sequence == 1


@pytest.mark.parametrize("store", ["ftp://host/store", "s3://b/prefix"])
def test_a_store_uri_nothing_can_open_is_the_runs_one_line_problem_not_retried(store: str) -> None:
    from tasks.channels import resolve_dataset

    # A ValueError left the task: retried as transient three times (~42 s), then a traceback.
    assert resolve_dataset.fn("channel:latest", store)["problem"].startswith(store.split("/prefix")[0])
    # With the run's key (a retrain keeps its first resolution in the store): the same one line.
    assert resolve_dataset.fn("channel:latest", store, None, "run-1")["problem"].startswith(store.split("/prefix")[0])


def test_a_channel_record_over_the_size_cap_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read under the records' cap, like every record: a channel grown (or written) past it is refused
    with one line naming it, never parsed into memory whole."""
    from protein.errors import RecordError
    from protein.storage.records import MAX_RECORD_BYTES_ENV

    store = LocalStore(tmp_path)
    push(store, "a" * 16, "e1")
    monkeypatch.setenv(MAX_RECORD_BYTES_ENV, "64")
    with pytest.raises(RecordError, match=r"datasets/channels/latest\.json: .* bytes is larger than the 64-byte cap"):
        read_channel(store, "latest")


@pytest.mark.parametrize("record", [b"[1, 2]", b"{not json", b'{"history": [{"sequence": "one"}]}', None])
def test_a_channel_record_that_is_not_one_is_the_runs_one_line_problem_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: bytes | None) -> None:
    """A StoreError is transient: the task retried it three times (~42 s) on a record no retry
    changes, then the run failed with a traceback. None: a record over the cap (RecordError)."""
    from protein.storage.records import MAX_RECORD_BYTES_ENV
    from tasks.channels import resolve_dataset
    from tasks.retry import is_transient

    store = LocalStore(tmp_path)
    if record is None:
        push(store, "a" * 16, "e1")
        monkeypatch.setenv(MAX_RECORD_BYTES_ENV, "64")
    else:
        store.put_bytes("datasets/channels/latest.json", record)
    with pytest.raises(Exception) as raised:
        read_channel(store, "latest")
    assert not is_transient(raised.value), raised.value
    problem = resolve_dataset.fn("channel:latest", str(tmp_path))["problem"]
    assert "datasets/channels/latest.json" in problem and "\n" not in problem, problem


def test_a_validate_run_judges_the_channels_head_even_a_refused_one(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The validate deployment on channel:latest, run once the cause of a refusal is mended, validated
    the older push that passed instead and looked green; the refused head kept being passed over."""
    import flows.validate
    from tasks.channels import resolve_dataset

    store = LocalStore(tmp_path / "store")
    for n, fp in enumerate(("a" * 16, "b" * 16), start=1):
        push(store, fp, f"e{n}")
    stored_verdict(store, "b" * 16, False)
    uri = str(tmp_path / "store")
    assert resolve_dataset.fn("channel:latest", uri)["fingerprint"] == "a" * 16  # a retrain passes it over
    assert resolve_dataset.fn("channel:latest", uri, pass_over_refused=False)["fingerprint"] == "b" * 16

    asked: list[dict] = []
    monkeypatch.setattr(flows.validate, "resolve_dataset",
                        lambda *args, **kwargs: asked.append(kwargs) or {"problem": "stop here"})
    assert flows.validate.validate.fn("channel:latest", uri).is_failed()
    assert asked == [{"pass_over_refused": False}]


def test_a_refusal_judged_against_another_reference_is_no_refusal_now(tmp_path: Path) -> None:
    """Push X failed drift against champion B's reference; B was rolled back: every nightly after it
    passed X over on a verdict about a reference no longer in force."""
    from protein.validation.reference import load_reference

    store = LocalStore(tmp_path / "store")
    push(store, "a" * 16, "e1")
    push(store, "b" * 16, "e2")
    in_force = load_reference(store)["hash"]
    for judged_against, passed_over in ((in_force, True), ("another-reference", False)):
        store.put_bytes(report_key("b" * 16), json.dumps({"success": False, "profile": {},
                                                          "reference": {"hash": judged_against}}).encode())
        resolved = resolve_data("channel:latest", str(tmp_path / "store"), refused=refused_by_validation)
        assert (resolved.fingerprint == "a" * 16) is passed_over, (judged_against, resolved)


@pytest.mark.parametrize(("record", "exit_code"), [(b"{not json", 8), (None, 2)])
@pytest.mark.parametrize("flow_module", ["flows.predict", "flows.validate", "flows.retrain"])
def test_a_flow_on_a_channel_it_cannot_resolve_exits_as_the_cli_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], record: bytes | None,
        exit_code: int, flow_module: str) -> None:
    """A damaged channel record (RecordError, docs/runbook.md: exit 8) and a channel with no push yet
    (DataError: 2, data that is not there) both ended the flow's command line in 1."""
    import importlib
    import logging

    from flows.params import report_state
    from tasks.channels import resolve_dataset

    module = importlib.import_module(flow_module)
    flow_fn = getattr(module, flow_module.rpartition(".")[2]).fn
    store = LocalStore(tmp_path)
    if record is not None:
        store.put_bytes("datasets/channels/latest.json", record)
    resolved = resolve_dataset.fn("channel:latest", str(tmp_path))
    assert resolved["exit_code"] == exit_code, resolved
    monkeypatch.setattr(module, "resolve_dataset", lambda *args, **kwargs: resolve_dataset.fn(*args, **kwargs))
    if hasattr(module, "get_run_logger"):  # the retrain logs before it resolves; no flow run here
        monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger(flow_module))
    state = flow_fn("channel:latest", str(tmp_path))
    assert report_state(state, flow_module) == exit_code
    err = capsys.readouterr().err
    assert err.startswith(f"{flow_module} failed: data channel:latest: ") and err.count("\n") == 1, err
