"""A cumulative histogram of per-request counts (e.g. tokens a request's backtracks recomputed), in
the form Prometheus expects: upper bounds, cumulative counts per bound, the sum and the count."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

RECOMPUTED_TOKEN_BOUNDS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class CountHistogram:
    bounds: tuple[int, ...] = RECOMPUTED_TOKEN_BOUNDS
    counts: list[int] = field(default_factory=list)  # per bucket (value <= bound), then one for +Inf
    total: int = 0
    observations: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: int) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.observations += 1

    def snapshot(self) -> dict:
        """``{"buckets": [[upper bound, cumulative count], ...], "sum": ..., "count": ...}``; the last
        bound is ``"+Inf"``."""
        cumulative, buckets = 0, []
        for bound, n in zip([*self.bounds, "+Inf"], self.counts):
            cumulative += n
            buckets.append([bound, cumulative])
        return {"buckets": buckets, "sum": self.total, "count": self.observations}
