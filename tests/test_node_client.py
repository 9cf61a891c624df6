"""A client in another language, generated from the .proto files alone: tests/node_client/client.js
(Node.js, @grpc/grpc-js and @grpc/proto-loader over protos/ and googleapis' longrunning protos)
trains and samples on a real server, and its results match in-process PyTorch on the same weights."""
from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

import gradwire
from reference import (assert_state_equal, cross_entropy_gradient_error, greedy_reference, reference_base_model,
                       reference_logprobs, reference_model, run_state, sequence_logprobs, server_gradients)

CLIENT = pathlib.Path(__file__).parent / "node_client"
DATUM = {"tokens": [5, 17, 230, 9, 41, 300], "targets": [17, 230, 9, 41, 300, 2],
         "weights": [1.0, 0.5, 0.0, 2.0, 1.0, 1.0]}

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (CLIENT / "node_modules").is_dir(),
    reason="needs node and `npm ci` in tests/node_client (scripts/_install.sh runs it where npm is installed)")


def node(address: str, *args: str) -> dict:
    """Runs the Node client once; its one line of JSON output."""
    done = subprocess.run(["node", str(CLIENT / "client.js"), address, *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def as_datum(datum: dict) -> gradwire.Datum:
    return gradwire.Datum(model_input=gradwire.ModelInput.from_ints(datum["tokens"]),
                          loss_fn_inputs={"target_tokens": np.array(datum["targets"]),
                                          "weights": np.array(datum["weights"], np.float32)})


@pytest.fixture()
def node_run(server) -> str:
    return node(server.address, "create")["model_id"]


def test_node_forward_matches_in_process_logprobs(server, node_run):
    """Forward from Node, its tensors sent as little-endian bytes: the logprobs it decodes are
    the in-process model's, and loss:sum is the weighted sum of their negatives."""
    output = node(server.address, "forward", node_run, json.dumps(DATUM))
    expected = reference_logprobs(reference_model(server, node_run, rank=4), as_datum(DATUM)).detach()
    torch.testing.assert_close(torch.tensor(output["logprobs"]), expected, rtol=0, atol=1e-5)
    assert output["metrics"]["loss:sum"] == pytest.approx(
        -float((expected * torch.tensor(DATUM["weights"])).sum()), rel=1e-5)


def test_node_forward_backward_gives_the_in_process_gradient_and_optim_step_applies_it(server, node_run):
    """ForwardBackward from Node accumulates the in-process cross-entropy gradient;
    OptimStep from Node then changes the weights and clears the gradient."""
    node(server.address, "forward_backward", node_run, json.dumps(DATUM))
    model = reference_model(server, node_run, rank=4)
    assert cross_entropy_gradient_error(server, node_run, model, [as_datum(DATUM)]) <= 1e-5
    before = run_state(server, node_run)

    metrics = node(server.address, "optim_step", node_run, "0.01")["metrics"]

    assert metrics["learning_rate:mean"] == pytest.approx(0.01)
    after = run_state(server, node_run)
    assert any(not torch.equal(after[name][0], weight) for name, (weight, _) in before.items())
    assert not server_gradients(server, node_run)


def test_node_bad_input_is_invalid_argument_naming_the_datum_and_changes_nothing(server, node_run):
    """A token id outside the vocabulary, sent from Node: INVALID_ARGUMENT (code 3) naming
    data[0] and the id; the run's weights and gradients are as before."""
    node(server.address, "forward_backward", node_run, json.dumps(DATUM))
    before = run_state(server, node_run)
    bad = {**DATUM, "tokens": [5, 99999, 230, 9, 41, 300]}

    output = node(server.address, "forward_backward", node_run, json.dumps(bad))

    assert output["code"] == 3, output
    assert "data[0]" in output["details"] and "99999" in output["details"]
    assert_state_equal(before, run_state(server, node_run))


def test_node_greedy_sample_matches_in_process_argmax(server):
    """Sample from Node at temperature 0: the tokens are the in-process model's argmax
    continuation and each logprob is the model's log_softmax at that token."""
    prompt = [3, 141, 59, 26]
    output = node(server.address, "sample", json.dumps(prompt), "6")
    base = reference_base_model(server)
    assert output["tokens"] == greedy_reference(base, prompt, 6)
    assert output["stop_reason"] == "STOP_REASON_LENGTH"
    full = prompt + output["tokens"]
    scores = sequence_logprobs(base, full)[len(prompt) - 1:-1]
    expected = scores.gather(-1, torch.tensor(output["tokens"])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(output["logprobs"]), expected, rtol=0, atol=1e-5)
