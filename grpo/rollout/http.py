"""The one HTTP client of the project: JSON over urllib with a deadline on every call, errors that name the server,
and calls to several servers at once. Server mode's generation and checks (grpo/rollout/server.py), its weight
transfer's control plane (grpo/rollout/transfer/) and distillation's teacher client (grpo/loop/distill.py) use it.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any


class ServerError(RuntimeError):
    """A generation server did not answer, or answered with an error; the message names it."""


def request(url: str, route: str, body: dict[str, Any] | None, timeout: float) -> Any:
    """GET (body None) or POST JSON to a server; its JSON answer (None when empty). Errors name the server."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + route, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:1000]
        raise ServerError(f"vLLM server {url}{route} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(f"vLLM server {url} did not answer {route.split('?')[0]} within {timeout:g} s: {reason} "
                          "(is `grpo serve` running there? see rollout.vllm.servers)") from None


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
