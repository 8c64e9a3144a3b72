"""Kubernetes label and field selectors: `?labelSelector=` and `?fieldSelector=` of a list or a watch.

Pure. `parse(kind, label_selector, field_selector)` reads both query parameters as kube-apiserver does
(k8s.io/apimachinery's `labels.Parse` and `fields.ParseSelector`, then the kind's field label conversion) and
refuses, with kube-apiserver's own messages, whatever it cannot evaluate: bad syntax, an invalid key or
value, a field the kind does not select on. The `Selection` it returns is

- a predicate, `matches(obj)`, for what has the object in hand (the watch, the list of one object);
- a tuple of `store.Where` conditions, so the store selects in SQLite and a selected list of 100,000 VMs
  parses no body it drops. Only what SQL cannot say (the integer comparisons `gt` and `lt`) is left to
  `matches`, and `needs_matching` says when.

The grammar and the messages follow apimachinery's lexer and parser one for one (why by hand: no Python
library parses Kubernetes selectors). Neighbours: `handlers.py` (lists), `watch.py` (watches), and
`vmquota.store` (the `Where` it evaluates).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmquota import errors, objects
from vmquota.objects import Kind, Obj
from vmquota.store import Where

# -- validation of keys and values, as k8s.io/apimachinery/pkg/util/validation words it -------------------

_QUALIFIED_NAME_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QUALIFIED_NAME = re.compile(f"^{_QUALIFIED_NAME_FMT}$")
_QUALIFIED_NAME_MSG = ("must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
                       "alphanumeric character")
_LABEL_VALUE_FMT = f"({_QUALIFIED_NAME_FMT})?"
_LABEL_VALUE = re.compile(f"^{_LABEL_VALUE_FMT}$")
_LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                    "'.', and must start and end with an alphanumeric character")
_DNS1123_SUBDOMAIN_FMT = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_DNS1123_SUBDOMAIN = re.compile(f"^{_DNS1123_SUBDOMAIN_FMT}$")
_DNS1123_SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
                          "'-' or '.', and must start and end with an alphanumeric character")
MAX_NAME_LENGTH = 63
MAX_PREFIX_LENGTH = 253
_INT64 = re.compile(r"^[+-]?[0-9]+$")


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    """apimachinery's RegexError, double spaces and all."""
    shown = "".join(f"{' or ' if i else ''}'{example}', " for i, example in enumerate(examples))
    return f"{message} (e.g. {shown}regex used for validation is '{fmt}')"


