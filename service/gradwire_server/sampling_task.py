"""A Sample / SampleStream / ComputeLogprobs request as a worker task: the first
turn loads the adapter and prefills the prompt, each later turn decodes
DECODE_STEPS_PER_TURN tokens, so training runs interleave with a long
generation. A streaming task reports each turn's new tokens as it goes."""
from __future__ import annotations

import secrets

import numpy as np
from google.protobuf import message

from gradwire import _codec
from gradwire.v1 import sampling_service_pb2 as pb
from gradwire_server.checkpoints import Checkpoint
from gradwire_server.engine import Engine
from gradwire_server.errors import FieldViolation, invalid_argument
from gradwire_server.sampler import Generation, PromptScores, SampleSpec, SequenceNews
from gradwire_server.sampler_weights import AdapterLoadError, SamplerAdapters, WeightsSnapshot
from gradwire_server.scheduler import Step

# Each turn switches the model's adapters (to a sampler adapter: peft walks every
# module and parameter, milliseconds with a few runs loaded): turns long enough to
# amortise it.
DECODE_STEPS_PER_TURN = 64
STOP_REASONS = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


class SampleTask:
    """`checkpoint`: a sampler checkpoint or ephemeral snapshot, None for the base model. With `stream`,
    every turn reports a SampleStreamResponse as an operation output."""

    def __init__(self, engine: Engine, adapters: SamplerAdapters, checkpoint: Checkpoint | WeightsSnapshot | None,
                 spec: SampleSpec, stream: bool = False):
        self.engine, self.adapters, self.checkpoint = engine, adapters, checkpoint
        self.spec, self.stream = spec, stream
        self._generation: Generation | None = None
        self._scores = PromptScores()

    def ready(self) -> bool:
        return True

    def discard(self) -> None:
        self._generation = None  # frees the KV cache

    def step(self) -> Step:
        first = self._generation is None
        if first:
            self._generation = Generation(self.spec, self.engine.device, self.engine.base.tokenizer.decode)
        generation = self._generation
        # Looked up every turn: other requests' checkpoints may have evicted it since.
        adapter = self._adapter()
        with self.adapters.model_with(adapter) as model, self.engine.autocast():
            if first:
                self._scores = generation.prefill(model)
            else:
                generation.decode(model, DECODE_STEPS_PER_TURN)
        outputs = None
        if self.stream and (news := self._stream_message(generation.news(), first)).ByteSize():
            outputs = [news]
        if generation.done:
            response = self._response()
            self._generation = None  # frees the KV cache now, not when the job is collected
            return Step(True, response, outputs=outputs)
        return Step(False, outputs=outputs)

    def _adapter(self) -> str | None:
        if self.checkpoint is None:
            return None
        try:
            return self.adapters.adapter_for(self.checkpoint)
        except AdapterLoadError as error:
            raise invalid_argument([FieldViolation("model_path", str(error))]) from None

    def _response(self) -> message.Message:
        if self.spec.num_samples == 0:
            return pb.ComputeLogprobsResponse(logprobs=_codec.pack_float32(self._scores.logprobs))
        request_id = secrets.token_hex(8)  # sequence ids: unique across requests and restarts
        response = pb.SampleResponse(sequences=[
            pb.SampledSequence(stop_reason=STOP_REASONS[s.stop_reason], tokens=_codec.pack_int32(s.tokens),
                               logprobs=_codec.pack_float32(s.logprobs), sequence_id=f"{request_id}-{i}",
                               topk_logprobs=_topk_rows(s.topk) if s.topk else None)
            for i, s in enumerate(self._generation.sequences)])
        self._add_scores(response)
        return response

    def _stream_message(self, news: list[SequenceNews], first: bool) -> pb.SampleStreamResponse:
        out = pb.SampleStreamResponse(samples=[
            pb.SampledTokens(sequence_index=n.index, tokens=_codec.pack_int32(n.tokens), logprobs=_codec.pack_float32(n.logprobs),
                             done=n.stop_reason is not None,
                             stop_reason=STOP_REASONS.get(n.stop_reason, pb.STOP_REASON_STOP))
            for n in news])
        if first:
            self._add_scores(out)
        return out

    def _add_scores(self, out: pb.SampleResponse | pb.SampleStreamResponse) -> None:
        scores = self._scores
        if scores.logprobs is not None:
            out.prompt_logprobs = _codec.pack_float32(scores.logprobs)
        if scores.topk_ids is not None:
            length, k = scores.topk_ids.shape
            out.topk_prompt_logprobs.CopyFrom(pb.TopkPromptLogprobs(
                token_ids=_codec.pack_int32(scores.topk_ids), logprobs=_codec.pack_float32(scores.topk_logprobs),
                k=k, prompt_length=length))


def _topk_rows(rows: list[tuple[np.ndarray, np.ndarray]]) -> pb.TopkSampleLogprobs:
    """A sequence's per-token top-k (ids, logprobs) rows as one dense message."""
    return pb.TopkSampleLogprobs(token_ids=_codec.pack_int32(np.stack([ids for ids, _ in rows])),
                                 logprobs=_codec.pack_float32(np.stack([lps for _, lps in rows])),
                                 k=len(rows[0][0]))
