"""The upload byte budget shared by every route that takes an image into memory (POST /v1/images
and Label Studio's image fetches): upload bodies held at once total at most `total` bytes, and
the bodies of one client (its IP address) at most `per_client`, so that one client cannot hold
them all (docs/serving.md, "Limits")."""

from __future__ import annotations

import contextlib
import threading

from .service import ApiError


def client_of(request) -> str:
    """The key of a request's client in the budget: the peer's IP address."""
    client = request.scope.get("client")
    return client[0] if client else "unknown"


class UploadBudget:
    def __init__(self, total: int, per_client: int):
        self.total, self.per_client = int(total), int(per_client)
        self.held = 0
        self.by_client: dict[str, int] = {}
        self._lock = threading.Lock()  # the Label Studio fetch may count from a worker thread

    @contextlib.contextmanager
    def holding(self, client: str):
        """A holder whose take(n) counts n more bytes for `client` (ApiError 503 over the total or
        the client's share); all it took is given back when the block ends."""
        holder = _Holder(self, client)
        try:
            yield holder
        finally:
            holder.release()


class _Holder:
    def __init__(self, budget: UploadBudget, client: str):
        self.budget, self.client, self.taken = budget, client, 0

    def take(self, n: int) -> None:
        b = self.budget
        with b._lock:
            mine = b.by_client.get(self.client, 0)
            if b.held + n > b.total or mine + n > b.per_client:
                whose = "this client's" if mine + n > b.per_client else "all clients'"
                raise ApiError(503, f"the server is holding as many uploads as it may ({whose} share); retry shortly")
            b.held += n
            b.by_client[self.client] = mine + n
            self.taken += n

    def release(self) -> None:
        b = self.budget
        with b._lock:
            b.held -= self.taken
            left = b.by_client.get(self.client, 0) - self.taken
            if left > 0:
                b.by_client[self.client] = left
            else:
                b.by_client.pop(self.client, None)
            self.taken = 0
