"""Read peers' new versions ahead, off the training step."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .base import Check, Exchange, Published
from .compression import decoded

log = logging.getLogger(__name__)


class Prefetcher:
    """Between two exchanges, a background thread watches the peers for versions newer than
    the loaded ones, reads each (file read, checksum, header check, tensors) into memory and
    decodes a compressed one, so that the next refresh only copies it into its teacher. At
    most one version per peer is held; a version that fails its checks is left for the
    refresh to reject and warn about. It lists every peer each ``poll_seconds`` (default: the
    exchange's; an object store's is longer, as each listing is a billed request).
    """

    def __init__(self, exchange: Exchange, poll_seconds: float | None = None) -> None:
        self.exchange = exchange
        self.poll_seconds = exchange.poll_seconds if poll_seconds is None else poll_seconds
        self._ready: dict[int, Published] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loaded: dict[int, int | None], check: Callable[[int], Check]) -> None:
        """Watch the peers of ``loaded`` (``{peer: step loaded}``) until :meth:`stop`."""
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(dict(loaded), check, self._stop),
                                        name="codistill-prefetch", daemon=True)
        self._thread.start()

    def _run(self, newest: dict[int, int | None], check: Callable[[int], Check],
             stop: threading.Event) -> None:
        tried: set[tuple[int, int]] = set()
        while not stop.is_set():
            for peer, have in newest.items():
                try:
                    step = next(iter(self.exchange.candidates(peer)), None)  # bad ones left out
                    if step is None or (have is not None and step <= have) or (peer, step) in tried:
                        continue
                    tried.add((peer, step))
                    published = self.exchange.load(peer, step, check(peer))
                    if published is not None:  # decoded here (int8: dequantised), not on the step
                        published = decoded(published)
                except Exception as e:  # noqa: BLE001 - the refresh reads it again and reports
                    log.debug("prefetching peer %d failed: %s", peer, e)
                    continue
                if published is not None:
                    with self._lock:
                        self._ready[peer] = published
                    newest[peer] = step
                if stop.is_set():
                    return
            stop.wait(self.poll_seconds)

    def stop(self) -> None:
        """Stop watching (a read in progress is finished first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def take(self, peer: int, step: int, ident: str | None) -> Published | None:
        """The prefetched version ``step`` of ``peer`` if it is still the exchange's content
        (``ident``, as :meth:`Exchange.ident` gives it now), else None."""
        with self._lock:
            published = self._ready.get(peer)
            if published is None or published.step != step or ident not in (None, published.ident):
                return None
            del self._ready[peer]
            return published
