"""Outputs too large for the Operation are spooled to one file per operation under
the checkpoint folder (server memory does not grow with the dataset), read back
exactly by ReadOutputs, and removed with the operation."""
from __future__ import annotations

import numpy as np
import torch
from google.longrunning import operations_pb2

import gradwire
from gradwire import _convert
from gradwire.v1 import tensor_pb2
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server.server import OUTPUTS_FOLDER
from reference import reference_logprobs, reference_model, succeeded, trained_run

N, K, COUNT = 200, 1000, 5  # 800 kB of logprobs per datum, 4 MB in all: past the inline 3 MiB


def wide_targets(seed: int) -> tuple[list[gradwire.Datum], pb.ForwardBackwardRequest]:
    """Datums with [N, K] targets, sent as sparse tensors (a few bytes on the wire)."""
    rng = np.random.default_rng(seed)
    data, request = [], pb.ForwardBackwardRequest(loss_fn="cross_entropy")
    for _ in range(COUNT):
        tokens = rng.integers(0, 320, N)
        column = rng.integers(0, 320, N)
        targets = np.zeros((N, K), np.int64)
        targets[:, 0] = column  # the other K - 1 targets are token 0
        datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens),
                               loss_fn_inputs={"target_tokens": targets})
        data.append(datum)
        message = _convert.datum_to_proto(datum, keys=())
        message.loss_fn_inputs["target_tokens"].CopyFrom(tensor_pb2.Tensor(
            sparse_csr=tensor_pb2.SparseCsr(values=column.astype("<i8").tobytes(),
                                            crow_indices=np.arange(N + 1, dtype="<i8").tobytes(),
                                            col_indices=np.zeros(N, "<i8").tobytes()),
            dtype=tensor_pb2.INT64, shape=[N, K]))
        request.data.append(message)
    return data, request


def test_large_outputs_are_spooled_read_exactly_and_removed_with_the_operation(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    data, request = wide_targets(0)
    request.model_id = tc.model_id
    name = training.Forward(request).name
    response = pb.ForwardBackwardOutput()
    succeeded(operations, name).response.Unpack(response)
    assert response.outputs_streamed and not response.loss_fn_outputs

    spool = server.server.checkpoint_root / OUTPUTS_FOLDER / name.replace("/", "_")
    assert spool.stat().st_size == COUNT * N * K * 4
    read = list(training.ReadOutputs(pb.ReadOutputsRequest(name=name)))
    assert len(read) >= 2  # chunks of at most 2 MiB
    logprobs = _convert.forward_backward_output(response, read).loss_fn_outputs
    model = reference_model(server, tc.model_id, rank=4)
    with torch.no_grad():
        for datum, output in zip(data, logprobs, strict=True):
            expected = reference_logprobs(model, datum)
            torch.testing.assert_close(torch.tensor(output["logprobs"].data), expected,
                                       rtol=1e-4, atol=1e-4)
    tail = list(training.ReadOutputs(pb.ReadOutputsRequest(name=name, start_datum_index=3)))
    assert tail[0].first_datum_index == 3

    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    assert not spool.exists()


def test_small_outputs_stay_in_memory_and_read_back_exactly(server, service, stubs):
    """Outputs an inline response carries anyway stay in memory (no file per request, whose
    system calls the event loop would pay on every training step); ReadOutputs still reads
    them, equal to the inline ones."""
    training, operations = stubs
    tc = trained_run(service)
    request = pb.ForwardBackwardRequest(model_id=tc.model_id, loss_fn="cross_entropy")
    data = [gradwire.Datum(model_input=gradwire.ModelInput.from_ints(list(range(5, 5 + n))),
                           loss_fn_inputs={"target_tokens": np.arange(6, 6 + n)}) for n in (7, 3, 12)]
    request.data.extend(_convert.datum_to_proto(datum) for datum in data)
    name = training.Forward(request).name
    response = pb.ForwardBackwardOutput()
    succeeded(operations, name).response.Unpack(response)
    inline = _convert.forward_backward_output(response, []).loss_fn_outputs
    read = _convert.forward_backward_output(pb.ForwardBackwardOutput(), training.ReadOutputs(
        pb.ReadOutputsRequest(name=name, start_datum_index=1))).loss_fn_outputs
    assert not (server.server.checkpoint_root / OUTPUTS_FOLDER / name.replace("/", "_")).exists()
    assert [output["logprobs"].data.tolist() for output in read] == \
        [output["logprobs"].data.tolist() for output in inline[1:]]
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
