"""Checkpoints and weight files are data: a hostile pickle is refused, never executed.

Every payload below would create a marker file when unpickled by plain `pickle` (which is
what torch's loader does when weights_only is off); the control test proves that, the others
prove our loaders never get that far.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import zipfile
from pathlib import Path

import pytest
import torch

from protein.errors import DataError, StoreError
from protein.modeling.checkpoints import checkpoint_key, load_checkpoint
from protein.modeling.model import read_state_dict
from protein.storage import open_store
from tests.helpers import write_dataset


class Payload:
    """Unpickling this runs exec(): it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def raw_pickle(marker: Path) -> bytes:
    return pickle.dumps({"format": "protein-train-checkpoint/1", "model": Payload(marker)}, protocol=2)


def torch_file(marker: Path) -> bytes:
    """The same payload inside torch.save's zip container, as a real checkpoint would be."""
    buffer = io.BytesIO()
    torch.save({"format": "protein-train-checkpoint/1", "epoch": 1, "model": Payload(marker)}, buffer)
    return buffer.getvalue()


PAYLOADS = {"raw-pickle": raw_pickle, "torch-save": torch_file}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_control_the_payload_is_live(tmp_path, kind):
    """Without weights_only the bytes do run code: the tests below are not vacuous."""
    marker = tmp_path / "marker"
    data = PAYLOADS[kind](marker)
    if kind == "torch-save":
        # The pickle inside torch.save's zip container, unpickled as an unsafe loader would.
        with zipfile.ZipFile(io.BytesIO(data)) as container:
            data = container.read(next(n for n in container.namelist() if n.endswith("/data.pkl")))
    pickle.loads(data)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("kind", PAYLOADS)
def test_malicious_training_checkpoint_is_refused(tmp_path, kind):
    marker = tmp_path / "marker"
    store = open_store(str(tmp_path / "store"))
    store.put_bytes(checkpoint_key("run-1"), PAYLOADS[kind](marker))
    with pytest.raises(StoreError, match="runs/run-1/checkpoint.pt: not a loadable training checkpoint") as info:
        load_checkpoint(store, "run-1")
    message = str(info.value)
    assert "runs/run-1/checkpoint.pt: not a loadable training checkpoint" in message
    assert "nothing in it was executed" in message
    assert "\n" not in message and "weights_only=False" not in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_malicious_weights_file_is_refused(tmp_path, kind, suffix):
    marker = tmp_path / "marker"
    weights = tmp_path / f"pretrained{suffix}"
    weights.write_bytes(PAYLOADS[kind](marker))
    with pytest.raises(DataError, match=re.escape(str(weights))) as info:
        read_state_dict(weights)
    assert str(weights) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_garbage_checkpoint_is_a_store_error(tmp_path):
    store = open_store(str(tmp_path / "store"))
    # Many blobs: random bytes trip the safe unpickler in different ways (IndexError among them).
    rng = random.Random(0)
    for i in range(200):
        store.put_bytes(checkpoint_key(f"run-{i}"), rng.randbytes(rng.randint(1, 4096)))
        with pytest.raises(StoreError, match="not a loadable training checkpoint"):
            load_checkpoint(store, f"run-{i}")


def test_cli_refuses_malicious_weights_and_checkpoint(tmp_path, protein_cli):
    """As users meet it: one error line, a specific exit code, no traceback, nothing executed or registered."""
    data = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(12)}, ["900"], size=32)
    store, cache = tmp_path / "store", tmp_path / "cache"
    common = ["--data", str(data), "--store", str(store), "--cache-dir", str(cache), "--epochs", "1",
              "--image-size", "32", "--batch-size", "4"]

    marker = tmp_path / "weights-marker"
    weights = tmp_path / "evil.pt"
    weights.write_bytes(torch_file(marker))
    result = protein_cli("train", *common, "--weights", str(weights))
    assert result.returncode == 2, result.stderr
    assert f"{weights}: not a plain tensor state dict (UnpicklingError)" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()

    marker = tmp_path / "checkpoint-marker"
    open_store(str(store)).put_bytes(checkpoint_key("evil-run"), torch_file(marker))
    result = protein_cli("train", *common, "--run-id", "evil-run")
    assert result.returncode == 3, result.stderr
    assert "runs/evil-run/checkpoint.pt: not a loadable training checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    assert not (store / "models").exists()


