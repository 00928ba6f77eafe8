"""Convergence-gated refresh (Q-GaLore §3.2): refresh a matrix's subspace less often once it stops moving.

Each matrix starts with interval ``update_proj_gap``. At every refresh the similarity between the new and the
old subspace goes into a queue of length ``queue_size``; when the queue is full and its mean reaches the
threshold, the interval is multiplied by ``gamma_proj`` (capped at ``max_proj_gap``) and the queue is cleared, so
each further lengthening needs ``queue_size`` fresh confirmations.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RefreshRecord:
    step: int
    name: str
    similarity: float | None
    interval: int


@dataclass
class RefreshGate:
    """Refresh schedule of one matrix. Pure bookkeeping: no tensors, no collectives."""

    interval: int
    threshold: float
    queue_size: int
    gamma: float
    max_interval: int
    adaptive: bool = True
    next_refresh: int = 0
    queue: list[float] = field(default_factory=list)
    count: int = 0

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) must refresh this matrix's subspace."""
        return step >= self.next_refresh

    def record(self, step: int, similarity: float | None, offset: int = 0) -> None:
        """Note a refresh at ``step`` (``similarity`` is None for the first one) and schedule the next.

        ``offset`` delays only the next refresh (staggering matrices that all refreshed at step 0).
        """
        self.count += 1
        if similarity is not None and self.adaptive:
            self.queue.append(float(similarity))
            if len(self.queue) > self.queue_size:
                self.queue.pop(0)
            if len(self.queue) == self.queue_size and sum(self.queue) / self.queue_size >= self.threshold:
                self.interval = min(self.max_interval, int(self.interval * self.gamma))
                self.queue.clear()
        self.next_refresh = step + self.interval + offset

    def state_dict(self) -> dict:
        return {"interval": self.interval, "next_refresh": self.next_refresh, "queue": list(self.queue),
                "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.interval = int(d["interval"])
        self.next_refresh = int(d["next_refresh"])
        self.queue = [float(x) for x in d["queue"]]
        self.count = int(d["count"])
