"""The batch runner: runs a scheduled Step on the model (the decode lane in one batched forward, each prefill group
in one batched forward of its turns' equal-length chunks) and samples the next tokens.

When turns with a response_format sample this step, their token masks are filled (worker/constraints.py) in
llguidance's threads from the start of the step, while the forwards run, and applied to their logits rows just
before sampling; a step without such turns does none of it.

Each part of a step (the lane's forward and sampling, each group's forward and sampling) is timed for the scheduler's
prefill pacer (worker/engine/pacing.py); on CUDA a group that samples nothing is synchronized first, so its time is
the device's.

The lane's batched state stays batched from step to step while the lane is unchanged (no split and re-cat per
token), and two state buffers alternate: each step writes its output into the buffer the previous step read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from worker.engine.scheduler import PrefillGroup, Seq, Step, StepResult
from worker.model import RWKV5
from worker.sampler import SampleResult, sample_batch
from worker.state import State

if TYPE_CHECKING:
    from worker.constraints import MaskFiller, PendingMask


@dataclass
class Lane:
    """The decode lane: the turns decoded together last step and their batched state (B = len(seqs))."""

    seqs: list[Seq] = field(default_factory=list)
    state: State | None = None
    spare: State | None = None  # last step's input buffer: the next step writes its output there (no page faults)


class BatchRunner:
    """Runs each Step on one model: the lane's decode forward (B x 1), one forward per prefill group (B x T),
    sampling."""

    def __init__(self, model: RWKV5, sample_vocab: int) -> None:
        self.model = model
        self.sample_vocab = sample_vocab  # sampled ids stay below this (see Engine)
        self.lane = Lane()
        self.on_decode: Callable[[int], None] | None = None  # metrics hook: each decode step's batch size
        self.masks: MaskFiller | None = None  # set by the engine with its constraint compiler
        self._pending: PendingMask | None = None  # this step's masks, being filled

    def run(self, step: Step) -> StepResult:
        """The step's forwards and samples; writes each prefilled turn's new state into its Seq."""
        result = StepResult()
        # Every matcher has consumed the tokens sampled so far: this step's masks can be filled beside the forwards.
        self._pending = self.masks.start(step.constraints) if step.constraints and self.masks else None
        try:
            if step.decode:
                started = time.perf_counter()
                result.lane_state, result.decode_samples = self._decode(step)
                result.decode_s = time.perf_counter() - started
            else:
                self.lane = Lane()  # let go of the last batch's tensors
            for group in step.prefill:
                started = time.perf_counter()
                result.prefill_samples.append(self._prefill(group))
                result.prefill_s.append(time.perf_counter() - started)
        finally:
            if self._pending is not None:
                self._pending.wait()  # the fill writes into a buffer the next step reuses
            self._pending = None
        return result

    def _sample(self, logits: torch.Tensor, seqs: list[Seq]) -> list[SampleResult]:
        """Samples one token per row for `seqs`, under their response_format masks when this step has any."""
        mask = None
        if self._pending is not None:
            mask = self._pending.rows([s.constraint for s in seqs], logits.device)
        return sample_batch(logits, [s.sampler for s in seqs], mask)

    def reset(self) -> None:
        """Forgets the lane (after a failed step: its turns are gone)."""
        self.lane = Lane()

    def _lane_state(self, seqs: list[Seq]) -> State:
        """The batched state of `seqs`, reusing last step's batch when the lane did not change."""
        previous = self.lane
        if previous.seqs == seqs and previous.state is not None:
            return previous.state
        index = {id(s): i for i, s in enumerate(previous.seqs)}
        parts = []
        for seq in seqs:
            i = index.get(id(seq))
            parts.append(previous.state.select(i) if i is not None and previous.state is not None else seq.state)
        return State.cat(parts)

    def _decode(self, step: Step) -> tuple[State, list[SampleResult]]:
        seqs = step.decode
        tokens = torch.tensor([[t] for t in step.decode_tokens], dtype=torch.long, device=self.model.device)
        current = self._lane_state(seqs)
        spare = self.lane.spare
        if spare is not None and (spare.batch_size != current.batch_size or spare is current):
            spare = None
        logits, state = self.model.forward(tokens, current, out=spare)  # (B, V)
        # The input buffer is the engine's own (built by cat, or last step's output), so it can be written next step.
        self.lane = Lane(list(seqs), state, spare=current)
        if self.on_decode is not None:
            self.on_decode(len(seqs))
        rows = step.sample_rows
        if not rows:
            return state, []
        return state, self._sample(logits[rows, : self.sample_vocab], [seqs[i] for i in rows])

    def _prefill(self, group: PrefillGroup) -> list[SampleResult]:
        """One forward over the group's chunks (B x T, every row the same length: exact); each turn's new state is
        its own row (a copy, so no turn's state holds the others' memory alive)."""
        seqs = group.seqs
        for seq in seqs:
            if seq.state is None:  # a fresh session: the model's zero state, made when the turn first runs
                seq.state = self.model.init_state(1)
        tokens = torch.tensor(group.tokens, dtype=torch.long, device=self.model.device)
        state = seqs[0].state if len(seqs) == 1 else State.cat([s.state for s in seqs])
        logits, state = self.model.forward(tokens, state)  # (B, V)
        if len(seqs) == 1:
            seqs[0].state = state
        else:
            for i, seq in enumerate(seqs):
                seq.state = state.select(i)
        rows = group.sample_rows
        if not rows:
            if logits.device.type == "cuda":  # nothing reads the result back: wait for it, so the time is true
                torch.cuda.synchronize(logits.device)
            return []
        return self._sample(logits[rows, : self.sample_vocab], [seqs[i] for i in rows])
