"""The API's operations, Kubernetes-style: list, get, create, replace, patch, delete, and the VM subresources.

Below only `apiserver` (which maps paths to these calls) and above the controller, accounting and store.
Each write runs in one store transaction: the validation, the admission and every side effect (a default
quota made for a namespace joining a project, the charges of a new VM) commit together or not at all. The
rules for each kind are in one `_Rules` class each.

Every write takes `dry_run` (Kubernetes' `dryRun=All`): it runs all of that in a transaction the store undoes
(`Store.transaction(dry_run=True)`), and answers the object as it would be, without a resourceVersion of its
own. Writes that name a field `manager` record who set what in `metadata.managedFields` (`fieldmanager.py`);
`apply` is server-side apply.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmquota import (
    accounting,
    errors,
    fieldmanager,
    history,
    imports,
    objects,
    quantity,
    rbac,
    tokens,
    uploads,
    usage,
    vmspec,
)
from vmquota import resources as r
from vmquota.controller import (
    CLONE_DISKS_ANNOTATION,
    CLONE_SOURCE_ANNOTATION,
    Controller,
    data_volume_owner,
    nodes,
    runtime_phase,
)
from vmquota.controller.volumes import set_volume_status
from vmquota.objects import (
    CLUSTER_ROLE,
    CLUSTER_ROLE_BINDING,
    EVENT,
    NAMESPACE,
    NODE,
    PROJECT,
    RESOURCE_QUOTA,
    ROLE,
    ROLE_BINDING,
    SERVICE_ACCOUNT,
    VIRTUAL_MACHINE,
    VIRTUAL_MACHINE_CLONE,
    VIRTUAL_MACHINE_INSTANCE_MIGRATION,
    Kind,
    Obj,
)
from vmquota.store import Part, Reader, Store, Transaction, Where

MAX_LABELS = 64
BRIDGES_ANNOTATION = "vmquota.io/bridges"  # on a Namespace: the host bridges its VMs may join, comma-separated
MAX_LABEL_LENGTH = 253


def invalid(kind: Kind, name: object, field: str, message: str) -> errors.Invalid:
    return errors.Invalid(f"{kind.qualified_kind} {objects.quote(name)} is invalid: {field}: {message}")


def existing(reader: Reader, kind: Kind, namespace: str, name: str) -> Obj:
    """The stored object, or Kubernetes' NotFound."""
    obj = reader.get(kind, namespace, name)
    if obj is None:
        raise errors.NotFound(f'{kind.resource} "{name}" not found')
    return obj


