"""What the core measures (runs, latencies, pool refills, egress, refusals), for any listener.

The core emits named events; it does not know Prometheus. The daemon's ``server.metrics``
listens and turns them into counters and histograms; the CLI and the SDK run the core embedded,
where ``prometheus_client`` need not be installed and nobody scrapes, and there an event with no
listener costs one empty loop. Gauges (pool depth, VMs and sandboxes by state, memory, PSS) are
not events: the server reads them from the Service when it is scraped.

Each event's labels are listed beside it. Every label takes a bounded set of values (languages,
actions, outcome kinds, decisions); ids never go in a label.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

log = logging.getLogger("fission.telemetry")

# A run, install or repo command ended. value: seconds from the request for a machine to the
# end. labels: language, action (run|install|repo), outcome (see ``outcome_kind``)
RUN = "run"
# A machine was handed to a run. value: seconds waited. labels: language, source (pool|fresh)
ACQUIRE = "acquire"
# A VM was booted or restored. value: seconds. labels: language, source (pool|fresh|sandbox)
VM_START = "vm_start"
# A program ran in a VM. value: seconds of its execution. labels: language, kind (run|sandbox)
EXEC = "exec"
# A pool made a machine ready (restore, warm-up, park). value: seconds. labels: language
POOL_REFILL = "pool_refill"
# A sandbox operation ended. value: seconds (None: untimed). labels: action, outcome
SANDBOX_OP = "sandbox_op"
# The egress proxy decided on a connection. labels: decision (allowed|refused|cut), source
EGRESS = "egress"
# An API key was refused for being over its own limit. labels: limit (rate|sandboxes)
QUOTA_REFUSED = "quota_refused"
# A run found no machine within its deadline or budget (Busy). labels: language
BUSY = "busy"

EVENTS = (RUN, ACQUIRE, VM_START, EXEC, POOL_REFILL, SANDBOX_OP, EGRESS, QUOTA_REFUSED, BUSY)

Listener = Callable[[str, float | None, Mapping[str, str]], None]


class Telemetry:
    """The events of one Service, handed to each listener (none: they go nowhere)."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call ``listener(event, value, labels)`` for every event from now on."""
        self._listeners.append(listener)

    def emit(self, event: str, value: float | None = None, **labels: str) -> None:
        """Hand one event to every listener; a failing listener is logged, never raised."""
        for listener in self._listeners:
            try:
                listener(event, value, labels)
            except Exception:  # measuring must not break the run it measures
                log.exception("a telemetry listener failed on %s", event)


def outcome_kind(outcome: str) -> str:
    """An audit outcome with its numbers folded: ``exit 3`` -> ``exit_nonzero``, ``signal 9``
    -> ``signal``; ``ok``, ``timeout``, ``oom`` and ``error:<code>`` stay as they are."""
    if outcome.startswith("exit "):
        return "exit_nonzero"
    if outcome.startswith("signal "):
        return "signal"
    return outcome
