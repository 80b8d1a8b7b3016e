"""The same reconnection rules as watch.py, written the way a program using sseclient-py
(1.9.0, which parses a stream and does not reconnect) would: the standard library opens
the stream, sseclient-py splits it into events, and a small loop follows the `id` and
`retry` they report.

sseclient-py drops frames without data; that is why the gateway's drain frame is the
named `reconnect` event with `data: {}`: it reaches this program, and its empty `id:`
resets the id the program sends back.
"""

import http.client
import threading
import urllib.error
import urllib.request

from sseclient import SSEClient


def watch(url, on_event, stop=None):
    """Calls `on_event(sse)` for each event of the stream at `url`, reconnecting with the
    last id (none once it is empty) after `retry`, until the server says 204 or `stop`
    (a threading.Event) is set."""
    stop = stop or threading.Event()
    last_id = ""
    retry = 3.0
    while not stop.is_set():
        request = urllib.request.Request(url, headers={"Last-Event-Id": last_id} if last_id else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status == 204:
                    return
                for sse in SSEClient(response).events():
                    if sse.id is not None:
                        last_id = sse.id
                    if sse.retry and sse.retry.isdigit():
                        retry = int(sse.retry) / 1000
                    on_event(sse)
                    if stop.is_set():
                        return
        except (OSError, http.client.HTTPException, urllib.error.URLError):
            pass  # a refused or cut connection: try again after `retry`
        stop.wait(retry)
