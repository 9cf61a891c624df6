"""DPO (Direct Preference Optimization) with forward_backward_custom.

A second training client that is never stepped is the frozen reference model:
its logprobs of each chosen and rejected completion are fetched once with
`forward` and travel to the loss as an extra loss_fn_input ("reference_logprobs"),
which reaches the loss function on this machine and is never sent. Per pair,

    loss = -logsigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r)))

summed over the pairs, where lp is a completion's summed token logprobs. Each
step prints the loss, the preference accuracy (pairs whose implicit reward
margin is positive) and the mean margin; both rise over the steps.

    python scripts/example_dpo.py                        # starts its own tiny-random server
    python scripts/example_dpo.py --base-url 127.0.0.1:50051 --model smollm2-135m
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import gradwire
from local_server import local_server

# (prompt, chosen completion, rejected completion)
PREFERENCES = [
    ("Say hello.", "Hello! Nice to meet you.", "Go away."),
    ("What is 2 + 2?", "2 + 2 is 4.", "Who cares."),
    ("Name a color.", "Blue is a color.", "No."),
    ("Can you help me?", "Of course, happy to help.", "Figure it out yourself."),
    ("Tell me a fact.", "Water boils at 100 C at sea level.", "I will not."),
    ("Thank you!", "You are welcome!", "Whatever."),
]


@dataclass
class PreferenceStats:
    loss: float       # DPO loss summed over the pairs
    accuracy: float   # fraction of pairs with a positive implicit reward margin
    margin: float     # mean beta * ((lp_c - ref_c) - (lp_r - ref_r))


@dataclass
class DpoResult:
    steps: list[PreferenceStats]  # before each step's update (its forward leg)
    final: PreferenceStats        # after the last update


def completion_datum(tokenizer, prompt: str, completion: str) -> tuple[gradwire.Datum, torch.Tensor]:
    """The chat-formatted prompt + completion as a next-token datum, and the mask
    (1 on target positions that are completion tokens)."""
    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, return_dict=False))
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    ids = prompt_ids + completion_ids
    mask = torch.zeros(len(ids) - 1)
    mask[len(prompt_ids) - 1:] = 1.0  # target i is ids[i + 1]
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(ids[:-1]),
                           loss_fn_inputs={"target_tokens": ids[1:]})
    return datum, mask


def preference_stats(data: list[gradwire.Datum], logprobs: list[torch.Tensor], beta: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(DPO loss summed over pairs, per-pair margins) for data ordered chosen, rejected, ..."""
    rewards = torch.stack([((lp - d.loss_fn_inputs["reference_logprobs"].to_torch())
                            * d.loss_fn_inputs["completion_mask"].to_torch()).sum()
                           for d, lp in zip(data, logprobs)])
    margins = beta * (rewards[0::2] - rewards[1::2])
    return -F.logsigmoid(margins).sum(), margins


def dpo_loss(beta: float):
    """The custom loss for forward_backward_custom."""
    def loss_fn(data: list[gradwire.Datum], logprobs: list[torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, margins = preference_stats(data, logprobs, beta)
        margins = margins.detach()
        return loss, {"accuracy:mean": (margins > 0).float().mean().item(),
                      "margin:mean": margins.mean().item()}
    return loss_fn


def evaluate(tc: gradwire.TrainingClient, data: list[gradwire.Datum], beta: float) -> PreferenceStats:
    """The preference statistics of the policy as it is now (a forward pass)."""
    plain = [gradwire.Datum(model_input=d.model_input,
                            loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]})
             for d in data]
    out = tc.forward(plain, "cross_entropy").result()
    loss, margins = preference_stats(data, [o["logprobs"].to_torch() for o in out.loss_fn_outputs], beta)
    return PreferenceStats(loss.item(), (margins > 0).float().mean().item(), margins.mean().item())


def train(base_url: str, model: str | None, steps: int, beta: float, learning_rate: float,
          rank: int) -> DpoResult:
    service = gradwire.ServiceClient(base_url=base_url, progress=False)
    try:
        base_model = model or service.get_server_capabilities().supported_models[0].model_name
        policy = service.create_lora_training_client(base_model=base_model, rank=rank, seed=0)
        reference = service.create_lora_training_client(base_model=base_model, rank=rank, seed=1)
        tokenizer = policy.get_tokenizer()

        pairs = [completion_datum(tokenizer, prompt, text)
                 for prompt, chosen, rejected in PREFERENCES for text in (chosen, rejected)]
        plain = [datum for datum, _ in pairs]
        reference_out = reference.forward(plain, "cross_entropy").result()
        data = [gradwire.Datum(model_input=datum.model_input,
                               loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"],
                                               "completion_mask": mask,
                                               "reference_logprobs": out["logprobs"]})
                for (datum, mask), out in zip(pairs, reference_out.loss_fn_outputs)]
        print(f"model {base_model}, LoRA rank {rank}: {len(PREFERENCES)} preference pairs, "
              f"beta {beta}, AdamW lr {learning_rate}, policy {policy.model_id}, "
              f"reference {reference.model_id}")

        adam = gradwire.AdamParams(learning_rate=learning_rate)
        loss_fn = dpo_loss(beta)
        history = []
        for step in range(steps):
            fb = policy.forward_backward_custom(data, loss_fn)
            opt = policy.optim_step(adam)  # queued right behind the forward-backward
            metrics = fb.result().metrics
            opt.result()
            history.append(PreferenceStats(metrics["loss:sum"], metrics["accuracy:mean"],
                                           metrics["margin:mean"]))
            print(f"step {step:2d}  loss {metrics['loss:sum']:.4f}  accuracy {metrics['accuracy:mean']:.2f}  "
                  f"margin {metrics['margin:mean']:+.4f}", flush=True)
        # Each step's metrics show the policy before its update; one forward shows it after.
        final = evaluate(policy, data, beta)
        print(f"after step {steps - 1:2d}  loss {final.loss:.4f}  accuracy {final.accuracy:.2f}  "
              f"margin {final.margin:+.4f}")
        return DpoResult(history, final)
    finally:
        service.close()


def main(argv: list[str] | None = None) -> DpoResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None,
                        help="host:port of a running gradwire-server (default: start one for --model)")
    parser.add_argument("--model", default=None,
                        help="base model (default: tiny-random, or the server's model with --base-url)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        base_url = args.base_url or stack.enter_context(local_server(args.model or "tiny-random"))
        result = train(base_url, args.model, args.steps, args.beta, args.learning_rate, args.rank)
    first = result.steps[0]
    print(f"margin {first.margin:+.4f} -> {result.final.margin:+.4f}, accuracy {first.accuracy:.2f} -> "
          f"{result.final.accuracy:.2f} in {time.monotonic() - start:.1f} s")
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome.final.margin > outcome.steps[0].margin else 1)
