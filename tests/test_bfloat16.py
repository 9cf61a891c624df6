"""A server with --dtype bfloat16 (CUDA's default; it runs on the CPU too): frozen
base matmul weights in bf16 (embeddings and norms float32), LoRA weights, gradients
and AdamW state in float32, and the numbers within stated bf16 tolerances of the
in-process reference (the same weights under bf16 autocast, on the server's device).
Sampled and training logprobs of the same tokens take the same numeric path: by default
(--sampler-logprobs auto, training over bf16) the sampler's logprobs are the training
forward's exactly; from the decode steps they part by bf16 rounding, within a tolerance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gradwire
from gradwire.v1 import training_service_pb2 as pb
from conftest import server_config
from gradwire_server.server import BackgroundServer
from reference import (optimizer_state, random_data, reference_gradients, reference_logprobs, reference_model,
                       relative_error, run_state, server_gradients, trained_run)

LOGPROB_TOLERANCE = 0.02     # max abs, nats: bf16 keeps 8 bits of mantissa (logprobs here are ~ -6)
GRADIENT_TOLERANCE = 0.02    # relative, over every adapter parameter
SAMPLED_TOLERANCE = 0.02     # max abs, decode-step vs training logprob of the same token (the goal)
PROMPT = [72, 101, 108, 108, 111, 44, 32]
PROMPTS = (PROMPT, PROMPT[:3], PROMPT * 3)  # requests of three prompt lengths, decoded together


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory):
    background = BackgroundServer(server_config(dtype="bfloat16",
                                               checkpoint_dir=tmp_path_factory.mktemp("bf16")))
    yield background
    background.stop()


@pytest.fixture(scope="module")
def bf16_service(bf16_server):
    client = gradwire.ServiceClient(base_url=bf16_server.address)
    yield client
    client.close()


def squared_logprob_loss(data, logprobs):
    return (torch.cat(logprobs) ** 2).sum(), {}


def test_base_is_bf16_and_training_state_float32(bf16_server, bf16_service):
    tc = trained_run(bf16_service)
    tc.forward_backward(random_data(80), "cross_entropy").result()
    base = bf16_server.engine.base.model
    linear = {p.dtype for name, p in base.named_parameters() if "lora_" not in name and "proj" in name}
    assert linear == {torch.bfloat16} and base.get_output_embeddings().weight.dtype == torch.bfloat16
    # The residual stream stays float32: input embeddings and norms are float32.
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for name, p in base.named_parameters() if "norm" in name} == {torch.float32}
    state = run_state(bf16_server, tc.model_id)
    assert {weight.dtype for weight, _ in state.values()} == {torch.float32}
    assert {grad.dtype for _, grad in state.values()} == {torch.float32}
    moments = optimizer_state(bf16_server, tc.model_id)
    assert {value.dtype for entry in moments.values() for key, value in entry.items() if key != "step"} \
        == {torch.float32}
    capabilities = bf16_service._call("GetServerCapabilities", pb.GetServerCapabilitiesRequest())
    assert capabilities.dtype == "bfloat16"


def test_forward_logprobs_within_bf16_tolerance(bf16_server, bf16_service):
    tc = trained_run(bf16_service)
    model = reference_model(bf16_server, tc.model_id, rank=4)
    data = random_data(81, lengths=(40, 100, 7, 64))
    out = tc.forward(data, "cross_entropy").result()
    for datum, output in zip(data, out.loss_fn_outputs):
        expected = reference_logprobs(model, datum).detach()
        assert (output["logprobs"].to_torch() - expected).abs().max() <= LOGPROB_TOLERANCE


def test_custom_loss_gradient_within_bf16_tolerance(bf16_server, bf16_service):
    tc = trained_run(bf16_service)
    model = reference_model(bf16_server, tc.model_id, rank=4)
    data = random_data(82)
    tc.forward_backward_custom(data, squared_logprob_loss).result()
    expected, _ = squared_logprob_loss(data, [reference_logprobs(model, d) for d in data])
    expected.backward()
    assert relative_error(server_gradients(bf16_server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= GRADIENT_TOLERANCE


def sampled_vs_training(service, prompts: tuple[list[int], ...] = (PROMPT,), rank: int = 4) -> float:
    """Max abs difference between the sampled logprobs of a trained run's sampler weights
    (4 samples of each prompt, the requests sent at once: rows of one decode batch) and
    the training forward's logprobs of the same tokens."""
    tc = trained_run(service, rank=rank)
    sampler = service.create_sampling_client(model_path=tc.save_weights_for_sampler("bf16").result().path)
    requests = [sampler.sample(gradwire.ModelInput.from_ints(prompt), 4, gradwire.SamplingParams(max_tokens=48, seed=5))
                for prompt in prompts]
    differences = []
    for prompt, request in zip(prompts, requests):
        for sequence in request.result().sequences:
            tokens = prompt + list(sequence.tokens)
            datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                                   loss_fn_inputs={"target_tokens": np.array(tokens[1:])})
            training = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
            differences.append(np.abs(training[len(prompt) - 1:] - np.array(sequence.logprobs)).max())
    return max(differences)


