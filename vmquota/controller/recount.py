"""The periodic recount: the hypervisor's truth against the store, drift corrected, garbage collected.

`resync` sums the ledger again (`accounting.recount`), queues every VM whose phase disagrees with what libvirt
shows (the reconcile then decides, as for an event), and removes the domains and disk folders vmquota made for
VMs that no longer exist. It never touches a domain vmquota did not make.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

from vmquota import accounting, history, telemetry
from vmquota.controller.context import Context
from vmquota.controller.state import Key, StoredVM, needs_reconcile
from vmquota.hypervisor import ABSENT, Observed

log = logging.getLogger(__name__)


class Recount:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def resync(self) -> list[str]:
        """Compare every VM with the hypervisor's truth, queue those that differ, collect garbage, recount.

        Returns the quotas whose used had drifted from the ledger (normally none).
        """
        ctx = self.ctx
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="resync") as pool:
            # The ledger is summed while libvirt lists the domains and the disk folders are listed: those
            # two wait mostly outside Python's lock, so the three take little more than the longest.
            domains, folders = pool.submit(ctx.hypervisor.observe_all), pool.submit(ctx.disks.vm_dirs)
            started = time.perf_counter()
            with ctx.store.transaction() as txn:
                drifted = accounting.recount(txn)
                history.roll_up(txn, now=ctx.clock())  # the usage history stays bounded: one commit for both
            # Look at the hypervisor and the disks before the VMs: anything made after this look belongs to
            # a VM the list below already holds, so garbage collection never takes a new VM's domain or disks.
            observed, disk_dirs = domains.result(), folders.result()
        known: dict[Key, str] = {}  # every VM's uid
        for row in ctx.store.reader().vm_states():  # only the fields the comparison needs, streamed
            vm = StoredVM.from_row(row)
            key = (vm.namespace, vm.name)
            known[key] = vm.uid
            if needs_reconcile(vm, observed.get(key, ABSENT)):
                ctx.queue.add(key)
        self._collect_garbage(known, observed, disk_dirs)
        telemetry.RECOUNT_SECONDS.observe(time.perf_counter() - started)
        telemetry.RECOUNT_CORRECTIONS.inc(len(drifted))
        telemetry.HYPERVISOR_UP.labels(ctx.hypervisor.uri).set(1)
        for quota in drifted:
            log.warning("recount corrected the used of %s", quota)
        return drifted

    def _collect_garbage(self, known: dict[Key, str], observed: dict[Key, Observed],
                         disk_dirs: list[tuple[str, str]]) -> None:
        """Remove the domains and disk folders vmquota made for VMs that no longer exist."""
        hypervisor = self.ctx.hypervisor
        for key, seen in observed.items():
            uid = known.get(key)
            # A domain without a VM, or a running one made for an earlier VM of the same name. (An off domain
            # of an earlier VM is replaced when the new VM starts, or removed with it.)
            if uid is not None and (seen.uid is None or seen.uid == uid):
                continue
            owner = hypervisor.owner(*key)
            if owner is None or owner == uid:
                continue
            log.warning("removing domain %s/%s: vmquota made it for a VM that no longer exists", *key)
            hypervisor.remove_orphan(*key, owner)
        uids = set(known.values())
        for ns, uid in disk_dirs:
            if uid not in uids:
                log.warning("removing the disks of a deleted VM: %s/%s", ns, uid)
                self.ctx.disks.remove_vm(ns, uid)
