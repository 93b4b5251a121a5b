"""Bundle hot swap: load the new bundle fully, warm it, then replace one reference.

Requests read `slot.current` once, at validation, and carry that Engine through the batch queue, so a request that
arrived before the swap computes on the old bundle and one that arrives after it on the new; none fails. The old
Engine is freed when its last request finishes (plain reference counting).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from genrec.core.bundle import BundleError
from genrec.server.engine import Engine
from genrec.server.metrics import Metrics

log = logging.getLogger(__name__)


class EngineSlot:
    def __init__(self, engine: Engine, metrics: Metrics):
        self._engine = engine
        self._metrics = metrics
        self._reload_lock = threading.Lock()  # one reload at a time; a second waits for the first
        metrics.set_bundle(engine.bundle_id, engine.version, str(engine.path))

    @property
    def current(self) -> Engine:
        return self._engine  # a single attribute read: atomic under the GIL

    def reload(self, path: str | Path | None = None) -> Engine:
        """Serve the bundle at `path` (default: the current path, re-read from disk). On any error the current
        bundle keeps serving and the error propagates (BundleError -> FAILED_PRECONDITION)."""
        with self._reload_lock:
            old = self._engine
            target = Path(path) if path else old.path
            try:
                new = Engine.load(target, previous=old)
                new.warm_up()
            except Exception as e:
                self._metrics.reloads.labels("failed").inc()
                # %r: paths and messages are escaped, so no client string can forge a log line.
                log.error("reload of %r failed (%s: %r); still serving %r (%s)", str(target), type(e).__name__,
                          str(e), str(old.path), old.bundle_id, exc_info=not isinstance(e, BundleError))
                raise
            self._engine = new
            self._metrics.reloads.labels("ok").inc()
            self._metrics.set_bundle(new.bundle_id, new.version, str(new.path))
            log.info("now serving %r version %d (%s); was %s", str(new.path), new.version, new.bundle_id,
                     old.bundle_id)
            return new
