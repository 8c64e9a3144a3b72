"""The upload endpoint: a disk image in the request body, streamed into an upload data volume's disk.

`POST /apis/upload.cdi.kubevirt.io/v1beta1/namespaces/{ns}/datavolumes/{name}/upload`, with the raw image as
the body and its `Content-Length` (CDI's upload proxy takes the same body at `/v1beta1/upload`). Like every
path it passes authentication and authorization first: RBAC's verb `create` on `datavolumes/upload` in API
group `upload.cdi.kubevirt.io`, which the `edit` and `admin` roles hold (CDI gives them `create` on
`uploadtokenrequests` in the same group, the token that lets a client reach its upload proxy: here the user's
own credentials are the token). Only then is the body read, by `Api.upload`, never held in memory.

`http.py` asks `streams(method, path)` before it reads a body: for this path it hands the handler the open
connection as `Request.body_stream` instead, and drops (then closes) whatever the handler did not read.
"""

from __future__ import annotations

import re

from vmquota import errors
from vmquota.api import Api
from vmquota.apiserver.request import Request, Response

GROUP, VERSION = "upload.cdi.kubevirt.io", "v1beta1"
RESOURCE, SUBRESOURCE = "datavolumes", "upload"
_PATH = re.compile(rf"^/apis/{re.escape(GROUP)}/{VERSION}/namespaces/[^/]+/{RESOURCE}/[^/]+/{SUBRESOURCE}/?$")


def path(namespace: str, data_volume: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{RESOURCE}/{data_volume}/{SUBRESOURCE}"


def streams(method: str, request_path: str) -> bool:
    """Whether this request's body is an image to stream, not a document to read whole."""
    return method in ("POST", "PUT") and _PATH.match(request_path) is not None


def handle(api: Api, request: Request, namespace: str, data_volume: str, *, dry_run: bool) -> Response:
    if request.method not in ("POST", "PUT"):
        raise errors.MethodNotAllowed("only POST (or PUT) of the image is supported here")
    body = request.body_stream
    if body is None:  # only a request `streams` named has one; anything else reached here by mistake
        raise errors.BadRequest("the upload must be the request body, with a Content-Length")
    return Response.json(200, api.upload(namespace, data_volume, body, body.length, dry_run=dry_run))
