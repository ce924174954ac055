"""How long a run may take and how fast it may go (redrive, replay)."""

from __future__ import annotations

from collections.abc import Callable


class Pace:
    """A run's time limit and rate, from the moment it is made.

    ``wait(done)`` sleeps until ``done`` messages are no longer ahead of ``rate_per_s``: the run
    never gets ahead of the rate (None: as fast as it can).
    """

    def __init__(
        self,
        *,
        rate_per_s: float | None,
        max_seconds: float,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
    ) -> None:
        self._rate = rate_per_s
        self._clock = clock
        self._sleep = sleep
        self._started = clock()
        self._deadline = self._started + max_seconds

    def batch_size(self, largest: int) -> int:
        """``largest``, or less under a rate: about a second's worth, at least one."""
        return largest if self._rate is None else max(1, min(largest, int(self._rate)))

    def expired(self) -> bool:
        """True once the time limit has passed."""
        return self._clock() >= self._deadline

    def wait(self, done: int) -> None:
        """Sleep while ``done`` messages are ahead of the rate, never past the time limit (a
        very low rate would otherwise sleep through the function's timeout)."""
        if self._rate is not None:
            now = self._clock()
            ahead = min(done / self._rate - (now - self._started), self._deadline - now)
            if ahead > 0:
                self._sleep(ahead)
