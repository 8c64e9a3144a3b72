"""The periodic recount: every host's truth against the store, drift corrected, garbage collected.

`resync` sums the ledger again (`accounting.recount`) and the capacity placed on each node, looks at every
node's domains at once (a host that does not answer within HOST_LOOK_SECONDS is left out: one unreachable node
does not stall the recount of the others), queues every VM whose phase disagrees with what its node shows (the
reconcile then decides, as for an event), adopts a VM found running on a node other than its own (charged once:
the charge is the VM's, wherever it runs; reported in an event), and removes the domains and disk folders vmquota
made for VMs that no longer exist. It never touches a domain vmquota did not make.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time

from vmquota import accounting, errors, history, telemetry, usage
from vmquota.controller.context import Context
from vmquota.controller.nodes import out_of_service
from vmquota.controller.state import Key, StoredVM, key_of, needs_reconcile, runtime_phase
from vmquota.hypervisor import ABSENT, Hypervisor, Observed
from vmquota.objects import NODE, Obj
from vmquota.store import Transaction
from vmquota.vmstatus import Phase

log = logging.getLogger(__name__)

HOST_LOOK_SECONDS = 20.0  # a host's domain listing that takes longer is not waited for


class Recount:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._reported: set[tuple[Key, str]] = set()  # (VM, node) already reported found elsewhere

    def resync(self) -> list[str]:
        """Compare every VM with its node's truth, queue those that differ, collect garbage, recount.

        Returns the quotas whose used had drifted from the ledger (normally none), and the nodes whose placed
        capacity had.
        """
        ctx = self.ctx
        hosts = ctx.hosts.nodes() or [(ctx.hosts.first_name(), ctx.hosts.first)]
        pool = concurrent.futures.ThreadPoolExecutor(len(hosts) + 1, thread_name_prefix="resync")
        try:
            # The ledger is summed while the hosts list their domains and the disk folders are listed: those
            # wait mostly outside Python's lock, so they take little more than the longest.
            looks = {name: (host, pool.submit(host.observe_all)) for name, host in hosts}
            folders = pool.submit(ctx.disks.vm_dirs)
            started = time.perf_counter()
            with ctx.store.transaction() as txn:
                drifted = accounting.recount(txn) + _correct_placements(txn)
                history.roll_up(txn, now=ctx.clock())  # the usage history stays bounded: one commit for all
            # Look at the hosts and the disks before the VMs: anything made after this look belongs to a VM the
            # list below already holds, so garbage collection never takes a new VM's domain or disks.
            observed = self._observed(looks)
            disk_dirs = folders.result()
        finally:
            pool.shutdown(wait=False)  # a host that hangs keeps its thread, not the recount
        first = ctx.hosts.first_name()
        placed = ctx.store.reader().running_placements()
        running_on: dict[Key, list[str]] = {}  # every running domain's nodes, by VM: looked up once per VM
        if len(observed) > 1:
            for name, domains in observed.items():
                for key, seen in domains.items():
                    if seen.up:
                        running_on.setdefault(key, []).append(name)
        known: dict[Key, str] = {}  # every VM's uid
        for row in ctx.store.reader().vm_states():  # only the fields the comparison needs, streamed
            vm = StoredVM.from_row(row)
            key = (vm.namespace, vm.name)
            known[key] = vm.uid
            if key in ctx.migrating:  # on both hosts for a while: the migration's end settles it
                continue
            node = placed.get(key, first)
            if node in observed and needs_reconcile(vm, observed[node].get(key, ABSENT)):
                ctx.queue.add(key)
            if len(observed) > 1:
                self._found_elsewhere(key, vm, node, observed, running_on)
        for name, (host, _look) in looks.items():
            if name in observed:
                self._collect_garbage(host, known, observed[name])
        self._collect_disks(known, disk_dirs)
        telemetry.RECOUNT_SECONDS.observe(time.perf_counter() - started)
        telemetry.RECOUNT_CORRECTIONS.inc(len(drifted))
        for name, (host, _look) in looks.items():
            telemetry.HYPERVISOR_UP.labels(host.uri).set(1 if name in observed else 0)
        for what in drifted:
            log.warning("recount corrected the used of %s", what)
        return drifted

    def _observed(self, looks: dict[str, tuple[Hypervisor, concurrent.futures.Future[dict[Key, Observed]]]]
                  ) -> dict[str, dict[Key, Observed]]:
        """Each node's domains, for the nodes that answered in time; the first node's failure is the server's."""
        deadline = time.monotonic() + HOST_LOOK_SECONDS
        found: dict[str, dict[Key, Observed]] = {}
        for name, (host, look) in looks.items():
            try:
                found[name] = look.result(timeout=max(0.0, deadline - time.monotonic()))
            except (errors.HypervisorError, concurrent.futures.TimeoutError) as e:
                if host is self.ctx.hosts.first:
                    if isinstance(e, errors.HypervisorError):
                        raise
                    raise errors.HypervisorUnavailable(f"the hypervisor at {host.uri} did not list its domains "
                                                       f"within {HOST_LOOK_SECONDS:g} s") from e
                log.warning("recount leaves node %s out: %s", name, e or "no answer in time")
        return found

    def _found_elsewhere(self, key: Key, vm: StoredVM, node: str, observed: dict[str, dict[Key, Observed]],
                         running_on: dict[Key, list[str]]) -> None:
        """A VM's domain running on a node that is not its own: adopted there if its own shows it off; a stale
        copy on a node confirmed down is removed (the VM was released, and may run elsewhere by now)."""
        for other in running_on.get(key, ()):
            if other == node or observed[other][key].uid != vm.uid:
                continue
            if other in self._out_of_service():
                self._remove_stale_copy(key, vm, other)
                continue
            twice = node in observed and observed[node].get(key, ABSENT).up
            if (key, other) not in self._reported:
                self._reported.add((key, other))
                self.ctx.update(key, functools.partial(self._adopt, node=other, twice=twice), expect_uid=vm.uid)
            return
        if self._reported:
            self._reported = {r for r in self._reported if r[0] != key}

    def _out_of_service(self) -> set[str]:
        return {n["metadata"]["name"] for n in self.ctx.store.reader().list(NODE) if out_of_service(n)}

    def _remove_stale_copy(self, key: Key, vm: StoredVM, node: str) -> None:
        log.warning("%s/%s: removing its stale copy on node %s, which was confirmed down", *key, node)
        self.ctx.hosts.of(node).destroy(*key, vm.uid)
        self.ctx.update(key, lambda txn, obj: self.ctx.record(
            txn, obj, "Warning", "StaleCopyRemoved", f"node {node} came back after it was confirmed down: the copy "
                                                      f"of the VM it still ran was forced off"), expect_uid=vm.uid)

    def _adopt(self, txn: Transaction, vm: Obj, *, node: str, twice: bool) -> None:
        if twice:  # vmquota never starts a second copy: someone else did; both are left alone, and said
            self.ctx.record(txn, vm, "Warning", "RunningTwice",
                            f"the VM's domain runs on node {node} too, besides its own node: charged once")
            return
        phase = runtime_phase(vm)
        if not usage.holds_runtime(phase):
            phase = Phase.RUNNING
        self.ctx.transition(txn, vm, phase, enforce=False, node=node)
        self.ctx.record(txn, vm, "Warning", "FoundOnUnexpectedNode",
                        f"the domain was found running on node {node}: it is placed there, and charged once")
        log.warning("%s/%s found running on node %s", *key_of(vm), node)

    def _collect_garbage(self, host: Hypervisor, known: dict[Key, str], observed: dict[Key, Observed]) -> None:
        """Remove the domains vmquota made on this host for VMs that no longer exist."""
        for key, seen in observed.items():
            uid = known.get(key)
            # A domain without a VM, or a running one made for an earlier VM of the same name. (An off domain
            # of an earlier VM is replaced when the new VM starts, or removed with it.)
            if uid is not None and (seen.uid is None or seen.uid == uid):
                continue
            owner = host.owner(*key)
            if owner is None or owner == uid:
                continue
            log.warning("removing domain %s/%s on %s: vmquota made it for a VM that no longer exists", *key, host.uri)
            host.remove_orphan(*key, owner)

    def _collect_disks(self, known: dict[Key, str], disk_dirs: list[tuple[str, str]]) -> None:
        uids = set(known.values())
        for ns, uid in disk_dirs:
            if uid not in uids:
                log.warning("removing the disks of a deleted VM: %s/%s", ns, uid)
                self.ctx.disks.remove_vm(ns, uid)


def _correct_placements(txn: Transaction) -> list[str]:
    """Make each node's placed capacity the sum of its placements again; names the nodes that had drifted."""
    drifted = []
    for node, cpu, memory, vms in txn.placement_drift():
        txn.correct_node_allocated(node, cpu, memory, vms)
        drifted.append(f"node/{node}")
    return drifted
