"""ServiceClient and TrainingClient: the Tinker-style SDK over gRPC.

Every training call returns an APIFuture at once. A training client's requests
go out one by one from its own sender thread, numbered by seq_id in call
order, and the server runs them in that order; so forward_backward and
optim_step can be submitted back to back. If a request fails before it is
accepted, the requests queued behind it fail with AbortedError; requests made
after that run normally.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import queue
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import grpc
from tqdm.auto import tqdm

from gradwire import _convert, custom_loss, types
from gradwire.errors import AbortedError, GradwireError, UnsupportedFeatureError, error_from_rpc
from gradwire._transport import Transport, request_id, submitted
from gradwire.futures import APIFuture
from gradwire.rest_client import RestClient
from gradwire.sampling_client import SamplingClient
from gradwire.v1 import sampling_service_pb2 as sampling_pb
from gradwire.v1 import training_service_pb2 as pb

DEFAULT_BASE_URL = "localhost:50051"
MESSAGE_BUDGET_BYTES = 3 * 1024 * 1024  # datums per message: within gRPC's 4 MiB default
# A stream that ends with one of these codes may have broken on this side, unseen by the server.
_BROKEN_HERE = frozenset({grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
_SETTLE_S = 60.0  # how long settling a broken stream may take
_SENDER_IDLE_S = 2.0  # a training client's sender thread ends after this long with nothing to send



def _grpc_target(base_url: str) -> str:
    """host:port from a base URL (grpc:// or http:// and a trailing slash dropped); ValueError
    for what gRPC would retry as an unreachable server for retry_s seconds."""
    target = base_url.strip()
    for scheme in ("grpc://", "http://"):
        target = target.removeprefix(scheme)
    target = target.rstrip("/")
    if "://" in target or "/" in target or not target:
        raise ValueError(f"base_url {base_url!r}: gradwire serves plain gRPC at host:port (optionally grpc:// or "
                         "http://), without a path or TLS")
    return target

class ServiceClient:
    """Entry point: connects to a gradwire server and creates clients.

    Parameters are Tinker's, in its order. user_metadata labels every training
    run this client creates. base_url defaults to $GRADWIRE_BASE_URL, else
    localhost:50051; api_key (default $GRADWIRE_API_KEY) is sent as a bearer
    token when set; default_headers_overrides are sent as gRPC metadata.
    display_name is kept on the client only (gradwire has no
    sessions or console); project_id is a hosted feature (UnsupportedFeatureError).
    Other keywords (options of the hosted SDK's HTTP client) are ignored with a
    warning. Streamed uploads show a progress bar unless progress=False (or
    $GRADWIRE_PROGRESS=0). Calls are retried for up to retry_s seconds while the
    server is unreachable or still loading its model.
    """

    def __init__(self, user_metadata: dict[str, str] | None = None, project_id: str | None = None, *,
                 display_name: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 default_headers_overrides: dict[str, str] | None = None,
                 progress: bool | None = None, retry_s: float = 60.0, **kwargs: Any):
        if isinstance(user_metadata, str):  # gradwire < 0.2: ServiceClient(base_url, api_key)
            warnings.warn("ServiceClient(base_url) positionally is deprecated: pass base_url=...",
                          DeprecationWarning, stacklevel=2)
            user_metadata, base_url, api_key = None, user_metadata, api_key or project_id
            project_id = None
        if project_id is not None:
            raise UnsupportedFeatureError("ServiceClient(project_id=...)",
                                          "projects are a feature of the hosted Tinker service")
        if kwargs:
            warnings.warn(f"ServiceClient ignores {sorted(kwargs)}: options of the hosted Tinker "
                          "service's HTTP client", stacklevel=2)
        self.user_metadata = dict(user_metadata or {})
        self.display_name = display_name
        self.retry_s = retry_s
        self.progress = progress if progress is not None else os.environ.get("GRADWIRE_PROGRESS", "1") != "0"
        target = _grpc_target(base_url or os.environ.get("GRADWIRE_BASE_URL") or DEFAULT_BASE_URL)
        self.base_url = target
        api_key = api_key or os.environ.get("GRADWIRE_API_KEY")
        self._transport = Transport(target, api_key, retry_s, default_headers_overrides)
        # What a copy in another process connects with (a pickled SamplingClient).
        self._connection = {"base_url": target, "api_key": api_key, "retry_s": retry_s, "progress": self.progress,
                            "default_headers_overrides": dict(default_headers_overrides or {}),
                            "user_metadata": self.user_metadata}
        # Sampling requests being submitted at once, shared by this service's sampling
        # clients (an RL loop makes a new one per step).
        self._sampling_senders = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="gradwire-sampling")
        self._tokenizers: dict[str, Any] = {}
        # Ephemeral sampler weights -> sampling clients using them; released at 0.
        self._snapshot_users: dict[str, int] = {}
        # Reentrant: a garbage collection inside the lock may run a finalizer that takes it.
        self._snapshot_lock = threading.RLock()

    # ---- plumbing shared by the clients ------------------------------------------

    def _in_background(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """fn() run by one of the sampling senders (APIConnectionError once closed)."""
        self._transport.check_open()
        return self._sampling_senders.submit(fn)

    def _call(self, method: str, request, timeout: float | None = None, stub=None):
        """A TrainingService call (or one of `stub`'s); gRPC errors become SDK exceptions."""
        return self._transport.unary(getattr(stub or self._transport.training, method), request, timeout)

    def _submit_loss(self, model_id: str, next_seq: Callable[[], int], forward_only: bool,
                     data: Iterable[types.Datum], loss_fn: str, loss_fn_config: dict[str, float] | None,
                     keys: Iterable[str] | None = None, keep_graph: bool = False,
                     reuse_forward: str = "") -> str:
        """Sends a forward(-backward) batch, unary when it fits one message, else
        client-streamed in messages of at most MESSAGE_BUDGET_BYTES; returns the
        operation's name. keep_graph / reuse_forward: see ForwardBackwardRequest.

        The request takes its seq_id from next_seq() only once its message is
        whole and about to go out, so data or a field that fails before then
        leaves no gap in the run's order.
        A stream that breaks on this side (the data's iterator raises, the
        connection drops) is settled on the server before the error reaches the
        caller, so whatever the caller sends next is not aborted by it (see
        _settle_stream)."""
        self._transport.check_open()
        config = _convert.loss_fn_config(loss_fn_config)
        pieces = _convert.datum_pieces(data, keys, MESSAGE_BUDGET_BYTES)
        first = next(pieces)
        second = next(pieces, None)
        if second is None:
            request = _convert.message(pb.ForwardBackwardRequest, model_id=model_id, loss_fn=loss_fn,
                                       loss_fn_config=config, data=first, request_id=request_id(),
                                       keep_graph=keep_graph, reuse_forward=reuse_forward)
            request.seq_id = next_seq()
            return self._call("Forward" if forward_only else "ForwardBackward", request).name
        header = _convert.message(pb.StreamHeader, model_id=model_id, loss_fn=loss_fn, loss_fn_config=config,
                                  request_id=request_id(), keep_graph=keep_graph, reuse_forward=reuse_forward)
        header.seq_id = next_seq()
        total = len(data) if isinstance(data, Sized) else None
        rpc = getattr(self._transport.training, "ForwardStream" if forward_only else "ForwardBackwardStream")
        with tqdm(total=total, unit="datum", desc=f"uploading to {model_id}",
                  disable=not self.progress, leave=False) as bar:
            def messages() -> Iterator[pb.ForwardBackwardStreamRequest]:
                yield pb.ForwardBackwardStreamRequest(header=header)
                sent = 0
                for piece in itertools.chain((first, second), pieces):
                    yield pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=piece))
                    sent += len(piece)
                    bar.update(len(piece))
                yield pb.ForwardBackwardStreamRequest(end=pb.StreamEnd(num_datums=sent))

            requests = _AbandoningIterator(messages())
            try:
                return rpc(requests, metadata=self._transport.metadata).name
            except grpc.RpcError as error:
                if error.code() in _BROKEN_HERE:
                    self._settle_stream(rpc, header)
                requests.reraise()  # the data's own exception, once the server has settled the stream
                raise error_from_rpc(error) from None

    def _settle_stream(self, rpc, header: pb.StreamHeader) -> None:
        """After a stream broke on this side, sends its header again (same seq_id and
        request_id, so the server treats it as a retry) and closes it at once: the
        server answers with the first stream's operation, which is then awaited, or,
        if the header never arrived, fails the abandoned stream before answering.
        Either way the failure is settled before the next request goes out."""
        retry = iter([pb.ForwardBackwardStreamRequest(header=header)])
        try:
            operation = rpc(retry, metadata=self._transport.metadata, timeout=_SETTLE_S)
        except grpc.RpcError:
            return  # settled (the server answers an abandoned stream with its error) or unreachable
        try:
            self._transport.wait_operation(operation.name, _SETTLE_S)
        except GradwireError:
            pass

    def _forward_output(self, name: str, delete: bool = True) -> types.ForwardBackwardOutput:
        """A finished forward(-backward) operation's result, reading streamed outputs if any
        (then the operation is deleted, unless not `delete`)."""
        def read(response: pb.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
            streamed = []
            if response.outputs_streamed:
                try:
                    streamed = list(self._transport.training.ReadOutputs(
                        pb.ReadOutputsRequest(name=name), metadata=self._transport.metadata))
                except grpc.RpcError as error:
                    raise error_from_rpc(error) from None
            return _convert.forward_backward_output(response, streamed)

        return self._transport.operation_result(name, pb.ForwardBackwardOutput, read, delete)

    def _tokenizer(self, base_model: str):
        if base_model not in self._tokenizers:
            from transformers import AutoTokenizer

            files = self._call("GetTokenizer", pb.GetTokenizerRequest(base_model=base_model)).files
            with tempfile.TemporaryDirectory() as folder:
                for name, content in files.items():
                    with open(os.path.join(folder, os.path.basename(name)), "wb") as out:
                        out.write(content)
                self._tokenizers[base_model] = AutoTokenizer.from_pretrained(folder)
        return self._tokenizers[base_model]

    # ---- public API ---------------------------------------------------------------

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """Models, built-in losses, limits and device of the server."""
        return _convert.server_capabilities(
            self._call("GetServerCapabilities", pb.GetServerCapabilitiesRequest()))

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        return await asyncio.to_thread(self.get_server_capabilities)

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True,
                                    train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None,
                                    optimizer: types.OptimizerConfig | None = None) -> TrainingClient:
        """A new training run: a LoRA adapter of `rank` on `base_model`, with its own AdamW.

        Returns the client, which also answers .result() and await (Tinker's future form).
        optimizer: AdamOptimizerConfig (the default); other families are not supported."""
        _check_optimizer(optimizer)
        config = _convert.new_lora_config(rank, seed, train_mlp, train_attn, train_unembed)
        response = self._call("CreateModel", _convert.message(
            pb.CreateModelRequest, base_model=base_model, lora_config=config,
            user_metadata={**self.user_metadata, **(user_metadata or {})}, request_id=request_id()))
        return TrainingClient(self, response.model_id, base_model)

    async def create_lora_training_client_async(self, base_model: str, rank: int = 32, seed: int | None = None,
                                                train_mlp: bool = True, train_attn: bool = True,
                                                train_unembed: bool = True,
                                                user_metadata: dict[str, str] | None = None,
                                                optimizer: types.OptimizerConfig | None = None) -> TrainingClient:
        return await asyncio.to_thread(self.create_lora_training_client, base_model, rank, seed, train_mlp,
                                       train_attn, train_unembed, user_metadata, optimizer)

    def create_training_client_from_state(self, path: str, base_model: str | None = None,
                                          user_metadata: dict[str, str] | None = None,
                                          weights_access_token: str | None = None,
                                          optimizer: types.OptimizerConfig | None = None) -> TrainingClient:
        """A new training run (new model_id) with the LoRA config and weights of the
        checkpoint at `path`; its optimizer starts afresh. base_model, if given, must be
        a name of the served model (the checkpoint's base model is checked on the server)."""
        return self._training_client_from_state(path, False, base_model, user_metadata, weights_access_token,
                                                optimizer)

    def create_training_client_from_state_with_optimizer(
            self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClient:
        """A new training run continuing exactly from the training checkpoint at
        `path` (gradwire://<run_id>/weights/<name>): weights, AdamW state and step."""
        return self._training_client_from_state(path, True, base_model, user_metadata, weights_access_token)

    async def create_training_client_from_state_async(
            self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None, optimizer: types.OptimizerConfig | None = None
    ) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state, path, base_model, user_metadata,
                                       weights_access_token, optimizer)

    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, base_model: str | None = None, user_metadata: dict[str, str] | None = None,
            weights_access_token: str | None = None) -> TrainingClient:
        return await asyncio.to_thread(self.create_training_client_from_state_with_optimizer, path, base_model,
                                       user_metadata, weights_access_token)

    def _training_client_from_state(self, path: str, optimizer: bool, base_model: str | None,
                                    user_metadata: dict[str, str] | None, weights_access_token: str | None,
                                    optimizer_config: types.OptimizerConfig | None = None) -> TrainingClient:
        _check_optimizer(optimizer_config)
        if weights_access_token is not None:
            raise UnsupportedFeatureError("weights_access_token",
                                          "access to another account's weights is a hosted Tinker feature")
        if base_model is not None:
            served = [m.model_name for m in self.get_server_capabilities().supported_models]
            if base_model not in served:
                raise ValueError(f"base_model {base_model!r} is not served here: {served}")
        response = self._call("CreateModelFromState", pb.CreateModelFromStateRequest(
            path=_convert.gradwire_path(path), optimizer=optimizer,
            user_metadata={**self.user_metadata, **(user_metadata or {})}, request_id=request_id()))
        info = self._call("GetInfo", pb.GetInfoRequest(model_id=response.model_id))
        return TrainingClient(self, response.model_id, base_model or info.model_name)

    def create_rest_client(self) -> RestClient:
        """A client for training runs and checkpoints as resources (list, get, delete, download)."""
        return RestClient(self)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config: Any = None, record_stability_info: bool = False) -> SamplingClient:
        """A client that samples from a sampler checkpoint (model_path,
        `gradwire://<run_id>/sampler_weights/<name>`, or an ephemeral snapshot) or the
        base model (base_model). retry_config: see SamplingClient. record_stability_info
        (data for the hosted stable_reinforce loss) is not supported."""
        _check_stability_info(record_stability_info)
        return SamplingClient(self, model_path=model_path and _convert.gradwire_path(model_path),
                              base_model=base_model, retry_config=retry_config)

    async def create_sampling_client_async(self, model_path: str | None = None, base_model: str | None = None,
                                           retry_config: Any = None,
                                           record_stability_info: bool = False) -> SamplingClient:
        return self.create_sampling_client(model_path, base_model, retry_config, record_stability_info)

    def _use_snapshot(self, path: str, client: object) -> None:
        """Counts `client` as a user of the ephemeral weights at `path`; when the last
        user is garbage-collected, the server frees them."""
        with self._snapshot_lock:
            self._snapshot_users[path] = self._snapshot_users.get(path, 0) + 1
        weakref.finalize(client, self._drop_snapshot_user, path)

    def _drop_snapshot_user(self, path: str) -> None:
        with self._snapshot_lock:
            self._snapshot_users[path] -= 1
            if self._snapshot_users[path]:
                return
            del self._snapshot_users[path]

        def release() -> None:
            try:
                self._transport.sampling.ReleaseSamplerWeights(
                    sampling_pb.ReleaseSamplerWeightsRequest(model_path=path),
                    metadata=self._transport.metadata, timeout=30)
            except grpc.RpcError:
                pass  # gone already, or the server is away: it frees snapshots under pressure anyway

        try:
            self._sampling_senders.submit(release)
        except RuntimeError:
            pass  # the client was closed

    def get_console_url(self):
        """Hosted only: raises UnsupportedFeatureError (gradwire has no web console)."""
        raise UnsupportedFeatureError("get_console_url", "gradwire has no web console")

    def copy_weights(self, path: str, *, ttl_seconds: int | None = None, weights_access_token: str | None = None):
        """Hosted only: raises UnsupportedFeatureError."""
        raise UnsupportedFeatureError("copy_weights", "copying weights between projects is a hosted Tinker feature")

    def get_telemetry(self) -> None:
        """None: gradwire's SDK collects no telemetry."""
        return None

    def close(self, status: str | None = None, detail: str | None = None) -> None:
        """Closes the connection (status and detail, Tinker's session outcome, are not recorded)."""
        self._sampling_senders.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass
