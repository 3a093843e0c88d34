"""When pruning happens and how sparse the model is after each pruning event.

Three schedules, each a list of ``(time, sparsity)`` events (time in epochs or optimizer steps):

- ``oneshot``: one event at ``start`` to the final sparsity.
- ``agp``: automated gradual pruning (Zhu & Gupta 2017, eq. 1): events at
  ``t = t0, t0 + dt, ...`` and ``end`` (``t0 = start``, ``n*dt = end - start``, ``dt = every``) with
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n*dt))**3``; the last event reaches ``s_f``.
- ``iterative``: prune-retrain in the manner of Han et al. 2015, ``n`` events from ``start`` to
  ``end`` each removing the same fraction of the remaining weights:
  ``s_k = 1 - (1 - s_f)**(k / n)`` for ``k = 1..n``.

Sparsities are targets for the cumulative fraction removed; the pruners turn them into
integer counts of the *original* size, so the compounding of torch's per-call amounts never
shows up in the result.
"""

from __future__ import annotations

KINDS = ("oneshot", "agp", "iterative")
UNITS = ("epoch", "step")


class SparsitySchedule:
    """Events of a pruning schedule.

    Args:
        kind: ``oneshot``, ``agp`` or ``iterative``.
        start: time of the first event (epoch or step, see ``unit``).
        end: time of the last event (``agp``, ``iterative``); ignored by ``oneshot``.
        every: spacing ``dt`` between events (``agp``, ``iterative``).
        unit: ``epoch`` (events at the start of an epoch) or ``step`` (before an optimizer step).
        initial_sparsity: ``s_i`` of the cubic schedule (``agp`` only).
    """

    def __init__(
        self,
        kind: str = "oneshot",
        start: int = 0,
        end: int | None = None,
        every: int = 1,
        unit: str = "epoch",
        initial_sparsity: float = 0.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"prune.schedule must be one of {KINDS}, got {kind!r}")
        if unit not in UNITS:
            raise ValueError(f"prune.unit must be one of {UNITS}, got {unit!r}")
        for key, value, low in (("start", start, 0), ("every", every, 1), ("end", end, 0)):
            if (value is not None or key != "end") and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"prune.{key} must be an integer >= {low}, got {value!r}")
        if kind != "oneshot":
            if end is None or end < start:
                raise ValueError(f"a {kind} schedule needs prune.end >= prune.start (got start={start}, end={end})")
        if isinstance(initial_sparsity, bool) or not isinstance(initial_sparsity, (int, float)) or not 0.0 <= initial_sparsity < 1.0:
            raise ValueError(f"prune.initial_sparsity must lie in [0, 1), got {initial_sparsity!r}")
        self.kind, self.start, self.every, self.unit = kind, start, every, unit
        self.end = start if kind == "oneshot" else int(end)  # type: ignore[arg-type]
        self.initial_sparsity = initial_sparsity

    @property
    def last(self) -> int:
        """Time of the last event: from then on the model is at its final sparsity."""
        return self.end

    def times(self) -> list[int]:
        """Event times: ``start, start + every, ...`` and always ``end`` last."""
        return [*range(self.start, self.end, self.every), self.end]

    def sparsity_at(self, t: int, final: float) -> float | None:
        """Target sparsity of an event at time ``t`` for a layer whose final sparsity is
        ``final``; None when ``t`` is not an event."""
        times = self.times()
        if t not in times:
            return None
        if t == self.end:  # a oneshot schedule's one event is its end
            return final
        n_dt = self.end - self.start
        if self.kind == "agp":
            s_i = min(self.initial_sparsity, final)
            return final + (s_i - final) * (1.0 - (t - self.start) / n_dt) ** 3
        k, n = times.index(t) + 1, len(times)  # iterative: the same fraction of what remains
        return 1.0 - (1.0 - final) ** (k / n)

    def describe(self) -> str:
        if self.kind == "oneshot":
            return f"oneshot@{self.unit}{self.start}"
        return f"{self.kind} {self.unit}s {self.start}..{self.end}/{self.every}"
