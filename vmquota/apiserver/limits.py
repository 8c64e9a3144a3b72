"""Per-user limits on requests in flight, so that one tenant cannot starve the others. A filter after authentication.

Each API process counts the requests it is serving for each user; one beyond the limit is answered at once with
Kubernetes' 429 (`TooManyRequests`, `Retry-After: 1`), as kube-apiserver's max-in-flight filter answers, and
clients retry (kubectl and client-go do). Watches are long-running and not counted, as in Kubernetes. The limit
is per process: with N API processes a user may have up to N times as many in flight in all.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from vmquota.apiserver.request import Request, Response, status

Handler = Callable[[Request], Response]

DEFAULT_PER_USER = 64


class InFlight:
    def __init__(self, per_user: int = DEFAULT_PER_USER) -> None:
        self.per_user = per_user
        self._lock = threading.Lock()
        self._serving: dict[str, int] = {}

    def __call__(self, request: Request, handler: Handler) -> Response:
        if request.param("watch") in ("true", "1"):
            return handler(request)
        user = request.user.name if request.user is not None else ""
        with self._lock:
            count = self._serving.get(user, 0)
            if count >= self.per_user:
                body = status(429, "TooManyRequests", "Too many requests, please try again later.")
                body["details"] = {"retryAfterSeconds": 1}
                return Response(429, json.dumps(body).encode(), headers={"Retry-After": "1"})
            self._serving[user] = count + 1
        try:
            return handler(request)
        finally:
            with self._lock:
                left = self._serving[user] - 1
                if left:
                    self._serving[user] = left
                else:
                    del self._serving[user]
