"""Model-based property test: random sequences of VM, quota and project operations against the real server on
libvirt's simulated host, checked after every step against a model and against the hypervisor's truth.

Each rule is one thing a user (or the hypervisor) does, named plainly with plain arguments, so a shrunk
counter-example reads like a script: `state.create_vm(ns='a', name='v1', ...)`, `state.crash(ns='a', name='v1')`.
The model predicts each answer (admitted, refused with which code) from Kubernetes' admission rules applied to the
truth; after every step:

* each quota's and project's `status.used` equals the sum of the charges of what exists and what the simulated
  host really runs (computed here from the VM specs and the host's domains, not by vmquota's code);
* no used exceeds its hard limit (nothing in these rules starts a domain behind vmquota's back);
* a refused request changed nothing: every VM, quota, project, namespace, clone and event is as before;
* VMs, quotas, projects and memberships are what the model expects; no domain or disk file is leaked.

Time is frozen for the controller and its back-offs are an hour, so a sequence replays identically (hypothesis
needs that to shrink).
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import libvirt
import pytest
from conftest import HOST, open_app, unsettled, vm_manifest, vm_state_row, wait_until
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from reliability import profile
from reliability.invariants import (
    ALL_VMS,
    NAMESPACES,
    PROJECT_LABEL,
    PROJECTS,
    Resources,
    World,
    add,
    clones_path,
    compute_charge,
    fits,
    look,
    persistent_charge,
    project_usage,
    q,
    quota_hard,
    quotas_path,
    snapshot,
    violations,
    vms_path,
)

from vmquota import objects
from vmquota.client import Client, ClientError, action_path
from vmquota.controller import Controller

NS = ("a", "b")
VM_NAMES = ("v1", "v2", "v3")
PROJECT_NAMES = ("p", "q")
QUOTA_NAMES = ("q1", "q2")
STARTS_AT_CREATION = ("Always", "RerunOnFailure", "Once")
LIMITS = [  # (resource, hard) pairs a quota is made of; the first ones shrink best
    ("limits.cpu", "2"), ("limits.cpu", "4"), ("limits.cpu", "6"),
    ("limits.memory", "2Gi"), ("limits.memory", "4Gi"),
    ("requests.cpu", "300m"), ("requests.cpu", "1"),
    ("requests.storage", "4Gi"), ("requests.storage", "10Gi"),
    ("count/virtualmachines.kubevirt.io", "2"), ("count/virtualmachines.kubevirt.io", "4"),
    ("requests.instances/vmi", "1"), ("requests.instances/vmi", "3"),
    ("limits.memory", "0"),
]
FROZEN_CLOCK = 1_000_000.0

namespaces = st.sampled_from(NS)
vm_names = st.sampled_from(VM_NAMES)
projects = st.sampled_from(PROJECT_NAMES)
hards = st.lists(st.sampled_from(LIMITS), min_size=1, max_size=4, unique_by=lambda pair: pair[0]).map(dict)

_machines = itertools.count()
STATS: Counter[str] = Counter()  # what the runs did, for the report: "start: admitted", "start: 403"...


@dataclass(frozen=True)
class VM:
    """What the model knows of a VM: its sizes, strategy and the phase it must be in."""

    cores: int
    memory: str
    disk: str | None
    strategy: str
    cpu_limit: str | None
    grace: int
    phase: str = "Stopped"  # Running | Stopped | CrashLoopBackOff
    failures: int = 0  # consecutive failures (time is frozen: every crash comes soon after the last start)

    def manifest(self, name: str) -> dict[str, Any]:
        manifest = vm_manifest(name, cores=self.cores, memory=self.memory, disk=self.disk, strategy=self.strategy,
                               grace=self.grace)
        if self.cpu_limit:
            manifest["spec"]["template"]["spec"]["domain"]["resources"] = {"limits": {"cpu": self.cpu_limit}}
        return manifest

    def charge(self, *, running: bool) -> Resources:
        manifest = self.manifest("x")
        charge = persistent_charge(manifest)
        return add(charge, compute_charge(manifest)) if running else charge


class QuotaMachine(RuleBasedStateMachine):
    vms = Bundle("vms")

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"m{next(_machines)}-{int(time.time() * 1000) % 10**6}"
        self.tmp = Path(tempfile.mkdtemp(prefix="vmquota-model-"))
        self.data_dir = self.tmp / "data"
        self._open()
        for ns in NS:
            self.client.post(NAMESPACES, {"metadata": {"name": self.ns(ns)}})
        self.vms: dict[tuple[str, str], VM] = {}
        self.quotas: dict[tuple[str, str], dict[str, str]] = {}
        self.projects: dict[str, dict[str, str]] = {}
        self.member_of: dict[str, str | None] = dict.fromkeys(NS)
        self.clones = itertools.count()
        self._world: World | None = None  # the last look at server and host; None once something changed

    # -- plumbing -------------------------------------------------------------------------------------

    def _open(self) -> None:
        run = Controller.run

        def run_with_test_settings(controller: Controller) -> None:
            """Before the controller's first recount, which acts on VMs left by a previous server."""
            controller.clock = lambda: FROZEN_CLOCK  # crashes always come "soon": replays are identical
            controller.backoff_base_seconds = 3600.0  # a crash loop waits longer than any example runs
            controller.unschedulable_retry_seconds = 3600.0
            run(controller)

        with mock.patch.object(Controller, "run", run_with_test_settings):
            self.app = open_app(self.data_dir)
        self.client = Client(self.app.url)

    def ns(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def project(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            result = self.client.request(method, path, body, content_type="application/merge-patch+json"
                                         if method == "PATCH" else "application/json")
            return 200, result
        except ClientError as e:
            return e.code, e.status

    def settle(self) -> None:
        """Until the controller has nothing left to do and no VM of ours is between two phases."""
        self._world = None
        deadline = time.monotonic() + 15
        while True:
            busy = unsettled(self.app, lambda ns: ns.startswith(self.prefix + "-"))
            if not busy:
                return
            assert time.monotonic() < deadline, f"the controller never settled: {busy}"
            time.sleep(0.002)

    def state(self) -> str:
        return snapshot(self.client, [self.ns(n) for n in NS], [self.project(p) for p in PROJECT_NAMES])

    def expect(self, what: str, method: str, path: str, body: Any, codes: set[int]) -> bool:
        """Send the request; its answer must be one of `codes` (200: admitted); a refusal must change nothing.

        Returns whether it was admitted.
        """
        before = self.state() if 200 not in codes else None  # a refusal the model did not expect fails anyway
        code, result = self.call(method, path, body)
        self.settle()
        admitted = code < 300
        STATS[f"{what.split()[0]}: {'admitted' if admitted else code}"] += 1
        expected = "admitted" if codes == {200} else f"refused with {sorted(codes)}"
        assert code in codes, (
            f"{what}: expected {expected}, got {code}: {result if not admitted else 'admitted'}")
        if not admitted:
            assert result.get("kind") == "Status" and result.get("code") == code, result
            after = self.state()
            assert after == before, f"{what} was refused ({code}) but changed something"
        return admitted

    @property
    def world(self) -> World:
        if self._world is None:
            self._world = look(self.client, HOST, [self.ns(n) for n in NS], [self.project(p) for p in PROJECT_NAMES])
        return self._world

    def usage(self, ns: str) -> Resources:
        return self.world.usage[self.ns(ns)]

    def fits(self, ns: str, delta: Resources) -> bool:
        """Whether `delta` fits every quota of the namespace and its project, judged on the truth."""
        if not all(fits(self.usage(ns), delta, {k: q(v) for k, v in hard.items()})
                   for (qns, _), hard in self.quotas.items() if qns == ns):
            return False
        project = self.member_of[ns]
        if project is None:
            return True
        room = project_usage(self.world, self.project(project))
        return fits(room, delta, {k: q(v) for k, v in self.projects[project].items()})

    def vm_path(self, ns: str, name: str) -> str:
        return f"{vms_path(self.ns(ns))}/{name}"

    def host_domain(self, ns: str, name: str) -> Any:
        return HOST.lookupByName(f"vmquota_{self.ns(ns)}_{name}")

    def behind_the_back(self, vm: tuple[str, str], act: str) -> None:
        """Do `act` to the domain through the test's own libvirt connection, then wait for vmquota to see it."""
        before = self.client.get(self.vm_path(*vm))["metadata"]["resourceVersion"]
        getattr(self.host_domain(*vm), act)()
        deadline = time.monotonic() + 10
        while self.client.get(self.vm_path(*vm))["metadata"]["resourceVersion"] == before:
            assert time.monotonic() < deadline, f"vmquota never noticed the {act} of {vm}"
            time.sleep(0.002)
        self.settle()

    @initialize(quota=hards, project=hards)
    def begin_with_quotas(self, quota: dict[str, str], project: dict[str, str]) -> None:
        """Namespace a has a quota and namespace b is in project p, so admission bites from the first step."""
        self.create_quota("a", "q1", quota)
        self.create_project("p", project)
        self.move_namespace("b", "p")

    # -- VMs ------------------------------------------------------------------------------------------
    # A VM rule takes a `vms` bundle entry, (namespace, name), so it mostly acts on VMs that exist; entries of
    # deleted VMs stay in the bundle and test the 404 paths.

    @rule(target=vms, ns=namespaces, name=vm_names, cores=st.integers(1, 3),
          memory=st.sampled_from(["512Mi", "1Gi", "2Gi"]), disk=st.sampled_from([None, "1Gi", "3Gi"]),
          strategy=st.sampled_from(["Halted", "Manual", "Always", "RerunOnFailure", "Once"]),
          cpu_limit=st.sampled_from([None, "500m", "4"]), grace=st.sampled_from([0, 30]))
    def create_vm(self, ns: str, name: str, cores: int, memory: str, disk: str | None, strategy: str,
                  cpu_limit: str | None, grace: int) -> Any:
        vm = VM(cores, memory, disk, strategy, cpu_limit, grace)
        starts = strategy in STARTS_AT_CREATION
        if (ns, name) in self.vms:
            codes = {409}
        else:
            codes = {200} if self.fits(ns, vm.charge(running=starts)) else {403}
        if self.expect(f"create_vm {ns}/{name}", "POST", vms_path(self.ns(ns)), vm.manifest(name), codes):
            self.vms[(ns, name)] = replace(vm, phase="Running" if starts else "Stopped")
            return (ns, name)
        return multiple()

    @rule(vm=vms)
    def start(self, vm: tuple[str, str]) -> None:
        model = self.vms.get(vm)
        if model is None:
            codes = {404}
        elif model.phase == "Running":
            codes = {409}
        else:
            codes = {200} if self.fits(vm[0], compute_charge(model.manifest(vm[1]))) else {403}
        if self.expect(f"start {vm}", "PUT", action_path(self.ns(vm[0]), vm[1], "start"), None, codes):
            assert model is not None
            self.vms[vm] = replace(model, phase="Running", failures=0,
                                   strategy="Always" if model.strategy == "Halted" else model.strategy)

    @rule(vm=vms)
    def stop(self, vm: tuple[str, str]) -> None:
        model = self.vms.get(vm)
        codes = {404} if model is None else {200} if model.phase in ("Running", "CrashLoopBackOff") else {409}
        if self.expect(f"stop {vm}", "PUT", action_path(self.ns(vm[0]), vm[1], "stop"), None, codes):
            assert model is not None
            self.vms[vm] = replace(model, phase="Stopped", failures=0,
                                   strategy="Manual" if model.strategy == "Manual" else "Halted")

    @rule(vm=vms)
    def restart(self, vm: tuple[str, str]) -> None:
        model = self.vms.get(vm)
        codes = {404} if model is None else {200} if model.phase == "Running" else {409}
        old_id = self.host_domain(*vm).ID() if codes == {200} else None
        if self.expect(f"restart {vm}", "PUT", action_path(self.ns(vm[0]), vm[1], "restart"), None, codes):
            assert self.host_domain(*vm).ID() != old_id, "a restart must run a new domain"

    @precondition(lambda self: any(vm.phase == "Running" for vm in self.vms.values()))
    @rule(vm=vms)
    def crash(self, vm: tuple[str, str]) -> None:
        """The domain dies behind vmquota's back (virsh destroy, QEMU killed): restarted only by strategy."""
        model = self.vms.get(vm)
        if model is None or model.phase != "Running":
            return
        self.behind_the_back(vm, "destroy")
        STATS["crash: done"] += 1
        if model.strategy in ("Always", "RerunOnFailure"):
            # The first failure restarts at once; a second one soon after waits for its back-off.
            phase = "Running" if model.failures == 0 else "CrashLoopBackOff"
            self.vms[vm] = replace(model, phase=phase, failures=model.failures + 1)
        else:
            self.vms[vm] = replace(model, phase="Stopped")

    @precondition(lambda self: any(vm.phase == "Running" for vm in self.vms.values()))
    @rule(vm=vms)
    def guest_shutdown(self, vm: tuple[str, str]) -> None:
        """The guest powers itself off: a success, so only Always starts it again."""
        model = self.vms.get(vm)
        if model is None or model.phase != "Running":
            return
        self.behind_the_back(vm, "shutdown")
        STATS["guest shutdown: done"] += 1
        self.vms[vm] = replace(model, phase="Running" if model.strategy == "Always" else "Stopped")

    @rule(target=vms, source=vms, into=vm_names)
    def clone(self, source: tuple[str, str], into: str) -> Any:
        ns = source[0]
        model = self.vms.get(source)
        if model is None:
            codes = {422}
        elif (ns, into) in self.vms:
            codes = {409}
        else:
            codes = {200} if self.fits(ns, model.charge(running=False)) else {403}
        body = {"metadata": {"name": f"clone-{next(self.clones)}"},
                "spec": {"source": {"kind": "VirtualMachine", "name": source[1]},
                         "target": {"kind": "VirtualMachine", "name": into}}}
        if self.expect(f"clone {source} into {into}", "POST", clones_path(self.ns(ns)), body, codes):
            assert model is not None
            self.vms[(ns, into)] = replace(model, phase="Stopped", failures=0, strategy="Halted")
            return (ns, into)
        return multiple()

    @rule(vm=vms)
    def delete(self, vm: tuple[str, str]) -> None:
        codes = {200} if vm in self.vms else {404}
        if self.expect(f"delete {vm}", "DELETE", self.vm_path(*vm), None, codes):
            del self.vms[vm]

    @rule(vm=vms, cores=st.integers(1, 3), memory=st.sampled_from(["512Mi", "1Gi", "2Gi"]),
          disk_change=st.sampled_from(["same", "grow 1Gi", "shrink 1Gi"]))
    def resize(self, vm: tuple[str, str], cores: int, memory: str, disk_change: str) -> None:
        """Change vCPUs and memory and grow (or try to shrink) the disk, by a merge patch, running or not."""
        model = self.vms.get(vm)
        if model is None:
            self.expect(f"resize {vm}", "PATCH", self.vm_path(*vm), {"spec": {}}, {404})
            return
        disk = model.disk
        if disk is not None and disk_change != "same":
            disk = f"{q(disk) / 2**30 + (1 if disk_change == 'grow 1Gi' else -1)}Gi"
        new = replace(model, cores=cores, memory=memory, disk=disk)
        running = model.phase == "Running"
        old_charge = model.charge(running=running)
        delta = {k: v - old_charge.get(k, Decimal(0)) for k, v in new.charge(running=running).items()}
        if disk is not None and model.disk is not None and q(disk) < q(model.disk):
            codes = {422}
        else:
            codes = {200} if self.fits(vm[0], delta) else {403}
        patch: dict[str, Any] = {"spec": {"template": {"spec": {"domain": {
            "cpu": {"cores": cores}, "memory": {"guest": memory}}}}}}
        if disk is not None:
            patch["spec"]["dataVolumeTemplates"] = new.manifest(vm[1])["spec"]["dataVolumeTemplates"]
        if self.expect(f"resize {vm}", "PATCH", self.vm_path(*vm), patch, codes):
            self.vms[vm] = new

    # -- quotas and projects --------------------------------------------------------------------------

    @rule(ns=namespaces, quota=st.sampled_from(QUOTA_NAMES), change=st.sampled_from(["create", "patch", "delete"]),
          hard=hards)
    def change_quota(self, ns: str, quota: str, change: str, hard: dict[str, str]) -> None:
        """Create, patch (to exactly `hard`) or delete a ResourceQuota."""
        getattr(self, f"{change}_quota")(ns, quota, hard)

    @rule(project=projects, change=st.sampled_from(["create", "patch", "delete"]), hard=hards)
    def change_project(self, project: str, change: str, hard: dict[str, str]) -> None:
        """Create, patch (to exactly `hard`) or delete a Project."""
        getattr(self, f"{change}_project")(project, hard)

    def _quota_codes(self, ns: str, hard: dict[str, str]) -> set[int]:
        """422 if it allows more than the namespace's project does, 403 if it is below what is used."""
        codes = set()
        project = self.member_of[ns]
        if project is not None:
            limit = self.projects[project]
            if any(k in limit and q(v) > q(limit[k]) for k, v in hard.items()):
                codes.add(422)
        if any(self.usage(ns).get(k, Decimal(0)) > q(v) for k, v in hard.items()):
            codes.add(403)
        return codes

    def create_quota(self, ns: str, quota: str, hard: dict[str, str]) -> None:
        codes = self._quota_codes(ns, hard) | ({409} if (ns, quota) in self.quotas else set())
        body = {"metadata": {"name": quota}, "spec": {"hard": hard}}
        if self.expect(f"create_quota {ns}/{quota}", "POST", quotas_path(self.ns(ns)), body, codes or {200}):
            self.quotas[(ns, quota)] = hard

    def patch_quota(self, ns: str, quota: str, hard: dict[str, str]) -> None:
        old = self.quotas.get((ns, quota))
        codes = {404} if old is None else self._quota_codes(ns, hard) or {200}
        patch = {"spec": {"hard": {**dict.fromkeys(old or {}), **hard}}}  # null removes what is not kept
        if self.expect(f"patch_quota {ns}/{quota}", "PATCH", f"{quotas_path(self.ns(ns))}/{quota}", patch, codes):
            self.quotas[(ns, quota)] = hard

    def delete_quota(self, ns: str, quota: str, hard: object = None) -> None:
        codes = {200} if (ns, quota) in self.quotas else {404}
        if self.expect(f"delete_quota {ns}/{quota}", "DELETE", f"{quotas_path(self.ns(ns))}/{quota}", None, codes):
            del self.quotas[(ns, quota)]

    def create_project(self, project: str, hard: dict[str, str]) -> None:
        codes = {409} if project in self.projects else {200}
        body = {"metadata": {"name": self.project(project)}, "spec": {"resourceQuota": {"hard": hard}}}
        if self.expect(f"create_project {project}", "POST", PROJECTS, body, codes):
            self.projects[project] = hard

    def patch_project(self, project: str, hard: dict[str, str]) -> None:
        old = self.projects.get(project)
        if old is None:
            codes = {404}
        else:
            used = project_usage(self.world, self.project(project))
            codes = {403} if any(used.get(k, Decimal(0)) > q(v) for k, v in hard.items()) else {200}
        patch = {"spec": {"resourceQuota": {"hard": {**dict.fromkeys(old or {}), **hard}}}}
        if self.expect(f"patch_project {project}", "PATCH", f"{PROJECTS}/{self.project(project)}", patch, codes):
            self.projects[project] = hard

    def delete_project(self, project: str, hard: object = None) -> None:
        if project not in self.projects:
            codes = {404}
        else:
            codes = {409} if project in self.member_of.values() else {200}
        if self.expect(f"delete_project {project}", "DELETE", f"{PROJECTS}/{self.project(project)}", None, codes):
            del self.projects[project]

    @rule(ns=namespaces, project=st.sampled_from([None, *PROJECT_NAMES, "missing"]))
    def move_namespace(self, ns: str, project: str | None) -> None:
        """Label the namespace into a project (or out of any): it joins only if its usage and quotas fit."""
        codes: set[int] = set()
        if project is not None and project != self.member_of[ns]:
            if project not in self.projects:
                codes.add(422)
            else:
                hard = {k: q(v) for k, v in self.projects[project].items()}
                if not fits(project_usage(self.world, self.project(project)), self.usage(ns), hard):
                    codes.add(403)
                if any(k in hard and q(v) > hard[k] for (qns, _), qhard in self.quotas.items() if qns == ns
                       for k, v in qhard.items()):
                    codes.add(422)
        label = None if project is None else self.project(project)
        patch = {"metadata": {"labels": {PROJECT_LABEL: label}}}
        if self.expect(f"move_namespace {ns} to project {project}", "PATCH", f"{NAMESPACES}/{self.ns(ns)}", patch,
                       codes or {200}):
            self.member_of[ns] = project

    # -- the server itself ----------------------------------------------------------------------------

    @rule()
    def recount(self) -> None:
        """A periodic full recount finds nothing to correct: event-driven accounting never drifted."""
        drifted = self.app.controller.resync()
        STATS["recount: done"] += 1
        self.settle()
        assert drifted == [], f"the recount corrected {drifted}"
        # What the recount reads of every VM is what the VM's body says (two reads: a late event may fall
        # between them, so they must agree within a moment, not at once).
        reader = self.app.store.reader()

        def index_matches() -> bool:
            return list(reader.vm_states()) == [vm_state_row(vm) for vm in reader.list(objects.VIRTUAL_MACHINE)]

        wait_until(index_matches, timeout=5, what="vm_states to equal the VM bodies")

    @rule()
    def restart_server(self) -> None:
        """vmquota stops and starts again on the same data directory; the VMs run on meanwhile."""
        self.client.close()
        self.app.close()
        self._open()
        self.settle()
        STATS["server restart: done"] += 1

    # -- after every step -----------------------------------------------------------------------------

    @invariant()
    def server_matches_model_and_truth(self) -> None:
        self._world = None
        problems = violations(self.world, disks_root=self.app.controller.disks.root)
        problems += self.differences(self.world)
        STATS["invariant checks"] += 1
        assert not problems, "\n".join(problems)

    def differences(self, world: World) -> list[str]:
        found = []
        server_vms = {(ns.removeprefix(self.prefix + "-"), name): vm for (ns, name), vm in world.vms.items()}
        if set(server_vms) != set(self.vms):
            found.append(f"VMs on the server {sorted(server_vms)} but the model has {sorted(self.vms)}")
        for key in sorted(set(server_vms) & set(self.vms)):
            vm, model = server_vms[key], self.vms[key]
            domain = vm["spec"]["template"]["spec"]["domain"]
            seen = (vm["status"].get("printableStatus"), vm["spec"].get("runStrategy"), domain["cpu"]["cores"],
                    domain["memory"]["guest"], persistent_charge(vm)["requests.storage"])
            wanted = (model.phase, model.strategy, model.cores, model.memory, q(model.disk or 0))
            if seen != wanted:
                found.append(f"VM {key[0]}/{key[1]}: (phase, strategy, cores, memory, storage) is {seen}, "
                             f"the model says {wanted}")
        quotas = {(ns.removeprefix(self.prefix + "-"), name): quota_hard(x)
                  for (ns, name), x in world.quotas.items()}
        wanted_quotas = {key: {k: q(v) for k, v in hard.items()} for key, hard in self.quotas.items()}
        if quotas != wanted_quotas:
            found.append(f"quotas {quotas} but the model has {wanted_quotas}")
        members = {ns.removeprefix(self.prefix + "-"): project.removeprefix(self.prefix + "-")
                   for project, nss in world.members.items() for ns in nss}
        wanted_members = {ns: p for ns, p in self.member_of.items() if p is not None}
        if members != wanted_members:
            found.append(f"project members {members} but the model has {wanted_members}")
        if {p.removeprefix(self.prefix + "-") for p in world.projects} != set(self.projects):
            found.append(f"projects {sorted(world.projects)} but the model has {sorted(self.projects)}")
        return found

    def teardown(self) -> None:
        """Delete every VM through the API and check nothing is left on the host; then stop the server."""
        try:
            for vm in self.client.get(ALL_VMS)["items"]:
                if vm["metadata"]["namespace"].startswith(self.prefix + "-"):
                    self.call("DELETE", self.vm_path(vm["metadata"]["namespace"].split("-")[-1],
                                                     vm["metadata"]["name"]))
            self.settle()
        finally:
            self.client.close()
            self.app.close()
            leftovers = [d for d in HOST.listAllDomains() if d.name().startswith(f"vmquota_{self.prefix}-")]
            for dom in leftovers:
                try:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                except libvirt.libvirtError:
                    pass
            shutil.rmtree(self.tmp, ignore_errors=True)
        assert not leftovers, f"domains left after every VM was deleted: {[d.name() for d in leftovers]}"


@pytest.mark.timeout(7200 if profile.LONG else 600)
def test_random_operation_sequences_keep_every_invariant() -> None:
    started = time.monotonic()
    STATS.clear()
    run_state_machine_as_test(QuotaMachine, settings=settings(
        max_examples=profile.MODEL_EXAMPLES, stateful_step_count=profile.MODEL_STEPS, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]))
    profile.record("model", examples=profile.MODEL_EXAMPLES, steps_per_example=profile.MODEL_STEPS,
                   seconds=round(time.monotonic() - started, 1), outcomes=dict(sorted(STATS.items())))
    print(dict(sorted(STATS.items())))