def qualified_name_problems(value: str) -> list[str]:
    """Why `value` is no qualified name (a label key): apimachinery's IsQualifiedName."""
    problems: list[str] = []
    parts = value.split("/")
    if len(parts) > 2:
        return ["a qualified name " + _regex_error(_QUALIFIED_NAME_MSG, _QUALIFIED_NAME_FMT, "MyName", "my.name",
                                                   "123-abc")
                + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"]
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            problems.append("prefix part must be non-empty")
        else:
            if len(prefix) > MAX_PREFIX_LENGTH:
                problems.append(f"prefix part must be no more than {MAX_PREFIX_LENGTH} characters")
            if not _DNS1123_SUBDOMAIN.match(prefix):
                problems.append("prefix part " + _regex_error(_DNS1123_SUBDOMAIN_MSG, _DNS1123_SUBDOMAIN_FMT,
                                                              "example.com"))
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > MAX_NAME_LENGTH:
        problems.append(f"name part must be no more than {MAX_NAME_LENGTH} characters")
    if not _QUALIFIED_NAME.match(name):
        problems.append("name part " + _regex_error(_QUALIFIED_NAME_MSG, _QUALIFIED_NAME_FMT, "MyName", "my.name",
                                                    "123-abc"))
    return problems


def label_value_problems(value: str) -> list[str]:
    """Why `value` is no label value: apimachinery's IsValidLabelValue."""
    problems: list[str] = []
    if len(value) > MAX_NAME_LENGTH:
        problems.append(f"must be no more than {MAX_NAME_LENGTH} characters")
    if not _LABEL_VALUE.match(value):
        problems.append(_regex_error(_LABEL_VALUE_MSG, _LABEL_VALUE_FMT, "MyValue", "my_value", "12345"))
    return problems


def go_quote(text: str) -> str:
    """Go's %q of a string, as the messages quote keys and values."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _invalid(path: str, value: str, problems: Sequence[str]) -> str:
    """A field.Invalid error's text; apimachinery's parser has no path for the key, so it prints <nil>."""
    return f"{path}: Invalid value: {go_quote(value)}: {'; '.join(problems)}"


class SelectorError(errors.BadRequest):
    """A selector kube-apiserver would refuse; its message is kube-apiserver's."""


# -- label selectors ------------------------------------------------------------------------------------


class Operator(enum.StrEnum):
    """apimachinery's selection operators, by the names its messages use."""
    IN = "in"
    NOT_IN = "notin"
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    GREATER_THAN = "gt"
    LESS_THAN = "lt"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"


_BINARY = (Operator.IN, Operator.NOT_IN, Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS,
           Operator.GREATER_THAN, Operator.LESS_THAN)
_POSITIVE = (Operator.IN, Operator.EQUALS, Operator.DOUBLE_EQUALS)
_NEGATIVE = (Operator.NOT_IN, Operator.NOT_EQUALS)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()  # sorted, as apimachinery keeps them

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator in _POSITIVE:
            return value is not None and value in self.values
        if self.operator in _NEGATIVE:
            return value is None or value not in self.values
        if self.operator is Operator.EXISTS:
            return value is not None
        if self.operator is Operator.DOES_NOT_EXIST:
            return value is None
        # gt and lt compare integers; a label that is no integer matches neither.
        if value is None or not _INT64.match(value):
            return False
        have, want = int(value), int(self.values[0])
        return have > want if self.operator is Operator.GREATER_THAN else have < want

    @property
    def where(self) -> Where | None:
        """The same condition for the store to evaluate; None for gt and lt, which Python keeps."""
        path = ("metadata", "labels", self.key)
        if self.operator in _POSITIVE:
            return Where(path, "in", self.values)
        if self.operator in _NEGATIVE:
            return Where(path, "notin", self.values)
        if self.operator is Operator.EXISTS:
            return Where(path, "exists")
        if self.operator is Operator.DOES_NOT_EXIST:
            return Where(path, "absent")
        return None


class _Token(enum.Enum):
    END = "end of string"
    CLOSE = ")"
    COMMA = ","
    NOT = "!"
    DOUBLE_EQUALS = "=="
    EQUALS = "="
    GREATER = ">"
    IDENTIFIER = "identifier"
    IN = "in"
    LESS = "<"
    NOT_EQUALS = "!="
    NOT_IN = "notin"
    OPEN = "("


_SYMBOLS = {"(": _Token.OPEN, ")": _Token.CLOSE, ",": _Token.COMMA, "!": _Token.NOT, "==": _Token.DOUBLE_EQUALS,
            "=": _Token.EQUALS, ">": _Token.GREATER, "<": _Token.LESS, "!=": _Token.NOT_EQUALS}
_KEYWORDS = {"in": _Token.IN, "notin": _Token.NOT_IN}
_SPECIAL = frozenset("=!(),<>")
_WHITESPACE = frozenset(" \t\r\n")
_OPERATOR_TOKENS = {_Token.IN: Operator.IN, _Token.EQUALS: Operator.EQUALS,
                    _Token.DOUBLE_EQUALS: Operator.DOUBLE_EQUALS, _Token.GREATER: Operator.GREATER_THAN,
                    _Token.LESS: Operator.LESS_THAN, _Token.NOT_IN: Operator.NOT_IN,
                    _Token.NOT_EQUALS: Operator.NOT_EQUALS}


def _lex(text: str) -> list[tuple[_Token, str]]:
    """apimachinery's lexer: identifiers run to whitespace or a special symbol; `==` and `!=` are read
    whole. Like Go, a NUL character ends the string."""
    tokens: list[tuple[_Token, str]] = []
    text = text.split("\0", 1)[0]
    i = 0
    while True:
        while i < len(text) and text[i] in _WHITESPACE:
            i += 1
        if i == len(text):
            tokens.append((_Token.END, ""))
            return tokens
        if text[i] in _SPECIAL:
            symbol = text[i:i + 2] if text[i:i + 2] in ("==", "!=") else text[i]
            tokens.append((_SYMBOLS[symbol], symbol))
            i += len(symbol)
            continue
        start = i
        while i < len(text) and text[i] not in _SPECIAL and text[i] not in _WHITESPACE:
            i += 1
        word = text[start:i]
        tokens.append((_KEYWORDS.get(word, _Token.IDENTIFIER), word))


class _LabelParser:
    """apimachinery's recursive descent over the tokens. In a value's place `in` and `notin` are plain
    identifiers (`x in (in)` is valid)."""

    def __init__(self, text: str) -> None:
        self.tokens = _lex(text)
        self.position = 0

    def lookahead(self, *, values: bool = True) -> tuple[_Token, str]:
        return self._as_value(self.tokens[self.position], values)

    def consume(self, *, values: bool = True) -> tuple[_Token, str]:
        self.position += 1
        return self._as_value(self.tokens[self.position - 1], values)

    @staticmethod
    def _as_value(item: tuple[_Token, str], values: bool) -> tuple[_Token, str]:
        token, literal = item
        if values and token in (_Token.IN, _Token.NOT_IN):
            return _Token.IDENTIFIER, literal
        return token, literal

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        while True:
            token, literal = self.lookahead()
            if token is _Token.END:
                return requirements
            if token not in (_Token.IDENTIFIER, _Token.NOT):
                raise SelectorError(f"found '{literal}', expected: !, identifier, or 'end of string'")
            try:
                requirements.append(self.requirement())
            except SelectorError as e:
                raise SelectorError(f"unable to parse requirement: {e.message}") from None
            token, literal = self.consume()
            if token is _Token.END:
                return requirements
            if token is not _Token.COMMA:
                raise SelectorError(f"found '{literal}', expected: ',' or 'end of string'")
            after, after_literal = self.lookahead()
            if after not in (_Token.IDENTIFIER, _Token.NOT):
                raise SelectorError(f"found '{after_literal}', expected: identifier after ','")

    def requirement(self) -> Requirement:
        key, operator = self.key_and_inferred_operator()
        if operator is not None:
            return _requirement(key, operator, [])
        operator = self.operator()
        values = self.values() if operator in (Operator.IN, Operator.NOT_IN) else self.exact_value()
        return _requirement(key, operator, sorted(values))

    def key_and_inferred_operator(self) -> tuple[str, Operator | None]:
        operator = None
        token, literal = self.consume()
        if token is _Token.NOT:
            operator = Operator.DOES_NOT_EXIST
            token, literal = self.consume()
        if token is not _Token.IDENTIFIER:
            raise SelectorError(f"found '{literal}', expected: identifier")
        problems = qualified_name_problems(literal)
        if problems:
            raise SelectorError(_invalid("<nil>", literal, problems))
        if self.lookahead()[0] in (_Token.END, _Token.COMMA) and operator is None:
            operator = Operator.EXISTS
        return literal, operator

    def operator(self) -> Operator:
        token, literal = self.consume(values=False)
        if token not in _OPERATOR_TOKENS:
            raise SelectorError(f"found '{literal}', expected: {', '.join(_BINARY)}")
        return _OPERATOR_TOKENS[token]

    def values(self) -> set[str]:
        token, literal = self.consume()
        if token is not _Token.OPEN:
            raise SelectorError(f"found '{literal}' expected: '('")
        token, literal = self.lookahead()
        if token is _Token.CLOSE:  # "()" is the empty value
            self.consume()
            return {""}
        if token not in (_Token.IDENTIFIER, _Token.COMMA):
            raise SelectorError(f"found '{literal}', expected: ',', ')' or identifier")
        found = self.identifiers()
        if self.consume()[0] is not _Token.CLOSE:
            raise SelectorError(f"found '{literal}', expected: ')'")  # sic: the token after '('
        return found

    def identifiers(self) -> set[str]:
        """A comma-separated list of possibly empty values, up to (not including) ')'."""
        found: set[str] = set()
        while True:
            token, literal = self.consume()
            if token is _Token.IDENTIFIER:
                found.add(literal)
                after, after_literal = self.lookahead()
                if after is _Token.CLOSE:
                    return found
                if after is not _Token.COMMA:
                    raise SelectorError(f"found '{after_literal}', expected: ',' or ')'")
            elif token is _Token.COMMA:
                if not found:
                    found.add("")  # "(,"
                after = self.lookahead()[0]
                if after is _Token.CLOSE:
                    found.add("")  # ",)"
                    return found
                if after is _Token.COMMA:
                    self.consume()
                    found.add("")  # ",,"
            else:
                raise SelectorError(f"found '{literal}', expected: ',', or identifier")

    def exact_value(self) -> set[str]:
        if self.lookahead()[0] in (_Token.END, _Token.COMMA):
            return {""}
        token, literal = self.consume()
        if token is not _Token.IDENTIFIER:
            raise SelectorError(f"found '{literal}', expected: identifier")
        return {literal}


def _requirement(key: str, operator: Operator, values: list[str]) -> Requirement:
    """apimachinery's NewRequirement: the values' checks, every problem reported (an aggregate)."""
    problems: list[str] = []
    if operator in (Operator.GREATER_THAN, Operator.LESS_THAN):
        problems += [_invalid(f"values[{i}]", value, ["for 'Gt', 'Lt' operators, the value must be an integer"])
                     for i, value in enumerate(values) if not _INT64.match(value) or not _fits_int64(value)]
    for i, value in enumerate(values):
        value_problems = label_value_problems(value)
        if value_problems:
            problems.append(_invalid(f"values[{i}][{key}]", value, value_problems))
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SelectorError(unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]")
    return Requirement(key, operator, tuple(values))


def _fits_int64(value: str) -> bool:
    return -(1 << 63) <= int(value) < (1 << 63)


@dataclass(frozen=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()  # all must match (a comma is "and")

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def parse_labels(text: str) -> LabelSelector:
    """A `labelSelector` as kube-apiserver reads it; SelectorError with its message otherwise."""
    return LabelSelector(tuple(sorted(_LabelParser(text).parse(), key=lambda r: r.key)))


# -- field selectors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldTerm:
    field: str
    value: str
    negated: bool = False  # `!=`; `=` and `==` mean the same

    def matches(self, fields: Mapping[str, str]) -> bool:
        return (fields.get(self.field, "") == self.value) != self.negated


def _split_terms(text: str) -> list[str]:
    """The comma-separated terms; a backslash-escaped comma is data (its backslash is kept for unescaping)."""
    terms, start, escaped = [], 0, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _split_term(term: str) -> tuple[str, str, str] | None:
    """(field, operator, raw value) at the first operator; the field part has no escaping."""
    for i in range(len(term)):
        for operator in ("!=", "==", "="):
            if term.startswith(operator, i):
                return term[:i], operator, term[i + len(operator):]
    return None


def _unescape(value: str) -> str:
    if not any(ch in value for ch in "\\,="):
        return value
    out: list[str] = []
    escaped = False
    for ch in value:
        if escaped:
            if ch not in "\\,=":
                raise SelectorError(f"invalid field selector: invalid escape sequence: \\{ch}")
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in ",=":
            raise SelectorError(f"invalid field selector: unescaped character in value: {ord(ch)}")  # Go's %v of a rune
        else:
            out.append(ch)
    if escaped:
        raise SelectorError("invalid field selector: invalid escape sequence: \\")
    return "".join(out)


FieldValue = Callable[[Obj], str]


@dataclass(frozen=True)
class SelectableField:
    """One field a kind can be selected on: where it is in the object, and what it is when missing."""
    path: tuple[str, ...]
    default: str = ""  # fields.Set.Get of an absent field is ""

    def value(self, obj: Obj) -> str:
        current: Any = obj
        for step in self.path:
            current = current.get(step) if isinstance(current, dict) else None
        return current if isinstance(current, str) else self.default


@dataclass(frozen=True)
class FieldRules:
    """The fields of one kind kube-apiserver selects on, and how it refuses any other."""
    fields: Mapping[str, SelectableField]
    refusal: Callable[[str], str]

    def convert(self, label: str) -> SelectableField:
        known = self.fields.get(label)
        if known is None:
            raise SelectorError(self.refusal(label))
        return known


def _not_supported(label: str) -> str:
    return f"field label not supported: {label}"


def _not_known(label: str) -> str:
    """runtime.DefaultMetaV1FieldSelectorConversion: a built-in kind with no conversion of its own."""
    return f'{go_quote(label)} is not a known field selector: only "metadata.name", "metadata.namespace"'


_NAME = SelectableField(("metadata", "name"))
_NAMESPACE = SelectableField(("metadata", "namespace"))
_NAMESPACED = {"metadata.name": _NAME, "metadata.namespace": _NAMESPACE}
_EVENT_FIELDS = {
    **_NAMESPACED,
    **{f"involvedObject.{name}": SelectableField(("involvedObject", name))
       for name in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")},
    "reason": SelectableField(("reason",)),
    "reportingComponent": SelectableField(("reportingComponent",)),
    "type": SelectableField(("type",)),
}

# As kube-apiserver 1.32 converts field labels: a CRD (KubeVirt's kinds, vmquota's Project) takes
# metadata.name, and metadata.namespace when namespaced; Namespace has its own list (pkg/apis/core/v1);
# ResourceQuota has none and gets the default conversion; Event has its own (kubectl describe uses it).
FIELD_RULES: dict[str, FieldRules] = {
    objects.VIRTUAL_MACHINE.kind: FieldRules(_NAMESPACED, _not_supported),
    objects.VIRTUAL_MACHINE_CLONE.kind: FieldRules(_NAMESPACED, _not_supported),
    objects.PROJECT.kind: FieldRules({"metadata.name": _NAME}, _not_supported),
    objects.NAMESPACE.kind: FieldRules({"metadata.name": _NAME,
                                        "status.phase": SelectableField(("status", "phase"), "Active")},
                                       _not_supported),
    objects.RESOURCE_QUOTA.kind: FieldRules(_NAMESPACED, _not_known),
    objects.EVENT.kind: FieldRules(_EVENT_FIELDS, _not_supported),
}
_EVENT_SOURCE = "source"  # source.component, else reportingComponent: not one path, so matched apart


@dataclass(frozen=True)
class FieldSelector:
    terms: tuple[FieldTerm, ...] = ()
    resolved: tuple[SelectableField | None, ...] = ()  # each term's field; None for an event's `source`

    def matches(self, obj: Obj) -> bool:
        return all(term.matches({term.field: _field_value(field, obj)})
                   for term, field in zip(self.terms, self.resolved, strict=True))


def _field_value(field: SelectableField | None, obj: Obj) -> str:
    if field is not None:
        return field.value(obj)
    source, reporting = obj.get("source"), obj.get("reportingComponent")
    component = source.get("component") if isinstance(source, dict) else None
    if isinstance(component, str) and component:
        return component
    return reporting if isinstance(reporting, str) else ""


def parse_fields(kind: Kind, text: str) -> FieldSelector:
    """A `fieldSelector` as kube-apiserver reads it for `kind`; SelectorError with its message otherwise."""
    terms: list[FieldTerm] = []
    for part in sorted(_split_terms(text)) if text else []:
        if not part:
            continue
        split = _split_term(part)
        if split is None:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        field, operator, raw = split
        terms.append(FieldTerm(field, _unescape(raw), negated=operator == "!="))
    rules = FIELD_RULES[kind.kind]
    resolved = [None if kind is objects.EVENT and term.field == _EVENT_SOURCE else rules.convert(term.field)
                for term in terms]
    return FieldSelector(tuple(terms), tuple(resolved))


# -- both -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What a list or watch selects: every label requirement and every field term."""
    labels: LabelSelector = LabelSelector()
    fields: FieldSelector = FieldSelector()

    @property
    def empty(self) -> bool:
        return not self.labels.requirements and not self.fields.terms

    def matches(self, obj: Obj) -> bool:
        return self.labels.matches(objects.labels(obj)) and self.fields.matches(obj)

    __call__ = matches  # a Selection is the predicate itself (`Callable[[Obj], bool]`)

    @property
    def where(self) -> tuple[Where, ...]:
        """The conditions the store evaluates; `needs_matching` says whether any is left for `matches`."""
        found = [w for w in (r.where for r in self.labels.requirements) if w is not None]
        for term, field in zip(self.fields.terms, self.fields.resolved, strict=True):
            if field is not None:
                found.append(Where(field.path, "notin" if term.negated else "in", (term.value,),
                                   default=field.default))
        return tuple(found)

    @property
    def needs_matching(self) -> bool:
        return (any(r.where is None for r in self.labels.requirements)
                or any(field is None for field in self.fields.resolved))

    def exact(self, label: str) -> str | None:
        """The one value a field must equal for anything to match (`metadata.name=web-1`), else None: a
        list of one name is a lookup, not a scan."""
        values = {t.value for t in self.fields.terms if t.field == label and not t.negated}
        return values.pop() if len(values) == 1 else None


EVERYTHING = Selection()


def parse(kind: Kind, label_selector: str | None, field_selector: str | None) -> Selection:
    """Both selectors of a request (None or "" selects everything); SelectorError (400) as kube-apiserver."""
    return Selection(parse_labels(label_selector) if label_selector else LabelSelector(),
                     parse_fields(kind, field_selector) if field_selector else FieldSelector())
