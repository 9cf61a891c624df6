"""The worker never waits on a client, and runs take turns: orderings read from the
operations' own start/end timestamps (no durations are asserted)."""
from __future__ import annotations

import concurrent.futures
import time

import pytest

import gradwire
from reference import new_run, operation_metadata, random_data, raw_request, succeeded, worker_busy


def test_optim_step_runs_without_the_client_fetching_the_gradient_result(service):
    """forward_backward and optim_step submitted back to back: the step is done while
    the forward_backward's result has never been asked for."""
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    backward = tc.forward_backward(random_data(70), "cross_entropy")
    step = tc.optim_step(gradwire.AdamParams(learning_rate=1e-3))
    assert step.result(timeout=60).metrics["grad_norm:mean"] > 0
    assert backward.result().metrics["loss:sum"] > 0


def test_done_turns_true_once_the_server_finishes_without_anyone_asking_for_the_result(server, service):
    """A loop polling done() (as code written for concurrent futures does) ends: a training
    request, a sample and a refused request each read done() False while queued, then True
    once the server has finished them; result() then gives the value or the error."""
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    sampler = service.create_sampling_client(base_model="tiny-random")
    with worker_busy(server):
        futures = [tc.forward_backward(random_data(71), "cross_entropy"),
                   sampler.sample(gradwire.ModelInput.from_ints([1, 2, 3]), 1,
                                  gradwire.SamplingParams(max_tokens=3, seed=0)),
                   tc.optim_step(gradwire.AdamParams(learning_rate=1e-3, beta1=2.0))]
        assert concurrent.futures.wait(futures[2:], timeout=30).done  # refused at once
        assert [future.done() for future in futures[:2]] == [False, False]  # queued
    deadline = time.monotonic() + 60
    while not all(future.done() for future in futures):
        assert time.monotonic() < deadline, "done() never turned True"
        time.sleep(0.05)
    backward, sample, refused = futures
    assert backward.result(timeout=0).metrics["loss:sum"] > 0
    assert len(sample.result(timeout=0).sequences[0].tokens) == 3
    with pytest.raises(gradwire.BadRequestError, match="beta1"):
        refused.result(timeout=0)


def test_runs_take_turns_instead_of_waiting_behind_a_whole_queue(server, stubs):
    """Run A queues three requests and run B one while the worker is busy: B's is
    done before A's second starts, not after all of A's."""
    training, operations = stubs
    run_a, run_b = new_run(training), new_run(training)
    with worker_busy(server):
        a_ops = [training.ForwardBackward(raw_request(run_a, seq, random_data(71 + seq))).name
                 for seq in (1, 2, 3)]
        b_op = training.ForwardBackward(raw_request(run_b, 1, random_data(75))).name
    a_meta = [operation_metadata(succeeded(operations, name)) for name in a_ops]
    b_meta = operation_metadata(succeeded(operations, b_op))
    assert b_meta.end_time.ToNanoseconds() <= a_meta[1].start_time.ToNanoseconds()
