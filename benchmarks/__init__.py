"""`make bench`: vmquota's speed against its limits, every figure measured with its baseline in the same run.

Sections (docs/performance.md says what each measures and why):
    admission   1. admission cost vs namespace size (accounting and store, no hypervisor)
    durable     2. admitted starts per second vs the raw commit rate of the same SQLite settings
    http        3. start/stop requests over HTTP with 1, 10 and 50 clients (server in its own process)
    kvm         4. start to Running and forced stop on real KVM vs the same domain through libvirt
    realtime    5. a domain destroyed behind vmquota's back until status.used shows it
    recount     6. a full recount (Controller.resync) of 100,000 VMs in 1,000 namespaces
"""
