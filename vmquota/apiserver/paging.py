"""Paged lists: `limit` and `continue`, pages of one consistent snapshot, as Kubernetes serves them.

The first page of a list is read at the store's newest resourceVersion S; its `metadata.continue` token names S
and the last key returned, and every later page is read as the objects were at S (`Reader.bodies_at`: the
objects unchanged since, and the `previous` body of the first logged change after S of the others), however
many writes happen between pages. `metadata.remainingItemCount` says how many items follow, unless a selector
filters the list (Kubernetes cannot count those without reading them, and says nothing).

A token is Kubernetes' own shape: unpadded URL-safe base64 of `{"v": "meta.k8s.io/v1", "rv": S, "start":
"<key>\\u0000"}`, the key being `namespace/name` (`name` for a cluster-scoped kind). A malformed one is a 400
"invalid continue token: ..."; one whose S the change log no longer reaches is kube-apiserver's 410 Expired,
which carries a token that goes on from the same key at the newest resourceVersion (`rv` -1), for a client
that accepts an inconsistent rest.

Neighbours: `handlers.py` calls `list_page` when a list has `limit` or `continue`; `watch.py` reads the
current state the same way.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass

from vmquota import errors
from vmquota.apiserver.request import Request
from vmquota.objects import Kind, Obj
from vmquota.store import Store

TOKEN_VERSION = "meta.k8s.io/v1"
LATEST = -1  # a token's rv that means "at the newest resourceVersion": an inconsistent continuation
_INCONSISTENT = ("The provided continue parameter is too old to display a consistent list result. You can start "
                 "a new list without the continue parameter, or use the continue token in this response to "
                 "retrieve the remainder of the results. Continuing with the provided token results in an "
                 "inconsistent list - objects that were created, modified, or deleted between the time the first "
                 "chunk was returned and now may show up in the list.")

Predicate = Callable[[Obj], bool]


@dataclass(frozen=True)
class Continue:
    """A decoded continue token: the snapshot's resourceVersion (LATEST: none) and the last key returned."""
    resource_version: int
    after: tuple[str, str]  # (namespace, name); namespace "" for a cluster-scoped kind


@dataclass(frozen=True)
class Options:
    limit: int  # 0: no limit
    token: Continue | None


EXACT, NOT_OLDER_THAN = "Exact", "NotOlderThan"
_TOO_OLD = "The resourceVersion for the provided list is too old."


class TooLargeResourceVersion(errors.ApiError):
    """504: a list asked for a resourceVersion this server has not reached, as kube-apiserver's watch cache
    answers it (it waits up to 3 s for its cache first; vmquota's store has no cache to lag behind)."""
    code = 504
    reason = "Timeout"

    def __init__(self, version: int, current: int) -> None:
        super().__init__(f"Too large resource version: {version}, current: {current}")

    def status(self) -> dict[str, object]:
        body = super().status()
        body["details"] = {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                           "retryAfterSeconds": 1}
        return body


@dataclass(frozen=True)
class ListVersion:
    """What a list's `resourceVersion` and `resourceVersionMatch` ask for (Kubernetes' "semantics for get and
    list"): the list as it was at `exact`, or the newest list, which must be at least `not_older_than`."""
    exact: int | None = None
    not_older_than: int | None = None


def list_version(request: Request, parse: Callable[[str | None], int | None]) -> ListVersion:
    """A list request's resourceVersion options, checked as kube-apiserver checks them (ValidateListOptions:
    422 Invalid, every problem named; a version with a continue token: 400). Unset or "0": the newest. N with
    NotOlderThan, or with neither a match nor a limit: the newest, if it is at least N. N with Exact, or with a
    limit and no match (the legacy rule for paged lists): the list as it was at N. `parse` reads N."""
    text, match = request.param("resourceVersion") or "", request.param("resourceVersionMatch") or ""
    problems = []
    if match:
        if not text:
            problems.append("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion "
                            "is provided")
        if request.param("continue"):
            problems.append("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is "
                            "provided")
        if match not in (EXACT, NOT_OLDER_THAN):
            problems.append(f'resourceVersionMatch: Unsupported value: {json.dumps(match[:80])}: supported values: '
                            f'"{EXACT}", "{NOT_OLDER_THAN}", ""')
        if match == EXACT and text == "0":
            problems.append('resourceVersionMatch: Forbidden: resourceVersionMatch "exact" is forbidden for '
                            'resourceVersion "0"')
    if request.param("sendInitialEvents") is not None:
        problems.append("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list")
    if problems:
        listed = problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
        raise errors.Invalid(f'ListOptions.meta.k8s.io "" is invalid: {listed}')
    if request.param("continue") and text not in ("", "0"):
        raise errors.BadRequest("specifying resource version is not allowed when using continue")
    version = parse(text)
    if version is None:
        return ListVersion()
    if match == EXACT or (not match and request.param("limit") not in (None, "", "0")):
        return ListVersion(exact=version)
    return ListVersion(not_older_than=version)


