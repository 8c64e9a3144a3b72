"""The VM controller: turns requests and hypervisor events into domain actions and charges.

A package of parts, each a module:

* `core`: the `Controller` the API and the app hold: worker threads, the reconcile's dispatch by phase.
* `context`: what the parts share, and `transition`, the one place a VM's phase and charge change.
* `lifecycle`: admission of creates, starts, stops, restarts and deletes; the reconcile of each phase.
* `volumes` and `clone`: disks from images, blank, cloned or copied live; the seed and the domain XML.
* `guest`: pause, unpause, soft reboot, the console and port forwards of a running guest.
* `recount`: the periodic comparison with the hypervisor's truth, and garbage collection.
* `state`: pure helpers reading a VM's status.
"""

from vmquota.controller.clone import CLONE_DISKS_ANNOTATION, CLONE_SOURCE_ANNOTATION, data_volume_owner
from vmquota.controller.core import Controller
from vmquota.controller.state import Key, bring_stop_nearer, runtime_phase

__all__ = ["CLONE_DISKS_ANNOTATION", "CLONE_SOURCE_ANNOTATION", "Controller", "Key", "bring_stop_nearer",
           "data_volume_owner", "runtime_phase"]
