"""KubeVirt's streaming subresources: a guest's serial console and its ports, over websockets, as virtctl uses them.

    GET /apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachineinstances/{name}/console
    GET .../virtualmachineinstances/{name}/portforward/{port}[/tcp]
    GET .../virtualmachines/{name}/portforward/{port}[/tcp]       (virtctl port-forward vm/NAME)

Called by `handlers.py`, behind the whole filter chain like any request: authentication, audit, and
authorization of verb `get` on `virtualmachineinstances/console` or `.../portforward` (KubeVirt's roles grant
them to admin and edit). As KubeVirt's virt-api does, the VMI is looked up and the guest's end opened before the
websocket handshake is answered, so every refusal is a plain Status with KubeVirt's words:
- no VMI (the VM is stopped, or does not exist): 404 `virtualmachineinstance.kubevirt.io "NAME" not found`;
- a console of a VMI that does not run yet: 400 `VMI is not running` (virtctl console retries on a 400 until
  its --timeout, so `vmquota start` followed at once by `virtctl console` works);
- a port forward to a paused VMI: 409 `VMI is paused`; to a stopped VM: 409 `VMI is not started`;
- a port that is not 1-65535, or a protocol but tcp: 400;
- a request that is not a websocket handshake (version 13, with a key): 400, in gorilla/websocket's words.
Once accepted (101, subprotocol `plain.kubevirt.io` when offered), `vmquota.tunnel` carries the bytes until either
side ends. Each session holds its connection's thread and one more; it is not counted against the in-flight
limit, which ends when the handshake is answered.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any

from wsproto.connection import Connection, ConnectionType
from wsproto.utilities import generate_accept_token

from vmquota import errors, objects, tunnel
from vmquota.api import Api
from vmquota.apiserver.request import Headers, Request, Response, Takeover
from vmquota.apiserver.routing import Route
from vmquota.objects import Obj

log = logging.getLogger(__name__)

CONSOLE, PORT_FORWARD = objects.VMI_STREAMS
PROTOCOLS = ("tcp",)  # KubeVirt takes udp too; QEMU's user-mode network forwards it, vmquota does not (yet)

_VMI = "virtualmachineinstance.kubevirt.io"  # KubeVirt names the resource in the singular in these refusals
_VM = "virtualmachine.kubevirt.io"


@dataclass(frozen=True)
class Target:
    """What a streaming path asks for: the VMI (or the VM, for `vm/NAME` port forwards) and the guest's port."""
    namespace: str
    name: str
    subresource: str  # console or portforward
    port: int | None = None  # for portforward
    by_vm: bool = False  # the path names the VirtualMachine, not its instance


def target(route: Route) -> Target:
    """The port and protocol segments after `portforward`, checked; BadRequest as KubeVirt words it."""
    assert route.namespace is not None and route.name is not None and route.subresource in objects.VMI_STREAMS
    by_vm = route.kind is objects.VIRTUAL_MACHINE
    if route.subresource == CONSOLE:
        if route.extra:
            raise errors.NotFound("the server could not find the requested resource")
        return Target(route.namespace, route.name, CONSOLE)
    if not route.extra or len(route.extra) > 2:
        raise errors.NotFound("the server could not find the requested resource")
    port = _port(route.extra[0])
    if len(route.extra) == 2 and route.extra[1] not in PROTOCOLS:
        raise errors.BadRequest(f"unsupported protocol {route.extra[1][:20]!r}: only tcp is forwarded")
    return Target(route.namespace, route.name, PORT_FORWARD, port, by_vm)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        raise errors.BadRequest(f"invalid port {text[:20]!r}: a port is a number from 1 to 65535")
    return int(text)


def serve(api: Api, request: Request, route: Route) -> Response:
    """Check the request, open the guest's end, and answer 101 with a session that runs on the connection."""
    if request.method != "GET":
        raise errors.MethodNotAllowed("only GET is supported here: a websocket handshake")
    wanted = target(route)
    vm = _instance(api, wanted)
    key = _handshake_key(request.headers)
    protocol = _subprotocol(request.headers)
    end = _open(api, wanted, vm)
    headers = {"Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Accept": generate_accept_token(key.encode()).decode()}
    if protocol:
        headers["Sec-WebSocket-Protocol"] = protocol
    return Response(101, Session(end, f"{wanted.namespace}/{wanted.name} {wanted.subresource}"), headers=headers)


