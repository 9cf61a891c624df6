"""optim_step: grad_norm and gradient clipping against in-process torch on the
server's own gradients, and AdamW state kept in float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

import gradwire
from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings
from gradwire_server.engine import Engine
from gradwire_server.models import load_model
from reference import random_data, run_state, trained_run


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_step_equals_torch_adamw_on_the_same_gradients(server, service, clip):
    tc = trained_run(service)
    tc.forward_backward(random_data(95), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    adam = gradwire.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip_norm=clip)
    # The reference: the run's weights, gradients and AdamW state (in the run's parameter
    # order), torch's clipping and single-tensor AdamW.
    names = list(before)
    weights = [before[name][0].clone().requires_grad_(True) for name in names]
    for weight, name in zip(weights, names):
        weight.grad = before[name][1].clone()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.grad) for w in weights]))
    if clip:
        torch.nn.utils.clip_grad_norm_(weights, clip, foreach=False)
    optimizer = torch.optim.AdamW(weights, foreach=False)
    state = server.call(lambda: server.engine.run(tc.model_id).optimizer.state_dict())
    optimizer.load_state_dict({"state": {i: {key: value.clone() for key, value in entry.items()}
                                         for i, entry in state["state"].items()},
                               "param_groups": state["param_groups"]})
    optimizer.param_groups[0].update(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    optimizer.step()

    metrics = tc.optim_step(adam).result().metrics
    assert metrics["grad_norm:mean"] == pytest.approx(float(norm), rel=1e-6)
    after = run_state(server, tc.model_id)
    for weight, name in zip(weights, names):
        torch.testing.assert_close(after[name][0], weight.detach(), rtol=1e-5, atol=1e-7)
        assert after[name][1] is None  # gradients cleared


def multimodal_engine(folder) -> Engine:
    """A tiny random Gemma 3 with a vision tower (random weights from its config): the
    LoRA config's q_proj, ... name modules of both towers, and a batch of tokens reaches
    only the text tower's."""
    text = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=300,
                 boi_token_index=301, eoi_token_index=302).save_pretrained(folder)
    cpu = torch.device("cpu")
    return Engine(load_model(str(folder), cpu, load_format="dummy"), cpu)


def test_a_parameter_no_batch_reaches_is_left_alone_by_adamw(tmp_path):
    """As torch's AdamW skips a parameter without a gradient: a LoRA factor that no batch
    reaches (the vision tower's, under batches of tokens) has no gradient, gets no AdamW
    state, and weight decay does not move it, over steps and across a save_state /
    load_state of the optimizer (whose state then covers only the reached factors)."""
    engine = multimodal_engine(tmp_path)
    run_id = engine.create_run(LoraSettings(rank=4, seed=1))
    run = engine.run(run_id)
    names = [name for name, _ in engine.peft_model.named_parameters() if f".{run_id}." in name]
    unreached = [p for name, p in zip(names, run.params) if "vision" in name]
    assert 0 < len(unreached) < len(run.params)
    before = [p.detach().clone() for p in unreached]
    rng = np.random.default_rng(0)
    adam = AdamSettings(learning_rate=1e-2, weight_decay=0.1)

    def train_step(on: str) -> None:
        data = [DatumArrays(rng.integers(0, 300, n), {"target_tokens": rng.integers(0, 300, n)}) for n in (12, 7)]
        loss_pass = engine.start_pass(on, "cross_entropy", {}, backward=True)
        loss_pass.feed(data)
        loss_pass.commit()
        params = engine.run(on).params
        assert sum(p.grad is not None for p in params) == len(params) - len(unreached)
        engine.optim_step(on, adam)

    for _ in range(2):
        train_step(run_id)
    assert all(torch.equal(p, b) for p, b in zip(unreached, before))
    assert len(run.optimizer.state) == len(run.params) - len(unreached)
    assert all(p not in run.optimizer.state for p in unreached)

    saved = engine.save_state(run_id, with_optimizer=True)
    resumed = engine.create_run(LoraSettings(rank=4, seed=2))
    engine.load_state(resumed, saved.adapter, saved.optimizer, saved.step)
    train_step(resumed)
    resumed_names = [name for name, _ in engine.peft_model.named_parameters() if f".{resumed}." in name]
    resumed_unreached = [p for name, p in zip(resumed_names, engine.run(resumed).params) if "vision" in name]
    assert all(torch.equal(p, b) for p, b in zip(resumed_unreached, before))
