"""Concurrency storm: many HTTP clients hammer start, stop, restart, clone, create and delete on VMs of shared
namespaces that share one project, while domains crash behind vmquota's back and recounts run all along.

A sampler reads every quota's and the project's `status.used` throughout: no sample may exceed its hard limit.
After the storm, once the controller has settled, every invariant must hold (usage equals the simulated host's
truth, nothing leaked, nothing stuck) and a full recount must find nothing to correct.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import libvirt
import pytest
from conftest import HOST, Cluster, unsettled, vm_manifest, wait_until
from reliability import profile
from reliability.invariants import (
    ALL_QUOTAS,
    NAMESPACES,
    PROJECT_LABEL,
    PROJECTS,
    clones_path,
    look,
    project_hard,
    q,
    quota_hard,
    violations,
    vms_path,
)

from vmquota.client import Client, ClientError, action_path

POOL = [f"vm-{i}" for i in range(6)]  # the names VMs of each namespace are made and cloned under
OPERATIONS = ["start"] * 6 + ["stop"] * 4 + ["restart"] * 2 + ["clone"] * 3 + ["delete"] * 2 + ["create"] * 3
REFUSALS = {403, 404, 409, 422}  # what a racing client may be told; anything else is a failure


def settle(cluster: Cluster, namespaces: list[str]) -> None:
    wait_until(lambda: not unsettled(cluster.app, lambda ns: ns in namespaces), timeout=60,
               what="the controller to settle after the storm")


def random_vm(rng: random.Random, name: str) -> dict[str, Any]:
    return vm_manifest(name, cores=rng.choice([1, 2]), memory=rng.choice(["256Mi", "512Mi", "1Gi"]),
                       disk=rng.choice([None, "1Gi", "2Gi"]), strategy=rng.choice(["Halted", "Manual", "Always"]),
                       grace=rng.choice([0, 30]))


class Storm:
    def __init__(self, cluster: Cluster, namespaces: list[str], project: str) -> None:
        self.cluster = cluster
        self.namespaces = namespaces
        self.project = project
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.over_hard: list[str] = []
        self.samples = 0
        self.crashes = 0
        self.recounts = 0
        self.drifts: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def note(self, op: str, code: int | str) -> None:
        with self.lock:
            self.outcomes[f"{op}: {code}"] += 1

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        client = Client(self.cluster.app.url)
        try:
            for _ in range(profile.STORM_OPERATIONS):
                op, ns, name = rng.choice(OPERATIONS), rng.choice(self.namespaces), rng.choice(POOL)
                try:
                    self.act(client, rng, op, ns, name)
                    self.note(op, "admitted")
                except ClientError as e:
                    self.note(op, e.code)
                    if e.code not in REFUSALS or "Traceback" in e.message:
                        self.failures.append(f"{op} {ns}/{name}: {e.code} {e.message}")
                    if e.code == 403 and "exceeded quota: " not in e.message:
                        self.failures.append(f"{op} {ns}/{name}: a refusal that does not name the quota: {e.message}")
        except Exception as e:
            self.failures.append(f"client {seed}: {type(e).__name__}: {e}")
        finally:
            client.close()

    def act(self, client: Client, rng: random.Random, op: str, ns: str, name: str) -> None:
        if op in ("start", "stop", "restart"):
            client.put(action_path(ns, name, op))
        elif op == "delete":
            client.delete(f"{vms_path(ns)}/{name}")
        elif op == "create":
            client.post(vms_path(ns), random_vm(rng, name))
        else:
            client.post(clones_path(ns), {
                "metadata": {"name": f"c-{rng.getrandbits(40):x}"},
                "spec": {"source": {"kind": "VirtualMachine", "name": name},
                         "target": {"kind": "VirtualMachine", "name": rng.choice(POOL)}}})

    def sampler(self) -> None:
        client = Client(self.cluster.app.url)
        try:
            while not self.done.is_set():
                quotas = [x for x in client.get(ALL_QUOTAS)["items"] if x["metadata"]["namespace"] in self.namespaces]
                project = client.get(f"{PROJECTS}/{self.project}")
                for name, hard, used in [(f"{x['metadata']['namespace']}/{x['metadata']['name']}", quota_hard(x),
                                          x["status"]["used"]) for x in quotas] + [
                        (f"project/{self.project}", project_hard(project), project["status"]["used"])]:
                    over = {k: v for k, v in used.items() if q(v) > hard.get(k, Decimal("Infinity"))}
                    if over:
                        self.over_hard.append(f"{name}: used {over} above hard {hard}")
                self.samples += 1
        finally:
            client.close()

    def chaos(self, seed: int) -> None:
        """Domains die behind vmquota's back, and full recounts run far more often than the default 30 s."""
        rng = random.Random(seed)
        prefixes = tuple(f"vmquota_{ns}_" for ns in self.namespaces)
        while not self.done.wait(0.05):
            running = [d for d in HOST.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
                       if d.name().startswith(prefixes)]
            if running and rng.random() < 0.3:
                try:
                    rng.choice(running).destroy()
                    self.crashes += 1
                except libvirt.libvirtError:
                    pass  # stopped meanwhile
            self.drifts += self.cluster.app.controller.resync()
            self.recounts += 1


