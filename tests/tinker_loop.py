"""A Tinker-style training loop written only against the `tinker` API (the module is
passed in): test_tinker_compat runs it with `import tinker` (the compat distribution)
in a subprocess and with gradwire's own SDK in process, on the same seeds."""
from __future__ import annotations

PROMPT = [1, 40, 33, 72, 105, 18, 7]


def sl_data(tinker) -> list:
    data = []
    for i, n in enumerate((9, 14, 5)):
        sequence = [(17 * i + 31 * k) % 300 for k in range(n + 1)]
        data.append(tinker.Datum(
            model_input=tinker.ModelInput.from_ints(sequence[:-1]),
            loss_fn_inputs={"target_tokens": tinker.TensorData.from_numpy(__import__("numpy").array(sequence[1:])),
                            "weights": [1.0] * n}))
    return data


def rl_data(tinker, prompt, response, with_ratio_mask: bool) -> list:
    """One datum per sampled sequence: reward = its first token's parity, centred."""
    rewards = [float(s.tokens[0] % 2) for s in response.sequences]
    mean = sum(rewards) / len(rewards)
    data = []
    for sequence, reward in zip(response.sequences, rewards):
        ob_len = prompt.length - 1
        model_input = prompt.append(tinker.types.EncodedTextChunk(tokens=sequence.tokens[:-1]))
        inputs = {"target_tokens": [0] * ob_len + sequence.tokens,
                  "logprobs": [0.0] * ob_len + sequence.logprobs,
                  "advantages": [0.0] * ob_len + [reward - mean] * len(sequence.tokens)}
        if with_ratio_mask:
            inputs["sequence_ratio_mask"] = [0.0] * ob_len + [1.0] * len(sequence.tokens)
        data.append(tinker.Datum(model_input=model_input, loss_fn_inputs=inputs))
    return data


def run(tinker, service) -> dict:
    """SL with cross_entropy and save_state(ttl_seconds=...), then RL steps sampling from
    save_weights_and_get_sampling_client() and training with importance_sampling and gspo."""
    tc = service.create_lora_training_client(base_model="tiny-random", rank=4, seed=0).result()
    fb = tc.forward_backward(sl_data(tinker), loss_fn="cross_entropy")
    optim = tc.optim_step(tinker.AdamParams(learning_rate=1e-2))
    result = {"sl_loss": fb.result().metrics["loss:sum"], "sl_optim": optim.result().metrics}
    state = tc.save_state("sl", ttl_seconds=3600).result().path
    listed = service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
    result["state_expires"] = [c.expires_at is not None for c in listed if c.path == state]
    prompt = tinker.ModelInput.from_ints(PROMPT)
    for step, loss_fn in enumerate(("importance_sampling", "gspo")):
        sampler = tc.save_weights_and_get_sampling_client().result()
        response = sampler.sample(prompt=prompt, num_samples=4,
                                  sampling_params=tinker.SamplingParams(max_tokens=6, seed=step)).result()
        result[f"tokens_{loss_fn}"] = [s.tokens for s in response.sequences]
        result[f"ids_{loss_fn}"] = [s.sequence_id for s in response.sequences]
        data = rl_data(tinker, prompt, response, with_ratio_mask=loss_fn == "gspo")
        out = tc.forward_backward(data, loss_fn=loss_fn).result()
        result[f"loss_{loss_fn}"] = out.metrics["loss:sum"]
        result[f"logprobs_{loss_fn}"] = [o["logprobs"].tolist() for o in out.loss_fn_outputs]
        tc.optim_step(tinker.AdamParams(learning_rate=1e-2)).result()
    final = tc.forward(sl_data(tinker), "cross_entropy").result()
    result["final_logprobs"] = [o["logprobs"].tolist() for o in final.loss_fn_outputs]
    return result