@pytest.mark.parametrize("rank", [4, 3])
def test_sampled_logprobs_are_the_training_logprobs_exactly_by_default(bf16_service, rank):
    """(Rank 3: a LoRA scale, 32 / 3, that rounds the delta differently unless applied last, as peft does.)"""
    assert bf16_service.get_server_capabilities().sampler_logprobs == "training"
    assert sampled_vs_training(bf16_service, PROMPTS, rank) == 0


def test_prompt_logprobs_are_the_training_logprobs_exactly_by_default(bf16_service):
    """A prompt's logprobs (sample's and compute_logprobs's) are those forward returns for the
    prompt as one datum, though the prompt's prefill for the samples is another pass."""
    tc = trained_run(bf16_service)
    sampler = bf16_service.create_sampling_client(model_path=tc.save_weights_for_sampler("prompts").result().path)
    for prompt in PROMPTS:
        datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(prompt[:-1]),
                               loss_fn_inputs={"target_tokens": np.array(prompt[1:])})
        training = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy().tolist()
        response = sampler.sample(gradwire.ModelInput.from_ints(prompt), 2, gradwire.SamplingParams(max_tokens=4),
                                  include_prompt_logprobs=True).result()
        assert response.prompt_logprobs == [None] + training
        assert sampler.compute_logprobs(gradwire.ModelInput.from_ints(prompt)).result() == [None] + training


def decode_logprobs_difference(tmp_path, attention: str, prompts: tuple[list[int], ...]) -> float:
    """sampled_vs_training on a bf16 server whose sampler takes logprobs from its decode steps."""
    background = BackgroundServer(server_config(dtype="bfloat16", attention=attention, sampler_logprobs="decode",
                                                checkpoint_dir=tmp_path))
    service = gradwire.ServiceClient(base_url=background.address)
    try:
        capabilities = service.get_server_capabilities()
        assert (capabilities.training["attention"], capabilities.sampler_logprobs) == (attention, "decode")
        return sampled_vs_training(service, prompts)
    finally:
        service.close()
        background.stop()


def test_decode_step_logprobs_within_bf16_tolerance(tmp_path):
    assert decode_logprobs_difference(tmp_path, "auto", PROMPTS) <= SAMPLED_TOLERANCE


ONE_KERNEL = pytest.mark.skipif(torch.cuda.is_available(), reason="which kernel makes them agree on a GPU "
                                "is measured by scripts/bench_bf16_invariance.py (its section 4), not yet known")


@ONE_KERNEL
def test_with_eager_attention_decode_step_logprobs_equal_training_logprobs_exactly(tmp_path):
    """--attention eager puts training and sampling on one attention whose rounding depends on
    neither the length nor the rows beside it: a decode step's bf16 logprob of a sampled token
    equals the training logprob of the same token exactly, for requests of different prompt
    lengths decoded together. (With auto, SDPA's kernels for a decode step and for training's
    causal pass round differently here.)"""
    assert decode_logprobs_difference(tmp_path, "eager", PROMPTS) == 0


@ONE_KERNEL
def test_with_sdpa_math_decode_step_logprobs_equal_training_logprobs_for_rows_of_one_length(tmp_path):
    """--attention math forces SDPA's math kernel on training and sampling alike: exact for the
    samples of one prompt (over a padded row of a mixed decode batch it may round differently)."""
    assert decode_logprobs_difference(tmp_path, "math", (PROMPT,)) == 0
