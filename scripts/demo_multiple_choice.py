"""Trains SmolLM2-135M (LoRA) on one multiple-choice question with a custom loss.

The loss renormalises the model's next-token distribution over the four answer
letters " A", " B", " C", " D" (multi-target target_tokens at the last prompt
position) and minimises -log P(B) -- the masked cross-entropy of Tinker's
"Custom Loss Functions" guide. It runs on the client through
forward_backward_custom; only public SDK calls are used.

    python scripts/demo_multiple_choice.py --base-url 127.0.0.1:50051
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import gradwire

QUESTION = ("What is the capital of France?\n"
            "A) London\n"
            "B) Paris\n"
            "C) Berlin\n"
            "D) Madrid\n"
            "Answer Letter:")
LETTERS = [" A", " B", " C", " D"]
CORRECT_ANSWER_IDX = 1  # B) Paris


def masked_ce_loss(data: list[gradwire.Datum], logprobs_list: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    # logprobs_list[0] has shape [N, K=4]; its last row holds the logprobs of
    # the four answer letters as the token after the prompt.
    answer_logprobs = logprobs_list[0][-1]
    answer_logprobs = answer_logprobs - torch.logsumexp(answer_logprobs, dim=-1)
    loss = -answer_logprobs[CORRECT_ANSWER_IDX]
    p = answer_logprobs.detach().exp()
    return loss, {"masked_ce": loss.item(), "p_correct:mean": p[CORRECT_ANSWER_IDX].item(),
                  **{f"p_{letter.strip()}:mean": p[i].item() for i, letter in enumerate(LETTERS)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="host:port of a gradwire-server")
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    start = time.monotonic()
    service = gradwire.ServiceClient(base_url=args.base_url, progress=False)
    tc = service.create_lora_training_client(base_model=args.base_model, rank=args.rank, seed=0)
    tokenizer = tc.get_tokenizer()

    messages = [{"role": "user", "content": QUESTION}]
    prompt_tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       return_dict=False))
    letter_ids = []
    for letter in LETTERS:
        ids = tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise SystemExit(f"{letter!r} is not a single token for {args.base_model}: {ids}")
        letter_ids.append(ids[0])

    target_tokens = torch.zeros(len(prompt_tokens), len(LETTERS), dtype=torch.long)
    target_tokens[-1] = torch.tensor(letter_ids)
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(prompt_tokens),
                           loss_fn_inputs={"target_tokens": target_tokens})

    print(f"model {args.base_model}, LoRA rank {args.rank}, run {tc.model_id}; "
          f"prompt {len(prompt_tokens)} tokens, answer letter ids {letter_ids}")
    print(f"training {args.steps} steps of masked cross-entropy over{''.join(LETTERS)} "
          f"(correct: B), AdamW lr={args.learning_rate}")

    adam = gradwire.AdamParams(learning_rate=args.learning_rate)
    p_correct = []
    for step in range(args.steps):
        fb = tc.forward_backward_custom([datum], masked_ce_loss)
        opt = tc.optim_step(adam)  # queued right behind the forward-backward
        result = fb.result()
        opt.result()
        metrics = result.metrics
        p_correct.append(metrics["p_correct:mean"])
        dist = " ".join(f"{letter.strip()}={metrics[f'p_{letter.strip()}:mean']:.3f}" for letter in LETTERS)
        print(f"step {step:2d}  loss {metrics['loss:sum']:.4f}  P(correct) {p_correct[-1]:.4f}  [{dist}]",
              flush=True)

    # The forward leg of each step shows the model before that step's update;
    # one forward pass shows the model after the last update.
    final = tc.forward([datum], "cross_entropy").result()
    logprobs = final.loss_fn_outputs[0]["logprobs"].to_torch()[-1]
    p_final = (logprobs - torch.logsumexp(logprobs, dim=-1)).exp()[CORRECT_ANSWER_IDX].item()
    print(f"after step {args.steps - 1:2d}: P(correct) {p_final:.4f}")

    rose = p_final > p_correct[0]
    print(f"P(correct): first {p_correct[0]:.4f} -> last {p_final:.4f} "
          f"({'rose' if rose else 'did NOT rise'}, x{p_final / p_correct[0]:.2f}) "
          f"in {time.monotonic() - start:.1f} s")
    service.close()
    return 0 if rose else 1


if __name__ == "__main__":
    sys.exit(main())
