"""vmquota: a VM controller for KVM hosts whose quotas count CPU and memory only while a VM really runs.

Layers, top to bottom (imports only go downwards; `lint-imports` checks it, from pyproject.toml):
    cli                                             the command line
    app, workers, client, printers                  the server's processes; what a client prints
    apiserver                                       the Kubernetes API server: filters, handlers, documents
    api                                             Kubernetes-style operations, one transaction each
    controller                                      VM lifecycle
    accounting, history, workqueue                  charges and admission; usage over time; the keyed queue
    store, hypervisor, disks, domainxml             SQLite, libvirt, qemu-img, domain XML
    fieldmanager, usage, vmspec, vmstatus, schema, resources, quantity, objects, errors, waiting, warning,
    telemetry, dashboard                            pure rules and data; warnings to the client; measurements;
                                                    the web dashboard's files
"""

__version__ = "0.1.0"
