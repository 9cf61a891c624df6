"""The server's life around the requests: health while the model loads, a SIGTERM
that drains, operation TTL and long-poll cap, the seq_id gap timeout, the CLI
flags as parsed, and the SDK's environment variables. Timeouts are shortened
through ServerConfig instead of waiting them out."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradwire
from gradwire import _convert, client
from gradwire.v1 import codec, sampling_service_pb2, sampling_service_pb2_grpc
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import cli, server as server_module
from gradwire_server.server import BackgroundServer, GradwireServer, ServerConfig
from conftest import free_port, raw_stubs, server_config, start_cli_server
from reference import (assert_state_equal, new_run, random_data, raw_request, response_or_error, run_state,
                       wait_for_stream_operation, wait_operation, worker_busy)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
TTL_S, MAX_WAIT_S, GAP_S = 3.0, 0.5, 1.0


@pytest.fixture(scope="module")
def short_server(tmp_path_factory):
    """An in-process server with a 3 s operation TTL, a 0.5 s long-poll cap and a 1 s seq_id gap timeout."""
    background = BackgroundServer(server_config(
        checkpoint_dir=tmp_path_factory.mktemp("short"),
        operation_ttl_s=TTL_S, max_wait_s=MAX_WAIT_S, seq_gap_timeout_s=GAP_S))
    yield background
    background.stop()


@pytest.fixture()
def short_stubs(short_server):
    """raw_stubs of short_server."""
    with raw_stubs(short_server.address) as training_and_operations:
        yield training_and_operations


def wait_done(operations, name: str) -> operations_pb2.Operation:
    """Polls (each WaitOperation returns after at most the cap) until the operation is done."""
    deadline = time.monotonic() + 30
    while not (operation := wait_operation(operations, name)).done:
        assert time.monotonic() < deadline, f"{name} never finished"
    return operation


# ---- operations: TTL and the long-poll cap --------------------------------------------------------

def test_capabilities_advertise_the_configured_limits(short_server):
    with gradwire.ServiceClient(base_url=short_server.address) as service:
        limits = service.get_server_capabilities().limits
    assert (limits["operation_ttl_seconds"], limits["max_wait_seconds"]) == (TTL_S, MAX_WAIT_S)


def test_wait_operation_returns_at_the_cap_with_the_operation_not_done(short_server, short_stubs):
    """A 30 s WaitOperation on an operation that cannot finish (the worker is busy) comes
    back unfinished at the server's 0.5 s cap, well within the call's 10 s deadline."""
    training, operations = short_stubs
    run_id = new_run(training)
    with worker_busy(short_server):
        name = training.ForwardBackward(raw_request(run_id, 1, random_data(80))).name
        waited = operations.WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout={"seconds": 30}), timeout=10)
        assert not waited.done
    assert not wait_done(operations, name).HasField("error")


def test_a_finished_operation_expires_after_its_ttl_and_an_unfinished_one_never(short_server, short_stubs):
    training, operations = short_stubs
    run_id = new_run(training)
    name = training.ForwardBackward(raw_request(run_id, 1, random_data(81))).name
    done = wait_done(operations, name)
    assert operations.GetOperation(operations_pb2.GetOperationRequest(name=name)) == done
    with worker_busy(short_server):
        queued = training.ForwardBackward(raw_request(run_id, 2, random_data(82))).name
        deadline = time.monotonic() + 30
        while True:
            try:
                operations.GetOperation(operations_pb2.GetOperationRequest(name=name))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                break
            assert time.monotonic() < deadline, "the finished operation never expired"
            time.sleep(0.2)
        # Queued for longer than the TTL, yet still there.
        assert not operations.GetOperation(operations_pb2.GetOperationRequest(name=queued)).done
    assert not wait_done(operations, queued).HasField("error")


# ---- the seq_id gap ---------------------------------------------------------------------------------

def test_a_missing_seq_id_aborts_the_held_requests_after_the_gap_timeout(short_server, short_stubs):
    """seq_id 2 and 3 wait for 1, which never comes: after the gap timeout both are ABORTED
    naming the missing seq_id, nothing ran; a late seq_id 1 is ABORTED as skipped; the run
    then goes on with seq_id 4."""
    training, operations = short_stubs
    run_id = new_run(training)
    before = run_state(short_server, run_id)
    held = [training.ForwardBackward(raw_request(run_id, 2, random_data(83))).name,
            training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=3,
                                                   adam_params=pb.AdamParams(learning_rate=1e-2))).name]
    for name in held:
        aborted = wait_done(operations, name)
        assert aborted.error.code == grpc.StatusCode.ABORTED.value[0]
        assert f"seq_id 1 of {run_id} never arrived within {GAP_S:g} s" in aborted.error.message
    assert_state_equal(before, run_state(short_server, run_id))
    with pytest.raises(grpc.RpcError) as late:
        training.ForwardBackward(raw_request(run_id, 1, random_data(84)))
    assert late.value.code() == grpc.StatusCode.ABORTED
    assert f"seq_id 1 of {run_id} has already run or was skipped" in late.value.details()
    assert_state_equal(before, run_state(short_server, run_id))
    assert not wait_done(operations, training.ForwardBackward(raw_request(run_id, 4, random_data(85))).name) \
        .HasField("error")


def test_a_request_the_sdk_refuses_takes_no_seq_id(short_server):
    """A field the SDK or protobuf refuses raises at once, naming it, before the request takes a
    seq_id: the next request runs (after a gap it would wait the 1 s gap timeout and be ABORTED)."""
    client = gradwire.ServiceClient(base_url=short_server.address)
    tc = client.create_lora_training_client(base_model="tiny-random", rank=4)
    data = random_data(86)
    past_int32 = gradwire.Datum(model_input=gradwire.ModelInput([gradwire.EncodedTextChunk([5, 2**32 + 8])]),
                                loss_fn_inputs={"target_tokens": [6, 7]})
    # [8, 70000] int64 candidates: 4.3 MiB, more than one message carries (gRPC answered
    # RESOURCE_EXHAUSTED after the seq_id was taken).
    past_a_message = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(list(range(8))),
                                    loss_fn_inputs={"target_tokens": np.full((8, 70000), 5, np.int64)})
    refused = [(lambda: tc.forward_backward(data, "cross_entropy", {"beta": "x"}), TypeError,
                "loss_fn_config['beta']: 'x' is not a number"),
               (lambda: tc.forward(data, 123), TypeError, "loss_fn=123: "),
               (lambda: tc.save_state(123), TypeError, "name=123: "),
               (lambda: tc.forward([*data, past_int32], "cross_entropy"), ValueError,
                f"data[{len(data)}]: model_input: token id 4294967304 (position 1) does not fit"),
               (lambda: tc.forward([*data, past_a_message], "cross_entropy"), ValueError,
                f"data[{len(data)}] is 4.27 MiB encoded, more than one gRPC message carries")]
    try:
        for call, error, message in refused:
            with pytest.raises(error) as raised:
                call().result(30)
            assert str(raised.value).startswith(message)
            assert tc.forward_backward(data, "cross_entropy").result(30).metrics["loss:sum"] > 0
    finally:
        client.close()


# ---- health while the model loads ---------------------------------------------------------------------

def test_health_is_not_serving_and_calls_unavailable_while_the_model_loads(tmp_path, monkeypatch):
    """The port opens before the model is loaded: health says NOT_SERVING (overall and per
    service) and every call is UNAVAILABLE "still loading" until the model is in; then
    SERVING. The real loader runs, held back until the checks are done. The server is
    configured from a command line, so --keep-graph-budget-mb reaches the engine. The model
    loads and the memory plan is made on the worker thread, which runs every later use of the
    model (on a CPU host a torch op in another thread slowed the worker's small ops threefold)."""
    loading = threading.Event()
    real_load, real_plan = server_module.load_model, server_module.Engine.plan_memory
    threads = []

    def held_load(*args):
        loading.wait(60)
        threads.append(threading.current_thread().name)
        return real_load(*args)

    def plan_memory(engine, *args):
        threads.append(threading.current_thread().name)
        return real_plan(engine, *args)

    monkeypatch.setattr(server_module, "load_model", held_load)
    monkeypatch.setattr(server_module.Engine, "plan_memory", plan_memory)
    port = free_port()
    config = cli.parse_config(["--model", "tiny-random", "--port", str(port), "--checkpoint-dir", str(tmp_path),
                               "--keep-graph-budget-mb", "1.5"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gradwire_server = GradwireServer(config)
    started = asyncio.run_coroutine_threadsafe(gradwire_server.start(), loop)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        services = ["", "gradwire.v1.TrainingService", "gradwire.v1.SamplingService", "gradwire.v1.ResourceService"]
        statuses = [health.Check(health_pb2.HealthCheckRequest(service=s), wait_for_ready=True, timeout=60).status
                    for s in services]
        assert statuses == [NOT_SERVING] * 4
        training = pb_grpc.TrainingServiceStub(channel)
        calls = [lambda: training.GetServerCapabilities(pb.GetServerCapabilitiesRequest()),
                 lambda: training.ForwardBackward(raw_request("run-x", 1, random_data(86))),
                 lambda: sampling_service_pb2_grpc.SamplingServiceStub(channel).Sample(
                     sampling_service_pb2.SampleRequest(base_model="tiny-random"))]
        for call in calls:
            with pytest.raises(grpc.RpcError) as raised:
                call()
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in raised.value.details()
        assert not started.done()
        loading.set()
        started.result(60)
        assert [health.Check(health_pb2.HealthCheckRequest(service=s)).status for s in services] == [SERVING] * 4
        assert training.GetServerCapabilities(
            pb.GetServerCapabilitiesRequest()).supported_models[0].model_name == "tiny-random"
        assert gradwire_server.engine.keep_graph_budget_bytes == int(1.5 * 2**20)
        assert threads == ["gradwire-worker"] * 2
    finally:
        loading.set()
        channel.close()
        if started.done() and started.exception() is None:
            asyncio.run_coroutine_threadsafe(gradwire_server.stop(grace_s=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_cli_flags_are_parsed_into_the_config(tmp_path, capsys):
    """Every flag reaches its ServerConfig field; the fields no flag sets keep ServerConfig's defaults."""
    config = cli.parse_config(["--model", "tiny-random", "--host", "0.0.0.0", "--port", "0",
                               "--checkpoint-dir", str(tmp_path), "--dtype", "bfloat16", "--load-format", "dummy",
                               "--micro-batch-tokens", "256", "--keep-graph-budget-mb", "0", "--kv-cache-mb", "1.5",
                               "--activation-checkpointing", "--no-cuda-graphs", "--attention", "eager",
                               "--sampler-logprobs", "training"])
    assert config == ServerConfig(model="tiny-random", host="0.0.0.0", port=0, checkpoint_dir=tmp_path,
                                  dtype="bfloat16", load_format="dummy", micro_batch_tokens=256,
                                  keep_graph_budget_mb=0.0, kv_cache_mb=1.5, activation_checkpointing=True,
                                  cuda_graphs=False, attention="eager", sampler_logprobs="training")
    # None: sized from the device's free memory; auto: the dtype that suits the device.
    assert cli.parse_config(["--model", "tiny-random"]) == ServerConfig(
        model="tiny-random", host="127.0.0.1", port=50051, checkpoint_dir=pathlib.Path("gradwire-checkpoints"),
        dtype="auto", load_format="auto", micro_batch_tokens=None, keep_graph_budget_mb=None, kv_cache_mb=None,
        activation_checkpointing=False, cuda_graphs=True, attention="auto", sampler_logprobs="auto")
    for tokens in ("0", str(2**31)):  # (the capabilities' int64 once failed on 1e20: every call INTERNAL)
        with pytest.raises(SystemExit):
            cli.parse_config(["--model", "tiny-random", "--micro-batch-tokens", tokens])
        assert f"--micro-batch-tokens must be in [1, {2**31 - 1}]" in capsys.readouterr().err
    assert [server_module.listen_address(host, 7) for host in ("127.0.0.1", "::1", "[::1]", "localhost")] == \
        ["127.0.0.1:7", "[::1]:7", "[::1]:7", "localhost:7"]
    # Values that would serve somewhere else or with nonsense (70000 wrapped to port 4464; a
    # negative budget was logged and used) are refused, naming the flag.
    for flag, value, expected in [("--port", "70000", "70000 is not a port"), ("--port", "-1", "-1 is not a port"),
                                  ("--kv-cache-mb", "0", "0 is not a size in MB"),
                                  ("--kv-cache-mb", "nan", "nan is not a size in MB"),
                                  ("--kv-cache-mb", "1e300", "1e300 is not a size in MB"),  # (it crashed)
                                  ("--keep-graph-budget-mb", "-100", "-100 is not a size in MB"),
                                  ("--keep-graph-budget-mb", "inf", "inf is not a size in MB")]:
        with pytest.raises(SystemExit):
            cli.parse_config(["--model", "tiny-random", flag, value])
        assert f"argument {flag}: {expected}" in capsys.readouterr().err


STARTUP_FAILURES = {
    "missing-folder": (["--model", "{tmp}/no-such-model"], {}, "--model {tmp}/no-such-model: no such folder"),
    "unknown-preset": (["--model", "no-such-preset", "--load-format", "dummy"], {},
                       "--model no-such-preset: --load-format dummy needs a preset"),
    # A fresh inductor cache, so the layers' kernels must be built, and no C++ compiler to build them.
    "compile-without-a-compiler": (["--model", "tiny-random", "--compile"],
                                   {"CXX": "/no/such/compiler", "TORCHINDUCTOR_CACHE_DIR": "{tmp}/inductor"},
                                   "--compile: torch.compile could not build the decoder layers' kernels"),
    "checkpoint-dir-a-file": (["--model", "tiny-random", "--checkpoint-dir", "{tmp}/a-file"], {},
                              "--checkpoint-dir {tmp}/a-file: not a folder"),
    "checkpoint-dir-under-a-file": (["--model", "tiny-random", "--checkpoint-dir", "{tmp}/a-file/checkpoints"], {},
                                    "--checkpoint-dir {tmp}/a-file/checkpoints: [Errno 20] Not a directory"),
    "damaged-run-index": (["--model", "tiny-random", "--checkpoint-dir", "{tmp}/damaged"], {},
                          "--checkpoint-dir {tmp}/damaged: file is not a database"),
    "kv-cache-too-large": (["--model", "tiny-random", "--kv-cache-mb", "1e9"], {},
                           "--kv-cache-mb 1e+09: cannot allocate the sampler's KV cache, 1,000,000,000 MiB"),
    # The CPU has no memory-efficient SDPA kernel.
    "attention-kernel-missing": (["--model", "tiny-random", "--attention", "efficient"], {},
                                 "--attention efficient: SDPA's efficient_attention kernel does not run this "
                                 "model's attention on this device (cpu"),
    # TEST-NET-1 (RFC 5737): an address of no machine, refused without a name lookup.
    "host-not-of-this-machine": (["--model", "tiny-random", "--host", "192.0.2.1"], {},
                                 "--host 192.0.2.1: cannot listen on 192.0.2.1:0: not an address of this machine"),
}


@pytest.mark.parametrize("failure", list(STARTUP_FAILURES))
def test_a_server_that_cannot_start_says_which_flag_and_why(tmp_path, failure):
    """A server that cannot start exits with status 1 and one line naming the flag and the
    cause, not a traceback."""
    if failure == "compile-without-a-compiler" and torch.cuda.is_available():
        pytest.skip("on CUDA the layers compile with triton, not a C++ compiler")
    if failure == "attention-kernel-missing" and torch.cuda.is_available():
        pytest.skip("CUDA has the memory-efficient kernel")
    args, env, expected = STARTUP_FAILURES[failure]
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / server_module.INDEX_FILE).write_text("not a database")
    result = subprocess.run(
        [sys.executable, "-m", "gradwire_server", "--port", "0", "--checkpoint-dir", str(tmp_path / "checkpoints"),
         *(arg.format(tmp=tmp_path) for arg in args)],
        env={**os.environ, **{key: value.format(tmp=tmp_path) for key, value in env.items()}},
        capture_output=True, text=True, timeout=300)
    assert_refused_to_start(result, expected.format(tmp=tmp_path))


def test_a_second_server_on_a_port_in_use_refuses_to_start(server, tmp_path):
    """A server started on the port of one already serving exits with status 1, naming
    --port, instead of sharing the port (the kernel would split clients between the two)."""
    port = server.server.port
    result = second_server("--port", str(port), "--checkpoint-dir", str(tmp_path / "checkpoints"))
    assert_refused_to_start(result, f"--port {port}: cannot listen on 127.0.0.1:{port}: in use")
    with raw_stubs(server.address) as (training, _):  # the first server still serves
        assert new_run(training)


def test_a_second_server_on_a_checkpoint_dir_in_use_refuses_to_start(server, service):
    """A server started on the checkpoint folder of one already serving exits with status 1,
    naming --checkpoint-dir and the other server, and leaves the folder as it was: the first
    server's run stays loaded (a second server's startup would mark every run unloaded and
    delete saves in progress)."""
    root = server.server.checkpoint_root
    tc = service.create_lora_training_client(base_model="tiny-random", rank=4)
    tc.save_state("before-the-second-server").result()
    result = second_server("--port", "0", "--checkpoint-dir", str(root))
    assert_refused_to_start(result, f"--checkpoint-dir {root}: in use by another gradwire-server (pid {os.getpid()})")
    assert service.create_rest_client().get_training_run(tc.model_id).result().loaded
    tc.save_state("after-the-second-server").result()


def second_server(*args: str) -> subprocess.CompletedProcess:
    """A CLI server of tiny-random with `args`, expected to exit; a test failure if it serves instead."""
    try:
        return subprocess.run([sys.executable, "-m", "gradwire_server", "--model", "tiny-random", *args],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as still_running:  # killed by run()
        pytest.fail(f"the second server started: {still_running.stderr.decode()}")


def assert_refused_to_start(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"gradwire-server: {expected}"), result.stderr
    assert "Traceback" not in result.stderr


# ---- SIGTERM ------------------------------------------------------------------------------------------------

def test_a_stop_while_the_model_loads_never_serves(tmp_path, monkeypatch, caplog):
    """A stop (SIGTERM) while the model loads: the server stops once the load ends (it cannot
    be interrupted) and never turns SERVING or says it listens. The real loader runs, held back
    until the stop has been asked for."""
    loading, entered = threading.Event(), threading.Event()
    real_load = server_module.load_model

    def held_load(*args):
        entered.set()
        loading.wait(60)
        return real_load(*args)

    monkeypatch.setattr(server_module, "load_model", held_load)
    caplog.set_level(logging.INFO, logger="gradwire_server")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        stop = asyncio.Event()
        served = asyncio.run_coroutine_threadsafe(
            server_module.serve_until(server_config(checkpoint_dir=tmp_path), stop), loop)
        assert entered.wait(60)
        loop.call_soon_threadsafe(stop.set)  # queued before the load can end
        loading.set()
        served.result(60)
        messages = [record.getMessage() for record in caplog.records]
        assert any("stopping before it serves" in message for message in messages), messages
        assert not any("listening on" in message for message in messages), messages
    finally:
        loading.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)


def test_a_second_signal_exits_at_once_without_draining(tmp_path):
    """SIGTERM, then SIGINT, while a 1.1B random model loads (tens of seconds here): the process
    exits at once with status 1 and one line saying so, instead of waiting for the load. The server
    is kept off any GPU: there the load takes a second or two and would end before the signals."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gradwire_server", "--model", "llama-1b", "--load-format", "dummy", "--dtype", "float32",
         "--port", str(port), "--checkpoint-dir", str(tmp_path)], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # the port opens before the load
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=120).status == NOT_SERVING
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    assert stderr.strip().splitlines()[-1] == "gradwire-server: a second signal: exiting without draining"
    assert "listening on" not in stderr



def test_sigterm_fails_what_did_not_run_then_exits_cleanly(tmp_path):
    """SIGTERM while a client is mid-stream and an optimizer step waits behind the stream:
    health turns NOT_SERVING at once; the stream's RPC answers UNAVAILABLE "the server is
    stopping" (nothing of it is applied) without waiting for the rest of its upload; the clients
    long-polling the step, and a step held for a seq_id that never came, read that too; a
    request made after the signal is refused (UNAVAILABLE); then the process exits with status 0."""
    process, address = start_cli_server("--checkpoint-dir", str(tmp_path))
    try:
        channel = grpc.insecure_channel(address)
        training, operations = pb_grpc.TrainingServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        run_id = new_run(training)
        rest = threading.Event()

        def messages():
            yield pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(model_id=run_id, seq_id=1,
                                                                         loss_fn="cross_entropy"))
            yield pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(
                data=[_convert.datum_to_proto(d) for d in random_data(87)]))
            rest.wait(30)
            yield pb.ForwardBackwardStreamRequest(end=pb.StreamEnd(num_datums=4))

        outcome: list = []
        upload = threading.Thread(
            target=lambda: outcome.append(response_or_error(training.ForwardBackwardStream, messages())))
        upload.start()
        wait_for_stream_operation(operations, run_id, received=4)
        step = training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=2,
                                                      adam_params=pb.AdamParams(learning_rate=1e-2))).name
        held = training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=4,
                                                      adam_params=pb.AdamParams(learning_rate=1e-2))).name
        polled: list = []
        polls = [threading.Thread(target=lambda name=name: polled.append(wait_operation(operations, name)))
                 for name in (step, held)]
        for poll in polls:
            poll.start()  # clients waiting for the steps' results, as result() does
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        upload.join(30)
        rest.set()
        for poll in polls:
            poll.join(30)
        assert isinstance(outcome[0], grpc.RpcError) and outcome[0].code() == grpc.StatusCode.UNAVAILABLE, outcome
        assert outcome[0].details().startswith("the server is stopping")
        for waited in polled:
            assert waited.done and waited.error.code == grpc.StatusCode.UNAVAILABLE.value[0], polled
            assert waited.error.message.startswith("the server is stopping")
        assert len(polled) == 2
        late = response_or_error(training.ForwardBackward, raw_request(run_id, 3, random_data(88)))
        assert isinstance(late, grpc.RpcError) and late.code() == grpc.StatusCode.UNAVAILABLE, late
        assert process.wait(timeout=60) == 0
        channel.close()
    finally:
        rest.set()
        process.kill()
        process.wait()


def test_sigterm_fails_a_sample_still_decoding():
    """SIGTERM while a Sample decodes: the client long-polling it reads UNAVAILABLE "not
    finished" (reason STOPPING), none of its tokens, and the process exits with status 0."""
    process, address = start_cli_server()
    try:
        channel = grpc.insecure_channel(address)
        sampling = sampling_service_pb2_grpc.SamplingServiceStub(channel)
        operations = operations_pb2_grpc.OperationsStub(channel)
        training = pb_grpc.TrainingServiceStub(channel)
        name = sampling.Sample(sampling_service_pb2.SampleRequest(
            base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array([1, 2, 3]))], num_samples=4,
            sampling_params=sampling_service_pb2.SamplingParams(max_tokens=1000))).name
        deadline = time.monotonic() + 60
        while (training.GetServerCapabilities(pb.GetServerCapabilitiesRequest()).kv_cache.running_sequences < 4
               and time.monotonic() < deadline):
            time.sleep(0.01)
        polled: list = []
        poll = threading.Thread(target=lambda: polled.append(wait_operation(operations, name)))
        poll.start()
        process.send_signal(signal.SIGTERM)
        poll.join(30)
        assert polled[0].done and polled[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0], polled
        assert polled[0].error.message.startswith("the server is stopping"), polled
        assert not polled[0].HasField("response")
        assert process.wait(timeout=60) == 0
        channel.close()
    finally:
        process.kill()
        process.wait()


EXITS_WITH_REQUESTS_IN_FLIGHT = """
import sys, gradwire
service = gradwire.ServiceClient(base_url=sys.argv[1])
tc = service.create_lora_training_client(base_model="tiny-random", rank=2)
tc.forward_backward([gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2, 3]),
                                    loss_fn_inputs={"target_tokens": [2, 3, 4]})], "cross_entropy")
sampler = service.create_sampling_client(base_model="tiny-random")
pending = [sampler.sample(gradwire.ModelInput.from_ints([1, 2]), 4, gradwire.SamplingParams(max_tokens=600))
           for _ in range(3)]
print("exiting", flush=True)
"""


def test_a_script_exits_cleanly_with_results_still_being_fetched(server):
    """A script that ends with requests in flight (their results being fetched by background
    threads, blocked in gRPC long-polls) exits at once with status 0, without gRPC crashing."""
    done = subprocess.run([sys.executable, "-c", EXITS_WITH_REQUESTS_IN_FLIGHT, server.address],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "GRADWIRE_PROGRESS": "0"})
    assert (done.returncode, done.stdout) == (0, "exiting\n"), done.stderr
    assert "Fatal" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_closed_client_says_so(server, monkeypatch):
    """After ServiceClient.close(), every call raises APIConnectionError "the client is closed"
    (gRPC's own error is a bare ValueError), and sends nothing; so does the result of a request
    still in flight at the close (its result's long-poll was cut: not CANCELLED, as if the
    request had been)."""
    client = gradwire.ServiceClient(base_url=server.address)
    tc = client.create_lora_training_client(base_model="tiny-random", rank=4)
    sampler = client.create_sampling_client(base_model="tiny-random")
    prompt, params = gradwire.ModelInput.from_ints([1, 2, 3]), gradwire.SamplingParams(max_tokens=2)
    polled: set[str] = set()
    both_polled = threading.Event()
    store_wait = server.server.store.wait

    async def wait(name: str, timeout_s: float):  # the server's long-poll of a result, as it starts
        polled.add(name)
        if len(polled) == 2:
            both_polled.set()
        return await store_wait(name, timeout_s)

    monkeypatch.setattr(server.server.store, "wait", wait)
    with worker_busy(server):
        in_flight = [sampler.sample(prompt, 1, params), tc.forward(random_data(88), "cross_entropy")]
        assert both_polled.wait(30)  # the close cuts both long-polls mid-call
        client.close()
    for future in in_flight:
        with pytest.raises(gradwire.APIConnectionError, match=r"the client is closed \(close\(\) was called\)"):
            future.result(30)
    for call in (lambda: tc.forward_backward(random_data(89), "cross_entropy").result(30),
                 lambda: tc.save_state("after-close").result(30),
                 lambda: sampler.sample(prompt, 1, params).result(30),
                 lambda: list(sampler.sample_stream(prompt, 1, params))):
        with pytest.raises(gradwire.APIConnectionError, match=r"the client is closed \(close\(\) was called\)"):
            call()


# ---- the SDK's environment variables -------------------------------------------------------------------

def test_gradwire_base_url_is_the_default_address(server, monkeypatch):
    monkeypatch.setenv("GRADWIRE_BASE_URL", f"grpc://{server.address}")
    with gradwire.ServiceClient(retry_s=0) as service:
        assert service.base_url == server.address
        assert service.get_server_capabilities().supported_models[0].model_name == "tiny-random"
    monkeypatch.setenv("GRADWIRE_BASE_URL", f"127.0.0.1:{free_port()}")  # nothing listens there
    with gradwire.ServiceClient(base_url=server.address, retry_s=0) as service:  # an explicit one wins
        assert service.get_server_capabilities().supported_models[0].model_name == "tiny-random"
    with gradwire.ServiceClient(retry_s=0) as service:
        with pytest.raises(gradwire.APIConnectionError):
            service.get_server_capabilities()
    with gradwire.ServiceClient(base_url=f"http://{server.address}/", retry_s=0) as service:  # a trailing slash
        assert service.get_server_capabilities().supported_models[0].model_name == "tiny-random"


@pytest.mark.parametrize("base_url", ["https://127.0.0.1:50051", "127.0.0.1:50051/v1", ""])
def test_a_base_url_grpc_cannot_reach_is_refused_at_once(base_url):
    """Not retried for retry_s seconds as if the server were down: ValueError naming it."""
    with pytest.raises(ValueError, match="gradwire serves plain gRPC at host:port"):
        gradwire.ServiceClient(base_url=base_url or " ")


@pytest.mark.parametrize("headers, named", [({"X-Title": "café"}, "X-Title"), ({"Bad Key": "x"}, "Bad Key"),
                                            ({"x-bin": "abc"}, "x-bin")])
def test_headers_grpc_cannot_send_are_refused_at_once(headers, named):
    """Not an InternalServerError on every call (a server bug, the README says): ValueError naming the header."""
    with pytest.raises(ValueError, match=f"header '{named}'"):
        gradwire.ServiceClient(base_url="127.0.0.1:50051", default_headers_overrides=headers)


@pytest.mark.parametrize("setting, shown", [(None, True), ("1", True), ("0", False)])
def test_gradwire_progress_controls_the_upload_progress_bar(server, monkeypatch, capsys, setting, shown):
    """A streamed upload draws a progress bar on stderr unless GRADWIRE_PROGRESS=0."""
    if setting is None:
        monkeypatch.delenv("GRADWIRE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("GRADWIRE_PROGRESS", setting)
    monkeypatch.setattr(client, "MESSAGE_BUDGET_BYTES", 1024)  # stream even a small batch
    with gradwire.ServiceClient(base_url=server.address) as service:
        assert service.progress is shown
        tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
        capsys.readouterr()
        data = random_data(89, lengths=tuple(np.full(30, 20)))
        assert len(tc.forward(data, "cross_entropy").result().loss_fn_outputs) == 30
    bar = f"uploading to {tc.model_id}"
    assert (bar in capsys.readouterr().err) is shown
