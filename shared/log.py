"""One line per event: `time level service message key=value ...`."""

from __future__ import annotations

import logging
import sys

from shared.bounded import BoundedDict


def setup_logging(service: str, level: str = "info") -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service}[%(process)d] %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return logging.getLogger(service)


class Throttle:
    """Says which of a repeated event's occurrences to log: the first `first` of each key, then
    every `every`-th, so a flood of bad input leaves a few lines and a running count, not a log
    as big as the flood. At most `max_keys` keys are remembered (the oldest forgotten first)."""

    def __init__(self, first: int = 1, every: int = 1000, max_keys: int = 1024) -> None:
        self.first = first
        self.every = every
        self.total = 0
        self.counts: BoundedDict[object, int] = BoundedDict(max_keys)

    def should_log(self, key: object = None) -> bool:
        self.total += 1
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        return n <= self.first or n % self.every == 0
