"""A real CUDA out-of-memory (no injection): a request whose micro-batch cannot fit
the card fails alone with RESOURCE_EXHAUSTED naming its size and the free memory,
releases what it allocated, changes nothing, and the server keeps serving.

CUDA only. It fills the card, so scripts/gpu_check runs it alone, after the suite."""
from __future__ import annotations

import grpc
import pytest
import torch

import gradwire
from conftest import server_config
from gradwire_server.server import BackgroundServer
from reference import assert_state_equal, random_data, run_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DATUMS, TOKENS = 64, 2048   # one micro-batch of 131,072 tokens: hundreds of GB of activations on a 1.1B model


@pytest.fixture(scope="module")
def big_server(tmp_path_factory):
    server = BackgroundServer(server_config(
        model="llama-1b", load_format="dummy", dtype="auto", checkpoint_dir=tmp_path_factory.mktemp("checkpoints"),
        micro_batch_tokens=DATUMS * TOKENS, keep_graph_budget_mb=0))
    yield server
    server.stop()


def test_a_real_out_of_memory_fails_alone_and_frees_its_memory(big_server):
    service = gradwire.ServiceClient(base_url=big_server.address)
    try:
        tc = service.create_lora_training_client("llama-1b", rank=8, seed=0)
        small = random_data(1, lengths=(64, 64), vocab=32000)
        tc.forward_backward(small, "cross_entropy").result()
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()
        before = run_state(big_server, tc.model_id)
        allocated = big_server.call(torch.cuda.memory_allocated)

        with pytest.raises(gradwire.APIStatusError) as raised:
            tc.forward_backward(random_data(2, lengths=(TOKENS,) * DATUMS, vocab=32000), "cross_entropy").result()
        assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = str(raised.value)
        assert f"{DATUMS} datums x {TOKENS} tokens" in message and "GiB free" in message
        assert big_server.call(torch.cuda.memory_allocated) <= allocated + 2**20  # all it took, given back
        assert_state_equal(before, run_state(big_server, tc.model_id))

        # The server keeps serving: training and sampling on the same run.
        tc.forward_backward(small, "cross_entropy").result()
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()
        sampler = tc.save_weights_and_get_sampling_client()
        result = sampler.sample(gradwire.ModelInput.from_ints([1, 2, 3]), 2,
                                gradwire.SamplingParams(max_tokens=8, temperature=1.0, seed=0)).result()
        assert [len(s.tokens) for s in result.sequences] == [8, 8]
    finally:
        service.close()
