"""`meta.k8s.io` Tables: what `kubectl get` prints, computed by the server as kube-apiserver does.

Pure. A client asks for a Table with `Accept: application/json;as=Table;g=meta.k8s.io;v=v1` (kubectl 1.32
also offers v1beta1 after it, then plain JSON); `target(accept)` negotiates that as kube-apiserver's
`negotiation` package does, PartialObjectMetadata(List) included. Each kind has one `Printer`: its column
definitions (priority 1 = `-o wide` only) and the cells of a row, preformatted (ages as kubectl's short
durations). The columns are those of kube-apiserver's printers for the built-in kinds (Namespace,
ResourceQuota, Event), of KubeVirt's CRD `additionalPrinterColumns` for VirtualMachine and
VirtualMachineClone, and vmquota's own for Project (its used/hard, as `vmquota get projects`).

A printer names the few fields its cells need (`Printer.fields`). A row is made either from an object in
hand (`rows_of_objects`: one GET, a watch event) or from those fields as the store cuts them out of its
bodies (`rows_of_values`, for lists), so a Table of 10,000 VMs never parses 10,000 bodies; the store keeps
those fields of most kinds at write time (`kept_parts`), so that it need not parse them either. `includeObject`
(None, Metadata by default, Object) says what each row carries: the object's metadata as a
PartialObjectMetadata is what `--show-labels` reads.

Neighbours: `handlers.py` (lists and gets) and `watch.py` (`table_for_event`, a one-row Table per event).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from vmquota import errors, objects
from vmquota.objects import Kind, Obj
from vmquota.store import STATUS_APART, Part

META_GROUP = "meta.k8s.io"
VERSIONS = ("v1", "v1beta1")
TABLE, PARTIAL, PARTIAL_LIST = "Table", "PartialObjectMetadata", "PartialObjectMetadataList"
INCLUDE = ("Metadata", "None", "Object")
CONTENT_TYPE = "application/json"  # kube-apiserver names no parameters in a Table's Content-Type


class NotAcceptable(errors.ApiError):
    code = 406
    reason = "NotAcceptable"


# -- negotiation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a response is turned into instead of the object or list itself."""
    kind: str  # Table, PartialObjectMetadata or PartialObjectMetadataList
    version: str  # v1 or v1beta1

    @property
    def api_version(self) -> str:
        return f"{META_GROUP}/{self.version}"


@dataclass(frozen=True)
class _Clause:
    media_type: str
    params: dict[str, str]
    q: float


def _clauses(accept: str) -> list[_Clause]:
    """The Accept header's media ranges, best first (by q, then the more specific), as goautoneg sorts them."""
    found = []
    for raw in accept.split(","):
        media_type, *raw_params = (part.strip() for part in raw.split(";"))
        if not media_type:
            continue
        params = {}
        for param in raw_params:
            name, _, value = param.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 0.0
        found.append(_Clause(media_type.lower(), params, q))
    return sorted((c for c in found if c.q > 0),
                  key=lambda c: (-c.q, c.media_type.startswith("*/"), c.media_type.endswith("/*")))


def target(accept: str, *, listing: bool) -> Target | None:
    """The transformation the Accept header asks for, None for the plain object (also when there is no
    Accept header or none of it is understood: vmquota answers JSON then, as it always has).

    A clause is taken, in preference order, when it is JSON (or a wildcard) and either asks for nothing
    else or asks for a Table or PartialObjectMetadata(List) of meta.k8s.io v1 or v1beta1. If only
    transformations were asked for and none can be made, that is kube-apiserver's 406.
    """
    asked_transform = False
    for clause in _clauses(accept):
        if clause.media_type not in ("application/json", "application/*", "*/*"):
            continue  # YAML, protobuf, CBOR: not served here
        convert = {k: clause.params[k] for k in ("as", "g", "v") if k in clause.params}
        if not convert:
            return None
        asked_transform = True
        kind, group, version = convert.get("as", ""), convert.get("g", ""), convert.get("v", "")
        if group == META_GROUP and version in VERSIONS and kind in (TABLE, PARTIAL, PARTIAL_LIST):
            if kind == PARTIAL and listing:
                raise NotAcceptable("you requested PartialObjectMetadata, but the requested object is a list")
            if kind == PARTIAL_LIST and not listing:
                raise NotAcceptable("you requested PartialObjectMetadataList, but the requested object is not "
                                    "a list")
            return Target(kind, version)
    if asked_transform:
        raise NotAcceptable("only the following media types are accepted: application/json, application/yaml, "
                            "application/vnd.kubernetes.protobuf")
    return None