def test_deployments_hold_no_secrets():
    """prefect.yaml is stored by the Prefect server (parameters, job variables): no credential, auth string
    or webhook may be written there, only {{ $VAR }} placeholders for non-secret settings and Secret blocks."""
    import re

    import yaml

    from tests.helpers import REPO

    secret_names = re.compile(r"SECRET_ACCESS_KEY|ACCESS_KEY_ID|AUTH_STRING|API_KEY|WEBHOOK|PASSWORD|TOKEN", re.I)
    secret_block = re.compile(r"\{\{ prefect\.blocks\.secret\.[\w-]+ \}\}")
    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    found: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                # A git token may come from a Secret block (resolved on the worker), never as a literal.
                if str(key) == "access_token" and secret_block.fullmatch(str(value)):
                    continue
                if secret_names.search(str(key)):
                    found.append(f"{path}.{key}")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, str) and (secret_names.search(node) or "://" in node and "@" in node):
            found.append(f"{path} = {node}")

    walk(document, "prefect.yaml")
    assert found == []


PRESIGNED = ("https://bkt.s3.amazonaws.com/ds.zip?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEY"
             "%2F20261207%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Security-Token=SESSIONTOKEN&X-Amz-Signature=SIGNATURE")


@pytest.mark.parametrize("uri", [PRESIGNED, "https://user:PASSWORD@host.example/ds?token=SESSIONTOKEN",
                                 "file://user:PASSWORD@nas/share?sig=SIGNATURE",
                                 "https://AKIAEXAMPLEKEY:wJal/PASSWORD/bPx@host.example/ds.zip"])
def test_a_refused_uri_is_named_without_its_credentials(tmp_path, capsys, uri):
    # A presigned link pasted as --data or --store: the refusal is printed, logged and kept in run states.
    from protein.cli import main
    from protein.data import open_dataset
    from protein.errors import DataError
    from protein.storage import open_store

    secrets = ("AKIAEXAMPLEKEY", "SESSIONTOKEN", "SIGNATURE", "PASSWORD")
    with pytest.raises(DataError) as refused_data:
        open_dataset(uri)
    with pytest.raises(ValueError) as refused_store:
        open_store(uri)
    assert main(["validate", "--data", uri, "--store", str(tmp_path / "store")]) == 2
    printed = capsys.readouterr()
    for text in (str(refused_data.value), str(refused_store.value), printed.out + printed.err):
        assert "(hidden)" in text or "host" in text, text
        assert not any(secret in text for secret in secrets), text
    host = uri.split("?")[0].rpartition("@")[2].split("://")[-1].split("/")[0]
    assert host in str(refused_data.value) and host in str(refused_store.value)


def test_links_and_summaries_name_a_refused_uri_without_its_query() -> None:
    from protein.links import shareable_url
    from tasks.summary import dataset_uri_problem

    with pytest.raises(ValueError) as refused:
        shareable_url(PRESIGNED)
    problem = dataset_uri_problem(PRESIGNED)
    for text in (str(refused.value), problem or ""):
        assert "bkt.s3.amazonaws.com" in text and not any(s in text for s in ("SIGNATURE", "SESSIONTOKEN")), text


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLEKEY:wJalrSECRETKEY@bucket/p",
                                 "s3://AKIAEXAMPLEKEY:wJal/rSECRETKEY@bucket/p",
                                 "s3://AKIAEXAMPLEKEY@bucket/p", "s3://AKIAEXAMPLEKEY:wJalrSECRETKEY/bucket/p"])
def test_an_s3_uri_with_credentials_is_refused_without_them(tmp_path, capsys, uri):
    # `--store s3://KEY:SECRET@bucket/p` made the whole user info the "bucket", and the refusal named it.
    from protein.cli import main
    from protein.data import open_dataset
    from protein.links import shareable_url

    secrets = ("AKIAEXAMPLEKEY", "SECRETKEY")
    with pytest.raises(ValueError) as refused_store:
        open_store(uri)
    with pytest.raises(DataError) as refused_data:
        open_dataset(uri + "/")
    with pytest.raises(ValueError) as refused_link:
        shareable_url(uri + "/key.png")
    assert main(["validate", "--data", str(tmp_path / "data"), "--store", uri]) == 2
    assert main(["validate", "--data", uri, "--store", str(tmp_path / "store")]) == 2
    printed = capsys.readouterr()
    for text in (str(refused_store.value), str(refused_data.value), str(refused_link.value), printed.err):
        assert "credentials or an endpoint in an s3:// URI are not accepted" in text, text
        assert not any(secret in text for secret in secrets), text


@pytest.mark.parametrize("api_url", ["http://user:SECRETPASSWORD@127.0.0.1:9/api",
                                     "http://user:SECRETPASSWORD@localhost/api"])
def test_an_unreachable_prefect_api_is_named_without_its_password(monkeypatch, api_url):
    from flows.cli import PrefectUnavailable, prefect_api

    monkeypatch.setenv("PREFECT_API_URL", api_url)
    with pytest.raises(PrefectUnavailable) as refused, prefect_api():
        pass
    assert "SECRETPASSWORD" not in str(refused.value) and "(hidden)@" in str(refused.value), refused.value
