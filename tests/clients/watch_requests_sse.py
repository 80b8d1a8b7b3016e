"""A program using requests-sse (0.5.3), which reconnects by itself: its EventSource sends
the last event id back (none once it is empty), waits twice the server's `retry:` before
reconnecting after a stream ends, and raises InvalidStatusCodeError on any answer but
200, which is how a 204 ("do not come back") stops the program.
"""

import threading
from datetime import timedelta
from types import SimpleNamespace

import requests
from requests_sse import EventSource, InvalidStatusCodeError


def watch(url, on_event, stop=None):
    """Calls `on_event(sse)` (with `event` and `data`, as watch.py's) for each event of
    the stream at `url` until the server says 204, the connection cannot be made again,
    or `stop` (a threading.Event) is set."""
    stop = stop or threading.Event()
    try:
        with EventSource(url, timeout=60, reconnection_time=timedelta(seconds=1)) as source:
            for event in source:
                on_event(SimpleNamespace(event=event.type, data=event.data, id=event.last_event_id))
                if stop.is_set():
                    return
    except (InvalidStatusCodeError, requests.RequestException):
        return  # 204, or the connection could not be made again: the program stops
