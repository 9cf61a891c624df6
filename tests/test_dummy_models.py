"""--load-format dummy: a model from a config alone (a folder holding only
config.json, or a named preset) with random weights made on the device."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gradwire
from conftest import start_cli_server
from gradwire_server.batch import DatumArrays, LoraSettings
from gradwire_server.engine import Engine
from gradwire_server.models import dummy_model, load_model, tiny_random_config
from reference import random_data


def test_presets_have_the_benchmark_shapes():
    """Built on the meta device: shapes and parameter counts, no memory."""
    small, _ = dummy_model("llama-1b", torch.device("meta"), torch.bfloat16)
    large, _ = dummy_model("llama-8b", torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in small.parameters()) == 1_100_048_384
    assert sum(p.numel() for p in large.parameters()) == 8_030_261_248
    config = large.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.intermediate_size,
            config.vocab_size) == (4096, 32, 8, 14336, 128256)
    assert {p.dtype for p in large.parameters()} == {torch.bfloat16}


def test_config_folder_gives_the_same_random_weights_each_time(tmp_path):
    tiny_random_config().to_json_file(tmp_path / "config.json")
    first = load_model(str(tmp_path), torch.device("cpu"), torch.bfloat16, "dummy")
    again = load_model(str(tmp_path), torch.device("cpu"), torch.bfloat16, "dummy")
    assert first.vocab_size == 320 and first.max_context_length == 1024
    assert first.model.config._attn_implementation == "sdpa"  # PyTorch's fused attention kernels
    assert again.dtype == torch.bfloat16
    # (Drawn in the model's dtype: whether float32 draws round to the bf16 ones is up to the torch version.)
    for (name, weight), (_, weight_again) in zip(first.model.state_dict().items(),
                                                  again.model.state_dict().items()):
        assert torch.equal(weight, weight_again), name


def test_neither_preset_nor_config_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="llama-8b"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32, "dummy")


def test_server_trains_a_dummy_model_from_a_config_folder(tmp_path):
    config = tiny_random_config()
    config.vocab_size, config.hidden_size = 384, 32
    config.to_json_file(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 384
    process, address = start_cli_server("--model", str(tmp_path), "--load-format", "dummy",
                                        "--checkpoint-dir", str(tmp_path / "checkpoints"))
    try:
        service = gradwire.ServiceClient(base_url=address)
        capabilities = service.get_server_capabilities()
        assert capabilities.supported_models[0].model_name == str(tmp_path)
        tc = service.create_lora_training_client(str(tmp_path), rank=2, seed=0)
        data = random_data(90, vocab=384)
        before = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        for _ in range(3):
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
        assert tc.forward(data, "cross_entropy").result().metrics["loss:sum"] < before
        service.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_models_that_scale_logits_after_the_unembedding_are_refused(tmp_path):
    """Training computes logprobs from the unembedding itself, so such a model would
    train on wrong logprobs."""
    config = tiny_random_config()
    config.final_logit_softcapping = 30.0
    config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32, "dummy")


def test_bf16_model_with_tied_embeddings_trains(tmp_path):
    """The input embedding stays float32 in a bf16 base; tied to the unembedding, that
    one stays float32 too, and a training pass still runs (under bf16 autocast)."""
    config = tiny_random_config()
    config.tie_word_embeddings = True
    config.to_json_file(tmp_path / "config.json")
    loaded = load_model(str(tmp_path), torch.device("cpu"), torch.bfloat16, "dummy")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.get_output_embeddings().weight.dtype == torch.float32
    engine = Engine(loaded, torch.device("cpu"))
    run_id = engine.create_run(LoraSettings(rank=2, seed=0))
    training = engine.start_pass(run_id, "cross_entropy", {}, backward=True)
    sequence = np.arange(12)
    [logprobs] = training.feed([DatumArrays(sequence, {"target_tokens": sequence})])
    training.commit()
    assert np.isfinite(logprobs).all() and all(p.grad is not None for p in engine.run(run_id).params)
