"""vmquota: a VM controller for KVM hosts whose quotas count CPU and memory only while a VM really runs.

Layers, top to bottom (imports only go downwards):
    cli, client, printers, server, app, openapi     what users and HTTP clients talk to
    api                                             Kubernetes-style operations, one transaction each
    controller, accounting                          VM lifecycle; charges and admission
    store, hypervisor, disks, domainxml, workqueue  SQLite, libvirt, qemu-img, plain structures
    usage, vmspec, vmstatus, resources, quantity, objects, errors   pure rules and data
"""

__version__ = "0.1.0"