@dataclass(frozen=True)
class TableOptions:
    include_object: str = "Metadata"  # None, Metadata or Object
    version: str = "v1"  # of meta.k8s.io, for the Table and its PartialObjectMetadata
    no_headers: bool = False  # a watch sends the column definitions with its first event only

    @property
    def api_version(self) -> str:
        return f"{META_GROUP}/{self.version}"


def options(include_object: str | None, version: str) -> TableOptions:
    """The request's TableOptions, checked as kube-apiserver checks them."""
    value = include_object or ""
    if value not in ("", *INCLUDE):
        raise errors.BadRequest(f'Unable to convert to Table as requested: includeObject: Invalid value: '
                                f'{json.dumps(value)}: must be \'Metadata\', \'Object\', \'None\', or empty')
    return TableOptions(value or "Metadata", version)


# -- columns and cells ----------------------------------------------------------------------------------

_NAME_DOC = ("Name must be unique within a namespace. Is required when creating resources, although some "
             "resources may allow a client to request the generation of an appropriate name automatically. Name "
             "is primarily intended for creation idempotence and configuration definition. Cannot be updated. "
             "More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names")
_CREATED_DOC = ("CreationTimestamp is a timestamp representing the server time when this object was created. It "
                "is not guaranteed to be set in happens-before order across separate operations. Clients may not "
                "set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. "
                "Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/"
                "sig-architecture/api-conventions.md#metadata")


@dataclass(frozen=True)
class Column:
    """A `TableColumnDefinition`."""
    name: str
    type: str = "string"
    format: str = ""
    description: str = ""
    priority: int = 0  # 1: shown by `-o wide` only

    def definition(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "format": self.format, "description": self.description,
                "priority": self.priority}


def _crd_column(name: str, type_: str, json_path: str, description: str = "", priority: int = 0) -> Column:
    """A CRD's printer column as kube-apiserver's CRD table convertor defines it."""
    return Column(name, type_, "", description or f"Custom resource definition column (in JSONPath format): "
                                                  f"{json_path}", priority)


_NAME_COLUMN = Column("Name", "string", "name", _NAME_DOC)
_AGE_COLUMN = Column("Age", "string", "", _CREATED_DOC)


def value_of(part: Part, obj: Obj) -> Any:
    """What the store's `Reader.extract` gives for `part`, from an object in hand; a JSON part decoded."""
    current: Any = obj
    for step in part.path:
        current = current.get(step) if isinstance(current, dict) else None
    if part.item is not None:
        key, value, field = part.item
        for element in current if isinstance(current, list) else []:
            if isinstance(element, dict) and element.get(key) == value:
                return _scalar(element.get(field))
        return None
    return current if part.as_json else _scalar(current)


def _scalar(value: Any) -> Any:
    """As SQLite's ->> gives a value: booleans as 1 or 0, objects and arrays as JSON text."""
    if isinstance(value, bool):
        return int(value)
    return _dumps(value) if isinstance(value, dict | list) else value


Cells = Callable[[Sequence[Any], "Clock"], list[Any]]


@dataclass(frozen=True)
class Printer:
    columns: tuple[Column, ...]
    fields: tuple[Part, ...]  # what the cells need of an object, cut out by the store for a list
    cells: Cells  # from the fields' values (in `fields` order) and the clock, one cell per column


class Clock:
    """The time a table is made at, and the ages it has shown: the VMs of a list share few creation seconds,
    and formatting each age once keeps a 10,000-row table cheap."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)
        self._ages: dict[tuple[Any, bool], str | None] = {}

    def age(self, value: Any, *, crd: bool = False) -> str | None:
        """A timestamp's age: a built-in printer's ("<unknown>" without one), or with `crd` a CRD "date"
        column's (null when missing, "<invalid>" when no time)."""
        key = (value, crd)
        shown = self._ages.get(key, _UNSEEN)
        if shown is _UNSEEN:
            shown = self._ages[key] = _date_cell(value, self.now) if crd else age(value, self.now)
        return shown


_UNSEEN = "<unseen>"  # no age is ever this


def human_duration(seconds: float) -> str:
    """apimachinery's duration.HumanDuration: kubectl's ages ("5s", "3m", "2d", "4m20s", "5h10m")."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        return f"{minutes}m{whole % 60}s" if whole % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = hours // 24 % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def age(value: Any, now: datetime) -> str:
    """A built-in printer's age (translateTimestampSince): "<unknown>" without a timestamp."""
    then = _parse_time(value)
    return "<unknown>" if then is None else human_duration((now - then).total_seconds())


