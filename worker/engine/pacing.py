"""Prefill pacing: how much prefill a step may carry beside a running decode lane, from what past steps cost.

Plain Python, no torch: the batch runner times each step's parts (the lane's decode forward and sampling, each
prefill group's forward), the scheduler feeds those times to a PrefillPacer after the step and asks it, when it
plans the next one, what each further chunk would add.

The rule (beside a decode lane; a step without one takes every waiting chunk): the first PREFILL turn's chunk
always runs, as in the old one-chunk-per-step behaviour, so every prefill makes progress every step. Further
turns' chunks join, in admission order, while the step's predicted cost stays within a target: (1 + slack) x the
old behaviour's costliest step, a full lane's decode (the costliest decode seen) plus the first chunk. With a full
lane that leaves `slack` x that step for more chunks; a smaller lane decodes faster, and the time it leaves up to
the target goes to prefill (the streams then wait no longer than they would in a full batch). So no step runs
longer than (1 + slack) x what the old behaviour ran at full load, which bounds the streams' inter-token latency
p99; prefills are grouped where the hardware makes a group cheap (a GPU's forward costs about the same for 1 or 8
rows) or the lane is small. Until the costs it needs have been seen, nothing joins the first chunk.

Why not "(1 + slack) x this lane's decode-only step": on the 2-core CPU of docs/benchmarks.md one 19-token prefill
forward alone costs ~70% of a 32-row decode step (per-call overhead), so no step with any prefill fits a small
slack, and a lane of a few streams would leave a burst of waiting turns one chunk per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Beside a decode lane, a step may take (1 + slack) x the old behaviour's costliest step (the costliest decode seen
# plus the first chunk). 0.1: the issue's goal (the streams' ITL p99 at most 10% above the old behaviour's).
DEFAULT_PREFILL_COST_SLACK = 0.1
# Weight of a new observation in a size bucket's running mean.
EMA_ALPHA = 0.25


@dataclass
class CostCurve:
    """Seconds as a function of a size (lane rows, or tokens of one prefill forward): an exponential moving mean
    per power-of-two size bucket, of both the size and the time, so each bucket is one point (mean size, mean
    time). Predictions interpolate linearly between the points and scale proportionally outside them (through the
    origin: beyond the largest an overestimate where cost grows slower than size, below the smallest an
    underestimate of the cost but an overestimate of what each further token adds, so both err towards a lighter
    step). None until something was observed."""

    alpha: float = EMA_ALPHA
    points: dict[int, tuple[float, float]] = field(default_factory=dict)  # bucket -> (mean size, mean seconds)

    def observe(self, size: int, seconds: float) -> None:
        if size <= 0 or seconds < 0:
            return
        bucket = size.bit_length()
        old = self.points.get(bucket)
        if old is None:
            self.points[bucket] = (float(size), seconds)
        else:
            a = self.alpha
            self.points[bucket] = (old[0] + a * (size - old[0]), old[1] + a * (seconds - old[1]))

    def predict(self, size: int) -> float | None:
        if not self.points:
            return None
        if size <= 0:
            return 0.0
        pts = sorted(self.points.values())
        if size <= pts[0][0]:
            return pts[0][1] * size / pts[0][0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if size <= x1:
                return y0 + (y1 - y0) * (size - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
        x, y = pts[-1]
        return y * size / x

    def peak(self) -> float | None:
        """The costliest bucket's mean time (None until observed)."""
        return max(y for _, y in self.points.values()) if self.points else None


@dataclass
class PrefillPacer:
    """Step costs seen so far, and what a prefill chunk beside the lane may add (see the module docstring)."""

    slack: float = DEFAULT_PREFILL_COST_SLACK
    decode: CostCurve = field(default_factory=CostCurve)  # the lane's forward + sampling, by lane rows
    prefill: CostCurve = field(default_factory=CostCurve)  # one prefill group's forward (+ sampling), by tokens

    def observe(self, lane_rows: int, decode_s: float, groups: list[tuple[int, float]]) -> None:
        """One step's measured parts: the lane (rows, seconds; 0 rows = none) and each group (tokens, seconds)."""
        if lane_rows:
            self.decode.observe(lane_rows, decode_s)
        for tokens, seconds in groups:
            self.prefill.observe(tokens, seconds)

    def allowance(self, lane_rows: int, first_tokens: int) -> float:
        """Seconds the chunks after the first may add to a step with this lane: the target, (1 + slack) x (the
        costliest decode seen + the first chunk), less this lane's decode and the first chunk. 0 while either cost
        is still unknown (the step then runs the first chunk alone)."""
        lane, peak, first = self.decode.predict(lane_rows), self.decode.peak(), self.prefill.predict(first_tokens)
        if lane is None or peak is None or first is None:
            return 0.0
        return max(0.0, (1 + self.slack) * (max(peak, lane) + first) - lane - first)

    def added_cost(self, group_tokens: int, tokens: int) -> float | None:
        """Seconds that `tokens` more add to a group of `group_tokens` (0: a new group, one more forward). None
        while no prefill was observed."""
        after = self.prefill.predict(group_tokens + tokens)
        if after is None:
            return None
        before = self.prefill.predict(group_tokens) if group_tokens else 0.0
        return max(0.0, after - (before or 0.0))