class _Pending:
    """A request waiting in a training client's send queue."""

    send: Callable[[Callable[[], int]], Any]   # given next_seq(), sends; returns what result needs
    submitted: concurrent.futures.Future
    label: str


class TrainingClient:
    """A training run. Calls return APIFutures and run on the server in call order."""

    def __init__(self, service: ServiceClient, model_id: str, base_model: str):
        self.service = service
        self.model_id = model_id
        self.base_model = base_model
        self._seq = 0
        self._queue: queue.Queue[_Pending] = queue.Queue()
        # The thread that sends the queue in order: started by a request, gone once idle,
        # so a client that is done with holds no thread (and can be collected).
        self._sender: threading.Thread | None = None
        self._sender_lock = threading.Lock()

    # ---- training ---------------------------------------------------------------

    def forward(self, data: Iterable[types.Datum], loss_fn: str,
                loss_fn_config: dict[str, float] | None = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss and per-token logprobs; gradients are not touched.

        `data` is a list of any length or an iterable (e.g. a generator reading
        from disk): batches beyond one message are streamed to the server,
        which computes while it receives."""
        return self._loss_call(True, data, loss_fn, loss_fn_config)

    def forward_backward(self, data: Iterable[types.Datum], loss_fn: str,
                         loss_fn_config: dict[str, float] | None = None
                         ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss and logprobs; the gradient accumulates until optim_step.

        `data` may be a list of any length or an iterable; large batches are
        streamed and applied all or nothing (a broken stream adds no gradient)."""
        return self._loss_call(False, data, loss_fn, loss_fn_config)

    def forward_backward_custom(self, data: Iterable[types.Datum], loss_fn: custom_loss.CustomLossFn, *,
                                loss_type_input: Any = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Trains any loss written in PyTorch over per-token logprobs.

        loss_fn(data, logprobs_list) -> (scalar loss tensor, metrics), where
        logprobs_list[i] is shaped like data[i]'s target_tokens. The function
        runs here, never on the server: a forward pass fetches the logprobs,
        loss_fn runs when they arrive, and a cross-entropy pass weighted by
        -dLoss/dlogprobs applies exactly the loss's gradient. Every
        loss_fn_inputs key reaches loss_fn; only target_tokens travels.
        Result metrics: loss:sum (the custom loss), surrogate_loss:sum, and
        the user's metrics (one of theirs named like those two is replaced).
        (Tinker's loss_type_input is not supported.)
        """
        if loss_type_input is not None:
            raise UnsupportedFeatureError("forward_backward_custom(loss_type_input=...)",
                                          "not implemented by gradwire")
        data = [d if isinstance(d, types.Datum) else types.Datum(**d) for d in data]
        service, model_id = self.service, self.model_id

        def send(next_seq: Callable[[], int]):
            forward = service._submit_loss(model_id, next_seq, True, data, "cross_entropy", None,
                                           keys=("target_tokens",), keep_graph=True)
            # The forward leg's operation is deleted once the backward leg is on its way: the
            # server waits for that leg, not for the delete.
            try:
                logprobs = [out["logprobs"].data
                            for out in service._forward_output(forward, delete=False).loss_fn_outputs]
                loss, metrics, grads = custom_loss.logprob_gradients(data, logprobs, loss_fn)
                backward = service._submit_loss(model_id, next_seq, False,
                                                custom_loss.surrogate_data(data, grads), "cross_entropy", None,
                                                reuse_forward=forward)
            finally:
                service._transport.delete_operation(forward)
            return backward, loss, metrics

        def fetch(submitted):
            name, loss, metrics = submitted
            output = service._forward_output(name)
            output.metrics = {**metrics, "loss:sum": loss,
                              "surrogate_loss:sum": output.metrics["loss:sum"]}
            return output

        return self._enqueue(send, fetch, "forward_backward_custom")

    def optim_step(self, optim_params: types.AdamParams | None = None, *,
                   adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        """One AdamW step with the accumulated gradients, which are then cleared.
        (`adam_params=` is gradwire's former name of optim_params, deprecated.)"""
        if adam_params is not None:
            warnings.warn("optim_step(adam_params=...) is deprecated: pass optim_params",
                          DeprecationWarning, stacklevel=2)
            optim_params = adam_params
        if not isinstance(optim_params, types.AdamParams):
            raise UnsupportedFeatureError(f"optim_step({type(optim_params).__name__})",
                                          "it takes an AdamParams (gradwire trains with AdamW), e.g. "
                                          "AdamParams(learning_rate=1e-4)")
        return self._ordered_call("OptimStep", pb.OptimStepRequest, pb.OptimStepResponse,
                                  lambda r: types.OptimStepResponse(metrics=dict(r.metrics)), "optim_step",
                                  adam_params=_convert.adam_params(optim_params))

    async def forward_async(self, data: Iterable[types.Datum], loss_fn: str,
                            loss_fn_config: dict[str, float] | None = None
                            ) -> APIFuture[types.ForwardBackwardOutput]:
        """Submits forward; the awaited APIFuture gives the result."""
        return await submitted(self.forward(data, loss_fn, loss_fn_config))

    async def forward_backward_async(self, data: Iterable[types.Datum], loss_fn: str,
                                     loss_fn_config: dict[str, float] | None = None
                                     ) -> APIFuture[types.ForwardBackwardOutput]:
        """Submits forward_backward; the awaited APIFuture gives the result."""
        return await submitted(self.forward_backward(data, loss_fn, loss_fn_config))

    async def forward_backward_custom_async(self, data: Iterable[types.Datum], loss_fn: custom_loss.CustomLossFn, *,
                                            loss_type_input: Any = None) -> APIFuture[types.ForwardBackwardOutput]:
        """Submits forward_backward_custom; the awaited APIFuture gives the result."""
        return await submitted(self.forward_backward_custom(data, loss_fn, loss_type_input=loss_type_input))

    async def optim_step_async(self, optim_params: types.AdamParams | None = None, *,
                               adam_params: types.AdamParams | None = None) -> APIFuture[types.OptimStepResponse]:
        """Submits optim_step; the awaited APIFuture gives the result."""
        return await submitted(self.optim_step(optim_params, adam_params=adam_params))

    # ---- checkpoints (ordered like training requests) -------------------------------

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Saves the adapter and AdamW state, after every request made before it, as
        the checkpoint gradwire://<model_id>/weights/<name>. With ttl_seconds the
        server deletes it that long after the save; a taken name is ConflictError
        unless overwrite, which replaces the old checkpoint atomically."""
        return self._ordered_call("SaveWeights", pb.SaveWeightsRequest, pb.SaveWeightsResponse,
                                  lambda r: types.SaveWeightsResponse(path=r.path), "save_state", name=name,
                                  ttl_seconds=ttl_seconds, overwrite=overwrite, user_metadata=user_metadata or {})

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None,
                                 user_metadata: dict[str, str] | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Saves the adapter alone (a peft adapter folder) as
        gradwire://<model_id>/sampler_weights/<name>, for sampling (ttl_seconds: as
        in save_state)."""
        return self._ordered_call("SaveWeightsForSampler", pb.SaveWeightsForSamplerRequest,
                                  pb.SaveWeightsForSamplerResponse,
                                  lambda r: types.SaveWeightsForSamplerResponse(path=r.path),
                                  "save_weights_for_sampler", name=name, ttl_seconds=ttl_seconds,
                                  user_metadata=user_metadata or {})

    def create_sampling_client(self, model_path: str, retry_config: Any = None,
                               record_stability_info: bool = False) -> SamplingClient:
        """A client sampling from the sampler checkpoint (or snapshot) at model_path."""
        return self.service.create_sampling_client(model_path=model_path, retry_config=retry_config,
                                                   record_stability_info=record_stability_info)

    async def create_sampling_client_async(self, model_path: str, retry_config: Any = None,
                                           record_stability_info: bool = False) -> SamplingClient:
        return self.create_sampling_client(model_path, retry_config, record_stability_info)

    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None):
        """Hosted only: raises UnsupportedFeatureError (save_weights_for_sampler writes a
        standard peft folder; RestClient.download_checkpoint fetches it)."""
        raise UnsupportedFeatureError("save_weights_external", "external weight storage is a hosted Tinker "
                                      "feature; save_weights_for_sampler + RestClient.download_checkpoint")

    async def save_weights_external_async(self, name: str, ttl_seconds: int | None = None,
                                          age_encryption_recipients: list[str] | None = None):
        self.save_weights_external(name, ttl_seconds, age_encryption_recipients)

    def get_console_url(self):
        """Hosted only: raises UnsupportedFeatureError (gradwire has no web console)."""
        raise UnsupportedFeatureError("get_console_url", "gradwire has no web console")

    def get_telemetry(self) -> None:
        """None: gradwire's SDK collects no telemetry."""
        return None

    def _snapshot_sampling_client(self, retry_config: Any = None) -> APIFuture[SamplingClient]:
        """Snapshots the adapter as it is after every request made before this one, in
        server memory (no files), and gives a SamplingClient on the snapshot. The
        server frees the snapshot once no SamplingClient of it is left (or, oldest
        first, when snapshots outgrow its memory budget)."""
        service = self.service

        def client(response: pb.SaveWeightsForSamplerResponse) -> SamplingClient:
            return service.create_sampling_client(model_path=response.path, retry_config=retry_config)

        return self._ordered_call("SaveWeightsForSampler", pb.SaveWeightsForSamplerRequest,
                                  pb.SaveWeightsForSamplerResponse, client,
                                  "save_weights_and_get_sampling_client", ephemeral=True)

    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config: Any = None,
                                             record_stability_info: bool = False,
                                             kind: str = "snapshot") -> SamplingClient:
        """A SamplingClient (which also answers .result() and await) on an in-memory
        snapshot of the current weights (kind="snapshot", the only kind). `name` is
        ignored, as in Tinker (use save_weights_for_sampler for weights that must last).
        record_stability_info (data for the hosted stable_reinforce loss) is not supported."""
        _check_stability_info(record_stability_info)
        if kind != "snapshot":
            raise UnsupportedFeatureError(f"save_weights_and_get_sampling_client(kind={kind!r})",
                                          "gradwire samples from in-memory snapshots (kind='snapshot')")
        return self._snapshot_sampling_client(retry_config).result()

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None, retry_config: Any = None,
                                                         record_stability_info: bool = False,
                                                         kind: str = "snapshot") -> SamplingClient:
        return await asyncio.to_thread(self.save_weights_and_get_sampling_client, name, retry_config,
                                       record_stability_info, kind)

    def load_state(self, path: str, weights_access_token: str | None = None) -> APIFuture[types.LoadWeightsResponse]:
        """Replaces this run's adapter weights by the checkpoint's; the optimizer starts
        afresh and accumulated gradients are dropped. A checkpoint that is missing,
        damaged or does not fit leaves the run as it was. (weights_access_token, for
        another account's weights, is a hosted feature.)"""
        return self._load_call(path, False, weights_access_token)

    def load_state_with_optimizer(self, path: str, weights_access_token: str | None = None
                                  ) -> APIFuture[types.LoadWeightsResponse]:
        """As load_state, and restores the AdamW state and step too (training
        checkpoints only), so training continues exactly as it would have."""
        return self._load_call(path, True, weights_access_token)

    def unload(self) -> APIFuture[types.UnloadModelResponse]:
        """Frees the run's adapter and optimizer state on the server, after every
        request made before it. Its checkpoints stay; later calls fail."""
        return self._ordered_call("UnloadModel", pb.UnloadModelRequest, pb.UnloadModelResponse,
                                  lambda r: types.UnloadModelResponse(model_id=r.model_id), "unload")

    async def save_state_async(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                               user_metadata: dict[str, str] | None = None) -> APIFuture[types.SaveWeightsResponse]:
        """Submits save_state; the awaited APIFuture gives the result."""
        return await submitted(self.save_state(name, ttl_seconds, overwrite, user_metadata))

    async def save_weights_for_sampler_async(self, name: str, ttl_seconds: int | None = None,
                                             user_metadata: dict[str, str] | None = None
                                             ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Submits save_weights_for_sampler; the awaited APIFuture gives the result."""
        return await submitted(self.save_weights_for_sampler(name, ttl_seconds, user_metadata))

    async def load_state_async(self, path: str, weights_access_token: str | None = None
                               ) -> APIFuture[types.LoadWeightsResponse]:
        """Submits load_state; the awaited APIFuture gives the result."""
        return await submitted(self.load_state(path, weights_access_token))

    async def load_state_with_optimizer_async(self, path: str, weights_access_token: str | None = None
                                              ) -> APIFuture[types.LoadWeightsResponse]:
        """Submits load_state_with_optimizer; the awaited APIFuture gives the result."""
        return await submitted(self.load_state_with_optimizer(path, weights_access_token))

    async def unload_async(self) -> APIFuture[types.UnloadModelResponse]:
        """Submits unload; the awaited APIFuture gives the result."""
        return await submitted(self.unload())

    def _load_call(self, path: str, optimizer: bool, weights_access_token: str | None
                   ) -> APIFuture[types.LoadWeightsResponse]:
        if weights_access_token is not None:
            raise UnsupportedFeatureError("weights_access_token",
                                          "access to another account's weights is a hosted Tinker feature")
        return self._ordered_call("LoadWeights", pb.LoadWeightsRequest, pb.LoadWeightsResponse,
                                  lambda r: types.LoadWeightsResponse(path=r.path),
                                  "load_state_with_optimizer" if optimizer else "load_state",
                                  path=_convert.gradwire_path(path), optimizer=optimizer)

    def _ordered_call(self, rpc: str, request_type, response_type, convert: Callable[[Any], Any],
                      label: str, **fields) -> APIFuture:
        """A request that takes its place in the run's order and returns an Operation."""
        service, model_id = self.service, self.model_id

        def send(next_seq):
            request = _convert.message(request_type, model_id=model_id, request_id=request_id(), **fields)
            request.seq_id = next_seq()  # once the message is whole: a field refused here costs no seq_id
            return service._call(rpc, request).name

        def fetch(name):
            return convert(service._transport.operation_result(name, response_type))

        return self._enqueue(send, fetch, label)

    # ---- information --------------------------------------------------------------

    def get_info(self) -> types.GetInfoResponse:
        """Base model, LoRA rank and settings, steps taken."""
        return _convert.run_info(self.service._call("GetInfo", pb.GetInfoRequest(model_id=self.model_id)))

    async def get_info_async(self) -> types.GetInfoResponse:
        return await asyncio.to_thread(self.get_info)

    def get_tokenizer(self):
        """The base model's Hugging Face tokenizer (fetched from the server, no download)."""
        return self.service._tokenizer(self.base_model)

    async def get_tokenizer_async(self):
        return await asyncio.to_thread(self.get_tokenizer)

    # Client-creation methods return the client; it also answers .result() and
    # await, so code written for newer Tinker SDKs (which return futures) runs.
    def result(self, timeout: float | None = None) -> TrainingClient:
        return self

    def __await__(self) -> Generator[Any, None, TrainingClient]:
        async def itself() -> TrainingClient:
            return self
        return itself().__await__()

    # ---- the send queue ---------------------------------------------------------------

    def _loss_call(self, forward_only: bool, data: Iterable[types.Datum], loss_fn: str,
                   loss_fn_config: dict[str, float] | None) -> APIFuture[types.ForwardBackwardOutput]:
        service, model_id = self.service, self.model_id

        def send(next_seq):
            return service._submit_loss(model_id, next_seq, forward_only, data, loss_fn, loss_fn_config)

        return self._enqueue(send, service._forward_output,
                             "forward" if forward_only else "forward_backward")

    def _enqueue(self, send, fetch, label: str) -> APIFuture:
        pending = _Pending(send, concurrent.futures.Future(), label)
        with self._sender_lock:
            self._queue.put(pending)
            if self._sender is None:
                self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                                name=f"gradwire-sender-{self.model_id}")
                self._sender.start()

        return APIFuture(lambda: fetch(pending.submitted.result()), pending.submitted)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send_loop(self) -> None:
        while True:
            try:
                pending = self._queue.get(timeout=_SENDER_IDLE_S)
            except queue.Empty:
                with self._sender_lock:  # a request queued meanwhile keeps this thread
                    if self._queue.empty():
                        self._sender = None
                        return
                continue
            try:
                pending.submitted.set_result(pending.send(self._next_seq))
            except BaseException as error:  # noqa: BLE001 - delivered through the future
                # Abort first: a request the caller submits once it sees this error must run.
                self._abort_queued(pending, error)
                pending.submitted.set_exception(error)

    def _abort_queued(self, failed: _Pending, error: BaseException) -> None:
        """Fails what was queued behind a failed request (never an optimizer step
        without the gradient the user meant to include)."""
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                return
            pending.submitted.set_exception(AbortedError(
                f"ABORTED: not sent: an earlier {failed.label} of {self.model_id} failed: {error}",
                grpc.StatusCode.ABORTED, "EARLIER_REQUEST_FAILED"))


def _check_stability_info(record_stability_info: bool) -> None:
    if record_stability_info:
        raise UnsupportedFeatureError("record_stability_info=True",
                                      "it records data for the hosted stable_reinforce loss, whose "
                                      "formula is not published")


def _check_optimizer(optimizer: types.OptimizerConfig | None) -> None:
    if optimizer is not None and getattr(optimizer, "type", None) != "adamw":
        raise UnsupportedFeatureError(f"optimizer {getattr(optimizer, 'type', optimizer)!r}",
                                      "gradwire trains with AdamW only")


class _AbandoningIterator:
    """Wraps a stream's request iterator: if the iterator raises, the stream ends
    there without a StreamEnd (the server then abandons it, settles the failure
    and answers) instead of being cancelled, and reraise() gives the caller the
    iterator's own exception."""

    def __init__(self, iterator: Iterator):
        self._iterator = iterator
        self._error: BaseException | None = None

    def __iter__(self) -> _AbandoningIterator:
        return self

    def __next__(self):
        if self._error is not None:
            raise StopIteration
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except Exception as error:  # noqa: BLE001 - handed to the caller by reraise()
            self._error = error
            raise StopIteration from None

    def reraise(self) -> None:
        if self._error is not None:
            raise self._error