@pytest.mark.timeout(3600 if profile.LONG else 300)
def test_a_storm_of_concurrent_clients_never_pushes_used_above_hard(cluster: Cluster) -> None:
    controller = cluster.app.controller
    controller.backoff_base_seconds = 3600.0  # crash loops wait: the end state must stay put to be checked
    controller.unschedulable_retry_seconds = 3600.0
    project = f"storm-{cluster.ns}"
    namespaces = [f"{cluster.ns}-{part}" for part in ("a", "b", "c")]
    cluster.client.post(PROJECTS, {"metadata": {"name": project}, "spec": {"resourceQuota": {"hard": {
        "limits.cpu": "6", "limits.memory": "6Gi", "requests.storage": "24Gi",
        "count/virtualmachines.kubevirt.io": "14"}}}})
    for ns in namespaces:
        cluster.client.post(NAMESPACES, {"metadata": {"name": ns, "labels": {PROJECT_LABEL: project}}})
    cluster.create_quota({"limits.cpu": "3", "count/virtualmachines.kubevirt.io": "6"}, namespace=namespaces[0])
    cluster.create_quota({"requests.instances/vmi": "2", "limits.memory": "3Gi"}, namespace=namespaces[1])
    rng = random.Random(0)
    for ns in namespaces:
        for name in POOL[:4]:
            cluster.create_vm(vm_manifest(name, cores=1, memory="512Mi", disk="1Gi",
                                          strategy=rng.choice(["Halted", "Manual"])), namespace=ns)

    storm = Storm(cluster, namespaces, project)
    started = time.monotonic()
    threads = [threading.Thread(target=storm.client_loop, args=(seed,)) for seed in range(profile.STORM_CLIENTS)]
    helpers = [threading.Thread(target=storm.sampler), threading.Thread(target=storm.chaos, args=(99,))]
    for thread in threads + helpers:
        thread.start()
    for thread in threads:
        thread.join()
    storm.done.set()
    for thread in helpers:
        thread.join()
    seconds = time.monotonic() - started

    settle(cluster, namespaces)
    drift_after = controller.resync()  # one recount: any lifecycle event still in flight is looked at now
    settle(cluster, namespaces)
    world = look(cluster.client, HOST, namespaces, [project])
    problems = violations(world, disks_root=controller.disks.root)
    profile.record("concurrency", clients=profile.STORM_CLIENTS, operations=sum(storm.outcomes.values()),
                   outcomes=dict(sorted(storm.outcomes.items())), samples=storm.samples, crashes=storm.crashes,
                   recounts=storm.recounts, seconds=round(seconds, 1), violations=len(problems) + len(storm.over_hard))
    print(f"\n{sum(storm.outcomes.values())} operations by {profile.STORM_CLIENTS} clients in {seconds:.1f}s, "
          f"{storm.samples} samples, {storm.crashes} crashes, {storm.recounts} recounts: "
          f"{dict(sorted(storm.outcomes.items()))}")
    assert storm.failures == []
    assert storm.over_hard == []
    assert storm.samples > 0 and sum(storm.outcomes.values()) == profile.STORM_CLIENTS * profile.STORM_OPERATIONS
    assert storm.drifts == [], "a recount during the storm had to correct used"
    assert drift_after == []
    assert problems == []