# -- the VMI, as KubeVirt's virt-api fetches and checks it ------------------------------------------------------

def _instance(api: Api, wanted: Target) -> Obj:
    """The running VMI's VM, or the refusal KubeVirt gives."""
    reader = api.store.reader()
    vm = reader.get(objects.VIRTUAL_MACHINE, wanted.namespace, wanted.name)
    if wanted.by_vm:
        if vm is None:
            raise errors.NotFound(f'{_VM} "{wanted.name}" not found')
        if not (vm.get("status") or {}).get("created"):
            raise errors.Conflict(f'Operation cannot be fulfilled on {_VM} "{wanted.name}": VMI is not started')
    vmi = reader.get(objects.VIRTUAL_MACHINE_INSTANCE, wanted.namespace, wanted.name)
    if vmi is None or vm is None:
        raise errors.NotFound(f'{_VMI} "{wanted.name}" not found')
    status = vmi.get("status") or {}
    if wanted.subresource == CONSOLE and status.get("phase") != "Running":
        raise errors.BadRequest("VMI is not running")
    if wanted.subresource == PORT_FORWARD and any(
            c.get("type") == "Paused" and c.get("status") == "True" for c in status.get("conditions") or []):
        raise errors.Conflict(f'Operation cannot be fulfilled on {_VMI} "{wanted.name}": VMI is paused')
    return vm


def _open(api: Api, wanted: Target, vm: Obj) -> tunnel.End:
    """The guest's console or a connection to its port; the controller checks the VM's phase once more (it may
    have stopped meanwhile) and which ports its interface lets through."""
    try:
        if wanted.subresource == CONSOLE:
            return api.controller.open_console(wanted.namespace, wanted.name)
        assert wanted.port is not None
        return tunnel.SocketEnd(api.controller.open_port(wanted.namespace, wanted.name, wanted.port))
    except errors.HypervisorUnavailable:
        raise
    except errors.HypervisorError as e:
        # KubeVirt's words when virt-api cannot reach the guest ("dialing VM: ..."), as a 500 with the reason.
        raise errors.ApiError(f"dialing VM: {e}") from e


# -- the websocket handshake (RFC 6455), checked as gorilla/websocket checks it for virt-api -------------------

def _tokens(headers: Headers, name: str) -> list[str]:
    return [token.strip().lower() for token in (headers.get(name) or "").split(",")]


def _handshake_key(headers: Headers) -> str:
    prefix = "websocket: the client is not using the websocket protocol: "
    if "upgrade" not in _tokens(headers, "Connection"):
        raise errors.BadRequest(prefix + "'upgrade' token not found in 'Connection' header")
    if "websocket" not in _tokens(headers, "Upgrade"):
        raise errors.BadRequest(prefix + "'websocket' token not found in 'Upgrade' header")
    if "13" not in _tokens(headers, "Sec-WebSocket-Version"):
        raise errors.BadRequest("websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header")
    key = (headers.get("Sec-WebSocket-Key") or "").strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise errors.BadRequest("websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 "
                                "encoded value of 16-byte in length")
    return key


def _subprotocol(headers: Headers) -> str | None:
    """KubeVirt's plain subprotocol when the client offers it (virtctl always does); none otherwise."""
    offered = [token.strip() for token in (headers.get("Sec-WebSocket-Protocol") or "").split(",")]
    return tunnel.PLAIN_PROTOCOL if tunnel.PLAIN_PROTOCOL in offered else None


# -- the session --------------------------------------------------------------------------------------------

class Session(Takeover):
    """One websocket between a client and a guest's end, for as long as both last."""

    def __init__(self, end: tunnel.End, what: str) -> None:
        self.end = end
        self.what = what

    def run(self, connection: Any) -> None:
        log.info("streaming %s", self.what)
        try:
            tunnel.pump(connection, Connection(ConnectionType.SERVER), self.end)
        except Exception:  # the connection is closed after this either way; the reason goes to the log
            log.exception("the stream of %s failed", self.what)
        log.info("stream of %s ended", self.what)

    def abandon(self) -> None:
        self.end.close()