def _date_cell(value: Any, now: datetime) -> str | None:
    """A CRD "date" column's cell: null when the field is missing, "<invalid>" when it is no time."""
    if value is None:
        return None
    then = _parse_time(value)
    return "<invalid>" if then is None else human_duration((now - then).total_seconds())


def _string_cell(value: Any) -> str | None:
    """A CRD "string" column's cell, as its JSONPath prints it; null when the field is missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quantities(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def quota_columns(used: dict[str, str], hard: dict[str, str]) -> tuple[str, str]:
    """kube-apiserver's REQUEST and LIMIT cells of a ResourceQuota: `name: used/hard, ...` in name order,
    the `limits.*` resources in LIMIT and every other one in REQUEST."""
    request: list[str] = []
    limit: list[str] = []
    for name in sorted(hard):
        (limit if name.split(".")[0] == "limits" and "." in name else request).append(
            f"{name}: {used.get(name, '0')}/{hard[name]}")
    return ", ".join(request), ", ".join(limit)


def used_of_hard(used: dict[str, str], hard: dict[str, str]) -> str:
    return ", ".join(f"{name}: {used.get(name, '0')}/{hard[name]}" for name in sorted(hard))


def _vm_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    name, created, printable, ready = values
    return [name, clock.age(created, crd=True), printable if type(printable) is str else _string_cell(printable),
            ready if type(ready) is str else _string_cell(ready)]


def _clone_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    name, phase, source, target_ = values
    return [name, _string_cell(phase), _string_cell(source), _string_cell(target_)]


def _quota_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    name, created, used, hard = values
    return [name, clock.age(created), *quota_columns(_quantities(used), _quantities(hard))]


def _project_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    name, created, used, hard = values
    return [name, clock.age(created, crd=True), used_of_hard(_quantities(used), _quantities(hard))]


def _namespace_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    name, phase, created = values
    return [name, phase if isinstance(phase, str) else "Active", clock.age(created)]


def _node_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    """kube-apiserver's printNode: the Ready condition's word, SchedulingDisabled when cordoned; the version is
    the host's libvirt's."""
    name, created, ready, unschedulable, version, address, os_image, kernel = values
    status = {"True": "Ready", "False": "NotReady"}.get(ready, "Unknown")
    if unschedulable in (True, 1):
        status += ",SchedulingDisabled"
    return [name, status, "<none>", clock.age(created), _string_cell(version), _string_cell(address) or "<none>",
            "<none>", _string_cell(os_image) or "<unknown>", _string_cell(kernel) or "<unknown>", "libvirt"]


def _vmi_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    name, created, phase, interfaces, node, ready, migratable, paused = values
    try:
        first = json.loads(interfaces)[0] if isinstance(interfaces, str) else {}
    except (ValueError, IndexError, KeyError):
        first = {}
    address = first.get("ipAddress") if isinstance(first, dict) else None
    return [name, clock.age(created, crd=True), _string_cell(phase), _string_cell(address), _string_cell(node),
            _string_cell(ready), _string_cell(migratable), _string_cell(paused)]


def _event_cells(values: Sequence[Any], clock: Clock) -> list[Any]:
    """kube-apiserver's printEvent, wide (the server always sends the wide cells; kubectl hides them)."""
    (name, involved, type_, reason, message, first, last, event_time, count, series, source,
     reporting_controller, reporting_instance) = values
    involved = involved if isinstance(involved, dict) else {}
    first_seen = clock.age(first) if first else clock.age(event_time)
    last_seen = clock.age(last) if last else first_seen
    if isinstance(series, dict):
        last_seen = clock.age(series.get("lastObservedTime"))
        count = series.get("count")
    elif not count:
        count = 1  # a singleton event of the new API has no count
    kind = str(involved.get("kind") or "").lower()
    target_ = f"{kind}/{involved['name']}" if involved.get("name") else kind
    source = source if isinstance(source, dict) else {}
    component = source.get("component") or reporting_controller or ""
    instance = source.get("host") or reporting_instance or ""
    return [last_seen, type_ or "", reason or "", target_, involved.get("fieldPath") or "",
            f"{component}, {instance}" if instance else component, str(message or "").strip(), first_seen,
            int(count) if isinstance(count, int | float) else 1, name]


