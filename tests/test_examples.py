"""The example scripts run against a real server and do what they claim."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.append(str(SCRIPTS))  # the scripts import their shared local_server module
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_dpo_raises_the_preference_margin(server):
    """A few DPO steps: the policy starts equal to the frozen reference (margin 0) and
    ends preferring every chosen completion, with a lower DPO loss."""
    example_dpo = load_script("example_dpo")
    result = example_dpo.main(["--base-url", server.address, "--steps", "4"])
    assert len(result.steps) == 4
    assert result.steps[0].margin == pytest.approx(0.0, abs=1e-6)
    assert result.final.margin > result.steps[0].margin
    assert result.final.accuracy == 1.0
    assert result.final.loss < result.steps[0].loss


def test_example_rl_raises_the_mean_reward(server):
    """A few RL steps from sampled groups: tiny-random's random policy starts near the
    chance rate of lowercase letter bytes and learns to emit mostly those."""
    example_rl = load_script("example_rl")
    result = example_rl.main(["--base-url", server.address, "--steps", "10"])
    assert len(result.steps) == 10
    first, last = result.first_and_last(2)
    assert first < 0.2  # 26 of the 320 tokens are lowercase letters
    assert last > first + 0.5
