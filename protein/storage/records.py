"""The one way the pipeline reads back the JSON records it keeps in a store.

model.json, champion.json (and its history events), run index entries, tombstones and dataset
manifests all go through `load_record`: the object is refused from its size before its body is read
(`MAX_RECORD_BYTES`, or the schema's own cap), then parsed, then checked against a `RecordSchema`.
Every failure is one `RecordError` line naming the key (exit code 8); nothing downstream ever
indexes into a list it expected to be an object, or a missing field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protein.errors import RecordError
from protein.storage.base import MiB, Store, env_number

# A model.json with its holdout and training row ids is a few hundred KB for the full competition
# (31k rows); champion.json grows by ~0.6 KB per promotion. 16 MiB leaves room for both by far and
# bounds what a forged or runaway record can make a reader hold. PROTEIN_MAX_RECORD_BYTES overrides it.
MAX_RECORD_BYTES = 16 * MiB
MAX_RECORD_BYTES_ENV = "PROTEIN_MAX_RECORD_BYTES"

FieldType = type | tuple[type, ...]


@dataclass(frozen=True)
class RecordSchema:
    """The shape of one kind of record: required and optional top-level fields with their JSON types,
    and, for fields holding a list of objects, the schema each element must meet."""

    name: str
    required: Mapping[str, FieldType]
    optional: Mapping[str, FieldType] = field(default_factory=dict)
    items: Mapping[str, RecordSchema] = field(default_factory=dict)
    max_bytes: int | None = None  # None: `record_cap()`, read when the record is

    def cap(self) -> int:
        return self.max_bytes if self.max_bytes is not None else record_cap()


def record_cap() -> int:
    """The size cap of a record whose schema names none (read at each call, so operators can set it)."""
    return int(env_number(MAX_RECORD_BYTES_ENV, MAX_RECORD_BYTES))


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               bool: "true/false", type(None): "null"}


def _kind(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _matches(value: Any, expected: FieldType) -> bool:
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):  # JSON true is not a number, though bool subclasses int
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _expected(expected: FieldType) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)


def check_record(doc: Any, schema: RecordSchema, where: str) -> dict[str, Any]:
    """``doc`` if it has the schema's shape, else `RecordError` naming ``where`` and the field."""
    if not isinstance(doc, dict):
        raise RecordError(f"{where}: not a {schema.name}: expected a JSON object, found {_kind(doc)}")
    for name in schema.required:
        if name not in doc:
            raise RecordError(f"{where}: not a {schema.name}: field {name!r} is missing")
    for name, expected in (*schema.required.items(), *schema.optional.items()):
        if name in doc and not _matches(doc[name], expected):
            raise RecordError(f"{where}: not a {schema.name}: field {name!r} should be {_expected(expected)}, "
                              f"found {_kind(doc[name])}")
    for name, item_schema in schema.items.items():
        for index, item in enumerate(doc.get(name) or []):
            check_record(item, item_schema, f"{where} {name}[{index}]")
    return doc


def parse_record(data: bytes, schema: RecordSchema, where: str) -> dict[str, Any]:
    """Bytes already read (under the cap) -> the checked record."""
    if len(data) > (cap := schema.cap()):
        raise RecordError(f"{where}: {len(data):,} bytes is larger than the {cap:,}-byte cap for this record; "
                          "not read")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise RecordError(f"{where}: not a {schema.name}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        # Truncated records end in "Expecting ..." at the last character: say so, it is the usual cause.
        cut = " (truncated?)" if exc.pos >= len(data.rstrip()) else ""
        raise RecordError(f"{where}: not a {schema.name}: invalid JSON at line {exc.lineno} column {exc.colno}"
                          f"{cut}") from None
    except RecursionError:
        raise RecordError(f"{where}: not a {schema.name}: JSON nested too deeply") from None
    return check_record(doc, schema, where)


def record_location(store: Store, key: str) -> str:
    return f"{store.uri.rstrip('/')}/{key}"


def load_record(store: Store, key: str, schema: RecordSchema) -> dict[str, Any]:
    """Read ``key`` under the schema's size cap and check it; `NotFound` if it is missing."""
    data = store.get_bytes(key, max_bytes=schema.cap())
    return parse_record(data, schema, record_location(store, key))


def load_record_bytes(store: Store, key: str, schema: RecordSchema) -> tuple[dict[str, Any], bytes]:
    """Like `load_record`, also returning the exact bytes (to hash them, or to copy them unchanged)."""
    data = store.get_bytes(key, max_bytes=schema.cap())
    return parse_record(data, schema, record_location(store, key)), data
