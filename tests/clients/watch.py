"""The README's Python client for events-gateway streams (httpx + httpx-sse): it follows
the SSE reconnection rules that EventSource follows, and the gateway's:

- it keeps the last event id and sends it back as `Last-Event-Id` when it reconnects,
  unless it is empty (a drain's `reconnect` event resets it: reconnect from scratch);
- `retry:` sets the delay before reconnecting;
- `204 No Content` means "do not come back" (the original protocol's answer to a client
  that lost its stream, and to a stream that ended with an `error`): it stops.
"""

import threading

import httpx
from httpx_sse import connect_sse


def watch(url, on_event, stop=None):
    """Calls `on_event(sse)` for each event of the stream at `url`, reconnecting as the
    rules above say, until the server says 204 or `stop` (a threading.Event) is set."""
    stop = stop or threading.Event()
    last_id = ""
    retry = 3.0
    timeout = httpx.Timeout(10.0, read=None)
    with httpx.Client(timeout=timeout) as http:
        while not stop.is_set():
            headers = {"Last-Event-Id": last_id} if last_id else {}
            try:
                with connect_sse(http, "GET", url, headers=headers) as source:
                    if source.response.status_code == 204:
                        return
                    source.response.raise_for_status()
                    for sse in source.iter_sse():
                        last_id = sse.id
                        if sse.retry is not None:
                            retry = sse.retry / 1000
                        on_event(sse)
                        if stop.is_set():
                            return
            except httpx.HTTPError:
                pass  # a refused or cut connection: try again after `retry`
            stop.wait(retry)
