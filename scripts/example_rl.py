"""Reinforcement learning from sampled completions with a built-in RL loss.

Each step saves the policy's weights for sampling, samples a group of
completions per prompt from them, and scores each completion with a
programmatic reward: the fraction of its tokens that are lowercase letters
(tokens that decode to lowercase ASCII letters only; for tiny-random's byte
tokenizer, the 26 letter bytes). A completion's advantage is its reward minus
its group's mean. The datums carry the sampler's logprobs of the completion
tokens, so `importance_sampling` (or `ppo`) corrects for the sampler's policy;
prompt positions have advantage 0 and do not train. Each step prints the mean
reward, which rises over the steps.

    python scripts/example_rl.py                        # starts its own tiny-random server
    python scripts/example_rl.py --model smollm2-135m --steps 6 --learning-rate 1e-3
"""
from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import gradwire
from local_server import local_server

PROMPTS = [
    "Write a word.",
    "Say something.",
    "Name an animal.",
    "Finish this: the cat sat on",
]


@dataclass
class RlStep:
    mean_reward: float  # over every completion sampled this step (before its update)


@dataclass
class RlResult:
    steps: list[RlStep]

    def first_and_last(self, count: int) -> tuple[float, float]:
        """The mean reward of the first `count` steps and of the last `count` steps."""
        def mean(steps: list[RlStep]) -> float:
            return sum(s.mean_reward for s in steps) / len(steps)
        return mean(self.steps[:count]), mean(self.steps[-count:])


def lowercase_reward(tokenizer) -> Callable[[list[int]], float]:
    """The fraction of a completion's tokens that decode to lowercase ASCII letters only."""
    is_lowercase: dict[int, bool] = {}

    def lowercase(token: int) -> bool:
        if token not in is_lowercase:
            text = tokenizer.decode([token])
            is_lowercase[token] = text.isascii() and text.isalpha() and text.islower()
        return is_lowercase[token]

    def reward(tokens: list[int]) -> float:
        return sum(map(lowercase, tokens)) / len(tokens) if tokens else 0.0
    return reward


def rl_datum(prompt: list[int], sequence: gradwire.SampledSequence, advantage: float) -> gradwire.Datum:
    """prompt + completion as a next-token datum whose completion targets carry the
    sampler's logprobs and the advantage (prompt targets: 0, so they do not train)."""
    tokens = prompt + sequence.tokens
    prompt_targets = len(prompt) - 1  # target i is tokens[i + 1]
    return gradwire.Datum(
        model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:],
                        "logprobs": [0.0] * prompt_targets + list(sequence.logprobs),
                        "advantages": [0.0] * prompt_targets + [advantage] * len(sequence.tokens)})


def train(base_url: str, model: str | None, steps: int, loss_fn: str, learning_rate: float, rank: int,
          group_size: int, max_tokens: int, seed: int) -> RlResult:
    service = gradwire.ServiceClient(base_url=base_url, progress=False)
    try:
        base_model = model or service.get_server_capabilities().supported_models[0].model_name
        policy = service.create_lora_training_client(base_model=base_model, rank=rank, seed=seed)
        tokenizer = policy.get_tokenizer()
        reward = lowercase_reward(tokenizer)
        prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                      add_generation_prompt=True, return_dict=False))
                   for p in PROMPTS]
        print(f"model {base_model}, LoRA rank {rank}: {len(prompts)} prompts x {group_size} samples of "
              f"{max_tokens} tokens, loss {loss_fn}, AdamW lr {learning_rate}, policy {policy.model_id}")

        adam = gradwire.AdamParams(learning_rate=learning_rate)
        seeds = random.Random(seed)  # one sampling seed per group: the run repeats exactly
        history = []
        for step in range(steps):
            sampler = policy.save_weights_and_get_sampling_client()
            # Every prompt's group is submitted before any result is awaited.
            pending = [sampler.sample(gradwire.ModelInput.from_ints(prompt), group_size,
                                      gradwire.SamplingParams(max_tokens=max_tokens, temperature=1.0,
                                                              seed=seeds.getrandbits(31)))
                       for prompt in prompts]
            data, rewards = [], []
            for prompt, future in zip(prompts, pending):
                group = future.result().sequences
                group_rewards = [reward(sequence.tokens) for sequence in group]
                baseline = sum(group_rewards) / len(group_rewards)
                data += [rl_datum(prompt, sequence, r - baseline) for sequence, r in zip(group, group_rewards)]
                rewards += group_rewards
            fb = policy.forward_backward(data, loss_fn)
            opt = policy.optim_step(adam)  # queued right behind the forward-backward
            fb.result()
            opt.result()
            history.append(RlStep(sum(rewards) / len(rewards)))
            print(f"step {step:2d}  mean reward {history[-1].mean_reward:.3f}", flush=True)
        return RlResult(history)
    finally:
        service.close()


def main(argv: list[str] | None = None) -> RlResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None,
                        help="host:port of a running gradwire-server (default: start one for --model)")
    parser.add_argument("--model", default=None,
                        help="base model (default: tiny-random, or the server's model with --base-url)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss", choices=["importance_sampling", "ppo"], default="importance_sampling")
    parser.add_argument("--learning-rate", type=float, default=2e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt")
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens per completion")
    parser.add_argument("--seed", type=int, default=0, help="LoRA initialisation and sampling seeds")
    args = parser.parse_args(argv)

    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        base_url = args.base_url or stack.enter_context(local_server(args.model or "tiny-random"))
        result = train(base_url, args.model, args.steps, args.loss, args.learning_rate, args.rank,
                       args.group_size, args.max_tokens, args.seed)
    first, last = result.first_and_last(3)
    print(f"mean reward, first 3 steps {first:.3f} -> last 3 steps {last:.3f} "
          f"in {time.monotonic() - start:.1f} s")
    return result


if __name__ == "__main__":
    first, last = main().first_and_last(3)
    sys.exit(0 if last > first else 1)
