"""Hostile event payloads (issue 8, invariant 5): for every event type, `decode` either raises
`BadEvent` (the service loop terminates the message with its reason) or returns a valid event
that re-encodes. No other exception may escape, because anything else is redelivered as if
the handler had hit a transient failure.

"Valid" includes the ids: services build subjects and KV keys from a decoded event's
``workflow_id`` and item ``index``, so ids that are not subject tokens (dots, spaces, ``*``,
``>``, unicode, empty, 10 kB) must be refused by `decode` itself. Item ids (``item_<index>``)
never come from item data; `test_item_data_never_reaches_a_subject` pins that.

Valid payloads are generated from the msgspec types themselves (``msgspec.inspect``), so a
new event type is fuzzed without touching this file.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from msgspec import inspect as mi

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import MAX_INDEX, InvalidToken, Subjects, check_token, is_token

FUZZ = settings(
    max_examples=40,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)

pytestmark = pytest.mark.timeout(120)

EVENT_TYPES: list[type[Any]] = list(ev.Event.__args__)  # type: ignore[attr-defined]
ITEM_INDEXED = (ev.WorkItem, ev.ItemDone, ev.ItemDead, ev.ItemFailed, ev.MapFailed)

HOSTILE_IDS = [
    "",
    " ",
    "a b",
    "a.b",
    "wf.>",
    "*",
    ">",
    "wf*",
    "wf\n",
    "wf\r\nPUB x 1",
    "wf\t",
    "ü",
    "wf-é",
    "日本",
    "wf/1",
    "../etc",
    "$JS",
    "a\x00b",
    "x" * 81,
    "x" * 10_000,
]

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**64), max_value=2**64),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
tokens = st.text(alphabet=st.sampled_from("abcXYZ019_-"), min_size=1, max_size=80)


def valid_value(t: mi.Type, name: str = "") -> st.SearchStrategy[Any]:
    """Values of JSON type ``t`` that decode: the base every mutation starts from."""
    if name == "workflow_id":
        return tokens
    if name == "index" or name == "indices":
        index = st.integers(min_value=0, max_value=MAX_INDEX)
        return st.lists(index, max_size=3) if name == "indices" else index
    if isinstance(t, mi.StrType):
        return st.text(max_size=20)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return st.integers(min_value=-(2**63), max_value=2**63 - 1)
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.AnyType):
        return json_values
    if isinstance(t, mi.ListType):
        return st.lists(valid_value(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(st.text(max_size=8), valid_value(t.value_type), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(valid_value(member, name) for member in t.types))
    if isinstance(t, mi.StructType):
        return struct_doc(t)
    raise AssertionError(f"no strategy for {t!r}: extend valid_value")


def struct_doc(info: mi.StructType) -> st.SearchStrategy[dict[str, Any]]:
    required = {f.encode_name: valid_value(f.type, f.name) for f in info.fields if f.required}
    optional = {f.encode_name: valid_value(f.type, f.name) for f in info.fields if not f.required}
    base: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(required, optional=optional)
    if info.tag_field is not None:
        tag_field, tag = info.tag_field, info.tag
        base = base.map(lambda doc: {tag_field: tag, **doc})
    return base


def minimal_doc(info: mi.StructType) -> dict[str, Any]:
    """One fixed valid document: the required fields only, each with a plain value."""
    doc: dict[str, Any] = {info.tag_field: info.tag} if info.tag_field is not None else {}
    for f in info.fields:
        if f.required:
            doc[f.encode_name] = minimal_value(f.type, f.name)
    return doc


def minimal_value(t: mi.Type, name: str) -> Any:
    if name == "workflow_id":
        return "wf-1"
    if isinstance(t, mi.UnionType):
        return minimal_value(t.types[0], name)
    if isinstance(t, mi.StructType):
        return minimal_doc(t)
    plain = {mi.StrType: "x", mi.IntType: 1, mi.FloatType: 1.5, mi.BoolType: True}
    for kind, value in plain.items():
        if isinstance(t, kind):
            return value
    if isinstance(t, mi.ListType):
        return [minimal_value(t.item_type, "")]
    if isinstance(t, mi.DictType):
        return {}
    return {"any": [1]}  # AnyType


def struct_info(cls: type[Any]) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


def required_fields(cls: type[Any]) -> list[str]:
    return [f.encode_name for f in struct_info(cls).fields if f.required]


def check(data: bytes) -> ev.Event | None:
    """The property: BadEvent, or an event that is valid all the way down."""
    try:
        event = ev.decode(data)
    except ev.BadEvent as exc:
        assert str(exc).strip()
        return None
    assert isinstance(event, tuple(EVENT_TYPES))
    if not isinstance(event, ev.WorkflowSubmit):
        assert is_token(event.workflow_id)
    if isinstance(event, ITEM_INDEXED):
        assert 0 <= event.index <= MAX_INDEX
    assert math.isfinite(event.ts)
    again = ev.decode(ev.encode(event))
    assert again == event
    return event


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


# -- properties, per event type --------------------------------------------------------------

event_type = st.sampled_from(EVENT_TYPES)


@FUZZ
@given(st.data(), event_type)
def test_generated_valid_events_decode(data: st.DataObject, cls: type[Any]) -> None:
    """The generator's own check: unmutated documents are accepted, so the mutations below
    start from something real."""
    doc = data.draw(struct_doc(struct_info(cls)))
    assert type(check(dumps(doc))) is cls


@FUZZ
@given(st.data(), event_type)
def test_missing_fields(data: st.DataObject, cls: type[Any]) -> None:
    doc = data.draw(struct_doc(struct_info(cls)))
    fields = required_fields(cls)
    assume(fields)
    doc.pop(data.draw(st.sampled_from(fields)))
    assert check(dumps(doc)) is None


@FUZZ
@given(st.data(), event_type, json_values)
def test_wrong_types(data: st.DataObject, cls: type[Any], value: Any) -> None:
    doc = data.draw(struct_doc(struct_info(cls)))
    doc[data.draw(st.sampled_from(sorted(doc)))] = value
    check(dumps(doc))


@FUZZ
@given(st.data(), event_type, st.sampled_from(HOSTILE_IDS) | st.text(max_size=100))
def test_invalid_workflow_ids_are_refused(data: st.DataObject, cls: type[Any], wf: str) -> None:
    doc = data.draw(struct_doc(struct_info(cls)))
    doc["workflow_id"] = wf
    event = check(dumps(doc))
    if cls is not ev.WorkflowSubmit and not is_token(wf):
        assert event is None, f"{cls.__name__} accepted workflow_id {wf!r}"


@FUZZ
@given(
    st.data(),
    st.sampled_from(ITEM_INDEXED),
    st.integers(max_value=-1) | st.integers(min_value=MAX_INDEX + 1, max_value=2**200),
)
def test_out_of_range_indices_are_refused(data: st.DataObject, cls: type[Any], index: int) -> None:
    doc = data.draw(struct_doc(struct_info(cls)))
    doc["index"] = index
    assert check(dumps(doc)) is None


@FUZZ
@given(st.data(), event_type, st.integers(1, 5000), st.sampled_from(["[", '{"a":']))
def test_deep_nesting(data: st.DataObject, cls: type[Any], depth: int, opener: str) -> None:
    doc = data.draw(struct_doc(struct_info(cls)))
    key = data.draw(st.sampled_from(sorted(doc)))
    closer = "]" if opener == "[" else "}"
    deep = opener * depth + "1" + closer * depth
    text = dumps({**doc, key: "__DEEP__"}).decode().replace('"__DEEP__"', deep)
    check(text.encode())


@settings(FUZZ, max_examples=10)
@given(st.data(), event_type, st.integers(100_000, 2_000_000))
def test_huge_payloads(data: st.DataObject, cls: type[Any], size: int) -> None:
    doc = data.draw(struct_doc(struct_info(cls)))
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = "x" * size
    check(dumps(doc))
    doc[key] = list(range(size // 8))
    check(dumps(doc))


@FUZZ
@given(st.data(), event_type, st.integers(0, 10_000), st.binary(min_size=1, max_size=4))
def test_corrupted_bytes(data: st.DataObject, cls: type[Any], where: int, junk: bytes) -> None:
    raw = dumps(data.draw(struct_doc(struct_info(cls))))
    at = where % (len(raw) + 1)
    check(raw[:at] + junk + raw[at + len(junk) :])
    check(raw[:at])  # truncated


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes(data: bytes) -> None:
    check(data)


# -- regressions and pinned cases ------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            b'{"type":"work.item","workflow_id":"a","index":1,"item":'
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}",
            id="deep-item",
        ),
        pytest.param(
            b'{"type":"workflow.submit","workflow":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
            id="deep-submit",
        ),
        pytest.param(
            b'{"type":"work.item","workflow_id":"\xff\xfe","index":1,"item":1}', id="invalid-utf8"
        ),
    ],
)
def test_crashes_found_by_fuzzing_are_bad_events(payload: bytes) -> None:
    # Were RecursionError and UnicodeDecodeError escaping decode().
    with pytest.raises(ev.BadEvent):
        ev.decode(payload)


@pytest.mark.parametrize("wf", HOSTILE_IDS)
@pytest.mark.parametrize("cls", [c for c in EVENT_TYPES if c is not ev.WorkflowSubmit])
def test_every_hostile_id_is_refused_by_every_event(wf: str, cls: type[Any]) -> None:
    doc = minimal_doc(struct_info(cls))
    assert type(ev.decode(dumps(doc))) is cls
    doc["workflow_id"] = wf
    with pytest.raises(ev.BadEvent, match=r"workflow_id|malformed"):
        ev.decode(dumps(doc))


def test_a_submit_keeps_its_id_for_the_planner_to_reject_by_name() -> None:
    """The planner answers a bad submit id with a problem at ``workflow_id``; for that the
    submit must decode."""
    data = ev.encode(ev.WorkflowSubmit(workflow="name: x", workflow_id="a.b >"))
    assert ev.decode_as(data, ev.WorkflowSubmit).workflow_id == "a.b >"


# -- subjects: tokens, item ids --------------------------------------------------------------


@pytest.mark.parametrize("wf", HOSTILE_IDS)
def test_check_token_refuses_hostile_ids(wf: str) -> None:
    # "wf\n" used to pass: TOKEN_RE was used with match() and a `$` anchor.
    with pytest.raises(InvalidToken):
        check_token(wf)
    assert not is_token(wf)


# "*" (a filter) and "" (a prefix to compare with) are allowed: see the last test below.
@pytest.mark.parametrize("wf", [wf for wf in HOSTILE_IDS if wf not in ("", "*")])
def test_subject_builders_refuse_hostile_workflow_ids(wf: str) -> None:
    s = Subjects("pfx")
    builders = [
        lambda: s.workflow("failed", wf),
        lambda: s.map("complete", wf),
        lambda: s.item_done(wf, 1),
        lambda: s.item_terminal(wf, 1),
        lambda: s.dlq(wf, 1),
        lambda: s.work("p1", wf, 1),
        lambda: s.progress(wf),
        lambda: s.work_consumer(wf),
        lambda: s.all_of(wf),
    ]
    for build in builders:
        with pytest.raises(InvalidToken):
            build()


@pytest.mark.parametrize("item", [-1, True, "1", "a.b", ">", "item_1", 2**63, 1.5])
def test_item_tokens_are_indices_only(item: Any) -> None:
    s = Subjects()
    with pytest.raises(InvalidToken):
        s.item_done("wf", item)
    with pytest.raises(InvalidToken):
        s.dlq("wf", item)


def test_wildcards_and_valid_tokens_still_build() -> None:
    s = Subjects("pfx")
    assert s.item_terminal("wf-1", 7) == "pfx.item.*.wf-1.7"
    assert s.item_failed("wf-1", "*") == "pfx.item.failed.wf-1.*"  # type: ignore[arg-type]
    assert s.dlq_of("*") == "pfx.dlq.*.*"
    assert s.workflow("retry", "") == "pfx.workflow.retry."  # the planner's prefix match
    assert s.work("p0", "wf_1", MAX_INDEX) == f"pfx.work.p0.wf_1.{MAX_INDEX}"


@FUZZ
@given(tokens, st.integers(min_value=0, max_value=MAX_INDEX))
def test_every_item_subject_is_exactly_its_tokens(wf: str, index: int) -> None:
    s = Subjects("pfx")
    for subject in (s.item_done(wf, index), s.item_dead(wf, index), s.dlq(wf, index)):
        parts = subject.split(".")
        assert parts[-2:] == [wf, str(index)]
        assert not {"*", ">", ""} & set(parts)


@FUZZ
@given(json_values, st.sampled_from(HOSTILE_IDS), st.integers(0, 1000))
def test_item_data_never_reaches_a_subject(item: Any, hostile: str, index: int) -> None:
    """An item whose own ``id`` is hostile is still addressed by its index alone: WorkItem has
    no id field to take it from, and every item subject takes an int."""
    data = {"id": hostile, "name": hostile, "value": item}
    work = ev.WorkItem(workflow_id="wf-1", index=index, item=data)
    decoded = ev.decode_as(ev.encode(work), ev.WorkItem)
    assert decoded.item["id"] == hostile
    s = Subjects()
    assert s.work("p1", decoded.workflow_id, decoded.index) == f"work.p1.wf-1.{index}"
    assert "item_id" not in {f.name for f in struct_info(ev.WorkItem).fields}


def test_index_mutation_helper_is_sound() -> None:
    """Guard for the fuzzers above: every item-indexed type really has an ``index`` field."""
    for cls in ITEM_INDEXED:
        assert "index" in required_fields(cls)
    assert all(cls in EVENT_TYPES for cls in ITEM_INDEXED)
