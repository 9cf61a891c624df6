"""SamplingClient: generates from a sampler checkpoint or the base model.

Sampling requests are independent of each other and of training order: each
call is sent from a small thread pool and returns an APIFuture at once, so
many samples can be in flight together.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from gradwire import _convert, types
from gradwire._transport import request_id
from gradwire.errors import UnsupportedFeatureError, error_from_rpc
from gradwire.futures import APIFuture
from gradwire.v1 import sampling_service_pb2 as pb

if TYPE_CHECKING:
    from gradwire.client import ServiceClient


def _pieces(call) -> Iterator[types.SampledTokens]:
    """The pieces of a SampleStream call, gRPC errors as SDK exceptions."""
    try:
        for message in call:
            for piece in message.samples:
                yield _convert.sampled_tokens(piece)
    except grpc.RpcError as error:
        raise error_from_rpc(error) from None


class SamplingClient:
    """Samples from `model_path` (a `gradwire://<run_id>/sampler_weights/<name>`
    checkpoint: base model plus that LoRA adapter; or an ephemeral snapshot from
    save_weights_and_get_sampling_client) or from `base_model` alone. Create it with
    ServiceClient.create_sampling_client. retry_config (Tinker's) is accepted and
    unused: gradwire retries unreachable servers for ServiceClient(retry_s=...)."""

    def __init__(self, service: ServiceClient, model_path: str | None = None, base_model: str | None = None,
                 retry_config: Any = None, *, _holds_snapshot: bool = True):
        if (model_path is None) == (base_model is None):
            raise ValueError("give exactly one of model_path and base_model")
        self.service = service
        self.model_path = model_path
        self.base_model = base_model
        self.retry_config = retry_config
        self._stub = service._transport.sampling
        if model_path is not None and "/ephemeral/" in model_path and _holds_snapshot:
            service._use_snapshot(model_path, self)

    def __reduce__(self):
        """Picklable, as Tinker's, to hand to worker processes: the copy connects to the same
        server (one connection per process and server; the pickle holds the API key, if any).
        A copy of an ephemeral snapshot's client does not keep the snapshot: the client it was
        pickled from must live on."""
        return _unpickled, (self.service._connection, self.model_path, self.base_model)

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
               topk_sample_logprobs: int = 0, target_prompt_logprobs: types.TensorData | None = None,
               prompt_alt_tokens_k: int = 0, prompt_logprobs_last_n: int | None = None
               ) -> APIFuture[types.SampleResponse]:
        """num_samples completions of `prompt` (decoded together as one batch).

        Each sequence's logprobs are the model's unscaled log_softmax at the
        sampled tokens, comparable with training-side logprobs (exactly forward's
        numbers for the sequence when the server's capabilities say
        sampler_logprobs "training"), and each has a unique sequence_id. With
        include_prompt_logprobs the response has each prompt token's logprob
        (first None); topk_prompt_logprobs=k (up to 20)
        adds the k most likely (token, logprob) pairs at each prompt position
        (first None), topk_sample_logprobs=k the same at each generated position
        (SampledSequence.topk_logprobs). prompt_logprobs_last_n=n scores only the
        prompt's last n positions (the others are None). Tinker's
        target_prompt_logprobs and prompt_alt_tokens_k are not supported yet."""
        if target_prompt_logprobs is not None:
            raise UnsupportedFeatureError("sample(target_prompt_logprobs=...)", "not implemented by gradwire yet")
        if prompt_alt_tokens_k:
            raise UnsupportedFeatureError("sample(prompt_alt_tokens_k=...)", "not implemented by gradwire yet")
        request = _convert.message(pb.SampleRequest, **self._model(), prompt=_convert.prompt_chunks(prompt),
                                   num_samples=num_samples,
                                   sampling_params=_convert.sampling_params(sampling_params),
                                   include_prompt_logprobs=include_prompt_logprobs,
                                   topk_prompt_logprobs=topk_prompt_logprobs,
                                   topk_sample_logprobs=topk_sample_logprobs,
                                   prompt_logprobs_last_n=prompt_logprobs_last_n, request_id=request_id())
        return self._submit("Sample", request, pb.SampleResponse, _convert.sample_response)

    def compute_logprobs(self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
                         ) -> APIFuture[list[float | None]]:
        """The logprob of each prompt token given the ones before it (the first is None;
        with prompt_logprobs_last_n=n, all but the last n are None)."""
        request = _convert.message(pb.ComputeLogprobsRequest, **self._model(), prompt=_convert.prompt_chunks(prompt),
                                   prompt_logprobs_last_n=prompt_logprobs_last_n, request_id=request_id())
        return self._submit("ComputeLogprobs", request, pb.ComputeLogprobsResponse,
                            lambda response: _convert.prompt_logprobs(response.logprobs))

    def sample_stream(self, prompt: types.ModelInput, num_samples: int = 1,
                      sampling_params: types.SamplingParams | None = None) -> Iterator[types.SampledTokens]:
        """Yields tokens while they are generated: each piece holds one sample's
        new tokens and logprobs (a server whose sampler_logprobs is "training"
        sends a sample's logprobs all in its last piece); its last piece has
        stop_reason set. With the same seed the tokens are exactly those
        sample() returns. Leaving the loop early cancels the generation on the
        server."""
        call = self._stream_call(prompt, num_samples, sampling_params)
        try:
            yield from _pieces(call)
        finally:
            call.cancel()  # no-op once the stream has ended

    def _stream_call(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams | None):
        request = _convert.message(pb.SampleRequest, **self._model(), prompt=_convert.prompt_chunks(prompt),
                                   num_samples=num_samples,
                                   sampling_params=_convert.sampling_params(sampling_params or types.SamplingParams()))
        self.service._transport.check_open()
        return self._stub.SampleStream(request, metadata=self.service._transport.metadata)

    async def sample_async(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0,
                           topk_sample_logprobs: int = 0, target_prompt_logprobs: types.TensorData | None = None,
                           prompt_alt_tokens_k: int = 0, prompt_logprobs_last_n: int | None = None
                           ) -> types.SampleResponse:
        """sample's result, awaited (one await, as in Tinker: samples have no order to keep)."""
        return await self.sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                 topk_prompt_logprobs, topk_sample_logprobs, target_prompt_logprobs,
                                 prompt_alt_tokens_k, prompt_logprobs_last_n)

    async def compute_logprobs_async(self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
                                     ) -> list[float | None]:
        """compute_logprobs's result, awaited (one await, as in Tinker)."""
        return await self.compute_logprobs(prompt, prompt_logprobs_last_n)

    async def sample_stream_async(self, prompt: types.ModelInput, num_samples: int = 1,
                                  sampling_params: types.SamplingParams | None = None
                                  ) -> AsyncIterator[types.SampledTokens]:
        """sample_stream as an async iterator (`async for piece in ...`). Leaving the loop
        early, or cancelling the task that runs it, cancels the generation on the server."""
        call = self._stream_call(prompt, num_samples, sampling_params)
        pieces, end = _pieces(call), object()
        try:
            while (piece := await asyncio.to_thread(next, pieces, end)) is not end:
                yield piece
        finally:
            # Thread-safe, unlike closing `pieces` while a next() may still run in its thread:
            # that next() then ends with the call.
            call.cancel()

    def get_tokenizer(self):
        """The base model's Hugging Face tokenizer (fetched from the server, no download)."""
        return self.service._tokenizer(self.base_model or "")

    def get_base_model(self) -> str:
        """The name of the base model this client samples from."""
        if self.base_model is not None:
            return self.base_model
        return self.service.get_server_capabilities().supported_models[0].model_name

    async def get_base_model_async(self) -> str:
        return await asyncio.to_thread(self.get_base_model)

    def get_telemetry(self) -> None:
        """None: gradwire's SDK collects no telemetry."""
        return None

    async def get_tokenizer_async(self):
        return await asyncio.to_thread(self.get_tokenizer)

    # Returned by create_sampling_client; also answers .result() and await, as
    # newer Tinker SDKs return a future of the client.
    def result(self, timeout: float | None = None) -> SamplingClient:
        return self

    def __await__(self) -> Generator[Any, None, SamplingClient]:
        async def itself() -> SamplingClient:
            return self
        return itself().__await__()

    def _model(self) -> dict[str, str]:
        return {"model_path": self.model_path} if self.model_path is not None else {"base_model": self.base_model}

    def _submit(self, method: str, request, message_type, convert: Callable[[Any], Any]) -> APIFuture:
        service = self.service

        def send() -> str:  # retried while UNAVAILABLE: the request_id makes a copy the same request
            return service._transport.unary(getattr(self._stub, method), request).name

        submitted = self.service._in_background(send)

        def fetch():
            return service._transport.operation_result(submitted.result(), message_type, convert)

        return APIFuture(fetch, submitted)


_services: dict[tuple, ServiceClient] = {}  # per connection, in a process that unpickled clients
_services_lock = threading.Lock()


def _unpickled(connection: dict[str, Any], model_path: str | None, base_model: str | None) -> SamplingClient:
    from gradwire.client import ServiceClient

    key = tuple(sorted((name, tuple(sorted(value.items())) if isinstance(value, dict) else value)
                       for name, value in connection.items()))
    with _services_lock:
        if key not in _services or _services[key]._transport.closed:
            _services[key] = ServiceClient(**connection)
        service = _services[key]
    return SamplingClient(service, model_path, base_model, _holds_snapshot=False)
