from conftest import Cluster, vm_manifest


def test_stopped_vm_charges_storage_and_count_only(cluster: Cluster) -> None:
    cluster.create_quota({"limits.cpu": "4", "limits.memory": "4Gi", "requests.storage": "20Gi",
                          "count/virtualmachines.kubevirt.io": "3"})
    cluster.create_vm(vm_manifest("web-1"))
    assert cluster.used() == {"limits.cpu": "0", "limits.memory": "0", "requests.storage": "5Gi",
                              "count/virtualmachines.kubevirt.io": "1"}
