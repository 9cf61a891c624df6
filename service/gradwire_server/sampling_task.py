"""A Sample / SampleStream / ComputeLogprobs request as a worker task, whose
generation runs in the shared decode loop.

The loop advances every request at once, one turn at a time. A task's turn
runs the loop's next turn only if no other task has run it since this task's
last turn, so however many requests are sampling, the loop takes one turn per
round of the scheduler's rotation, like one training run: a pending training
request waits at most one loop turn. Every turn reports the task's news (a
streaming task sends it as an operation output) and finishes the task once
its generation is done."""
from __future__ import annotations

import secrets

import numpy as np
from google.protobuf import message

from gradwire.v1 import codec
from gradwire.v1 import sampling_service_pb2 as pb
from gradwire_server.checkpoints import Checkpoint
from gradwire_server.errors import FieldViolation, invalid_argument
from gradwire_server.sampler import DecodeLoop, Generation, SampleSpec, SequenceNews
from gradwire_server.sampler_weights import AdapterLoadError, SamplerAdapters, WeightsSnapshot
from gradwire_server.scheduler import Step

STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


class SampleTask:
    """`checkpoint`: a sampler checkpoint or ephemeral snapshot, None for the base model. With `stream`,
    every turn with news reports a SampleStreamResponse as an operation output."""

    def __init__(self, loop: DecodeLoop, adapters: SamplerAdapters, checkpoint: Checkpoint | WeightsSnapshot | None,
                 spec: SampleSpec, decode_text, stream: bool = False):
        self.loop, self.adapters, self.checkpoint = loop, adapters, checkpoint
        self.spec, self.decode_text, self.stream = spec, decode_text, stream
        self._generation: Generation | None = None
        self._join_error: Exception | None = None
        self._joined = False       # join() ran (it runs once: from an arrival or the first step)
        self._discarded = False
        self._seen_turn = -1       # the loop's turn count at this task's last turn
        self._scores_sent = False

    def ready(self) -> bool:
        return True

    def join(self) -> None:
        """Joins the decode loop (worker thread; raises nothing): from the loop before its
        next decode step if the request arrived during a turn (see DecodeLoop.arrive),
        else on this task's first step. The next step (any task's) admits it."""
        if self._joined or self._discarded:
            return
        self._joined = True
        try:
            self._generation = Generation(self.spec, self.decode_text, self._adapter())
        except Exception as error:  # noqa: BLE001 - raised by this task's own step
            self._join_error = error
            return
        self.loop.add(self._generation)
        self._seen_turn = self.loop.turns

    def discard(self) -> None:
        self._discarded = True
        if self._generation is not None:
            self.loop.remove(self._generation)  # frees its KV blocks now
            self._generation = None

    def step(self) -> Step:
        if not self._joined:
            self.join()
            if self._join_error is None:
                return Step(False)
        if self._join_error is not None:  # from this step's join, or an arrival's
            raise self._join_error
        if self._seen_turn == self.loop.turns:
            self.loop.turn()
        self._seen_turn = self.loop.turns
        generation = self._generation
        if generation.error is not None:
            self.discard()
            raise generation.error
        outputs = None
        if self.stream and (news := self._stream_message(generation)).ByteSize():
            outputs = [news]
        if generation.done:
            response = self._response()
            self._generation = None  # its KV blocks were freed as its samples finished
            return Step(True, response, outputs=outputs)
        return Step(False, outputs=outputs)

    def _adapter(self):
        if self.checkpoint is None:
            return None
        try:
            return self.adapters.weights_for(self.checkpoint)
        except AdapterLoadError as error:
            raise invalid_argument([FieldViolation("model_path", str(error))]) from None

    def _response(self) -> message.Message:
        scores = self._generation.scores
        if self.spec.num_samples == 0:
            return pb.ComputeLogprobsResponse(logprobs=codec.pack_float32(scores.logprobs))
        request_id = secrets.token_hex(8)  # sequence ids: unique across requests and restarts
        response = pb.SampleResponse(sequences=[
            pb.SampledSequence(stop_reason=STOP_REASONS[s.stop_reason], tokens=codec.pack_int32(s.tokens),
                               logprobs=codec.pack_float32(s.logprobs), sequence_id=f"{request_id}-{i}",
                               topk_logprobs=_topk_rows(s.topk) if s.topk else None)
            for i, s in enumerate(self._generation.sequences)])
        self._add_scores(response)
        return response

    def _stream_message(self, generation: Generation) -> pb.SampleStreamResponse:
        news: list[SequenceNews] = generation.news()
        out = pb.SampleStreamResponse(samples=[
            pb.SampledTokens(sequence_index=n.index, tokens=codec.pack_int32(n.tokens), logprobs=codec.pack_float32(n.logprobs),
                             done=n.stop_reason is not None,
                             stop_reason=STOP_REASONS.get(n.stop_reason, pb.STOP_REASON_STOP))
            for n in news])
        if generation.prefill_done and not self._scores_sent:
            self._add_scores(out)  # the prompt's scores come with the first message
            self._scores_sent = True
        return out

    def _add_scores(self, out: pb.SampleResponse | pb.SampleStreamResponse) -> None:
        scores = self._generation.scores
        if scores.logprobs is not None:
            out.prompt_logprobs = codec.pack_float32(scores.logprobs)
        if scores.topk_ids is not None:
            length, k = scores.topk_ids.shape
            out.topk_prompt_logprobs.CopyFrom(pb.TopkPromptLogprobs(
                token_ids=codec.pack_int32(scores.topk_ids), logprobs=codec.pack_float32(scores.topk_logprobs),
                k=k, prompt_length=length))


def _topk_rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> pb.TopkSampleLogprobs:
    """A sequence's per-token top-k (ids, logprobs) rows as one dense message."""
    return pb.TopkSampleLogprobs(token_ids=codec.pack_int32(np.stack([ids for ids, _ in rows])),
                                 logprobs=codec.pack_float32(np.stack([lps for _, lps in rows])),
                                 k=len(rows[0][0]))

