"""The batch runner: runs a scheduled Step on the model (the decode lane in one batched forward, a prefill chunk)
and samples the next tokens.

The lane's batched state stays batched from step to step while the lane is unchanged (no split and re-cat per
token), and two state buffers alternate: each step writes its output into the buffer the previous step read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.engine.scheduler import Seq, Step, StepResult
from worker.model import RWKV5
from worker.sampler import SampleResult, sample_batch
from worker.state import State


@dataclass
class Lane:
    """The decode lane: the turns decoded together last step and their batched state (B = len(seqs))."""

    seqs: list[Seq] = field(default_factory=list)
    state: State | None = None
    spare: State | None = None  # last step's input buffer: the next step writes its output there (no page faults)


class BatchRunner:
    """Runs each Step on one model: the lane's decode forward (B x 1), at most one prefill chunk (1 x T), sampling."""

    def __init__(self, model: RWKV5, sample_vocab: int) -> None:
        self.model = model
        self.sample_vocab = sample_vocab  # sampled ids stay below this (see Engine)
        self.lane = Lane()
        self.on_decode: Callable[[int], None] | None = None  # metrics hook: each decode step's batch size

    def run(self, step: Step) -> StepResult:
        """The step's forwards and samples; writes the prefilled turn's new state into its Seq."""
        result = StepResult()
        if step.decode:
            result.lane_state, result.decode_samples = self._decode(step)
        else:
            self.lane = Lane()  # let go of the last batch's tensors
        if step.prefill is not None:
            result.prefill_sample = self._prefill(step)
        return result

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
        return state, sample_batch(logits[rows, : self.sample_vocab], [seqs[i].sampler for i in rows])

    def _prefill(self, step: Step) -> SampleResult | None:
        seq = step.prefill
        assert seq is not None
        if seq.state is None:  # a fresh session: the model's zero state, made when the turn first runs
            seq.state = self.model.init_state(1)
        tokens = torch.tensor([step.prefill_tokens], dtype=torch.long, device=self.model.device)
        logits, seq.state = self.model.forward(tokens, seq.state)  # (1, V)
        if not step.sample_prefill:
            return None
        (sample,) = sample_batch(logits[:, : self.sample_vocab], [seq.sampler])
        return sample