class Api:
    def __init__(self, store: Store, controller: Controller) -> None:
        self.store = store
        self.controller = controller
        self.rules: dict[str, _Rules] = {
            PROJECT.kind: _ProjectRules(self),
            NAMESPACE.kind: _NamespaceRules(self),
            RESOURCE_QUOTA.kind: _QuotaRules(self),
            VIRTUAL_MACHINE.kind: _VMRules(self),
            VIRTUAL_MACHINE_CLONE.kind: _CloneRules(self),
            EVENT.kind: _EventRules(self),
            SERVICE_ACCOUNT.kind: _ServiceAccountRules(self),
            NODE.kind: _NodeRules(self),
            VIRTUAL_MACHINE_INSTANCE_MIGRATION.kind: _MigrationRules(self),
            ROLE.kind: _RoleRules(self, ROLE),
            CLUSTER_ROLE.kind: _RoleRules(self, CLUSTER_ROLE),
            ROLE_BINDING.kind: _BindingRules(self, ROLE_BINDING),
            CLUSTER_ROLE_BINDING.kind: _BindingRules(self, CLUSTER_ROLE_BINDING),
        }
        self.tokens: tokens.Signer | None = None  # set by the wiring when ServiceAccount tokens are served

    # -- reads ----------------------------------------------------------------------------------

    def list_json(self, kind: Kind, namespace: str | None, *, where: Sequence[Where] = (),
                  keep: Callable[[Obj], bool] | None = None) -> bytes:
        """The List of a kind as JSON, made of its items' stored JSON as it is: those that meet every `where`
        (SQLite checks them) and, when given, `keep` (which parses them; only selectors SQL cannot say need it).

        Parsing every item only to encode it again took 8.5 s and 1.1 GB for 100,000 VMs; this takes 0.4 s.
        `only` keeps the namespaces (of a namespaced kind) or the names (of a cluster-scoped one) a user may see.
        """
        reader = self.store.reader()
        with reader.snapshot():
            revision = reader.revision()
            bodies = reader.bodies(kind, namespace, where)
            items = ",".join(bodies if keep is None else (body for body in bodies if keep(json.loads(body))))
        head = json.dumps({"kind": f"{kind.kind}List", "apiVersion": kind.api_version,
                           "metadata": {"resourceVersion": str(revision)}})
        return f'{head[:-1]}, "items": [{items}]}}'.encode()

    def list_objects(self, kind: Kind, namespace: str | None, *, where: Sequence[Where] = (),
                     keep: Callable[[Obj], bool] | None = None) -> tuple[str, list[Obj]]:
        """(resourceVersion, the objects) of a list, parsed, as one snapshot."""
        reader = self.store.reader()
        with reader.snapshot():
            found = [json.loads(body) for body in reader.bodies(kind, namespace, where)]
            return str(reader.revision()), [obj for obj in found if keep is None or keep(obj)]

    def list_parts(self, kind: Kind, namespace: str | None, parts: Sequence[Part], *,
                   where: Sequence[Where] = ()) -> tuple[str, list[tuple[Any, ...]]]:
        """(resourceVersion, `parts` of each object) of a list, as one snapshot: what a Table needs of 10,000 VMs,
        read from the store's side table of kept parts or cut out of the bodies by SQLite (`Reader.extract`),
        never parsed in Python."""
        reader = self.store.reader()
        with reader.snapshot():
            return str(reader.revision()), list(reader.extract(kind, namespace, parts, where))

    def parts_of(self, texts: Sequence[str], parts: Sequence[Part]) -> list[tuple[Any, ...]]:
        """`parts` of objects given as JSON text (a page of a list), cut out as `list_parts` does."""
        return list(self.store.reader().cut(texts, parts))

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        return existing(self.store.reader(), kind, namespace, name)

    # -- writes ---------------------------------------------------------------------------------

    def create(self, kind: Kind, namespace: str, body: Any, *, dry_run: bool = False, manager: str = "",
               warnings: list[str] | None = None) -> Obj:
        obj = self._body(kind, namespace, body)
        metadata = obj["metadata"]
        if metadata.get("resourceVersion"):
            raise errors.BadRequest("resourceVersion should not be set on objects to be created")
        for server_field in ("uid", "creationTimestamp", "deletionTimestamp"):
            metadata.pop(server_field, None)
        obj.pop("status", None)
        rules = self.rules[kind.kind]
        rules.prepare(obj)
        with accounting.recording_refusals(self.store, dry_run=dry_run), self.store.transaction(dry_run=dry_run) as txn:
            rules.check_namespace(txn, namespace)
            rules.validate(txn, obj, None)
            if txn.exists(kind, namespace if kind.namespaced else "", metadata["name"]):
                raise errors.AlreadyExists(f'{kind.resource} "{metadata["name"]}" already exists')
            rules.before_create(txn, obj)
            if manager and metadata.get("managedFields") is None:
                metadata["managedFields"] = fieldmanager.record_update(
                    None, obj, manager=manager, api_version=kind.api_version, now=objects.now())
            created = txn.create(kind, obj)
            rules.after_write(txn, created, None)
        _warn_finalizers(warnings, None, created)
        if dry_run:  # Kubernetes' dry-run create has no resourceVersion: none was taken
            created["metadata"].pop("resourceVersion", None)
        return created

    def replace(self, kind: Kind, namespace: str, name: str, body: Any, *, dry_run: bool = False,
                manager: str = "", warnings: list[str] | None = None) -> Obj:
        obj = self._body(kind, namespace, body)
        if obj["metadata"]["name"] != name:
            raise errors.BadRequest(f'the name of the object ({obj["metadata"]["name"]}) does not match '
                                    f"the name on the URL ({name})")
        return self._update(kind, namespace, name, lambda current: obj, dry_run=dry_run, manager=manager,
                            warnings=warnings).obj

    def patch(self, kind: Kind, namespace: str, name: str, patch: Any, *, dry_run: bool = False,
              manager: str = "", warnings: list[str] | None = None) -> Obj:
        """A JSON merge patch (RFC 7386)."""
        if not isinstance(patch, dict):
            raise errors.BadRequest("a JSON merge patch must be an object")
        return self.update_with(kind, namespace, name, lambda current: objects.merge_patch(current, patch),
                                dry_run=dry_run, manager=manager, warnings=warnings)

    def update_with(self, kind: Kind, namespace: str, name: str, change: Callable[[Obj], Any], *,
                    dry_run: bool = False, manager: str = "", warnings: list[str] | None = None) -> Obj:
        """Any patch: `change` makes the new object from (a copy of) the stored one."""
        return self._update(kind, namespace, name, lambda current: self._body(
            kind, namespace, change(current), keep_name=name), dry_run=dry_run, manager=manager,
            warnings=warnings).obj

    def apply(self, kind: Kind, namespace: str, name: str, config: Any, *, manager: str, force: bool = False,
              dry_run: bool = False, warnings: list[str] | None = None) -> Written:
        """Server-side apply: create or update to what `config` says, as `manager` owns it (`fieldmanager.apply`)."""
        if not manager:
            raise errors.Invalid('PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                                 "is required for apply patch")
        fieldmanager.check_manager(manager)
        applied = self._body(kind, namespace, config, keep_name=name)
        ns = namespace if kind.namespaced else ""
        # A refusal of the create or update nested below rolls this transaction back too: recorded after it.
        with accounting.recording_refusals(self.store, dry_run=dry_run), self.store.transaction(dry_run=dry_run) as txn:
            if not txn.exists(kind, ns, name):
                new = fieldmanager.apply(None, applied, manager=manager, api_version=kind.api_version, force=force,
                                         now=objects.now())
                created = self.create(kind, namespace, new.obj, warnings=warnings)
                written = Written(created, created=True)
            else:
                written = self._update(kind, namespace, name, lambda current: self._body(
                    kind, namespace, _applied(current, applied, manager, kind, force), keep_name=name),
                    warnings=warnings)
        if dry_run and written.created:
            written.obj["metadata"].pop("resourceVersion", None)
        elif dry_run and written.before is not None:
            written.obj["metadata"]["resourceVersion"] = written.before["metadata"]["resourceVersion"]
        return written

    def _update(self, kind: Kind, namespace: str, name: str, make: Any, *, dry_run: bool = False,
                manager: str = "", warnings: list[str] | None = None) -> Written:
        rules = self.rules[kind.kind]
        ns = namespace if kind.namespaced else ""
        with accounting.recording_refusals(self.store, dry_run=dry_run), self.store.transaction(dry_run=dry_run) as txn:
            current = existing(txn, kind, ns, name)
            new = make(copy.deepcopy(current))
            metadata, old_meta = new["metadata"], current["metadata"]
            wanted_rv = metadata.get("resourceVersion")
            if wanted_rv and str(wanted_rv) != old_meta["resourceVersion"]:
                raise errors.Conflict(f'Operation cannot be fulfilled on {kind.resource} "{name}": the object has '
                                      f"been modified; please apply your changes to the latest version and try again")
            if metadata.get("uid") not in (None, old_meta["uid"]):
                raise errors.Conflict(f'Operation cannot be fulfilled on {kind.resource} "{name}": '
                                      f"the uid in the body does not match ({metadata.get('uid')})")
            for kept in ("uid", "creationTimestamp", "deletionTimestamp"):
                if kept in old_meta:
                    metadata[kept] = old_meta[kept]
                else:
                    metadata.pop(kept, None)
            new["status"] = copy.deepcopy(current.get("status", {}))  # status belongs to the server
            if not new["status"]:
                new.pop("status")
            rules.validate(txn, new, current)
            rules.before_update(txn, current, new)
            _record_update(kind, current, new, manager)
            if _comparable(new) == _comparable(current):
                written = Written(current, before=current)  # nothing changed: no new resourceVersion, like Kubernetes
            else:
                updated = txn.update(kind, new)
                rules.after_write(txn, updated, current)
                written = Written(updated, before=current)
        _warn_finalizers(warnings, current, written.obj)
        if dry_run:  # the object as it would be, at the resourceVersion it has: a dry run takes none
            written.obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        return written

    def delete(self, kind: Kind, namespace: str, name: str, *, dry_run: bool = False) -> Obj:
        rules = self.rules[kind.kind]
        ns = namespace if kind.namespaced else ""
        with self.store.transaction(dry_run=dry_run) as txn:
            current = existing(txn, kind, ns, name)
            rv = current["metadata"]["resourceVersion"]
            deleted = rules.delete(txn, current)
        if dry_run:
            deleted["metadata"]["resourceVersion"] = rv
        return deleted

    def _body(self, kind: Kind, namespace: str, body: Any, *, keep_name: str | None = None) -> Obj:
        if not isinstance(body, dict):
            raise errors.BadRequest(f"the body must be a {kind.kind} object")
        obj = copy.deepcopy(body)
        if obj.get("kind", kind.kind) != kind.kind or obj.get("apiVersion", kind.api_version) != kind.api_version:
            raise errors.BadRequest(f"the body is {obj.get('apiVersion')}/{obj.get('kind')}, "
                                    f"this path takes {kind.api_version}/{kind.kind}")
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        metadata = obj.get("metadata")
        if metadata is None:
            metadata = obj["metadata"] = {}
        if not isinstance(metadata, dict):
            raise errors.BadRequest("metadata must be an object")
        name = metadata.get("name")
        objects.check_name(kind, name)
        if keep_name is not None and name != keep_name:
            raise errors.BadRequest("metadata.name cannot be changed")
        if kind.namespaced:
            if metadata.get("namespace", namespace) != namespace:
                raise errors.BadRequest("the namespace of the provided object does not match the namespace "
                                        "sent on the request")
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        for field in ("labels", "annotations"):
            _check_string_map(kind, name, f"metadata.{field}", metadata.get(field))
        return obj

    # -- VM subresources -------------------------------------------------------------------------

    def _vm_action(self, namespace: str, name: str, action: Any, *, dry_run: bool) -> Obj:
        """A lifecycle request; a dry run admits it (or refuses it, with the real refusal) and keeps nothing."""
        with accounting.recording_refusals(self.store, dry_run=dry_run), self.store.transaction(dry_run=dry_run) as txn:
            vm = existing(txn, VIRTUAL_MACHINE, namespace, name)
            rv = vm["metadata"]["resourceVersion"]
            action(txn, vm)
            updated = txn.update(VIRTUAL_MACHINE, vm)
        if dry_run:
            updated["metadata"]["resourceVersion"] = rv
        return updated

    def start(self, namespace: str, name: str, *, dry_run: bool = False) -> Obj:
        return self._vm_action(namespace, name, self.controller.request_start, dry_run=dry_run)

    def stop(self, namespace: str, name: str, body: Any = None, *, dry_run: bool = False) -> Obj:
        grace = None
        if isinstance(body, dict) and body.get("gracePeriod") is not None:
            grace = body["gracePeriod"]
            if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= vmspec.MAX_GRACE_SECONDS:
                raise errors.BadRequest(f"gracePeriod must be a whole number of seconds from 0 to "
                                        f"{vmspec.MAX_GRACE_SECONDS}")
        return self._vm_action(namespace, name, lambda txn, vm: self.controller.request_stop(txn, vm, grace),
                               dry_run=dry_run)

    def restart(self, namespace: str, name: str, *, dry_run: bool = False) -> Obj:
        return self._vm_action(namespace, name, self.controller.request_restart, dry_run=dry_run)

    def migrate(self, namespace: str, name: str, body: Any = None, *, dry_run: bool = False) -> Obj:
        """virtctl migrate: a VirtualMachineInstanceMigration of the VM, named as virtctl's generateName does."""
        options = body if isinstance(body, dict) else {}
        if body is not None and not isinstance(body, dict):
            raise errors.BadRequest("the body must be a MigrateOptions object")
        spec: dict[str, Any] = {"vmiName": name}
        if options.get("addedNodeSelector") is not None:
            spec["addedNodeSelector"] = options["addedNodeSelector"]
        return self.create(VIRTUAL_MACHINE_INSTANCE_MIGRATION, namespace, {
            "apiVersion": VIRTUAL_MACHINE_INSTANCE_MIGRATION.api_version,
            "kind": VIRTUAL_MACHINE_INSTANCE_MIGRATION.kind,
            "metadata": {"name": f"kubevirt-migrate-vm-{objects.new_uid()[:5]}"}, "spec": spec}, dry_run=dry_run)

    # -- ServiceAccount tokens ----------------------------------------------------------------------

    def create_token(self, namespace: str, name: str, body: Any) -> Obj:
        """A TokenRequest: a bound token for the ServiceAccount, valid until it expires or the account goes."""
        if self.tokens is None:
            raise errors.MethodNotAllowed("this server issues no ServiceAccount tokens")
        request = body if isinstance(body, dict) else {}
        if body is not None and not isinstance(body, dict):
            raise errors.BadRequest("the body must be a TokenRequest object")
        spec = request.get("spec") or {}
        if not isinstance(spec, dict):
            raise errors.BadRequest("spec must be an object")
        seconds = spec.get("expirationSeconds")
        seconds = tokens.DEFAULT_EXPIRATION_SECONDS if seconds is None else seconds
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < tokens.MIN_EXPIRATION_SECONDS:
            raise errors.Invalid(f'TokenRequest.authentication.k8s.io "{name}" is invalid: spec.expirationSeconds: '
                                 f"Invalid value: {seconds}: may not specify a duration less than 10 minutes")
        seconds = min(seconds, tokens.MAX_EXPIRATION_SECONDS)
        audiences = spec.get("audiences") or list(tokens.API_AUDIENCES[:1])
        if not isinstance(audiences, list) or not all(isinstance(a, str) and a for a in audiences):
            raise errors.BadRequest("spec.audiences must be a list of strings")
        account = self.get(SERVICE_ACCOUNT, namespace, name)
        token, expires = self.tokens.issue(namespace=namespace, name=name, uid=account["metadata"]["uid"],
                                           audiences=tuple(audiences), expiration_seconds=seconds)
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
                "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": None},
                "status": {"token": token, "expirationTimestamp": _timestamp(expires)}}
    def guest_action(self, namespace: str, name: str, action: str) -> Obj:
        """KubeVirt's VMI subresources pause, unpause and softreboot."""
        request = {"pause": "Pause", "unpause": "Unpause", "softreboot": "SoftReboot"}[action]
        return self._vm_action(namespace, name, lambda txn, vm: self.controller.request_guest(txn, vm, request),
                               dry_run=False)

    # -- uploads: CDI's upload source, written by `vmquota image-upload` -------------------------------------

    def upload(self, namespace: str, data_volume: str, body: uploads.Readable, length: int, *,
               dry_run: bool = False) -> Obj:
        """Stream `length` bytes of `body` into the disk of the upload data volume `data_volume`.

        Everything that can be refused without the body is refused before a byte is read: no such data volume,
        not an upload source, already uploaded, a body larger than the disk's request. The storage was admitted
        against `requests.storage` when the VM was created. A dry run stops there.
        """
        vm, disk = self._upload_target(namespace, data_volume)
        _refusing(uploads.check_length, length, disk.size)
        target = self.controller.disks.path(namespace, vm["metadata"]["uid"], disk.name)
        if target.exists():
            raise _already_uploaded(data_volume)
        if dry_run:
            return _upload_status(data_volume, f"the upload into {data_volume} would be taken (dry run)")
        key, uid = (namespace, vm["metadata"]["name"]), vm["metadata"]["uid"]
        try:
            with uploads.exclusive(target):
                vm, disk = self._upload_target(namespace, data_volume)  # again under the lock: still this VM's?
                if vm["metadata"]["uid"] != uid:
                    raise errors.Conflict(f'the VM of data volume "{data_volume}" was replaced; upload again')
                if target.exists():
                    raise _already_uploaded(data_volume)
                sniffed = self._receive(key, uid, disk, body, length, target)
        except uploads.UploadRefused as e:
            raise _api_error(e) from e
        if not self._same_vm(key, uid):  # deleted meanwhile: its folder is the controller's to remove
            target.unlink(missing_ok=True)
            raise errors.Conflict(f'the VM of data volume "{data_volume}" went away during the upload')
        self.controller.ctx.update(key, lambda txn, vm: self._upload_succeeded(txn, vm, disk, sniffed),
                                   expect_uid=uid)
        self.controller.queue.add(key)  # the controller says DataVolumesReady, and a waiting start goes on
        return _upload_status(data_volume, f"uploaded {length} bytes ({sniffed.format.value}) into {data_volume}")

    def _receive(self, key: tuple[str, str], uid: str, disk: vmspec.Disk, body: uploads.Readable, length: int,
                 target: Path) -> imports.Sniffed:
        """The body into the disk; a refusal or a failed conversion is also said on the VM and in an event."""
        try:
            return uploads.receive(body, length, target=target, size=disk.size, disks=self.controller.disks)
        except (uploads.UploadRefused, errors.HypervisorError, OSError) as e:  # OSError: a full disk, say
            message = e.message if isinstance(e, uploads.UploadRefused) else str(e)
            self.controller.ctx.update(key, lambda txn, vm: self._upload_failed(txn, vm, disk, message),
                                       expect_uid=uid)
            if isinstance(e, uploads.UploadRefused):
                raise
            raise errors.Invalid(f'the upload into data volume "{disk.name}" is refused: {message}') from e

    def _same_vm(self, key: tuple[str, str], uid: str) -> bool:
        vm = self.store.reader().get(VIRTUAL_MACHINE, *key)
        return vm is not None and vm["metadata"].get("uid") == uid and not vm["metadata"].get("deletionTimestamp")

    def _upload_target(self, namespace: str, data_volume: str) -> tuple[Obj, vmspec.Disk]:
        """The VM whose dataVolumeTemplates make `data_volume`, and that disk; refused unless it is an upload."""
        if objects.name_problem(data_volume):
            raise errors.NotFound(f'datavolumes.cdi.kubevirt.io "{data_volume[:80]}" not found')
        owners = [vm for vm in self.list_objects(VIRTUAL_MACHINE, namespace)[1]
                  if data_volume_owner([vm], data_volume) is not None]  # which skips VMs being deleted
        if not owners:
            raise errors.NotFound(f'datavolumes.cdi.kubevirt.io "{data_volume}" not found: no VM of namespace '
                                  f"{namespace} has this dataVolumeTemplate")
        if len(owners) > 1:
            raise errors.Conflict(f'data volume "{data_volume}" is made by several VMs of namespace {namespace}: '
                                  + ", ".join(sorted(vm["metadata"]["name"] for vm in owners)))
        [vm] = owners
        [disk] = [d for d in vmspec.read(vm).disks if d.name == data_volume]
        if disk.source.kind is not vmspec.SourceKind.UPLOAD:
            raise errors.BadRequest(f'data volume "{data_volume}" has a {disk.source.kind.value} source; only a '
                                    "data volume with source upload: {} takes an upload")
        return vm, disk

    def _upload_failed(self, txn: Transaction, vm: Obj, disk: vmspec.Disk, message: str) -> None:
        set_volume_status(vm, disk.name, imports.Progress(imports.Phase.UPLOAD_READY,
                                                          message=f"the last upload was refused: {message}"))
        self.controller.record(txn, vm, "Warning", "UploadFailed", f"disk {disk.name}: {message}")

    def _upload_succeeded(self, txn: Transaction, vm: Obj, disk: vmspec.Disk, sniffed: imports.Sniffed) -> None:
        set_volume_status(vm, disk.name, imports.Progress(imports.Phase.SUCCEEDED, "100.0%"))
        self.controller.record(txn, vm, "Normal", "UploadSucceeded",
                               f"disk {disk.name}: a {sniffed.format.value} image was uploaded")

    # -- charges: who uses how much, and why ----------------------------------------------------

    def charges(self, namespace: str | None) -> Obj:
        reader = self.store.reader()
        items = [{"namespace": ns, "name": name, "charge": r.render(charge)}
                 for ns, name, charge in sorted(reader.charges(namespace))]
        return {"kind": "ChargeList", "apiVersion": "vmquota.io/v1", "items": items}

    def charge(self, namespace: str, name: str) -> Obj:
        """One VM's charge now, what it would charge running, and the memory overhead behind it."""
        reader = self.store.reader()
        vm = self.get(VIRTUAL_MACHINE, namespace, name)
        spec = vmspec.read(vm)
        model = self.controller.overhead
        phase = runtime_phase(vm)
        return {
            "kind": "Charge", "apiVersion": "vmquota.io/v1",
            "metadata": {"namespace": namespace, "name": name},
            "holdsRuntime": usage.holds_runtime(phase),
            "phase": phase.value,
            "charge": r.render(reader.charge(namespace, name) or {}),
            "whileRunning": r.render(usage.compute(spec, model)),
            "always": r.render(usage.persistent(spec)),
            "overheadModel": model.value,
            "overhead": [{"part": part, "memory": quantity.format(value)}
                         for part, value in usage.overhead_breakdown(spec, model)],
            "quotas": [q.display for q in accounting.covering(reader, namespace)],
        }

    def usage_history(self, kind: Kind, namespace: str, name: str, since: str | None) -> Obj:
        """A quota's or project's used over time, its peak, its time at the limit and its refusals per day."""
        now = accounting.clock()
        try:
            start = history.parse_since(since, now=now)
        except ValueError as e:
            raise errors.BadRequest(f"since: {e}") from e
        reader = self.store.reader()
        with reader.snapshot():
            quota = self.get(kind, namespace, name)
            display = f"project/{name}" if kind is PROJECT else name
            found = history.usage(reader, kind.kind, namespace, name, display, since=start, now=now)
        metadata = {"name": name, **({"namespace": namespace} if kind.namespaced else {})}
        status = quota.get("status") or {}
        return {"kind": "UsageHistory", "apiVersion": "vmquota.io/v1", "metadata": metadata,
                "hard": status.get("hard", {}), "used": status.get("used", {}),
                "enforcement": status.get("enforcement", accounting.ENFORCE), **found}

    def project_usage(self, name: str) -> Obj:
        """A project's used, per namespace and per VM (like OpenShift's ClusterResourceQuota status)."""
        reader = self.store.reader()
        project = self.get(PROJECT, "", name)
        hard = accounting.hard_of(PROJECT, project)
        namespaces = []
        for ns in accounting.members(reader, name):
            vms = [{"name": vm_name, "charge": r.render(r.mask(charge, hard) if hard else charge)}
                   for _, vm_name, charge in sorted(reader.charges(ns))]
            used = accounting.namespace_usage(reader, ns)
            namespaces.append({"namespace": ns, "used": r.render(r.mask(used, hard) if hard else used),
                               "virtualMachines": vms})
        return {"kind": "ProjectUsage", "apiVersion": "vmquota.io/v1", "metadata": {"name": name},
                "hard": r.render(hard), "used": (project.get("status") or {}).get("used", {}),
                "namespaces": namespaces}


