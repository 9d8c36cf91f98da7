"""Running the server: logging, and the shutdown drain on SIGTERM / SIGINT.

uvicorn's own shutdown closes the listening socket first (a new client sees "connection refused",
never the 503 it could retry elsewhere), cuts streams still running when its graceful timeout
ends (no error event, no `[DONE]`) and then re-raises the signal, so the process exits 143.
Plural's drain instead (issue 11):

1. keeps accepting: every new request is answered 503 `shutting_down` with Retry-After
   (`Guard`), and `/health` says "stopping", so a load balancer moves traffic away;
2. lets the requests already submitted finish, for up to `shutdown_timeout` seconds;
3. at that deadline ends whatever still runs: a stream gets an SSE error event and `[DONE]`,
   a plain request a 503;
4. then lets uvicorn close the connections, and the process exits 0.

A second signal during the drain stops at once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import uvicorn

log = logging.getLogger("plural.serve")


def setup_logging(level: str) -> None:
    """The server's log (request ids, failures with their tracebacks) on stderr, at `level`."""
    logger = logging.getLogger("plural")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_plural", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        h._plural = True
        logger.addHandler(h)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        # Not recorded in uvicorn's captured signals: nothing is re-raised after the shutdown.
        if self._draining:
            log.warning("second signal: stopping now")
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        threading.Thread(target=self._drain, name="plural-drain", daemon=True).start()

    def _drain(self) -> None:
        s = self.state
        s.stopping = True
        if s.engine is None:  # front mode: the upstreams run the requests; wait for the relays to end
            log.info("shutting down: %d requests open; draining for up to %g s (shutdown_timeout)",
                     s.in_flight, self.shutdown_timeout)
            deadline = time.monotonic() + self.shutdown_timeout
        else:
            log.info("shutting down: %d running, %d waiting; draining for up to %g s (shutdown_timeout)",
                     s.engine.running(), s.engine.queue_depth(), self.shutdown_timeout)
            s.engine.stop(drain_seconds=self.shutdown_timeout)  # at the deadline it cancels what is left
            deadline = time.monotonic() + 10  # the responses still writing their last events
        while s.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("drained; exiting")
        self.should_exit = True
