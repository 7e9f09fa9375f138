"""The one HTTP client of the project: JSON over urllib with a deadline on every call, errors that name the server,
and calls to several servers at once. Server mode's generation and checks (grpo/rollout/server.py), its weight
transfer's control plane (grpo/rollout/transfer/) and distillation's teacher client (grpo/loop/distill.py) use it.

`send` (and `post_json` on it) is the shared wire: it says what happened (an error status with its code, headers and
body, or no answer at all) and leaves the policy to the caller: `request` turns every failure into a ServerError
for server mode, the teacher client retries, backs off and counts.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any


class ServerError(RuntimeError):
    """A generation server did not answer, or answered with an error; the message names it."""


class HTTPStatusError(ServerError):
    """A server answered with an error status. `code`, `headers` and `read()` (the body) are urllib's; the body is
    read when the caller asks, so each caller decides what a body cut off mid-read means (server mode lets that
    error through, the teacher client retries it like the status)."""

    def __init__(self, url: str, error: urllib.error.HTTPError):
        super().__init__(f"{url} answered {error.code}")
        self.url, self.code, self.headers, self._error = url, error.code, error.headers, error

    def read(self) -> bytes:
        """The answer's body; raises OSError or http.client.HTTPException when the connection breaks mid-read."""
        return self._error.read()


class UnreachableError(ServerError):
    """No answer within the deadline, or none at all (refused, reset, timed out); `reason` is urllib's cause."""

    def __init__(self, url: str, reason: Any):
        super().__init__(f"{url} did not answer: {reason}")
        self.url, self.reason = url, reason


def send(url: str, body: Any | None, timeout: float, headers: dict[str, str] | None = None) -> bytes:
    """GET (body None) or POST `body` as JSON to `url`; the answer's raw body. An error status raises
    HTTPStatusError, no answer within `timeout` UnreachableError; http.client's protocol errors that are not
    OSErrors (a body cut short: IncompleteRead) pass through, as the callers have always seen them."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise HTTPStatusError(url, e) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UnreachableError(url, getattr(e, "reason", e)) from None


def post_json(url: str, body: Any, timeout: float, headers: dict[str, str] | None = None) -> Any:
    """POST `body` as JSON; the answer decoded (ValueError when it is not JSON, an empty one included). Errors as
    `send`'s."""
    return json.loads(send(url, body, timeout, headers))


def request(url: str, route: str, body: dict[str, Any] | None, timeout: float) -> Any:
    """GET (body None) or POST JSON to a server; its JSON answer (None when empty). Errors name the server."""
    try:
        raw = send(url.rstrip("/") + route, body, timeout)
    except HTTPStatusError as e:
        detail = e.read().decode(errors="replace")[:1000]
        raise ServerError(f"vLLM server {url}{route} answered {e.code}: {detail}") from None
    except UnreachableError as e:
        raise ServerError(f"vLLM server {url} did not answer {route.split('?')[0]} within {timeout:g} s: {e.reason} "
                          "(is `grpo serve` running there? see rollout.vllm.servers)") from None
    return json.loads(raw) if raw else None


def parallel(fns: list) -> list[Any]:
    """Run the callables in threads; re-raise the first error after all are done."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results