def _refusing(call: Callable[..., Any], *args: Any) -> Any:
    """`call(*args)` with an upload's refusal as the API error of its HTTP status."""
    try:
        return call(*args)
    except uploads.UploadRefused as e:
        raise _api_error(e) from e


_UPLOAD_ERRORS: dict[int, type[errors.ApiError]] = {400: errors.BadRequest, 409: errors.Conflict,
                                                    413: errors.RequestEntityTooLarge, 422: errors.Invalid}


def _api_error(refusal: uploads.UploadRefused) -> errors.ApiError:
    return _UPLOAD_ERRORS.get(refusal.code, errors.BadRequest)(refusal.message)


def _already_uploaded(data_volume: str) -> errors.Conflict:
    return errors.Conflict(f'data volume "{data_volume}" has been uploaded already; its disk exists')


def _upload_status(data_volume: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200,
            "message": message, "details": {"name": data_volume, "group": "cdi.kubevirt.io", "kind": "datavolumes"}}


def _timestamp(epoch: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Written:
    """What a write left: the object, whether it was created, and the object before (an update's)."""
    obj: Obj
    created: bool = False
    before: Obj | None = None


def _comparable(obj: Obj) -> Obj:
    clean = copy.deepcopy(obj)
    clean["metadata"].pop("resourceVersion", None)
    return clean


def _record_update(kind: Kind, current: Obj, new: Obj, manager: str) -> None:
    """managedFields after a write that is no apply.

    A body without managedFields keeps the stored ones, as in Kubernetes; a body whose managedFields differ
    from the stored ones sets them (kubectl rewrites them so, when it moves a client-side apply's fields to
    server-side apply). Otherwise `manager` (when there is one) takes what it changed.
    """
    metadata, stored = new["metadata"], current["metadata"].get("managedFields")
    given = metadata.get("managedFields")
    if given is not None and given != stored:
        for entry in fieldmanager.entries(new):
            fieldmanager.from_fields_v1(entry.get("fieldsV1") or {})  # a malformed one is refused here
        return
    metadata.pop("managedFields", None)
    if stored is not None:
        metadata["managedFields"] = stored
    if manager:
        managed = fieldmanager.record_update(current, new, manager=manager, api_version=kind.api_version,
                                             now=objects.now())
        if managed:
            metadata["managedFields"] = managed
        else:
            metadata.pop("managedFields", None)


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _applied(current: Obj, config: Obj, manager: str, kind: Kind, force: bool) -> Obj:
    """`config` applied over `current`; kubectl's own server-side apply also keeps the client-side apply's
    last-applied annotation up to date where there is one, as kube-apiserver does, so that a later
    client-side apply compares with what was applied last."""
    result = fieldmanager.apply(current, config, manager=manager, api_version=kind.api_version, force=force,
                                now=objects.now()).obj
    annotations = objects.meta(result).get("annotations")
    if manager == "kubectl" and isinstance(annotations, dict) and LAST_APPLIED in annotations:
        last = copy.deepcopy(config)
        last_annotations = last.get("metadata", {}).get("annotations") or {}
        last_annotations.pop(LAST_APPLIED, None)
        if not last_annotations:
            last.get("metadata", {}).pop("annotations", None)
        annotations[LAST_APPLIED] = json.dumps(last, separators=(",", ":")) + "\n"
    return result


STANDARD_FINALIZERS = frozenset({"kubernetes", "orphan", "foregroundDeletion"})


def _warn_finalizers(warnings: list[str] | None, old: Obj | None, new: Obj) -> None:
    """kube-apiserver's warning for each finalizer a write adds whose name has no path (`example.com/name`)."""
    if warnings is None:
        return
    before = set(objects.meta(old).get("finalizers") or []) if old else set()
    for name in objects.meta(new).get("finalizers") or []:
        if isinstance(name, str) and name not in before and name not in STANDARD_FINALIZERS and "/" not in name:
            warnings.append(f"metadata.finalizers: {json.dumps(name)}: prefer a domain-qualified finalizer name "
                            f"including a path (/) to avoid accidental conflicts with other finalizer writers")


def _check_string_map(kind: Kind, name: object, field: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > MAX_LABELS:
        raise invalid(kind, name, field, f"Invalid value: must be a map of at most {MAX_LABELS} strings")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > MAX_LABEL_LENGTH or not key or len(item) > 4096:
            raise invalid(kind, name, f"{field}[{key}]", "Invalid value: keys are 1-253 characters, values strings "
                                                         "of at most 4096")


def _parse_hard(kind: Kind, name: str, raw: Any, field: str) -> r.ResourceList:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid(kind, name, field, "Invalid value: must be a map of resource names to quantities")
    unknown = sorted(set(raw) - r.SUPPORTED)
    if unknown:
        raise invalid(kind, name, f"{field}[{unknown[0]}]",
                      f"Unsupported value: {objects.quote(unknown[0])}: supported values: "
                      + ", ".join(f'"{n}"' for n in sorted(r.SUPPORTED)))
    try:
        hard = r.parse(raw, field=field)
    except quantity.QuantityError as e:
        raise invalid(kind, name, field, f"Invalid value: {e}") from e
    for resource, value in hard.items():
        if value < 0:
            raise invalid(kind, name, f"{field}[{resource}]", "Invalid value: must be greater than or equal to 0")
    return hard


def _check_settings(kind: Kind, obj: Obj) -> None:
    """A quota's warning threshold and enforcement mode annotations, when set, must be ones vmquota knows."""
    problem = accounting.settings_problem(obj)
    if problem:
        annotation, why = problem
        raise invalid(kind, obj["metadata"]["name"], f"metadata.annotations[{annotation}]", f"Invalid value: {why}")


def _lowered(kind: Kind, obj: Obj, old: Obj | None, hard: r.ResourceList) -> r.ResourceList:
    """The limits this write sets that the below-used rule checks: none in audit mode (which admits past hard),
    else those new or changed. A limit left as it was is not "set below" usage, even if audit mode let usage pass
    it: the quota can still be annotated, or switched back to enforce, which then refuses the next rise."""
    if (objects.meta(obj).get("annotations") or {}).get(accounting.ENFORCEMENT_ANNOTATION) == accounting.AUDIT:
        return {}
    before = accounting.hard_of(kind, old) if old is not None else {}
    return {name: value for name, value in hard.items() if before.get(name) != value}


def _below_used(display: str, hard: r.ResourceList, used: r.ResourceList) -> str | None:
    _, exceeded = r.less_than_or_equal(r.mask(used, hard), hard)
    if not exceeded:
        return None
    return (f"hard limits of {display} cannot be set below current usage: "
            f"used: {r.describe(used, exceeded)}, limited: {r.describe(hard, exceeded)}")


class _Rules:
    """What one kind checks and does around a write; the defaults suit a plain object."""

    kind: Kind

    def __init__(self, api: Api) -> None:
        self.api = api

    def prepare(self, obj: Obj) -> None:
        """Checks of a new object that wait on the network: made before the store transaction, never inside."""

    def check_namespace(self, reader: Reader, namespace: str) -> None:
        if self.kind.namespaced and not reader.exists(NAMESPACE, "", namespace):
            raise errors.NotFound(f'namespaces "{namespace}" not found')

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        pass

    def before_create(self, txn: Transaction, obj: Obj) -> None:
        pass

    def before_update(self, txn: Transaction, old: Obj, new: Obj) -> None:
        pass

    def after_write(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        pass

    def delete(self, txn: Transaction, obj: Obj) -> Obj:
        meta = obj["metadata"]
        txn.delete(self.kind, meta.get("namespace", "") if self.kind.namespaced else "", meta["name"])
        return obj


class _ProjectRules(_Rules):
    kind = PROJECT

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        spec = obj.get("spec") or {}
        if not isinstance(spec, dict):
            raise invalid(PROJECT, name, "spec", "Invalid value: must be an object")
        for field in ("resourceQuota", "namespaceDefaultResourceQuota"):
            part = spec.get(field) or {}
            if not isinstance(part, dict):
                raise invalid(PROJECT, name, f"spec.{field}", "Invalid value: must be an object")
            _parse_hard(PROJECT, name, part.get("hard"), f"spec.{field}.hard")
        _check_settings(PROJECT, obj)
        hard = accounting.hard_of(PROJECT, obj)
        default = _parse_hard(PROJECT, name, (spec.get("namespaceDefaultResourceQuota") or {}).get("hard"),
                              "spec.namespaceDefaultResourceQuota.hard")
        _, above = r.less_than_or_equal(r.mask(default, hard), hard)
        if above:
            raise invalid(PROJECT, name, "spec.namespaceDefaultResourceQuota.hard",
                          f"Invalid value: {r.describe(default, above)} is above the project's limit "
                          f"{r.describe(hard, above)}")
        if old is not None:
            problem = _below_used(f"project/{name}", _lowered(PROJECT, obj, old, hard),
                                  accounting.project_usage(txn, name))
            if problem:
                raise errors.Forbidden(f'{PROJECT.resource} "{name}" is forbidden: {problem}')

    def after_write(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        accounting.refresh(txn, PROJECT, obj)

    def delete(self, txn: Transaction, obj: Obj) -> Obj:
        name = obj["metadata"]["name"]
        members = accounting.members(txn, name)
        if members:
            raise errors.Conflict(f'{PROJECT.resource} "{name}" still has namespaces: {", ".join(members)}; '
                                  f"move or delete them first")
        return super().delete(txn, obj)


class _NamespaceRules(_Rules):
    kind = NAMESPACE

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        project = objects.labels(obj).get(objects.PROJECT_LABEL)
        if project is not None and not txn.exists(PROJECT, "", project):
            raise invalid(NAMESPACE, name, f"metadata.labels[{objects.PROJECT_LABEL}]",
                          f"Not found: project {objects.quote(project)} does not exist")
        if obj.get("spec") is None:
            obj["spec"] = {}
        if not isinstance(obj["spec"], dict):
            raise invalid(NAMESPACE, name, "spec", "Invalid value: must be an object")
        obj["spec"].setdefault("finalizers", ["kubernetes"])
        obj.setdefault("status", {})["phase"] = "Active"

    def after_write(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        before = objects.labels(old).get(objects.PROJECT_LABEL) if old else None
        after = objects.labels(obj).get(objects.PROJECT_LABEL)
        if before == after:
            return
        self._join(txn, name, after)
        for project in (before, after):
            if project:
                project_obj = txn.get(PROJECT, "", project)
                if project_obj is not None:
                    accounting.refresh(txn, PROJECT, project_obj)

    def _join(self, txn: Transaction, namespace: str, project: str | None) -> None:
        """A namespace joins only if its usage fits the project's room, and its quotas fit its limits."""
        if project is None:
            return
        project_obj = txn.get(PROJECT, "", project)
        assert project_obj is not None  # validate checked it exists
        used = accounting.namespace_usage(txn, namespace)
        # The project's stored used does not count this namespace yet: its label was only just written.
        room = accounting.stored_quota(txn, PROJECT, "", project)
        assert room is not None  # every project has its status
        message = accounting.refusal(room, used)
        if message:
            raise errors.QuotaExceeded(f'namespaces "{namespace}" cannot join project "{project}": {message}',
                                       quota=room.display, namespace=namespace,
                                       resources=tuple(accounting.exceeded_by(room, used)), quota_ref=room.ref)
        for quota in txn.list(RESOURCE_QUOTA, namespace):
            _check_under_project(txn, quota, namespace)
        default = (project_obj.get("spec") or {}).get("namespaceDefaultResourceQuota") or {}
        if default.get("hard") and not txn.exists(RESOURCE_QUOTA, namespace, objects.DEFAULT_QUOTA_NAME):
            default_hard = r.parse(default["hard"], field="hard")
            problem = _below_used(f"quota {objects.DEFAULT_QUOTA_NAME}", default_hard, used)
            if problem:
                raise errors.Forbidden(f'namespaces "{namespace}" cannot join project "{project}": the project\'s '
                                       f"default quota does not fit: {problem}")
            quota = txn.create(RESOURCE_QUOTA, {
                "metadata": {"name": objects.DEFAULT_QUOTA_NAME, "namespace": namespace,
                             "labels": {objects.PROJECT_LABEL: project}},
                "spec": {"hard": copy.deepcopy(default["hard"])},
            })
            accounting.refresh(txn, RESOURCE_QUOTA, quota)

    def delete(self, txn: Transaction, obj: Obj) -> Obj:
        name = obj["metadata"]["name"]
        vms = [n for _, n in txn.names(VIRTUAL_MACHINE, name)]
        if vms:
            raise errors.Conflict(f'namespaces "{name}" still has virtual machines: {", ".join(vms)}; '
                                  f"delete them first")
        for kind in (RESOURCE_QUOTA, VIRTUAL_MACHINE_CLONE, EVENT, SERVICE_ACCOUNT, ROLE, ROLE_BINDING):
            for _, item in txn.names(kind, name):
                txn.delete(kind, name, item)
        txn.delete(NAMESPACE, "", name)
        project = objects.labels(obj).get(objects.PROJECT_LABEL)
        project_obj = txn.get(PROJECT, "", project) if project else None
        if project_obj is not None:
            accounting.refresh(txn, PROJECT, project_obj)
        return obj


def _check_under_project(reader: Reader, quota: Obj, namespace: str) -> None:
    """A namespace quota may not allow more than its project for the same resource."""
    project = accounting.project_of(reader, namespace)
    project_obj = reader.get(PROJECT, "", project) if project else None
    if project_obj is None:
        return
    project_hard = accounting.hard_of(PROJECT, project_obj)
    hard = accounting.hard_of(RESOURCE_QUOTA, quota)
    _, above = r.less_than_or_equal(r.mask(hard, project_hard), project_hard)
    if above:
        name = quota["metadata"]["name"]
        raise invalid(RESOURCE_QUOTA, name, "spec.hard",
                      f"Invalid value: {r.describe(hard, above)} is above the limit of project/{project}: "
                      f"{r.describe(project_hard, above)}")


class _QuotaRules(_Rules):
    kind = RESOURCE_QUOTA

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        spec = obj.get("spec")
        if spec is not None and not isinstance(spec, dict):
            raise invalid(RESOURCE_QUOTA, name, "spec", "Invalid value: must be an object")
        hard = _parse_hard(RESOURCE_QUOTA, name, (spec or {}).get("hard"), "spec.hard")
        _check_settings(RESOURCE_QUOTA, obj)
        _check_under_project(txn, obj, namespace)
        problem = _below_used(f"quota {name}", _lowered(RESOURCE_QUOTA, obj, old, hard),
                              accounting.namespace_usage(txn, namespace))
        if problem:
            raise errors.Forbidden(f'{RESOURCE_QUOTA.resource} "{name}" is forbidden: {problem}')

    def after_write(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        accounting.refresh(txn, RESOURCE_QUOTA, obj)


class _VMRules(_Rules):
    kind = VIRTUAL_MACHINE

    def prepare(self, obj: Obj) -> None:
        """An image to import is probed now, so a 404, a file that is no disk image or an image larger than its
        disk is refused synchronously, before the VM is admitted and charged (compressed images are checked
        once unpacked: their import fails instead)."""
        try:
            spec = vmspec.read(obj)
        except vmspec.FieldError:
            return  # validate says why, in the transaction
        for i, disk in enumerate(spec.disks):
            if disk.source.kind is vmspec.SourceKind.HTTP:
                try:
                    imports.probe(disk.source.url, disk.size)
                except imports.ImportFailed as e:
                    raise invalid(VIRTUAL_MACHINE, obj["metadata"]["name"],
                                  f"spec.dataVolumeTemplates[{i}].spec.source.http.url",
                                  f"Invalid value: {objects.quote(disk.source.url)}: {e}") from e

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        try:
            spec = vmspec.read(obj)
        except vmspec.FieldError as e:
            raise invalid(VIRTUAL_MACHINE, name, e.path, e.message) from e
        if old is not None and old["metadata"].get("deletionTimestamp"):
            raise errors.Conflict(f'{VIRTUAL_MACHINE.resource} "{name}" is being deleted')
        clones = [(i, d) for i, d in enumerate(spec.disks) if d.source.kind is vmspec.SourceKind.PVC]
        if clones and old is None:
            self._check_pvc_sources(txn, obj, clones)
        self._check_bridges(txn, obj, spec, old)

    def _check_bridges(self, txn: Transaction, obj: Obj, spec: vmspec.VMSpec, old: Obj | None) -> None:
        """A host bridge is the host's network: a VM joins one only where the cluster admin allows it, in its
        namespace's annotation `vmquota.io/bridges` (as KubeVirt's NetworkAttachmentDefinitions, which only the
        admin makes). Bridges the VM had already stay allowed, so no unrelated update fails once it is revoked."""
        wanted = {i.bridge for i in spec.interfaces if i.bridge is not None}
        if old is not None:
            try:
                wanted -= {i.bridge for i in vmspec.read(old).interfaces}
            except vmspec.FieldError:
                pass
        if not wanted:
            return
        namespace = txn.get(NAMESPACE, "", obj["metadata"]["namespace"]) or {}
        listed = (objects.meta(namespace).get("annotations") or {}).get(BRIDGES_ANNOTATION, "")
        allowed = {b.strip() for b in listed.split(",") if b.strip()}
        for bridge in sorted(wanted - allowed):
            [i] = [n for n, network in enumerate(obj["spec"]["template"]["spec"].get("networks") or [])
                   if (network.get("multus") or {}).get("networkName") == bridge][:1]
            raise invalid(VIRTUAL_MACHINE, obj["metadata"]["name"],
                          f"spec.template.spec.networks[{i}].multus.networkName",
                          f"Forbidden: host bridge {objects.quote(bridge)} is not allowed in namespace "
                          f"{obj['metadata']['namespace']}: the cluster admin lists the bridges it may join in the "
                          f"namespace's annotation {BRIDGES_ANNOTATION}")

    def _check_pvc_sources(self, txn: Transaction, obj: Obj, clones: list[tuple[int, vmspec.Disk]]) -> None:
        """A pvc source names a disk of another VM of the namespace, no larger than the disk made from it."""
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        others = [vm for vm in txn.list(VIRTUAL_MACHINE, namespace) if vm["metadata"]["name"] != name]
        for i, disk in clones:
            field = f"spec.dataVolumeTemplates[{i}].spec.source.pvc.name"
            owner = data_volume_owner(others, disk.source.pvc)
            if owner is None:
                raise invalid(VIRTUAL_MACHINE, name, field, f"Not found: {objects.quote(disk.source.pvc)}: no VM of "
                                                            f"namespace {namespace} has this data volume")
            [source] = [d for d in vmspec.read(owner).disks if d.name == disk.source.pvc]
            if source.size > disk.size:
                raise invalid(VIRTUAL_MACHINE, name, field,
                              f"Invalid value: {objects.quote(disk.source.pvc)}: the source is "
                              f"{quantity.format(source.size)}, larger than the requested storage "
                              f"{quantity.format(disk.size)}")

    def before_create(self, txn: Transaction, obj: Obj) -> None:
        obj["metadata"]["uid"] = objects.new_uid()  # before the admission: a VMI made by it names its owner's uid
        self.api.controller.admit_new(txn, obj)

    def before_update(self, txn: Transaction, old: Obj, new: Obj) -> None:
        self.api.controller.admit_update(txn, old, new)

    def delete(self, txn: Transaction, obj: Obj) -> Obj:
        self.api.controller.request_delete(txn, obj)
        return txn.update(VIRTUAL_MACHINE, obj)  # gone once the controller has removed domain and disks


class _CloneRules(_Rules):
    kind = VIRTUAL_MACHINE_CLONE

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        if old is not None:
            raise errors.MethodNotAllowed("a VirtualMachineClone cannot be changed; create a new one")
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            raise invalid(VIRTUAL_MACHINE_CLONE, name, "spec", "Required value")
        for side in ("source", "target"):
            ref = spec.get(side)
            if not isinstance(ref, dict):
                raise invalid(VIRTUAL_MACHINE_CLONE, name, f"spec.{side}", "Required value")
            if ref.get("kind", "VirtualMachine") != "VirtualMachine":
                raise invalid(VIRTUAL_MACHINE_CLONE, name, f"spec.{side}.kind",
                              f"Unsupported value: {objects.quote(ref.get('kind'))}: "
                              'supported values: "VirtualMachine"')
            problem = objects.name_problem(ref.get("name"))
            if problem:
                raise invalid(VIRTUAL_MACHINE_CLONE, name, f"spec.{side}.name",
                              f"Invalid value: {objects.quote(ref.get('name'))}: {problem}")

    def before_create(self, txn: Transaction, obj: Obj) -> None:
        """Create the target VM (stopped), admitted for its count and storage, in the same transaction."""
        namespace = obj["metadata"]["namespace"]
        source_name, target_name = obj["spec"]["source"]["name"], obj["spec"]["target"]["name"]
        source = txn.get(VIRTUAL_MACHINE, namespace, source_name)
        if source is None or source["metadata"].get("deletionTimestamp"):
            raise invalid(VIRTUAL_MACHINE_CLONE, obj["metadata"]["name"], "spec.source.name",
                          f"Not found: {objects.quote(source_name)}")
        if txn.exists(VIRTUAL_MACHINE, namespace, target_name):
            raise errors.AlreadyExists(f'{VIRTUAL_MACHINE.resource} "{target_name}" already exists')
        target = clone_vm(source, target_name)
        target["metadata"].setdefault("annotations", {})[CLONE_SOURCE_ANNOTATION] = (
            f"{namespace}/{source_name}/{source['metadata']['uid']}")
        self.api.rules[VIRTUAL_MACHINE.kind].validate(txn, target, None)
        self.api.controller.admit_new(txn, target)
        txn.create(VIRTUAL_MACHINE, target)
        obj["status"] = {"phase": "Succeeded", "targetName": target_name,
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded",
                                         "message": "the target VM exists; its disks are copied before it "
                                                    "first starts"}]}


def clone_vm(source: Obj, target_name: str) -> Obj:
    """A stopped copy of `source` named `target_name`, with its own data volumes (renamed) to be copied."""
    spec = copy.deepcopy(source.get("spec", {}))
    source_name = source["metadata"]["name"]
    renames: dict[str, str] = {}
    for template in spec.get("dataVolumeTemplates") or []:
        old = template["metadata"]["name"]
        new = target_name + old[len(source_name):] if old.startswith(source_name) else f"{target_name}-{old}"
        if len(new) > 63:
            new = f"{target_name[:40]}-{objects.new_uid()[:8]}"
        renames[old] = new
        template["metadata"]["name"] = new
    for volume in ((spec.get("template") or {}).get("spec") or {}).get("volumes") or []:
        dv = volume.get("dataVolume") if isinstance(volume, dict) else None
        if isinstance(dv, dict) and dv.get("name") in renames:
            dv["name"] = renames[dv["name"]]
    if "running" in spec:
        spec["running"] = False
    else:
        spec["runStrategy"] = "Halted"
    metadata = source["metadata"]
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items() if not k.startswith("vmquota.io/")}
    annotations[CLONE_DISKS_ANNOTATION] = ",".join(f"{new}={old}" for old, new in renames.items())
    return {
        "apiVersion": VIRTUAL_MACHINE.api_version, "kind": VIRTUAL_MACHINE.kind,
        "metadata": {"name": target_name, "namespace": metadata["namespace"],
                     "labels": copy.deepcopy(metadata.get("labels") or {}), "annotations": annotations},
        "spec": spec,
    }


class _EventRules(_Rules):
    kind = EVENT

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        raise errors.MethodNotAllowed("events are written by vmquota only")

    def delete(self, txn: Transaction, obj: Obj) -> Obj:
        raise errors.MethodNotAllowed("events are written by vmquota only")


class _ServiceAccountRules(_Rules):
    kind = SERVICE_ACCOUNT


class _NodeRules(_Rules):
    """A libvirt host: its URI is checked and fixed once set; its status is the controller's (the heartbeat)."""
    kind = NODE

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            raise invalid(NODE, name, "spec.providerID", "Required value: the host's libvirt URI")
        uri = spec.get("providerID")
        problem = nodes.provider_problem(uri)
        if problem:
            raise invalid(NODE, name, "spec.providerID", problem)
        if old is not None and (old.get("spec") or {}).get("providerID") != uri:
            raise invalid(NODE, name, "spec.providerID", "Forbidden: the host of a node cannot change; make "
                                                         "another node")
        if "unschedulable" in spec and not isinstance(spec["unschedulable"], bool):
            raise invalid(NODE, name, "spec.unschedulable", "must be true or false")
        problem = nodes.settings_problem(obj) or nodes.taints_problem(spec.get("taints"))
        if problem:
            raise errors.Invalid(f'{NODE.qualified_kind} "{name}" is invalid: {problem}')
        for other in txn.list(NODE):
            if other["metadata"]["name"] != name and (other.get("spec") or {}).get("providerID") == uri:
                raise invalid(NODE, name, "spec.providerID", f"Duplicate value: node {other['metadata']['name']} "
                                                             f"is this host already")

    def before_create(self, txn: Transaction, obj: Obj) -> None:
        obj.pop("status", None)  # the heartbeat writes it
        # As kubelet labels its node: `migrate --to NODE` selects the target by this label.
        obj["metadata"].setdefault("labels", {}).setdefault("kubernetes.io/hostname", obj["metadata"]["name"])

    def before_update(self, txn: Transaction, old: Obj, new: Obj) -> None:
        new["status"] = old.get("status") or {}


class _MigrationRules(_Rules):
    """A live migration: admitted, with its target node reserved, in the transaction that creates it."""
    kind = VIRTUAL_MACHINE_INSTANCE_MIGRATION

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        spec = obj.get("spec")
        vmi = spec.get("vmiName") if isinstance(spec, dict) else None
        if not isinstance(vmi, str) or not vmi:
            raise invalid(self.kind, name, "spec.vmiName", "Required value: the VMI (the VM) to migrate")
        assert isinstance(spec, dict)
        _check_string_map(self.kind, name, "spec.addedNodeSelector", spec.get("addedNodeSelector"))
        if old is not None and old.get("spec") != spec:
            raise invalid(self.kind, name, "spec", "Forbidden: a migration's spec cannot change")

    def before_create(self, txn: Transaction, obj: Obj) -> None:
        self.api.controller.request_migration(txn, obj)

    def before_update(self, txn: Transaction, old: Obj, new: Obj) -> None:
        new["status"] = old.get("status") or {}


def _string_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


class _RoleRules(_Rules):
    """Roles and ClusterRoles: well-formed rules, and none that their writer does not hold (escalation)."""

    def __init__(self, api: Api, kind: Kind) -> None:
        super().__init__(api)
        self.kind = kind

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        rules = obj.setdefault("rules", [])
        if not isinstance(rules, list):
            raise invalid(self.kind, name, "rules", "Invalid value: must be a list")
        for index, rule in enumerate(rules):
            where = f"rules[{index}]"
            if not isinstance(rule, dict):
                raise invalid(self.kind, name, where, "Invalid value: must be an object")
            for field in ("verbs", "apiGroups", "resources", "resourceNames", "nonResourceURLs"):
                if field in rule and not _string_list(rule[field]):
                    raise invalid(self.kind, name, f"{where}.{field}", "Invalid value: must be a list of strings")
            if not rule.get("verbs"):
                raise invalid(self.kind, name, f"{where}.verbs",
                              "Required value: verbs must contain at least one value")
            if rule.get("nonResourceURLs"):
                if self.kind is ROLE:
                    raise invalid(self.kind, name, f"{where}.nonResourceURLs",
                                  "Invalid value: namespaced rules cannot apply to non-resource URLs")
                if rule.get("apiGroups") or rule.get("resources"):
                    raise invalid(self.kind, name, f"{where}.nonResourceURLs", "Invalid value: rules cannot "
                                  "apply to both regular resources and non-resource URLs")
            elif not rule.get("apiGroups") or not rule.get("resources"):
                field = "apiGroups" if not rule.get("apiGroups") else "resources"
                raise invalid(self.kind, name, f"{where}.{field}",
                              f"Required value: resource rules must supply at least one {field[:-1]}")
        check = rbac.escalation_check.get()
        if check is not None:
            check(self.kind.kind, obj)


class _BindingRules(_Rules):
    """RoleBindings and ClusterRoleBindings: a roleRef that never changes, subjects, and the bind check."""

    def __init__(self, api: Api, kind: Kind) -> None:
        super().__init__(api)
        self.kind = kind

    def validate(self, txn: Transaction, obj: Obj, old: Obj | None) -> None:
        name = obj["metadata"]["name"]
        ref = obj.get("roleRef")
        kinds = ("Role", "ClusterRole") if self.kind is ROLE_BINDING else ("ClusterRole",)
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref.get("name"):
            raise invalid(self.kind, name, "roleRef.name", "Required value")
        if ref.get("kind") not in kinds:
            raise invalid(self.kind, name, "roleRef.kind", f"Unsupported value: {objects.quote(ref.get('kind'))}: "
                          + "supported values: " + ", ".join(f'"{k}"' for k in kinds))
        if ref.get("apiGroup", rbac.GROUP) != rbac.GROUP:
            raise invalid(self.kind, name, "roleRef.apiGroup",
                          f'Unsupported value: {objects.quote(ref.get("apiGroup"))}: supported values: "{rbac.GROUP}"')
        ref["apiGroup"] = rbac.GROUP
        if old is not None and old.get("roleRef") != ref:
            raise invalid(self.kind, name, "roleRef", "Invalid value: cannot change roleRef")
        subjects = obj.get("subjects") or []
        if not isinstance(subjects, list):
            raise invalid(self.kind, name, "subjects", "Invalid value: must be a list")
        for index, subject in enumerate(subjects):
            where = f"subjects[{index}]"
            if not isinstance(subject, dict) or not isinstance(subject.get("name"), str) or not subject["name"]:
                raise invalid(self.kind, name, f"{where}.name", "Required value")
            if subject.get("kind") not in ("User", "Group", "ServiceAccount"):
                raise invalid(self.kind, name, f"{where}.kind",
                              f"Unsupported value: {objects.quote(subject.get('kind'))}: "
                              'supported values: "Group", "ServiceAccount", "User"')
            if subject["kind"] == "ServiceAccount" and self.kind is CLUSTER_ROLE_BINDING \
                    and not subject.get("namespace"):
                raise invalid(self.kind, name, f"{where}.namespace", "Required value")
        check = rbac.escalation_check.get()
        if check is not None:  # new subjects get the role too: the bind check holds for updates as well
            check(self.kind.kind, obj)
