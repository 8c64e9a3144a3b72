"""cloud-init seeds: a VM's cloudInitNoCloud or cloudInitConfigDrive volume as the ISO 9660 image cloud-init reads.

Bottom layer, beside `disks.py`, which places the file. The ISO is written by pycdlib, in Python: what the user
wrote is only ever the content of files whose names are fixed here, so no user data reaches a path, a command
line or the domain XML. Sizes are bounded by `vmspec` (each part at most `vmspec.MAX_CLOUD_INIT_BYTES`).

* NoCloud: volume label `cidata`, files `user-data`, `meta-data` and (if given) `network-config`.
* Config drive: volume label `config-2`, files `openstack/latest/user_data`, `meta_data.json` and (if given)
  `network_data.json`, as OpenStack's config drive, which cloud-init's ConfigDrive source reads.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pycdlib

from vmquota.vmspec import CloudInit, SeedKind


def files(seed: CloudInit, *, uid: str, hostname: str) -> dict[str, bytes]:
    """The seed's files, by their path inside the ISO."""
    if seed.kind is SeedKind.NO_CLOUD:
        found = {"user-data": seed.user_data,
                 "meta-data": f"instance-id: {uid}\nlocal-hostname: {hostname}\n".encode()}
        if seed.network_data is not None:
            found["network-config"] = seed.network_data
        return found
    meta = {"uuid": uid, "instance_id": uid, "hostname": hostname, "name": hostname}
    found = {"openstack/latest/meta_data.json": json.dumps(meta).encode(),
             "openstack/latest/user_data": seed.user_data}
    if seed.network_data is not None:
        found["openstack/latest/network_data.json"] = seed.network_data
    return found


def label(seed: CloudInit) -> str:
    return "cidata" if seed.kind is SeedKind.NO_CLOUD else "config-2"


def write(seed: CloudInit, target: Path, *, uid: str, hostname: str) -> None:
    """Write the seed ISO to `target` (through a temporary file renamed over it: a running domain never sees a
    half-written seed)."""
    iso = pycdlib.PyCdlib()
    # Rock Ridge and Joliet carry the real (lower-case, long) names; ISO 9660 level 3 names are only a fallback.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label(seed))
    iso_dirs = {"": ""}  # a directory's path in the seed -> its short ISO 9660 path
    for index, (path, content) in enumerate(sorted(files(seed, uid=uid, hostname=hostname).items())):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            directory, parent = "/".join(parts[:depth]), "/".join(parts[:depth - 1])
            if directory not in iso_dirs:
                iso_dirs[directory] = f"{iso_dirs[parent]}/D{len(iso_dirs)}"
                iso.add_directory(iso_dirs[directory], rr_name=parts[depth - 1], joliet_path=f"/{directory}")
        iso_path = f"{iso_dirs['/'.join(parts[:-1])]}/F{index}.;1"
        iso.add_fp(io.BytesIO(content), len(content), iso_path, rr_name=parts[-1], joliet_path=f"/{path}")
    partial = target.with_suffix(".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("wb") as out:
        iso.write_fp(out)
        out.flush()
        os.fsync(out.fileno())
    iso.close()
    partial.rename(target)
