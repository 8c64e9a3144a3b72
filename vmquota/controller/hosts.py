"""The libvirt host behind each Node: the server's own `--hypervisor` for the first, a connection of its own,
made on first use, for every other.

Every part of the controller reaches a VM's domain through `Hosts.of(node)`, with the node the VM is placed on
(`state.node_of`); a VM placed before there were nodes is on the first. In the controller's process every host
tells the controller of its domains' lifecycle events (`listen`); API processes only use them for consoles and
port forwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vmquota.hypervisor import EventCallback, Hypervisor
from vmquota.objects import NODE
from vmquota.store import Reader, Store


class Hosts:
    def __init__(self, first: Hypervisor, store: Store) -> None:
        self.first = first
        self.store = store
        self._first_name: str | None = None
        self._others: dict[str, Hypervisor] = {}  # by libvirt URI
        self._lock = threading.Lock()
        self._on_event: EventCallback | None = None
        self._on_reconnect: Callable[[], object] | None = None

    def listen(self, *, on_event: EventCallback, on_reconnect: Callable[[], object]) -> None:
        """From now on every host reports its domains' lifecycle events and reconnections."""
        with self._lock:
            self._on_event, self._on_reconnect = on_event, on_reconnect
            for host in self._others.values():
                host.listen(on_event=on_event, on_reconnect=on_reconnect)

    def first_name(self, reader: Reader | None = None) -> str:
        """The name of the Node whose providerID is the server's hypervisor, once it is registered."""
        if self._first_name is None:
            for node in (reader or self.store.reader()).list(NODE):
                if (node.get("spec") or {}).get("providerID") == self.first.uri:
                    self._first_name = str(node["metadata"]["name"])
        return self._first_name or ""

    def of(self, node: str | None, reader: Reader | None = None) -> Hypervisor:
        """The host of `node` (the first node's for None or an unknown node: where VMs ran before nodes)."""
        if not node or node == self.first_name(reader):
            return self.first
        found = (reader or self.store.reader()).get(NODE, "", node)
        uri = str(((found or {}).get("spec") or {}).get("providerID", ""))
        return self.for_uri(uri) if uri else self.first

    def for_uri(self, uri: str) -> Hypervisor:
        if uri == self.first.uri:
            return self.first
        with self._lock:
            host = self._others.get(uri)
            if host is None:
                host = Hypervisor(uri, instance=self.first.instance, use_emulation=self.first.use_emulation)
                if self._on_event is not None:
                    host.listen(on_event=self._on_event, on_reconnect=self._on_reconnect)
                self._others[uri] = host
            return host

    def nodes(self, reader: Reader | None = None) -> list[tuple[str, Hypervisor]]:
        """Every Node with its host, the first node first."""
        found = []
        for node in (reader or self.store.reader()).list(NODE):
            uri = str((node.get("spec") or {}).get("providerID", ""))
            found.append((str(node["metadata"]["name"]), self.for_uri(uri)))
        return sorted(found, key=lambda pair: (pair[1] is not self.first, pair[0]))

    def forget(self, uris: set[str]) -> None:
        """Close the connections of hosts no Node names any more."""
        with self._lock:
            gone = [uri for uri in self._others if uri not in uris]
            closing = [self._others.pop(uri) for uri in gone]
        for host in closing:
            host.close()

    def close(self) -> None:
        with self._lock:
            closing, self._others = list(self._others.values()), {}
        for host in closing:
            host.close()
