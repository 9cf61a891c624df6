"""optim_step: grad_norm and gradient clipping against in-process torch on the
server's own gradients, and AdamW state kept in float32."""
from __future__ import annotations

import pytest
import torch

import gradwire
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