_EVENT_DOC = {
    "lastTimestamp": "The time at which the most recent occurrence of this event was recorded.",
    "type": "Type of this event (Normal, Warning), new types could be added in the future",
    "reason": "This should be a short, machine understandable string that gives the reason for the transition "
              "into the object's current status.",
    "involvedObject": "The object that this event is about.",
    "fieldPath": "If referring to a piece of an object instead of an entire object, this string should contain a "
                 "valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, "
                 "if the object reference is to a container within a pod, this would take on a value like: "
                 "\"spec.containers{name}\" (where \"name\" refers to the name of the container that triggered the "
                 "event) or if no container name is specified \"spec.containers[2]\" (container with index 2 in "
                 "this pod). This syntax is chosen only to have some well-defined way of referencing a part of "
                 "an object.",
    "source": "The component reporting this event. Should be a short machine understandable string.",
    "message": "A human-readable description of the status of this operation.",
    "firstTimestamp": "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
    "count": "The number of times this event has occurred.",
}

_NAME, _CREATED = Part(("metadata", "name")), Part(("metadata", "creationTimestamp"))

PRINTERS: dict[str, Printer] = {
    # KubeVirt's VirtualMachine CRD: Age, Status (printableStatus), Ready (the Ready condition's status).
    objects.VIRTUAL_MACHINE.kind: Printer(
        (_NAME_COLUMN, _crd_column("Age", "date", ".metadata.creationTimestamp"),
         _crd_column("Status", "string", ".status.printableStatus", "Human Readable Status"),
         _crd_column("Ready", "string", ".status.conditions[?(@.type=='Ready')].status")),
        (_NAME, _CREATED, Part(("status", "printableStatus")),
         Part(("status", "conditions"), item=("type", "Ready", "status"))),
        _vm_cells),
    # KubeVirt's VirtualMachineClone CRD has these three columns and no Age.
    objects.VIRTUAL_MACHINE_CLONE.kind: Printer(
        (_NAME_COLUMN, _crd_column("Phase", "string", ".status.phase"),
         _crd_column("SourceVirtualMachine", "string", ".spec.source.name"),
         _crd_column("TargetVirtualMachine", "string", ".spec.target.name")),
        (_NAME, Part(("status", "phase")), Part(("spec", "source", "name")), Part(("spec", "target", "name"))),
        _clone_cells),
    objects.RESOURCE_QUOTA.kind: Printer(
        (_NAME_COLUMN, _AGE_COLUMN,
         Column("Request", description="Request represents a minimum amount of cpu/memory that a container may "
                                       "consume."),
         Column("Limit", description="Limits control the maximum amount of cpu/memory that a container may use "
                                     "independent of contention on the node.")),
        (_NAME, _CREATED, Part(("status", "used"), as_json=True), Part(("status", "hard"), as_json=True)),
        _quota_cells),
    objects.PROJECT.kind: Printer(
        (_NAME_COLUMN, _crd_column("Age", "date", ".metadata.creationTimestamp"),
         Column("Used/Hard", description="What the project's namespaces use of each limited resource, and its "
                                         "limit (spec.resourceQuota.hard).")),
        (_NAME, _CREATED, Part(("status", "used"), as_json=True),
         Part(("spec", "resourceQuota", "hard"), as_json=True)),
        _project_cells),
    objects.NAMESPACE.kind: Printer(
        (_NAME_COLUMN, Column("Status", description="The status of the namespace"), _AGE_COLUMN),
        (_NAME, Part(("status", "phase")), _CREATED),
        _namespace_cells),
    # kubectl's built-in Node printer: Name, Status, Roles, Age, Version; -o wide adds the rest.
    objects.NODE.kind: Printer(
        (_NAME_COLUMN, Column("Status", description="The status of the node"),
         Column("Roles", description="The roles of the node"), _AGE_COLUMN,
         Column("Version", description="Kubelet Version reported by the node: here the host's libvirt version."),
         Column("Internal-IP", priority=1, description="List of internal IPs."),
         Column("External-IP", priority=1, description="List of external IPs."),
         Column("OS-Image", priority=1, description="OS Image reported by the node from /etc/os-release."),
         Column("Kernel-Version", priority=1, description="Kernel Version reported by the node."),
         Column("Container-Runtime", priority=1, description="What runs the node's VMs.")),
        (_NAME, _CREATED, Part(("status", "conditions"), item=("type", "Ready", "status")),
         Part(("spec", "unschedulable")), Part(("status", "nodeInfo", "kubeletVersion")),
         Part(("status", "addresses"), item=("type", "InternalIP", "address")),
         Part(("status", "nodeInfo", "osImage")), Part(("status", "nodeInfo", "kernelVersion"))),
        _node_cells),
    # KubeVirt's VirtualMachineInstance CRD columns.
    objects.VIRTUAL_MACHINE_INSTANCE.kind: Printer(
        (_NAME_COLUMN, _crd_column("Age", "date", ".metadata.creationTimestamp"),
         _crd_column("Phase", "string", ".status.phase"),
         _crd_column("IP", "string", ".status.interfaces[0].ipAddress"),
         _crd_column("NodeName", "string", ".status.nodeName"),
         _crd_column("Ready", "string", ".status.conditions[?(@.type=='Ready')].status"),
         _crd_column("Live-Migratable", "string", ".status.conditions[?(@.type=='LiveMigratable')].status",
                     priority=1),
         _crd_column("Paused", "string", ".status.conditions[?(@.type=='Paused')].status", priority=1)),
        (_NAME, _CREATED, Part(("status", "phase")), Part(("status", "interfaces"), as_json=True),
         Part(("status", "nodeName")), Part(("status", "conditions"), item=("type", "Ready", "status")),
         Part(("status", "conditions"), item=("type", "LiveMigratable", "status")),
         Part(("status", "conditions"), item=("type", "Paused", "status"))),
        _vmi_cells),
    objects.EVENT.kind: Printer(
        (Column("Last Seen", description=_EVENT_DOC["lastTimestamp"]),
         Column("Type", description=_EVENT_DOC["type"]),
         Column("Reason", description=_EVENT_DOC["reason"]),
         Column("Object", description=_EVENT_DOC["involvedObject"]),
         Column("Subobject", priority=1, description=_EVENT_DOC["fieldPath"]),
         Column("Source", priority=1, description=_EVENT_DOC["source"]),
         Column("Message", description=_EVENT_DOC["message"]),
         Column("First Seen", priority=1, description=_EVENT_DOC["firstTimestamp"]),
         Column("Count", priority=1, description=_EVENT_DOC["count"]),
         Column("Name", "string", "name", _NAME_DOC, priority=1)),
        (_NAME, Part(("involvedObject",), as_json=True), Part(("type",)), Part(("reason",)), Part(("message",)),
         Part(("firstTimestamp",)), Part(("lastTimestamp",)), Part(("eventTime",)), Part(("count",)),
         Part(("series",), as_json=True), Part(("source",), as_json=True), Part(("reportingComponent",)),
         Part(("reportingInstance",))),
        _event_cells),
}


