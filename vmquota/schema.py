"""The one definition of every served kind's schema, and the field checks that follow from it.

Bottom layer, pure: plain data and functions, no I/O. Each kind of the registry (`objects.KINDS`) has one
`Schema` tree here, with the descriptions users read in `kubectl explain`. `apiserver/openapi.py` renders the
trees as OpenAPI v2 and v3 and as the older `/openapi.json`; the write handlers ask `check_fields` what a body
holds that the schema does not know (`fieldValidation`).

Fields vmquota reads or writes are described with Kubernetes' and KubeVirt's names and words. Subtrees of a VM
that vmquota does not model (networks, devices other than disks, a disk's source, ...) are
`preserve_unknown`: whatever a user writes there is kept, as the contract keeps a VM's unknown fields, and is
never reported as unknown.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from vmquota import errors, objects, resources
from vmquota.objects import Kind


@dataclass(frozen=True, eq=False)
class Schema:
    """One node of a structural schema (the subset of OpenAPI v3 that Kubernetes' CRDs use)."""

    type: str = ""  # object, array, string, integer, number, boolean; "" for a reference
    description: str = ""
    properties: Mapping[str, Schema] = field(default_factory=dict)
    items: Schema | None = None  # an array's elements
    values: Schema | None = None  # a map's values (additionalProperties)
    preserve_unknown: bool = False  # x-kubernetes-preserve-unknown-fields: anything below is kept as written
    ref: str = ""  # the name of a shared definition (DEFINITIONS) this node stands for
    enum: tuple[str, ...] = ()
    format: str = ""
    pattern: str = ""
    max_length: int | None = None
    minimum: int | None = None
    required: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # the only keys vmquota accepts in a map (a quota's resource names)
    alternatives: tuple[str, ...] = ()  # the JSON types a value may take when more than one (a quantity)
    extensions: Mapping[str, Any] = field(default_factory=dict)  # further x-kubernetes-* annotations


def obj(description: str, properties: Mapping[str, Schema], *, required: tuple[str, ...] = (),
        preserve_unknown: bool = False) -> Schema:
    return Schema("object", description, properties, required=required, preserve_unknown=preserve_unknown)


def preserved(description: str) -> Schema:
    """An object vmquota does not model: kept as written, never checked."""
    return Schema("object", description, preserve_unknown=True)


def string(description: str, *, enum: tuple[str, ...] = (), fmt: str = "", pattern: str = "",
           max_length: int | None = None) -> Schema:
    return Schema("string", description, enum=enum, format=fmt, pattern=pattern, max_length=max_length)


def integer(description: str, *, minimum: int | None = None, fmt: str = "int32") -> Schema:
    return Schema("integer", description, format=fmt, minimum=minimum)


def boolean(description: str) -> Schema:
    return Schema("boolean", description)


def array(items: Schema, description: str, **extensions: Any) -> Schema:
    return Schema("array", description, items=items, extensions=extensions)


def map_of(values: Schema, description: str, *, keys: tuple[str, ...] = ()) -> Schema:
    return Schema("object", description, values=values, keys=keys)


def ref(name: str, description: str = "") -> Schema:
    return Schema(ref=name, description=description)


def patch_merge(key: str) -> dict[str, Any]:
    """The annotations of a list that strategic merge patch merges by `key` (kubectl apply reads them)."""
    return {"x-kubernetes-patch-strategy": "merge", "x-kubernetes-patch-merge-key": key,
            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


# -- shared definitions, named as Kubernetes names them -------------------------------------------------------

QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
TIME = "io.k8s.apimachinery.pkg.apis.meta.v1.Time"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
LIST_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta"
OWNER_REFERENCE = "io.k8s.apimachinery.pkg.apis.meta.v1.OwnerReference"
MANAGED_FIELDS_ENTRY = "io.k8s.apimachinery.pkg.apis.meta.v1.ManagedFieldsEntry"
STATUS = "io.k8s.apimachinery.pkg.apis.meta.v1.Status"
STATUS_DETAILS = "io.k8s.apimachinery.pkg.apis.meta.v1.StatusDetails"
WATCH_EVENT = "io.k8s.apimachinery.pkg.apis.meta.v1.WatchEvent"
OBJECT_REFERENCE = "io.k8s.api.core.v1.ObjectReference"
TYPED_LOCAL_OBJECT_REFERENCE = "io.k8s.api.core.v1.TypedLocalObjectReference"

NAME_PATTERN = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

_API_VERSION = ("APIVersion defines the versioned schema of this representation of an object. Servers should "
                "convert recognized schemas to the latest internal value, and may reject unrecognized values.")
_KIND = ("Kind is a string value representing the REST resource this object represents. Servers may infer this "
         "from the endpoint the client submits requests to. In CamelCase.")
_METADATA = "Standard object's metadata."


def _string_map(description: str) -> Schema:
    return map_of(string(""), description)


DEFINITIONS: dict[str, Schema] = {
    QUANTITY: Schema(
        "string", "Quantity is a fixed-point representation of a number, in Kubernetes' serialization format: a number "
        "with an optional suffix, binary (Ki, Mi, Gi, Ti, Pi, Ei), decimal (m, k, M, G, T, P, E) or a decimal "
        "exponent (e3). Examples: 500m, 2, 1.5Gi, 2048Mi, 10G.", alternatives=("string", "number")),
    TIME: string("Time is a timestamp in RFC 3339 form, in UTC (2026-11-27T07:56:40Z).", fmt="date-time"),
    OWNER_REFERENCE: obj(
        "OwnerReference contains enough information to let you identify an owning object.", {
            "apiVersion": string("API version of the referent."),
            "kind": string("Kind of the referent."),
            "name": string("Name of the referent."),
            "uid": string("UID of the referent."),
            "controller": boolean("If true, this reference points to the managing controller."),
            "blockOwnerDeletion": boolean("If true, the owner cannot be deleted from the key-value store "
                                          "until this reference is removed."),
        }, required=("apiVersion", "kind", "name", "uid")),
    MANAGED_FIELDS_ENTRY: obj(
        "ManagedFieldsEntry is a workflow-id, a FieldSet and the group version of the resource that the "
        "fieldset applies to.", {
            "apiVersion": string("APIVersion defines the version of this resource that this field set applies to."),
            "fieldsType": string("FieldsType is the discriminator for the different fields format and version. "
                                 "There is currently only one possible value: FieldsV1"),
            "fieldsV1": preserved("FieldsV1 holds the first JSON version format as described in the FieldsV1 "
                                  "type."),
            "manager": string("Manager is an identifier of the workflow managing these fields."),
            "operation": string("Operation is the type of operation which lead to this ManagedFieldsEntry being "
                                "created. The only valid values for this field are 'Apply' and 'Update'."),
            "subresource": string("Subresource is the name of the subresource used to update that object, or "
                                  "empty string if the object was updated through the main resource."),
            "time": ref(TIME, "Time is the timestamp of when the ManagedFields entry was added."),
        }),
    OBJECT_META: obj(
        "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must "
        "create.", {
            "name": string("Name must be unique within a namespace. Is required when creating resources. A DNS-1123 "
                           "label: lower case letters, digits and '-', at most 63 characters.",
                           pattern=NAME_PATTERN, max_length=63),
            "generateName": string("GenerateName is an optional prefix, used by the server, to generate a unique "
                                   "name ONLY IF the Name field has not been provided."),
            "namespace": string("Namespace defines the space within which each name must be unique. Not all "
                                "objects are required to be scoped to a namespace.",
                                pattern=NAME_PATTERN, max_length=63),
            "uid": string("UID is the unique in time and space value for this object. It is generated by the "
                          "server on successful creation of a resource and is not allowed to change on PUT."),
            "resourceVersion": string("An opaque value that represents the internal version of this object that "
                                      "can be used by clients to determine when objects have changed. A PUT that "
                                      "carries it is refused with a Conflict when the object changed since."),
            "generation": integer("A sequence number representing a specific generation of the desired state.",
                                  fmt="int64"),
            "creationTimestamp": ref(TIME, "CreationTimestamp is a timestamp representing the server time when "
                                           "this object was created. Set by the server, read-only."),
            "deletionTimestamp": ref(TIME, "DeletionTimestamp is the time after which this resource will be "
                                           "deleted. Set by the server when a graceful deletion is requested."),
            "deletionGracePeriodSeconds": integer("Number of seconds allowed for this object to gracefully "
                                                  "terminate before it will be removed from the system.",
                                                  fmt="int64"),
            "labels": _string_map("Map of string keys and values that can be used to organize and categorize "
                                  "(scope and select) objects. A Namespace joins a Project with the label "
                                  f"{objects.PROJECT_LABEL}."),
            "annotations": _string_map("Annotations is an unstructured key value map stored with a resource that "
                                       "may be set by external tools to store and retrieve arbitrary metadata."),
            "ownerReferences": array(ref(OWNER_REFERENCE), "List of objects depended by this object.",
                                     **patch_merge("uid")),
            "finalizers": array(string(""), "Must be empty before the object is deleted from the registry.",
                                **{"x-kubernetes-patch-strategy": "merge", "x-kubernetes-list-type": "set"}),
            "managedFields": array(ref(MANAGED_FIELDS_ENTRY), "ManagedFields maps workflow-id and version to the "
                                                              "set of fields that are managed by that workflow."),
            "selfLink": string("Deprecated: selfLink is a legacy read-only field that is no longer populated by "
                               "the system."),
        }),
    LIST_META: obj("ListMeta describes metadata that synthetic resources must have, including lists.", {
        "resourceVersion": string("String that identifies the server's internal version of this object that can be "
                                  "used by clients to determine when objects have changed; a watch starts from it."),
        "continue": string("continue may be set if the user set a limit on the number of items returned, and "
                           "indicates that the server has more data available."),
        "remainingItemCount": integer("The number of subsequent items in the list which are not included in this "
                                      "list response.", fmt="int64"),
        "selfLink": string("Deprecated: no longer populated by the system."),
    }),
    STATUS_DETAILS: obj("StatusDetails is a set of additional properties that MAY be set by the server to provide "
                        "additional information about a response.", {
                            "name": string("The name attribute of the resource associated with the status."),
                            "group": string("The group attribute of the resource associated with the status."),
                            "kind": string("The kind attribute of the resource associated with the status."),
                            "uid": string("UID of the resource."),
                            "causes": array(preserved("A cause of the error."), "The Causes array includes more "
                                                                                "details of the error."),
                            "retryAfterSeconds": integer("If specified, the time in seconds before the operation "
                                                         "should be retried."),
                        }),
    STATUS: obj("Status is a return value for calls that don't return other objects: every refusal, in "
                "Kubernetes' words.", {
                    "apiVersion": string(_API_VERSION),
                    "kind": string(_KIND),
                    "metadata": ref(LIST_META, "Standard list metadata."),
                    "status": string("Status of the operation. One of: \"Success\" or \"Failure\"."),
                    "message": string("A human-readable description of the status of this operation."),
                    "reason": string("A machine-readable description of why this operation is in the \"Failure\" "
                                     "status (NotFound, AlreadyExists, Conflict, Invalid, Forbidden, ...)."),
                    "details": ref(STATUS_DETAILS, "Extended data associated with the reason."),
                    "code": integer("Suggested HTTP return code for this status, 0 if not set."),
                }),
    WATCH_EVENT: obj("Event represents a single event to a watched resource.", {
        "type": string("ADDED, MODIFIED, DELETED, BOOKMARK or ERROR."),
        "object": preserved("Object is the object as it is now: the new state for ADDED and MODIFIED, the state "
                            "just before deletion for DELETED, a Status for ERROR."),
    }, required=("type", "object")),
    OBJECT_REFERENCE: obj("ObjectReference contains enough information to let you inspect or modify the referred "
                          "object.", {
                              "apiVersion": string("API version of the referent."),
                              "kind": string("Kind of the referent."),
                              "name": string("Name of the referent."),
                              "namespace": string("Namespace of the referent."),
                              "uid": string("UID of the referent."),
                              "resourceVersion": string("Specific resourceVersion to which this reference is made."),
                              "fieldPath": string("If referring to a piece of an object instead of an entire "
                                                  "object, this string should contain a valid JSON/Go field access "
                                                  "statement."),
                          }),
}


# -- the kinds ------------------------------------------------------------------------------------------------

def _hard(description: str) -> Schema:
    return map_of(ref(QUANTITY), description, keys=tuple(sorted(resources.SUPPORTED)))


_HARD_TEXT = ("hard is the set of desired hard limits for each named resource: limits.cpu, limits.memory, "
              "requests.cpu, requests.memory, cpu, memory, requests.storage, requests.instances/vmi, "
              "count/virtualmachines.kubevirt.io, count/virtualmachineinstances.kubevirt.io.")

_PROJECT = obj("A Project is a group of namespaces (those labelled vmquota.io/project: <project>) with an "
               "aggregate quota over all of them.", {
                   "spec": obj("The quotas of the project.", {
                       "resourceQuota": obj("The aggregate quota over all namespaces of the project.", {
                           "hard": _hard(_HARD_TEXT)}),
                       "namespaceDefaultResourceQuota": obj(
                           "Copied into each namespace that joins the project, as ResourceQuota \"default\".", {
                               "hard": _hard(_HARD_TEXT)}),
                   }),
                   "status": obj("Maintained by the server.", {
                       "used": map_of(ref(QUANTITY), "The sum of usage over the project's namespaces."),
                       "hard": map_of(ref(QUANTITY), "The enforced hard limits of the project's quota."),
                   }),
               })

_NAMESPACE = obj("Namespace provides a scope for Names. A namespace joins a Project with the label "
                 f"{objects.PROJECT_LABEL}: <project>.", {
                     "spec": obj("Spec defines the behavior of the Namespace.", {
                         "finalizers": array(string(""), "Finalizers is an opaque list of values that must be "
                                                         "empty to permanently remove object from storage."),
                     }),
                     "status": obj("Status describes the current status of a Namespace.", {
                         "phase": string("Phase is the current lifecycle phase of the namespace.",
                                         enum=("Active", "Terminating")),
                         "conditions": array(preserved("A namespace condition."),
                                             "Represents the latest available observations of a namespace's "
                                             "current state.", **patch_merge("type")),
                     }),
                 })

_SCOPE_SELECTOR = obj("scopeSelector is also a collection of filters like scopes that must match each object "
                      "tracked by a quota but expressed using ScopeSelectorOperator in combination with possible "
                      "values.", {
                          "matchExpressions": array(obj("A scoped-resource selector requirement.", {
                              "scopeName": string("The name of the scope that the selector applies to."),
                              "operator": string("Represents a scope's relationship to a set of values.",
                                                 enum=("In", "NotIn", "Exists", "DoesNotExist")),
                              "values": array(string(""), "An array of string values."),
                          }, required=("scopeName", "operator")), "A list of scope selector requirements by "
                                                                  "scope of the resources."),
                      })

_RESOURCE_QUOTA = obj("ResourceQuota sets aggregate quota restrictions enforced per namespace. vmquota charges "
                      "a VM's CPU and memory only while it holds a runtime; its disks and its count always.", {
                          "spec": obj("Spec defines the desired quota.", {
                              "hard": _hard(_HARD_TEXT),
                              "scopes": array(string(""), "A collection of filters that must match each object "
                                                          "tracked by a quota."),
                              "scopeSelector": _SCOPE_SELECTOR,
                          }),
                          "status": obj("Status defines the actual enforced quota and its current usage.", {
                              "hard": map_of(ref(QUANTITY), "Hard is the set of enforced hard limits for each "
                                                            "named resource."),
                              "used": map_of(ref(QUANTITY), "Used is the current observed total usage of the "
                                                            "resource in the namespace."),
                          }),
                      })

_EVENT = obj("Event is a report of an event somewhere in the cluster: here, what vmquota did to a VM or a quota "
             "and why.", {
                 "involvedObject": ref(OBJECT_REFERENCE, "The object that this event is about."),
                 "reason": string("This should be a short, machine understandable string that gives the reason for "
                                  "the transition into the object's current status."),
                 "message": string("A human-readable description of the status of this operation."),
                 "source": obj("The component reporting this event.", {
                     "component": string("Component from which the event is generated."),
                     "host": string("Node name on which the event is generated."),
                 }),
                 "firstTimestamp": ref(TIME, "The time at which the event was first recorded."),
                 "lastTimestamp": ref(TIME, "The time at which the most recent occurrence of this event was "
                                            "recorded."),
                 "eventTime": string("Time when this Event was first observed.", fmt="date-time"),
                 "count": integer("The number of times this event has occurred."),
                 "type": string("Type of this event (Normal, Warning), new types could be added in the future."),
                 "action": string("What action was taken/failed regarding to the Regarding object."),
                 "reportingComponent": string("Name of the controller that emitted this Event."),
                 "reportingInstance": string("ID of the controller instance."),
                 "related": ref(OBJECT_REFERENCE, "Optional secondary object for more complex actions."),
                 "series": preserved("Data about the Event series this event represents."),
             }, required=("metadata", "involvedObject"))

# KubeVirt's own words for the fields vmquota reads (kubevirt.io/api core/v1).
_COMPUTE = map_of(ref(QUANTITY), "", keys=("cpu", "memory"))
_VM_DOMAIN = obj("Specification of the desired behavior of the VirtualMachineInstance on the host.", {
    "cpu": obj("CPU allow specified the detailed CPU topology inside the vmi. vCPUs = sockets x cores x "
               "threads; a VM without resources.limits.cpu charges them as limits.cpu.", {
                   "cores": integer("Cores specifies the number of cores inside the vmi. Must be a value greater "
                                    "or equal 1.", minimum=1, fmt="int64"),
                   "sockets": integer("Sockets specifies the number of sockets inside the vmi. Must be a value "
                                      "greater or equal 1.", minimum=1, fmt="int64"),
                   "threads": integer("Threads specifies the number of threads inside the vmi. Must be a value "
                                      "greater or equal 1.", minimum=1, fmt="int64"),
                   "maxSockets": integer("MaxSockets specifies the maximum amount of sockets that can be "
                                         "hotplugged", fmt="int64"),
                   "model": string("Model specifies the CPU model inside the VMI. Defaults to host-model."),
                   "features": array(preserved("A CPU feature."), "Features specifies the CPU features list "
                                                                  "inside the VMI."),
                   "dedicatedCpuPlacement": boolean("DedicatedCPUPlacement requests the scheduler to place the "
                                                    "VirtualMachineInstance on a node with enough dedicated pCPUs "
                                                    "and pin the vCPUs to it."),
                   "isolateEmulatorThread": boolean("IsolateEmulatorThread requests one more dedicated pCPU to be "
                                                    "allocated for the VMI to place the emulator thread on it."),
                   "numa": preserved("NUMA allows specifying settings for the guest NUMA topology"),
                   "realtime": preserved("Realtime instructs the virt-launcher to tune the VMI for lower latency"),
               }),
    "memory": obj("Memory allow specifying the VMI memory features.", {
        "guest": ref(QUANTITY, "Guest allows to specifying the amount of memory which is visible inside the Guest "
                               "OS. The Guest must lie between Requests and Limits from the resources section. "
                               "Defaults to the requested memory in the resources section if not specified."),
        "maxGuest": ref(QUANTITY, "MaxGuest allows to specify the maximum amount of memory which is visible "
                                  "inside the Guest OS."),
        "hugepages": preserved("Hugepages allow to use hugepages for the VirtualMachineInstance instead of "
                               "regular memory."),
        "reservedOverhead": preserved("ReservedOverhead configures the memory overhead applied to a VM and its "
                                      "characteristics."),
    }),
    "resources": obj("Resources describes the Compute Resources required by this vmi. When set, they are what "
                     "the VM is charged.", {
                         "requests": Schema("object", "Requests is a description of the initial vmi resources. "
                                                      "Valid resource keys are \"memory\" and \"cpu\".",
                                            values=ref(QUANTITY), keys=("cpu", "memory")),
                         "limits": Schema("object", "Limits describes the maximum amount of compute resources "
                                                    "allowed. Valid resource keys are \"memory\" and \"cpu\".",
                                          values=ref(QUANTITY), keys=("cpu", "memory")),
                         "overcommitGuestOverhead": boolean("Don't ask the scheduler to take the guest-management "
                                                            "overhead into account. Defaults to false."),
                     }),
    "devices": obj("Devices allows adding disks, network interfaces, and others", {
        "disks": array(obj("A disk, cdrom or lun connected to the vmi.", {
            "name": string("Name is the device name"),
            "disk": preserved("Attach a volume as a disk to the vmi (bus: virtio, sata, scsi, usb)."),
            "cdrom": preserved("Attach a volume as a cdrom to the vmi."),
            "lun": preserved("Attach a volume as a LUN to the vmi."),
            "bootOrder": integer("BootOrder is an integer value > 0, used to determine ordering of boot devices. "
                                 "Lower values take precedence."),
            "serial": string("Serial provides the ability to specify a serial number for the disk device."),
            "cache": string("Cache specifies which kvm disk cache mode should be used."),
            "io": string("IO specifies which QEMU disk IO mode should be used."),
            "dedicatedIOThread": boolean("dedicatedIOThread indicates this disk should have an exclusive IO "
                                         "Thread."),
            "tag": string("If specified, disk address and its tag will be provided to the guest via config drive "
                          "metadata"),
            "blockSize": preserved("If specified, the virtual disk will be presented with the given block sizes."),
            "shareable": boolean("If specified the disk is made sharable and multiple write from different VMs "
                                 "are permitted"),
            "errorPolicy": string("If specified, it can change the default error policy (stop) for the disk"),
        }, required=("name",)), "Disks describes disks, cdroms and luns which are connected to the vmi."),
        "autoattachGraphicsDevice": boolean("Whether to attach the default graphics device or not. VNC will not be "
                                            "available if set to false. Defaults to true."),
        **{name: preserved(text) for name, text in (
            ("interfaces", "Interfaces describe network interfaces which are added to the vmi."),
            ("inputs", "Inputs describe input devices"),
            ("watchdog", "Watchdog describes a watchdog device which can be added to the vmi."),
            ("rng", "Whether to have random number generator from host"),
            ("gpus", "Whether to attach a GPU device to the vmi."),
            ("hostDevices", "Whether to attach a host device to the vmi."),
            ("filesystems", "Filesystems describes filesystem which is connected to the vmi."),
            ("tpm", "Whether to emulate a TPM device."),
            ("sound", "Whether to emulate a sound device."),
            ("video", "Video describes the video device configuration for the vmi."),
            ("clientPassthrough", "To configure and access client devices such as redirecting USB"),
            ("downwardMetrics", "DownwardMetrics creates a virtio serials for exposing the downward metrics to the "
                                "vmi."),
            ("panicDevices", "PanicDevices provides additional crash information when a guest crashes."),
        )},
        **{name: boolean(text) for name, text in (
            ("autoattachPodInterface", "Whether to attach a pod network interface. Defaults to true."),
            ("autoattachSerialConsole", "Whether to attach the default virtio-serial console or not. Defaults to "
                                        "true."),
            ("autoattachMemBalloon", "Whether to attach the Memory balloon device with default period."),
            ("autoattachInputDevice", "Whether to attach an Input Device. Defaults to false."),
            ("autoattachVSOCK", "Whether to attach the VSOCK CID to the VM or not. Defaults to false."),
            ("logSerialConsole", "Whether to log the auto-attached default serial console or not."),
            ("blockMultiQueue", "Whether or not to enable virtio multi-queue for block devices. Defaults to false."),
            ("networkInterfaceMultiqueue", "If specified, virtual network interfaces configured with a virtio bus "
                                           "will also enable the vhost multiqueue feature for network devices."),
            ("useVirtioTransitional", "Fall back to legacy virtio 0.9 support if virtio bus is selected on "
                                      "devices."),
            ("disableHotplug", "DisableHotplug disabled the ability to hotplug disks."),
        )},
    }),
    **{name: preserved(text) for name, text in (
        ("machine", "Machine type."),
        ("firmware", "Firmware."),
        ("clock", "Clock sets the clock and timers of the vmi."),
        ("features", "Features like acpi, apic, hyperv, smm."),
        ("ioThreads", "IOThreads specifies the IOThreads options."),
        ("chassis", "Chassis specifies the chassis info passed to the domain."),
        ("launchSecurity", "Launch Security setting of the vmi."),
    )},
    "ioThreadsPolicy": string("Controls whether or not disks will share IOThreads. One of: shared, auto, "
                              "supplementalPool"),
    "rebootPolicy": string("RebootPolicy specifies how the guest should behave on reboot."),
})

_VOLUME = obj("Volume represents a named volume in a vmi.", {
    "name": string("Volume's name. Must be a DNS_LABEL and unique within the vmi.", pattern=NAME_PATTERN),
    "dataVolume": obj("DataVolume represents the dynamic creation a PVC for this volume as well as the process "
                      "of populating that PVC with a disk image.", {
                          "name": string("Name of both the DataVolume and the PVC in the same namespace."),
                          "hotpluggable": boolean("Hotpluggable indicates whether the volume can be hotplugged "
                                                  "and hotunplugged."),
                      }, required=("name",)),
    **{name: preserved(text) for name, text in (
        ("cloudInitNoCloud", "CloudInitNoCloud represents a cloud-init NoCloud user-data source (userData, "
                             "userDataBase64, networkData)."),
        ("cloudInitConfigDrive", "CloudInitConfigDrive represents a cloud-init Config Drive user-data source."),
        ("containerDisk", "ContainerDisk references a docker image, embedding a qcow or raw disk."),
        ("persistentVolumeClaim", "PersistentVolumeClaimVolumeSource represents a reference to a "
                                  "PersistentVolumeClaim in the same namespace."),
        ("ephemeral", "Ephemeral is a special volume source that \"wraps\" specified source and provides "
                      "copy-on-write image on top of it."),
        ("emptyDisk", "EmptyDisk represents a temporary disk which shares the vmis lifecycle."),
        ("hostDisk", "HostDisk represents a disk created on the cluster level"),
        ("configMap", "ConfigMapSource represents a reference to a ConfigMap in the same namespace."),
        ("secret", "SecretVolumeSource represents a reference to a secret data in the same namespace."),
        ("serviceAccount", "ServiceAccountVolumeSource represents a reference to a service account."),
        ("sysprep", "Represents a Sysprep volume source."),
        ("downwardAPI", "DownwardAPI represents downward API about the pod that should populate this volume"),
        ("downwardMetrics", "DownwardMetrics adds a very small disk to VMIs which contains a limited view of host "
                            "and guest metrics."),
        ("memoryDump", "MemoryDump is attached to the virt launcher and is populated with a memory dump of the "
                       "vmi"),
    )},
}, required=("name",))

_VMI_SPEC = obj("VirtualMachineInstance Spec contains the VirtualMachineInstance specification.", {
    "domain": _VM_DOMAIN,
    "volumes": array(_VOLUME, "List of volumes that can be mounted by disks belonging to the vmi."),
    "terminationGracePeriodSeconds": integer("Grace period observed after signalling a VirtualMachineInstance to "
                                             "stop after which the VirtualMachineInstance is force terminated.",
                                             minimum=0, fmt="int64"),
    "networks": array(preserved("A network of the vmi (pod: {} or multus)."),
                      "List of networks that can be attached to a vm's virtual interface."),
    "nodeSelector": _string_map("NodeSelector is a selector which must be true for the vmi to fit on a node."),
    "hostname": string("Specifies the hostname of the vmi"),
    "subdomain": string("If specified, the fully qualified vmi hostname will be "
                        "\"<hostname>.<subdomain>.<pod namespace>.svc.<cluster domain>\"."),
    "evictionStrategy": string("EvictionStrategy describes the strategy to follow when a node drain occurs: None, "
                               "LiveMigrate, LiveMigrateIfPossible or External."),
    "startStrategy": string("StartStrategy can be set to \"Paused\" if Virtual Machine should be started in paused "
                            "state."),
    "priorityClassName": string("If specified, indicates the pod's priority."),
    "schedulerName": string("If specified, the VMI will be dispatched by specified scheduler."),
    "serviceAccountName": string("ServiceAccountName is the name of the ServiceAccount to use to run the "
                                 "virt-launcher pod."),
    "dnsPolicy": string("Set DNS policy for the pod. Defaults to \"ClusterFirst\"."),
    "architecture": string("Specifies the architecture of the vm guest you are attempting to run."),
    **{name: preserved(text) for name, text in (
        ("affinity", "If affinity is specifies, obey all the affinity rules"),
        ("tolerations", "If toleration is specified, obey all the toleration rules."),
        ("topologySpreadConstraints", "TopologySpreadConstraints describes how a group of VMIs will be spread "
                                      "across a given topology domains."),
        ("livenessProbe", "Periodic probe of VirtualMachineInstance liveness."),
        ("readinessProbe", "Periodic probe of VirtualMachineInstance service readiness."),
        ("dnsConfig", "Specifies the DNS parameters of a pod."),
        ("accessCredentials", "Specifies a set of public keys to inject into the vm guest"),
        ("resourceClaims", "ResourceClaims define which ResourceClaims must be allocated and reserved before the "
                           "VMI, hence virt-launcher pod is allowed to start."),
        ("utilityVolumes", "List of utility volumes that can be mounted to the vmi virt-launcher pod without having "
                           "a matching disk in the domain."),
    )},
})

def _claim(description: str) -> Schema:
    return obj(description, {
        "resources": obj("Resources represents the minimum resources the volume should have.", {
            "requests": Schema("object", "Requests describes the minimum amount of storage required: "
                                         "requests.storage is the disk's size.",
                               values=ref(QUANTITY), keys=("storage",)),
            "limits": map_of(ref(QUANTITY), "Limits describes the maximum amount of compute resources "
                                            "allowed."),
        }),
        "accessModes": array(string(""), "AccessModes contains the desired access modes the volume should "
                                         "have."),
        "storageClassName": string("Name of the StorageClass required by the claim."),
        "volumeMode": string("volumeMode defines what type of volume is required by the claim (Filesystem, "
                             "Block)."),
        "volumeName": string("VolumeName is the binding reference to the PersistentVolume backing this "
                             "claim."),
        "selector": preserved("A label query over volumes to consider for binding."),
        "dataSource": preserved("The source of the data to populate the volume with."),
        "dataSourceRef": preserved("The object from which to populate the volume with data."),
    })


_DATA_VOLUME_TEMPLATE = obj("A DataVolume the VM owns: a persistent disk made by the server when the VM is "
                            "created, charged in requests.storage whatever the VM's state.", {
    "apiVersion": string(_API_VERSION),
    "kind": string(_KIND),
    "metadata": obj("The DataVolume's metadata; its name is the one volumes[].dataVolume.name refers to.", {
        "name": string("The DataVolume's name, unique in the namespace.", pattern=NAME_PATTERN, max_length=63),
    }, preserve_unknown=True),
    "spec": obj("DataVolumeSpec contains the DataVolume specification.", {
        "storage": _claim("Storage is the requirements of the disk to be made: its size, "
                          "resources.requests.storage, is charged in requests.storage."),
        "pvc": _claim("PVC is the PVC specification; vmquota reads the disk's size from it when storage is not "
                      "given."),
        "source": preserved("Source is the src of the data for the requested DataVolume: http: {url}, blank: {}, "
                            "pvc: {namespace, name}."),
        **{name: preserved(text) for name, text in (
            ("sourceRef", "SourceRef is an indirect reference to the source of data for the requested DataVolume"),
            ("checkpoints", "Checkpoints is a list of DataVolumeCheckpoints, representing stages in a multistage "
                            "import."),
        )},
        "contentType": string("DataVolumeContentType options: \"kubevirt\", \"archive\""),
        "priorityClassName": string("PriorityClassName for Importer, Cloner and Uploader pod"),
        "preallocation": boolean("Preallocation controls whether storage for DataVolumes should be allocated in "
                                 "advance."),
        "finalCheckpoint": boolean("FinalCheckpoint indicates whether the current DataVolumeCheckpoint is the final "
                                   "checkpoint."),
    }),
    "status": preserved("DataVolumeTemplateDummyStatus is here simply for backwards compatibility with a previous "
                        "API."),
})

_RUN_STRATEGIES = ("Always", "RerunOnFailure", "Manual", "Halted", "Once")

_VIRTUAL_MACHINE = obj("VirtualMachine handles the VirtualMachines that are not running or are in a stopped "
                       "state. The VirtualMachine contains the template to create the VirtualMachineInstance. It "
                       "also mirrors the running state of the created VirtualMachineInstance in its status.", {
    "spec": obj("Spec contains the specification of VirtualMachineInstance created", {
        "runStrategy": string(
            "Running state indicates the requested running state of the VirtualMachineInstance mutually "
            "exclusive with Running Following are allowed values: - \"Always\": VMI should always be running. - "
            "\"Halted\": VMI should never be running. - \"Manual\": VMI can be started/stopped using API "
            "endpoints. - \"RerunOnFailure\": VMI will initially be running and restarted if a failure occurs, "
            "but will not be restarted upon successful completion. - \"Once\": VMI will run once and not be "
            "restarted upon completion regardless if the completion is of phase Failure or Success.",
            enum=_RUN_STRATEGIES),
        "running": boolean("Running controls whether the associatied VirtualMachineInstance is created or not "
                           "Mutually exclusive with RunStrategy Deprecated: VirtualMachineInstance field "
                           "\"Running\" is now deprecated, please use RunStrategy instead."),
        "template": obj("Template is the direct specification of VirtualMachineInstance", {
            "metadata": preserved("The metadata of the VirtualMachineInstances made from this template."),
            "spec": _VMI_SPEC,
        }),
        "dataVolumeTemplates": array(_DATA_VOLUME_TEMPLATE, "dataVolumeTemplates is a list of dataVolumes that "
                                                            "the VirtualMachineInstance template can reference. "
                                                            "DataVolumes in this list are dynamically created for "
                                                            "the VirtualMachine and are tied to the "
                                                            "VirtualMachine's life-cycle."),
        "instancetype": preserved("InstancetypeMatcher references a instancetype that is used to fill fields in "
                                  "Template"),
        "preference": preserved("PreferenceMatcher references a set of preference that is used to fill fields in "
                                "Template"),
        "updateVolumesStrategy": string("UpdateVolumesStrategy is the strategy to apply on volumes updates"),
    }),
    # Written by the server only; vmquota keeps its own bookkeeping beside KubeVirt's fields (phase, lastExit,
    # runningSince), so a body read back and sent again must never fail on them.
    "status": obj("Status holds the current state of the controller and brief information about its associated "
                  "VirtualMachineInstance", {
        "printableStatus": string("PrintableStatus is a human readable, high-level representation of the status "
                                  "of the virtual machine",
                                  enum=("Stopped", "Provisioning", "Starting", "Running", "Paused", "Stopping",
                                        "Terminating", "CrashLoopBackOff", "ErrorUnschedulable", "Unknown")),
        "ready": boolean("Ready indicates if the virtual machine is running and ready"),
        "created": boolean("Created indicates if the virtual machine is created in the cluster"),
        "conditions": array(obj("VirtualMachineCondition represents the state of VirtualMachine", {
            "type": string(""), "status": string(""), "reason": string(""), "message": string(""),
            "lastProbeTime": ref(TIME), "lastTransitionTime": ref(TIME),
        }, required=("type", "status")), "Hold the state information of the VirtualMachine and its "
                                         "VirtualMachineInstance"),
        "startFailure": obj("StartFailure tracks consecutive VMI startup failures for the purposes of crash loop "
                            "backoffs", {
                                "consecutiveFailCount": integer(""),
                                "retryAfterTimestamp": Schema("number", "When the next start may be tried, in "
                                                                        "seconds since the epoch (0: at once)."),
                                "lastFailedVMIUID": string(""),
                            }),
    }, preserve_unknown=True),
})

_CONDITIONS = array(obj("A condition of the object: its type, whether it holds, since when and why.", {
    "type": string(""), "status": string(""), "reason": string(""), "message": string(""),
    "lastProbeTime": ref(TIME), "lastTransitionTime": ref(TIME), "lastHeartbeatTime": ref(TIME),
}, required=("type", "status")), "Conditions of the object.")

MIGRATION_PHASES = ("Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running", "Succeeded",
                    "Failed")
_MIGRATION_STATE = obj("The state of a live migration, as the VMI and the migration show it.", {
    "sourceNode": string("The source node of the migration."),
    "targetNode": string("The target node of the migration."),
    "migrationUid": string("The VirtualMachineInstanceMigration object associated with this migration."),
    "startTimestamp": string("The time the migration action began.", fmt="date-time"),
    "endTimestamp": string("The time the migration action ended.", fmt="date-time"),
    "completed": boolean("Indicates the migration completed."),
    "failed": boolean("Indicates that the migration failed."),
    "abortRequested": boolean("Indicates that the migration has been requested to abort."),
    "abortStatus": string("Indicates the final status of the live migration abortion.",
                          enum=("Succeeded", "Failed", "Aborting")),
    "failureReason": string("Contains the reason why the migration failed."),
    "mode": string("Lets us know if the vmi is currently running pre or post copy migration."),
    "dataProcessedBytes": integer("How much of the guest's memory (and disks, when copied) has been sent.",
                                  fmt="int64"),
    "dataRemainingBytes": integer("How much is left to send.", fmt="int64"),
})

_VIRTUAL_MACHINE_INSTANCE_MIGRATION = obj(
    "VirtualMachineInstanceMigration is the live migration of a running VM to another node. The VM stays charged "
    "exactly once throughout; the target node's capacity is reserved while it runs. Deleting it cancels it.", {
        "spec": obj("The migration asked for.", {
            "vmiName": string("The name of the VMI to perform the migration on. VMI must exist in the migration "
                              "objects namespace", pattern=NAME_PATTERN, max_length=63),
            "addedNodeSelector": _string_map("AddedNodeSelector is an additional selector that can be used to "
                                             "complement a NodeSelector or NodeAffinity as set on the VM to "
                                             "restrict the set of allowed target nodes for a migration."),
        }, required=("vmiName",)),
        "status": obj("The migration's progress.", {
            "phase": string("The phase of the migration.", enum=MIGRATION_PHASES),
            "phaseTransitionTimestamps": array(preserved("A phase and when it was reached."),
                                               "PhaseTransitionTimestamp is the timestamp of when the last phase "
                                               "change occurred"),
            "migrationState": _MIGRATION_STATE,
            "conditions": _CONDITIONS,
        }),
    })

_VIRTUAL_MACHINE_INSTANCE = obj("VirtualMachineInstance is the running instance of a VirtualMachine: vmquota writes "
                                "one for each VM that holds a runtime, and removes it when the VM is off.", {
    "spec": _VMI_SPEC,
    "status": obj("Status is the high level overview of how the VirtualMachineInstance is doing.", {
        "phase": string("Phase is the status of the VirtualMachineInstance in kubernetes world.",
                        enum=("Pending", "Scheduling", "Scheduled", "Running", "Succeeded", "Failed", "Unknown")),
        "nodeName": string("NodeName is the name where the VirtualMachineInstance is currently running."),
        "conditions": _CONDITIONS,
        "interfaces": array(preserved("The interface's name, MAC and IP addresses."),
                            "Interfaces represent the details of available network interfaces."),
        "migrationState": _MIGRATION_STATE,
        "guestOSInfo": preserved("Guest OS Information"),
    }, preserve_unknown=True),
})

_NODE = obj("Node is a libvirt host that runs VMs: spec.providerID is its libvirt URI. vmquota maintains its "
            "status (capacity and allocatable from the host, the Ready condition from a heartbeat).", {
    "spec": obj("NodeSpec describes the attributes that a node is created with.", {
        "providerID": string("The libvirt URI of the host: qemu:///system, qemu+ssh://host/system, "
                             "qemu+tls://host/system or qemu+unix:///system?socket=PATH (test:///FILE for "
                             "simulated hosts)."),
        "unschedulable": boolean("Unschedulable controls node schedulability of new VMs (cordon)."),
        "taints": array(obj("The node this Taint is attached to has the \"effect\" on any VM that does not "
                            "tolerate the Taint (VMs tolerate none). node.kubernetes.io/out-of-service with "
                            "NoExecute confirms the host is off: its VMs are released.", {
            "key": string("Required. The taint key to be applied to a node."),
            "value": string("The taint value corresponding to the taint key."),
            "effect": string("Required. The effect of the taint on VMs that do not tolerate the taint.",
                             enum=("NoExecute", "NoSchedule", "PreferNoSchedule")),
            "timeAdded": string("TimeAdded represents the time at which the taint was added.", fmt="date-time"),
        }, required=("key", "effect")), "If specified, the node's taints."),
    }),
    "status": obj("NodeStatus is information about the current status of a node.", {
        "capacity": map_of(ref(QUANTITY), "Capacity represents the total resources of a node."),
        "allocatable": map_of(ref(QUANTITY), "Allocatable represents the resources of a node that are "
                                             "available for scheduling: capacity, less what is reserved, "
                                             "times the node's overcommit ratio."),
        "conditions": _CONDITIONS,
        "nodeInfo": preserved("Set of ids/uuids to uniquely identify the node."),
        "addresses": array(preserved("An address of the node."), "List of addresses reachable to the node."),
    }, preserve_unknown=True),
})

_CLONE_REF = obj("A typed reference to a VirtualMachine.", {
    "apiGroup": string("APIGroup is the group for the resource being referenced."),
    "kind": string("Kind is the type of resource being referenced: VirtualMachine."),
    "name": string("Name is the name of resource being referenced.", pattern=NAME_PATTERN, max_length=63),
}, required=("kind", "name"))

_VIRTUAL_MACHINE_CLONE = obj("VirtualMachineClone is a CRD that clones one VM into another: vmquota admits the "
                             "target against every quota first.", {
    "spec": obj("VirtualMachineCloneSpec defines the clone.", {
        "source": ref(TYPED_LOCAL_OBJECT_REFERENCE, "Source is the object that would be cloned. Currently "
                                                    "supported source types are: VirtualMachine"),
        "target": ref(TYPED_LOCAL_OBJECT_REFERENCE, "Target is the outcome of the cloning process. Currently "
                                                    "supported source types are: - VirtualMachine"),
        "annotationFilters": array(string(""), "Example use: \"!some/key*\"."),
        "labelFilters": array(string(""), "Example use: \"!some/key*\"."),
        "template": preserved("Filters for the VM template's labels and annotations."),
        "newMacAddresses": _string_map("NewMacAddresses manually sets that target interfaces' mac addresses."),
        "newSMBiosSerial": string("NewSMBiosSerial manually sets that target's SMbios serial."),
        "patches": array(string(""), "Patches holds JSON patches to apply to target."),
    }, required=("source", "target")),
    "status": obj("The clone's progress.", {
        "phase": string("Succeeded or Failed.", enum=("", "Succeeded", "Failed", "Unknown", "SnapshotInProgress",
                                                       "CreatingTargetVM", "RestoreInProgress")),
        "targetName": string("The name of the VM made."),
        "conditions": array(preserved("A condition."), ""),
    }, preserve_unknown=True),
}, required=("metadata", "spec"))

DEFINITIONS[TYPED_LOCAL_OBJECT_REFERENCE] = _CLONE_REF

# -- who may do what: ServiceAccounts and RBAC (rbac.authorization.k8s.io/v1), as Kubernetes describes them --

_SERVICE_ACCOUNT = obj("ServiceAccount binds together a name, understood by users and scripts, and a principal that "
                       "can be authenticated and authorized: system:serviceaccount:<namespace>:<name>. Its tokens "
                       "come from the token subresource (TokenRequest, `kubectl create token`).", {
                           "automountServiceAccountToken": boolean("Unused by vmquota; kept as written."),
                           "secrets": array(preserved("A reference to a Secret."), "Unused by vmquota."),
                       })


def _strings(description: str) -> Schema:
    return array(string(""), description)


_POLICY_RULE = obj("PolicyRule holds information that describes a policy rule, but does not contain information "
                   "about who the rule applies to or which namespace the rule applies to.", {
                       "verbs": _strings("Verbs is a list of Verbs that apply to ALL the ResourceKinds contained in "
                                         "this rule. '*' represents all verbs."),
                       "apiGroups": _strings("APIGroups is the name of the APIGroup that contains the resources. "
                                             "\"\" represents the core API group and \"*\" represents all API groups."),
                       "resources": _strings("Resources is a list of resources this rule applies to. '*' represents "
                                             "all resources; 'virtualmachines/start' a subresource."),
                       "resourceNames": _strings("ResourceNames is an optional white list of names that the rule "
                                                 "applies to. An empty set means that everything is allowed."),
                       "nonResourceURLs": _strings("NonResourceURLs is a set of partial urls that a user should have "
                                                   "access to. *s are allowed, but only as the full, final step."),
                   }, required=("verbs",))
_RULES = array(_POLICY_RULE, "Rules holds all the PolicyRules for this role.")
_ROLE = obj("Role is a namespaced, logical grouping of PolicyRules that can be referenced as a unit by a "
            "RoleBinding.", {"rules": _RULES})
_CLUSTER_ROLE = obj("ClusterRole is a cluster level, logical grouping of PolicyRules that can be referenced as a unit "
                    "by a RoleBinding or ClusterRoleBinding.", {
                        "rules": _RULES,
                        "aggregationRule": obj("AggregationRule is an optional field that describes how to build the "
                                               "Rules for this ClusterRole.", {
                                                   "clusterRoleSelectors": array(preserved("A label selector."),
                                                                                 "ClusterRoleSelectors holds a list "
                                                                                 "of selectors which will be used to "
                                                                                 "find ClusterRoles and create the "
                                                                                 "rules.")}),
                    })
_SUBJECT = obj("Subject contains a reference to the object or user identities a role binding applies to.", {
    "kind": string("Kind of object being referenced.", enum=("User", "Group", "ServiceAccount")),
    "name": string("Name of the object being referenced."),
    "namespace": string("Namespace of the referenced object (a ServiceAccount's)."),
    "apiGroup": string("APIGroup holds the API group of the referenced subject."),
}, required=("kind", "name"))
_ROLE_REF = obj("RoleRef contains information that points to the role being used. It cannot be changed.", {
    "apiGroup": string("APIGroup is the group for the resource being referenced."),
    "kind": string("Kind is the type of resource being referenced.", enum=("Role", "ClusterRole")),
    "name": string("Name is the name of resource being referenced."),
}, required=("apiGroup", "kind", "name"))
_BINDING_FIELDS = {"subjects": array(_SUBJECT, "Subjects holds references to the objects the role applies to."),
                   "roleRef": _ROLE_REF}
_ROLE_BINDING = obj("RoleBinding references a role, but does not contain it. It adds who information via Subjects "
                    "and namespace information by which namespace it exists in.", _BINDING_FIELDS,
                    required=("roleRef",))
_CLUSTER_ROLE_BINDING = obj("ClusterRoleBinding references a ClusterRole, but not contain it. It can reference a "
                            "ClusterRole in the global namespace, and adds who information via Subject.",
                            _BINDING_FIELDS, required=("roleRef",))

_KIND_BODIES: dict[str, Schema] = {
    objects.PROJECT.kind: _PROJECT,
    objects.NAMESPACE.kind: _NAMESPACE,
    objects.RESOURCE_QUOTA.kind: _RESOURCE_QUOTA,
    objects.VIRTUAL_MACHINE.kind: _VIRTUAL_MACHINE,
    objects.VIRTUAL_MACHINE_CLONE.kind: _VIRTUAL_MACHINE_CLONE,
    objects.EVENT.kind: _EVENT,
    objects.SERVICE_ACCOUNT.kind: _SERVICE_ACCOUNT,
    objects.ROLE.kind: _ROLE,
    objects.CLUSTER_ROLE.kind: _CLUSTER_ROLE,
    objects.ROLE_BINDING.kind: _ROLE_BINDING,
    objects.CLUSTER_ROLE_BINDING.kind: _CLUSTER_ROLE_BINDING,
    objects.NODE.kind: _NODE,
    objects.VIRTUAL_MACHINE_INSTANCE.kind: _VIRTUAL_MACHINE_INSTANCE,
    objects.VIRTUAL_MACHINE_INSTANCE_MIGRATION.kind: _VIRTUAL_MACHINE_INSTANCE_MIGRATION,
}


def definition_name(kind: Kind) -> str:
    """The name Kubernetes gives a kind's definition: `io.k8s.api.core.v1.ResourceQuota` for the core group,
    the group reversed for the others (`io.kubevirt.v1.VirtualMachine`), as kube-apiserver names CRDs."""
    if not kind.group:
        return f"io.k8s.api.core.{kind.version}.{kind.kind}"
    return ".".join([*reversed(kind.group.split(".")), kind.version, kind.kind])


def list_definition_name(kind: Kind) -> str:
    return definition_name(kind) + "List"


def kind_schema(kind: Kind) -> Schema:
    """The whole object of `kind`: apiVersion, kind and metadata beside the kind's own fields."""
    body = _KIND_BODIES[kind.kind]
    return Schema("object", body.description, {
        "apiVersion": string(_API_VERSION),
        "kind": string(_KIND),
        "metadata": ref(OBJECT_META, _METADATA),
        **body.properties,
    }, required=body.required)


def list_schema(kind: Kind) -> Schema:
    return obj(f"{kind.kind}List is a list of {kind.kind} objects.", {
        "apiVersion": string(_API_VERSION),
        "kind": string(_KIND),
        "metadata": ref(LIST_META, "Standard list metadata."),
        "items": array(ref(definition_name(kind)), f"The {kind.plural}."),
    }, required=("items",))


def resolve(node: Schema) -> Schema:
    """A shared definition's own schema for a reference; any other node as it is."""
    return DEFINITIONS[node.ref] if node.ref else node


# -- fieldValidation ------------------------------------------------------------------------------------------

IGNORE, WARN, STRICT = "Ignore", "Warn", "Strict"
DEFAULT_FIELD_VALIDATION = WARN  # kube-apiserver's default since 1.27, when a request names none


def unknown_fields(kind: Kind, body: Any, *, merge_patch: bool = False) -> list[str]:
    """The fields of `body` the schema of `kind` does not know, as Kubernetes names them (`spec.foo`,
    `spec.template.spec.volumes[0].bar`), in the order they appear. Values of the wrong type are not looked into:
    that is validation's to refuse. In a merge patch, a null removes a field: removing an unknown one is fine."""
    return list(_unknown(kind_schema(kind), body, "", merge_patch))


def _unknown(node: Schema, value: Any, path: str, merge_patch: bool) -> Iterator[str]:
    node = resolve(node)
    if node.preserve_unknown and not node.properties:
        return
    if isinstance(value, dict) and node.type == "object":
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if key in node.properties:
                yield from _unknown(node.properties[key], item, child, merge_patch)
            elif node.values is not None:
                yield from _unknown(node.values, item, child, merge_patch)
            elif not node.preserve_unknown and not (merge_patch and item is None):
                yield child
    elif isinstance(value, list) and node.items is not None:
        for index, item in enumerate(value):
            # A merge patch replaces a list whole: its elements are plain values again.
            yield from _unknown(node.items, item, f"{path}[{index}]", False)


class _Keys(dict[str, Any]):
    """A parsed JSON or YAML object that remembers the keys it held more than once."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__()
        self.repeated: list[str] = []
        for key, value in pairs:
            if key in self and key not in self.repeated:
                self.repeated.append(key)
            self[key] = value


class _DuplicateKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping keeps note of its repeated keys instead of silently keeping the last."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Keys:
    loader.flatten_mapping(node)
    return _Keys([(loader.construct_object(k, deep=True), loader.construct_object(v, deep=True))
                  for k, v in node.value])


_DuplicateKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def duplicate_fields(raw: bytes, content_type: str = "application/json") -> list[str]:
    """The fields a JSON or YAML body names twice in one object (`spec.runStrategy`). A body that does not parse
    has none: parsing it is refused elsewhere, with its own message."""
    try:
        if "yaml" in content_type:
            parsed = yaml.load(raw.decode("utf-8"), Loader=_DuplicateKeyLoader)  # a SafeLoader: no arbitrary objects
        else:
            parsed = json.loads(raw, object_pairs_hook=_Keys)
    except (ValueError, RecursionError, yaml.YAMLError):
        return []
    return list(_repeated(parsed, ""))


def _repeated(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, dict):
        for key in getattr(value, "repeated", ()):
            yield f"{path}.{key}" if path else str(key)
        for key, item in value.items():
            yield from _repeated(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _repeated(item, f"{path}[{index}]")


def check_fields(kind: Kind, body: Any, mode: str | None, warnings: list[str], *, raw: bytes = b"",
                 content_type: str = "application/json", merge_patch: bool = False) -> None:
    """Kubernetes' `fieldValidation` for a write of `body` (parsed from `raw`, when given, for duplicate keys).

    Strict: a 400 BadRequest naming every unknown and duplicate field, as kube-apiserver words it; Warn (the
    default): one warning each, appended to `warnings` (they become `Warning: 299` headers), and the request
    goes on; Ignore: nothing. Any other value is a 400. Unknown fields are never dropped here: the contract keeps
    them. `merge_patch`: `body` is a JSON merge patch (or a strategic one), whose nulls remove fields.
    """
    mode = DEFAULT_FIELD_VALIDATION if mode in (None, "") else mode
    if mode not in (IGNORE, WARN, STRICT):
        raise errors.BadRequest(f'fieldValidation: Unsupported value: "{mode}": supported values: '
                                f'"", "Ignore", "Strict", "Warn"')
    if mode == IGNORE:
        return
    # Quoted with only ASCII in the result (as Go's strconv.QuoteToASCII): each problem may become an HTTP header.
    problems = [f"duplicate field {json.dumps(path)}" for path in (duplicate_fields(raw, content_type) if raw else [])]
    problems += [f"unknown field {json.dumps(path)}" for path in unknown_fields(kind, body, merge_patch=merge_patch)]
    if not problems:
        return
    if mode == STRICT:
        raise errors.BadRequest(f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}: '
                                f'strict decoding error: {", ".join(problems)}')
    warnings.extend(problems)