def check_not_older_than(store: Store, version: ListVersion) -> None:
    """TooLargeResourceVersion when the store has not reached what a NotOlderThan list asks for."""
    if version.not_older_than is not None and version.not_older_than > (newest := store.revision):
        raise TooLargeResourceVersion(version.not_older_than, newest)


def options(request: Request) -> Options:
    limit_text = request.param("limit") or "0"
    try:
        limit = int(limit_text)
    except ValueError:
        raise errors.BadRequest(f'limit: Invalid value: "{limit_text[:40]}": must be a whole number') from None
    if limit < 0:
        raise errors.BadRequest("limit: Invalid value: must not be negative")
    token_text = request.param("continue")
    return Options(limit, decode(token_text) if token_text else None)


def encode(resource_version: int, kind: Kind, after: tuple[str, str]) -> str:
    key = f"{after[0]}/{after[1]}" if kind.namespaced else after[1]
    raw = json.dumps({"v": TOKEN_VERSION, "rv": resource_version, "start": key + "\x00"}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()


def decode(text: str) -> Continue:
    """A continue token this server made, or BadRequest in Kubernetes' words."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        token = json.loads(raw)
    except (binascii.Error, ValueError) as e:
        raise _invalid(f"continue key is not valid: {e}") from None
    if not isinstance(token, dict):
        raise _invalid("continue key is not valid")
    if token.get("v") != TOKEN_VERSION:
        raise _invalid("continue key is not valid: server does not recognize this encoded version")
    rv, start = token.get("rv"), token.get("start")
    if isinstance(rv, bool) or not isinstance(rv, int) or rv == 0 or rv < LATEST:
        raise _invalid(f"continue key is not valid: incorrect encoded start resourceVersion (version {TOKEN_VERSION})")
    if not isinstance(start, str) or not start.rstrip("\x00"):
        raise _invalid(f"continue key is not valid: encoded start key empty (version {TOKEN_VERSION})")
    key = start[:-1] if start.endswith("\x00") else start
    namespace, _, name = key.rpartition("/")
    if not name or "/" in namespace or "\x00" in key:
        raise _invalid(f"continue key is not valid: {key[:80]!r}")
    return Continue(rv, (namespace, name))


def _invalid(why: str) -> errors.BadRequest:
    return errors.BadRequest(f"invalid continue token: {why}")


@dataclass(frozen=True)
class Page:
    """One page of a list: its items' JSON text and the List's metadata."""
    items: list[str]
    resource_version: str
    continue_token: str | None
    remaining: int | None


def list_page(store: Store, kind: Kind, namespace: str | None, opts: Options, *,
              predicate: Predicate | None = None) -> bytes:
    """One page of a kind's List (JSON) as of the snapshot its token names (the newest for a first page)."""
    return list_json(kind, read_page(store, kind, namespace, opts, predicate=predicate))


def list_json(kind: Kind, page: Page) -> bytes:
    """A page as the kind's List."""
    metadata: Obj = {"resourceVersion": page.resource_version}
    if page.continue_token:
        metadata["continue"] = page.continue_token
        if page.remaining is not None:
            metadata["remainingItemCount"] = page.remaining
    head = json.dumps({"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": metadata})
    return f'{head[:-1]}, "items": [{",".join(page.items)}]}}'.encode()


def read_page(store: Store, kind: Kind, namespace: str | None, opts: Options, *,
              predicate: Predicate | None = None, exact: int | None = None) -> Page:
    """One page of a kind's objects as of the snapshot its token names (the newest for a first page, or `exact`,
    a list's resourceVersion with Exact): the List's items, or a Table's (tables.py) rows to be."""
    token = opts.token
    after = token.after if token else ("", "")
    if token is not None and kind.namespaced and namespace is not None and after[0] != namespace:
        raise _invalid("continue key is not valid: it belongs to another namespace's list")
    if token is not None and not kind.namespaced and after[0]:
        raise _invalid("continue key is not valid: it belongs to a namespaced list")
    reader = store.reader()
    with reader.snapshot():
        newest = reader.revision()
        at = newest if token is None or token.resource_version == LATEST else token.resource_version
        if exact is not None:  # a first page (a continue token and a resourceVersion are refused together)
            if exact > newest:
                raise TooLargeResourceVersion(exact, newest)
            if exact < reader.pruned():
                raise errors.Expired(_TOO_OLD)
            at = exact
        if at > newest:
            raise _invalid("continue key is not valid: its resourceVersion is not one of this server's")
        if at < reader.pruned():
            raise errors.Expired(_INCONSISTENT, continue_token=encode(LATEST, kind, after))
        items: list[str] = []
        last, more = after, False
        for ns, name, body in reader.bodies_at(kind, namespace, at, after=after):
            if predicate is not None and not predicate(json.loads(body)):
                continue
            if opts.limit and len(items) == opts.limit:
                more = True
                break
            items.append(body)
            last = (ns, name)
        remaining = reader.count_at(kind, namespace, at, after=last) if more and predicate is None else None
    # After a LATEST token, consistent from here on.
    return Page(items, str(at), encode(at, kind, last) if more else None, remaining if more else None)