# -- rows and tables ------------------------------------------------------------------------------------


METADATA = Part(("metadata",), as_json=True)


def kept_parts() -> dict[Kind, list[Part]]:
    """What the store keeps of each kind at write time (`Store.keep`), so that a Table list, even the first
    one a process makes, reads those instead of every body: the printer's fields and the row's metadata. A
    quota's and a project's status is not in their bodies, and they are few: those are cut out when read."""
    return {objects.BY_KIND[name]: [*printer.fields, METADATA] for name, printer in PRINTERS.items()
            if name not in STATUS_APART}


def store_parts(kind: Kind, options: TableOptions) -> list[Part]:
    """What `rows_of_values` needs from the store for each object (`Reader.extract`): the printer's fields,
    then what the row carries."""
    carried = {"Metadata": [METADATA], "Object": [Part.BODY], "None": []}[options.include_object]
    return [*PRINTERS[kind.kind].fields, *carried]


def rows_of_values(kind: Kind, extracted: Iterable[Sequence[Any]], options: TableOptions,
                   now: datetime | None = None) -> Iterator[str]:
    """The JSON text of each row, from what the store cut out (`store_parts`): the printer's fields, then
    the metadata's or the object's JSON text."""
    printer, clock = PRINTERS[kind.kind], Clock(now)
    json_parts = [i for i, part in enumerate(printer.fields) if part.as_json]
    count = len(printer.fields)
    for values in extracted:
        fields = list(values[:count])
        for i in json_parts:
            fields[i] = None if fields[i] is None else json.loads(fields[i])
        yield _row(printer.cells(fields, clock), values[count] if len(values) > count else None, options)


