"""--activation-checkpointing: training recomputes each decoder layer in the backward
pass; gradients (built-in and custom losses) and sampling stay exact, and a token
of activations costs a fraction of what it did."""
from __future__ import annotations

import pytest
import torch

import gradwire
from conftest import server_config
from gradwire_server.engine import Engine
from gradwire_server.models import load_model, tiny_random_config
from gradwire_server.server import BackgroundServer
from reference import (greedy_reference, random_data, reference_base_model, reference_gradients,
                       reference_logprobs, reference_model, relative_error, server_gradients, trained_run)
from test_custom_loss import logprob_squared_loss

PROMPT = [72, 101, 108, 108, 111, 44, 32]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    background = BackgroundServer(server_config(activation_checkpointing=True,
                                                checkpoint_dir=tmp_path_factory.mktemp("checkpointing")))
    yield background
    background.stop()


@pytest.fixture(scope="module")
def service(server):
    client = gradwire.ServiceClient(base_url=server.address, progress=False)
    yield client
    client.close()


def test_capabilities_say_the_layers_are_recomputed(service):
    assert service.get_server_capabilities().training == {"compiled_layers": False, "activation_checkpointing": True,
                                                            "attention": "auto"}


@pytest.mark.parametrize("custom", [False, True], ids=["cross_entropy", "custom"])
def test_gradients_equal_the_reference_without_checkpointing(server, service, custom):
    tc = trained_run(service)
    data = random_data(3)
    model = reference_model(server, tc.model_id, rank=4)
    logprobs = [reference_logprobs(model, d) for d in data]
    if custom:
        tc.forward_backward_custom(data, logprob_squared_loss).result()
        loss = logprob_squared_loss(data, logprobs)[0]
    else:
        tc.forward_backward(data, "cross_entropy").result()
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for lp, d in zip(logprobs, data))
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5


def test_sampling_is_unchanged(server, service):
    sampler = service.create_sampling_client(base_model="tiny-random")
    response = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), 1,
                              gradwire.SamplingParams(max_tokens=12, temperature=0.0)).result()
    assert response.sequences[0].tokens == greedy_reference(reference_base_model(server), PROMPT, 12)


def test_a_token_costs_a_fraction_of_the_activation_memory():
    device = torch.device("cpu")
    plain = Engine(load_model("tiny-random", device), device).activation_bytes_per_token(64)
    checkpointed = Engine(load_model("tiny-random", device), device,
                          activation_checkpointing=True).activation_bytes_per_token(64)
    assert checkpointed < plain / 2


def test_a_model_with_dropout_is_refused(tmp_path):
    config = tiny_random_config()
    config.attention_dropout = 0.1
    config.to_json_file(tmp_path / "config.json")
    device = torch.device("cpu")
    with pytest.raises(ValueError, match="attention_dropout"):
        Engine(load_model(str(tmp_path), device, torch.float32, "dummy"), device, activation_checkpointing=True)
