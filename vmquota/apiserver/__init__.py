"""vmquota's Kubernetes API server, in the spirit of k8s.io/apiserver: the wire, a chain of filters, handlers.

    http.py        the wire: requests in, responses out (streamed for watches)
    filters.py     the chain before any handler (errors as Status; authentication and authorization later)
    handlers.py    fixed paths and Kubernetes' verbs on the served kinds, each one `Api` call
    routing.py     paths to kinds, namespaces, names and subresources
    discovery.py   /version, /api, /apis and per-group-version discovery, legacy and aggregated (v2)
    openapi.py     /openapi/v2, /openapi/v3 and /openapi.json, rendered from `vmquota.schema`
    openapi_pb.py  OpenAPI v2 in gnostic's protobuf, the form client-go asks for
    selectors.py   labelSelector and fieldSelector: a predicate, and conditions the store evaluates
    tables.py      meta.k8s.io Tables (what kubectl get prints) and PartialObjectMetadata, by the Accept header
    request.py     Request and Response, plain data
    bodies.py      request bodies to plain JSON values
    dashboard.py   GET / and /ui/...: the web dashboard's files (`vmquota.dashboard`), public, under a strict CSP

Top layer: it imports `vmquota.api` and the pure modules below it, and nothing imports it but `app` and
`workers`.
"""

from vmquota.apiserver.http import Server, serve, serve_on

__all__ = ["Server", "serve", "serve_on"]