def rows_of_objects(kind: Kind, objs: Iterable[Obj], options: TableOptions,
                    now: datetime | None = None) -> Iterator[str]:
    """The JSON text of each row, from objects in hand."""
    printer, clock = PRINTERS[kind.kind], Clock(now)
    for obj in objs:
        carried = (None if options.include_object == "None" else
                   _dumps(obj) if options.include_object == "Object" else _dumps(objects.meta(obj)))
        yield _row(printer.cells([value_of(part, obj) for part in printer.fields], clock), carried, options)


def _row(cells: list[Any], carried: str | None, options: TableOptions) -> str:
    encoded = _cells_json(cells)
    if options.include_object == "None" or carried is None:
        return f'{{"cells":{encoded}}}'
    if options.include_object == "Object":
        return f'{{"cells":{encoded},"object":{carried}}}'
    return (f'{{"cells":{encoded},"object":{{"kind":"PartialObjectMetadata","apiVersion":'
            f'"{options.api_version}","metadata":{carried}}}}}')


def _cells_json(cells: list[Any]) -> str:
    """The cells as JSON: nearly all are strings, which the C string encoder does without json.dumps' cost
    per call (a third of a 10,000-row table's time)."""
    return "[" + ",".join([encode_basestring_ascii(c) if type(c) is str else _dumps(c) for c in cells]) + "]"


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps with separators makes one a call


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def _list_meta(resource_version: str, continue_token: str | None, remaining: int | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"resourceVersion": resource_version}
    if continue_token:
        meta["continue"] = continue_token
    if remaining is not None:
        meta["remainingItemCount"] = remaining
    return meta


def table(kind: Kind, rows: Iterable[str], options: TableOptions, *, resource_version: str,
          continue_token: str | None = None, remaining: int | None = None) -> bytes:
    """A Table of `rows` (from `rows_of_values` or `rows_of_objects`), as JSON, assembled without parsing
    them again."""
    columns = "null" if options.no_headers else _dumps([c.definition() for c in PRINTERS[kind.kind].columns])
    head = _dumps({"kind": "Table", "apiVersion": options.api_version,
                   "metadata": _list_meta(resource_version, continue_token, remaining)})
    return f'{head[:-1]},"columnDefinitions":{columns},"rows":[{",".join(rows)}]}}'.encode()


def to_table(kind: Kind, objs: Iterable[Obj], options: TableOptions, *, resource_version: str,
             continue_token: str | None = None, remaining: int | None = None,
             now: datetime | None = None) -> bytes:
    """A Table of objects in hand (a page of a list, or one object)."""
    return table(kind, rows_of_objects(kind, objs, options, now), options, resource_version=resource_version,
                 continue_token=continue_token, remaining=remaining)


def table_for_event(kind: Kind, obj: Obj, options: TableOptions, now: datetime | None = None) -> dict[str, Any]:
    """A watch event's object as a one-row Table. kube-apiserver sends the column definitions with the first
    event only: pass `options` with `no_headers=True` for every later one (`without_headers`)."""
    rv = str(objects.meta(obj).get("resourceVersion", ""))
    result: dict[str, Any] = json.loads(to_table(kind, [obj], options, resource_version=rv, now=now))
    return result


def without_headers(options: TableOptions) -> TableOptions:
    return replace(options, no_headers=True)


def event_renderer(kind: Kind, options: TableOptions) -> Callable[[Obj], Obj]:
    """What one watch turns each event's object into: a one-row Table, with the column definitions in the
    first one only, as kube-apiserver's watch encoder does."""
    state = {"options": options}

    def render(obj: Obj) -> Obj:
        table_ = table_for_event(kind, obj, state["options"])
        state["options"] = without_headers(options)
        return table_
    return render


def partial_list(metadata: Iterable[str], target_: Target, *, resource_version: str,
                 continue_token: str | None = None, remaining: int | None = None) -> bytes:
    """A PartialObjectMetadataList of the metadata JSON texts (the store's "json:metadata")."""
    head = _dumps({"kind": PARTIAL_LIST, "apiVersion": target_.api_version,
                   "metadata": _list_meta(resource_version, continue_token, remaining)})
    items = ",".join(f'{{"kind":"{PARTIAL}","apiVersion":"{target_.api_version}","metadata":{m}}}'
                     for m in metadata)
    return f'{head[:-1]},"items":[{items}]}}'.encode()


def partial(obj: Obj, target_: Target) -> dict[str, Any]:
    return {"kind": PARTIAL, "apiVersion": target_.api_version, "metadata": objects.meta(obj)}
