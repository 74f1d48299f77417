"""A graceful stop for both front ends: not ready at once, finish what was accepted, exit in bounded time.

Every rolling deploy (Kubernetes, ECS, `docker stop`) sends SIGTERM, waits a grace period, then
SIGKILLs. A service that exits at once drops the requests it had accepted; one that never exits is
killed mid-request. On SIGTERM (or Ctrl-C) the course's service:

1. answers ``/ready`` (and ``/v2/health/ready``) with 503 at once, so a load balancer stops
   sending new work; it keeps serving for ``drain_s`` seconds (default 0: set it to the load
   balancer's deregistration delay);
2. stops accepting connections and finishes every request already accepted - including those
   waiting in the dynamic batcher;
3. exits within ``grace_s`` seconds (default 20, below Kubernetes' 30 s), whatever is left.

uvicorn does 2 and 3 itself (``timeout_graceful_shutdown``); :func:`serve_waitress` adds them to
waitress, which otherwise exits on SIGTERM at once, dropping what is in flight.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_drain(service: Any, drain_s: float, stop: Callable[[int], None] | None = None) -> bool:
    """On SIGTERM/SIGINT: ``service.draining = True`` now, then after ``drain_s`` call ``stop(signal)``.

    ``stop`` defaults to whatever handler was installed before (uvicorn's, which begins its own
    graceful shutdown). Returns False where signals cannot be handled (not the main thread: a
    server started in a notebook thread), True otherwise.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in STOP_SIGNALS}
    stopping = threading.Event()

    def default_stop(sig: int) -> None:
        handler = previous[sig]
        if callable(handler):
            handler(sig, None)
        else:                       # nobody handled it before: do what the signal does by default
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    act = stop or default_stop

    def on_signal(sig: int, frame: Any) -> None:
        service.draining = True
        if stopping.is_set():       # a second signal: stop now
            act(sig)
            return
        stopping.set()
        if drain_s > 0:
            threading.Timer(drain_s, act, args=(sig,)).start()
        else:
            act(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    return True


def serve_waitress(app: Any, service: Any, host: str, port: int, threads: int, drain_s: float = 0.0,
                   grace_s: float = 20.0, **options: Any) -> None:
    """Run ``app`` under waitress until SIGTERM/SIGINT, then drain as described above.

    Also sized for slow clients: waitress reads requests in its event loop, not in worker threads,
    so a connection that trickles its headers costs a socket, not a thread; its default limit of
    100 open connections is what let 100 slow clients take the service offline.
    """
    from waitress import create_server

    options.setdefault("connection_limit", 1000)
    options.setdefault("channel_timeout", 30)
    server: Any = create_server(app, host=host, port=port, threads=threads, **options)

    def busy() -> bool:
        if server.task_dispatcher.queue:
            return True
        for channel in list(server.active_channels.values()):
            if channel.requests or channel.total_outbufs_len or getattr(channel, "request", None) is not None:
                return True
        return False

    stopped = threading.Lock()

    def stop(_sig: int) -> None:
        if not stopped.acquire(blocking=False):
            return                      # already stopping
        def close_listener() -> None:   # runs in waitress's event loop (the socket is in its select)
            server.accepting = False
            server.del_channel()
            server.socket.close()

        server.trigger.pull_trigger(close_listener)   # no new connections; those accepted are finished
        deadline = time.monotonic() + grace_s
        time.sleep(0.05)
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)

        def close_everything() -> None:  # an empty map ends waitress's event loop, and server.run()
            for channel in list(server._map.values()):
                channel.close()

        server.trigger.pull_trigger(close_everything)

    def stop_in_thread(sig: int) -> None:  # never block the signal handler
        threading.Thread(target=stop, args=(sig,), name="waitress-drain", daemon=True).start()

    install_drain(service, drain_s, stop_in_thread)
    server.run()
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=5)
