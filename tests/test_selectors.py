"""Label and field selectors: every operator, kube-apiserver's refusals word for word, and the store's SQL
evaluation agreeing with the Python predicate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmquota import objects
from vmquota.apiserver import selectors
from vmquota.apiserver.selectors import SelectorError
from vmquota.store import Store

VM, EVENT, QUOTA, NS, PROJECT = (objects.VIRTUAL_MACHINE, objects.EVENT, objects.RESOURCE_QUOTA, objects.NAMESPACE,
                                 objects.PROJECT)
KEY_PROBLEM = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
               "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
               "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")
VALUE_PROBLEM = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and "
                 "must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', "
                 "regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")


def vm(name: str = "web-1", namespace: str = "dev", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels}}


def select(text: str, obj: dict[str, Any]) -> bool:
    return selectors.parse(VM, text, None).matches(obj)


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("app=web", {"app": "web"}, True),
    ("app=web", {"app": "db"}, False),
    ("app=web", {}, False),
    ("app==web", {"app": "web"}, True),
    ("app!=web", {"app": "db"}, True),
    ("app!=web", {}, True),  # != also matches objects without the label, as in Kubernetes
    ("app!=web", {"app": "web"}, False),
    ("app in (web,db)", {"app": "db"}, True),
    ("app in (web,db)", {}, False),
    ("app notin (web,db)", {"app": "api"}, True),
    ("app notin (web,db)", {}, True),
    ("app notin (web,db)", {"app": "web"}, False),
    ("app", {"app": ""}, True),
    ("app", {}, False),
    ("!app", {}, True),
    ("!app", {"app": "web"}, False),
    ("tier>2", {"tier": "3"}, True),
    ("tier>2", {"tier": "2"}, False),
    ("tier<2", {"tier": "-1"}, True),
    ("tier>2", {"tier": "three"}, False),
    ("app=web,tier=front", {"app": "web", "tier": "front"}, True),  # a comma is "and"
    ("app=web,tier=front", {"app": "web", "tier": "back"}, False),
    ("app=", {"app": ""}, True),  # the empty value
    ("app in ()", {"app": ""}, True),
    ("app in (,web)", {"app": ""}, True),
    ("in in (in)", {"in": "in"}, True),  # keywords are plain identifiers in a value's place
    ("  app  =  web  ", {"app": "web"}, True),
    ("example.com/app=web", {"example.com/app": "web"}, True),
    ("", {"app": "web"}, True),
])
def test_label_operators(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert select(selector, vm(**labels)) is expected


@pytest.mark.parametrize(("selector", "message"), [
    ("a b", "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt"),
    ("a=b=c", "found '=', expected: ',' or 'end of string'"),
    ("a=b,", "found '', expected: identifier after ','"),
    (",a", "found ',', expected: !, identifier, or 'end of string'"),
    ("a in b", "unable to parse requirement: found 'b' expected: '('"),
    ("a in (b", "unable to parse requirement: found '', expected: ',' or ')'"),
    ("a in (=)", "unable to parse requirement: found '=', expected: ',', ')' or identifier"),
    ("a=(", "unable to parse requirement: found '(', expected: identifier"),
    ("!=a", "found '!=', expected: !, identifier, or 'end of string'"),
    ("!,a", "unable to parse requirement: found ',', expected: identifier"),
    ("!a=b", "found '=', expected: ',' or 'end of string'"),
    ("a+b=c", f'unable to parse requirement: <nil>: Invalid value: "a+b": {KEY_PROBLEM}'),
    ("a=b c", "found 'c', expected: ',' or 'end of string'"),
    ("a=-b", f'unable to parse requirement: values[0][a]: Invalid value: "-b": {VALUE_PROBLEM}'),
    ("a>b", "unable to parse requirement: values[0]: Invalid value: \"b\": for 'Gt', 'Lt' operators, the value must "
            "be an integer"),
    ("a/b/c", "unable to parse requirement: <nil>: Invalid value: \"a/b/c\": a qualified name must consist of "
              "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
              "'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
              "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. "
              "'example.com/MyName')"),
    ("/a", 'unable to parse requirement: <nil>: Invalid value: "/a": prefix part must be non-empty'),
    ("Example.com/a", 'unable to parse requirement: <nil>: Invalid value: "Example.com/a": prefix part a lowercase '
                      "RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
                      "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation "
                      "is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"),
    ("a" * 64, f'unable to parse requirement: <nil>: Invalid value: "{"a" * 64}": name part must be no more than 63 '
               "characters"),
])
def test_bad_label_selectors_get_kube_apiservers_message(selector: str, message: str) -> None:
    with pytest.raises(SelectorError) as refused:
        selectors.parse(VM, selector, None)
    assert refused.value.message == message
    assert refused.value.code == 400 and refused.value.reason == "BadRequest"


def test_several_bad_values_are_reported_together() -> None:
    with pytest.raises(SelectorError) as refused:
        selectors.parse(VM, "a in (-x,-y)", None)
    assert refused.value.message == ("unable to parse requirement: "
                                     f'[values[0][a]: Invalid value: "-x": {VALUE_PROBLEM}, '
                                     f'values[1][a]: Invalid value: "-y": {VALUE_PROBLEM}]')


def event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"metadata": {"name": "web-1.abc", "namespace": "dev"},
                            "involvedObject": {"kind": "VirtualMachine", "name": "web-1", "namespace": "dev",
                                               "uid": "u-1", "apiVersion": "kubevirt.io/v1"},
                            "reason": "Started", "type": "Normal", "source": {"component": "vmquota"},
                            "reportingComponent": "vmquota"}
    base.update(fields)
    return base


@pytest.mark.parametrize(("kind", "selector", "obj", "expected"), [
    (VM, "metadata.name=web-1", vm(), True),
    (VM, "metadata.name==web-1", vm(), True),
    (VM, "metadata.name!=web-1", vm(), False),
    (VM, "metadata.namespace=dev", vm(), True),
    (VM, "metadata.namespace=dev,metadata.name=db", vm(), False),
    (QUOTA, "metadata.namespace!=prod", vm(), True),
    (NS, "status.phase=Active", {"metadata": {"name": "dev"}}, True),  # a namespace without a status is Active
    (PROJECT, "metadata.name=p", {"metadata": {"name": "p"}}, True),
    (EVENT, "involvedObject.kind=VirtualMachine,involvedObject.name=web-1", event(), True),
    (EVENT, "involvedObject.uid=u-2", event(), False),
    (EVENT, "involvedObject.fieldPath=", event(), True),  # a missing field is ""
    (EVENT, "reason=Started,type!=Warning", event(), True),
    (EVENT, "source=vmquota", event(), True),
    (EVENT, "source=kubelet", event(source={}, reportingComponent="kubelet"), True),  # else reportingComponent
    (EVENT, "reportingComponent=vmquota", event(), True),
    (VM, r"metadata.name=a\,b", vm(name="a,b"), True),  # escaped , = and \ are data
    (VM, r"metadata.name=a\=b\\", vm(name="a=b\\"), True),
    (VM, ",,", vm(), True),
])
def test_field_selectors(kind: objects.Kind, selector: str, obj: dict[str, Any], expected: bool) -> None:
    assert selectors.parse(kind, None, selector).matches(obj) is expected


@pytest.mark.parametrize(("kind", "selector", "message"), [
    (VM, "spec.foo=x", "field label not supported: spec.foo"),
    (PROJECT, "metadata.namespace=x", "field label not supported: metadata.namespace"),  # cluster-scoped
    (NS, "metadata.namespace=x", "field label not supported: metadata.namespace"),
    (QUOTA, "spec.hard=x", '"spec.hard" is not a known field selector: only "metadata.name", "metadata.namespace"'),
    (EVENT, "involvedObject.foo=x", "field label not supported: involvedObject.foo"),
    (VM, "metadata.name", "invalid selector: 'metadata.name'; can't understand 'metadata.name'"),
    (VM, "metadata.name=a=b", "invalid field selector: unescaped character in value: 61"),
    (VM, "metadata.name=a\\b", "invalid field selector: invalid escape sequence: \\b"),
    (VM, "metadata.name=a\\", "invalid field selector: invalid escape sequence: \\"),
])
def test_bad_field_selectors_get_kube_apiservers_message(kind: objects.Kind, selector: str, message: str) -> None:
    with pytest.raises(SelectorError) as refused:
        selectors.parse(kind, None, selector)
    assert refused.value.message == message


def test_an_exact_name_is_known_without_a_scan() -> None:
    selection = selectors.parse(VM, "app=web", "metadata.name=web-1,metadata.namespace!=x")
    assert selection.exact("metadata.name") == "web-1"
    assert selection.exact("metadata.namespace") is None
    assert not selection.needs_matching  # everything in it is said to the store
    assert selectors.parse(VM, "tier>2", None).needs_matching  # integer comparisons are Python's


# -- the store says what the predicate says --------------------------------------------------------------

KEYS = ("app", "tier", "example.com/team")
VALUES = ("web", "db", "", "2", "10")
label_sets = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)
requirement = st.one_of(
    st.builds(lambda k, op, v: f"{k}{op}{v}", st.sampled_from(KEYS), st.sampled_from(["=", "==", "!="]),
              st.sampled_from(VALUES)),
    st.builds(lambda k, op, vs: f"{k} {op} ({','.join(vs)})", st.sampled_from(KEYS), st.sampled_from(["in", "notin"]),
              st.lists(st.sampled_from([v for v in VALUES if v]), min_size=1, max_size=3)),  # "(a,,)" is refused
    st.builds(lambda neg, k: f"{'!' if neg else ''}{k}", st.booleans(), st.sampled_from(KEYS)),
    st.builds(lambda k, op, v: f"{k}{op}{v}", st.sampled_from(KEYS), st.sampled_from([">", "<"]),
              st.sampled_from(["2", "5"])),
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return Store(Path(tmp_path_factory.mktemp("selectors")) / "vmquota.db")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(population=st.lists(label_sets, min_size=1, max_size=8),
       chosen=st.lists(requirement, min_size=1, max_size=3))
def test_the_store_selects_what_the_predicate_matches(store: Store, population: list[dict[str, str]],
                                                      chosen: list[str]) -> None:
    with store.transaction() as txn:
        for _, name in txn.names(VM, "sel"):
            txn.delete(VM, "sel", name)
        for i, labels in enumerate(population):
            txn.create(VM, vm(f"vm-{i}", "sel", **labels))
    selection = selectors.parse(VM, ",".join(chosen), "metadata.namespace=sel")
    reader = store.reader()
    stored = [json.loads(body) for body in reader.bodies(VM, None, selection.where)]
    by_store = [o["metadata"]["name"] for o in stored if not selection.needs_matching or selection.matches(o)]
    by_predicate = [o["metadata"]["name"] for o in reader.list(VM, "sel") if selection.matches(o)]
    assert by_store == by_predicate


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label=st.text(alphabet=st.sampled_from(list("ab=!,()<> \t-./_x9inotI\"'\\\0é")), max_size=30),
       field=st.text(alphabet=st.sampled_from(list("metadname.spc=!,\\ 'é\"")), max_size=30),
       kind=st.sampled_from(objects.KINDS))
def test_any_selector_is_parsed_or_refused_with_a_400_and_the_store_runs_what_parses(
        store: Store, label: str, field: str, kind: objects.Kind) -> None:
    try:
        selection = selectors.parse(kind, label, field)
    except SelectorError as refused:
        assert refused.code == 400 and refused.message
        return
    list(store.reader().bodies(kind, None, selection.where))  # no SQL error, whatever the values hold
    selection.matches(vm())
