"""The `tinker` namespace distribution (compat/tinker): installed with pip into a
temporary folder, a Tinker-style loop written against `import tinker` runs on a gradwire
server and gets exactly what gradwire's own SDK gets on the same seeds; the public
client signatures match those of the official Tinker 0.38.0 wheel
(tests/tinker_0_38_signatures.json)."""
from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest

import gradwire
import tinker_loop
from reference import random_data, worker_busy

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIGNATURES = pathlib.Path(__file__).resolve().parent / "tinker_0_38_signatures.json"


@pytest.fixture(scope="module")
def compat_site(tmp_path_factory) -> pathlib.Path:
    """gradwire-tinker installed by pip (no dependencies, no network) into a fresh folder."""
    source = tmp_path_factory.mktemp("compat-src") / "tinker"
    shutil.copytree(ROOT / "compat" / "tinker", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("compat-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True)
    return site


def run_with_tinker(site: pathlib.Path, code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter that finds `tinker` only in `site`."""
    path = os.pathsep.join([str(site), str(ROOT / "tests"), *sys.path])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **env})


LOOP = """
import json, tinker, tinker.types.tensor_data, tinker.lib.public_interfaces
from tinker.types import LossFnType
assert tinker.types.tensor_data.TensorData is tinker.TensorData
assert tinker.lib.public_interfaces.APIFuture is tinker.APIFuture and tinker.StopReason
import tinker_loop
print(json.dumps(tinker_loop.run(tinker, tinker.ServiceClient(progress=False))))
"""


def test_a_tinker_loop_gets_what_gradwire_gets(compat_site, server, service):
    ran = run_with_tinker(compat_site, LOOP, {"TINKER_BASE_URL": f"http://{server.address}"})
    assert ran.returncode == 0, ran.stderr
    via_tinker = json.loads(ran.stdout.strip().splitlines()[-1])
    via_gradwire = tinker_loop.run(gradwire, service)
    assert via_tinker["state_expires"] == [True]
    for key in ("ids_importance_sampling", "ids_gspo"):
        assert all(via_tinker[key]) and set(via_tinker[key]).isdisjoint(via_gradwire.pop(key))
        via_tinker.pop(key)
    assert via_tinker.keys() == via_gradwire.keys()
    for key, value in via_gradwire.items():
        assert via_tinker[key] == pytest.approx(value, rel=1e-6, abs=1e-6) if isinstance(value, float) \
            else via_tinker[key] == value, key


def test_tinker_is_only_there_when_installed_and_never_beside_the_real_one(compat_site):
    assert importlib.util.find_spec("tinker") is None  # gradwire itself provides no `tinker`
    assert not any((ROOT / folder / "tinker").exists() for folder in ("sdk", "service"))
    fake = compat_site.parent / "with-real-tinker"
    shutil.copytree(compat_site, fake)
    (fake / "tinker-0.38.0.dist-info").mkdir()
    (fake / "tinker-0.38.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tinker\nVersion: 0.38.0\n")
    ran = run_with_tinker(fake, "import warnings; warnings.simplefilter('error'); import tinker", {})
    assert ran.returncode != 0 and "uninstall one of them" in ran.stderr


def test_tinker_environment_variables_configure_the_client(compat_site):
    ran = run_with_tinker(compat_site, "import tinker; c = tinker.ServiceClient(); print(c.base_url)",
                          {"TINKER_BASE_URL": "http://example.invalid:1234", "TINKER_API_KEY": "k"})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "example.invalid:1234"


# ---- signatures ------------------------------------------------------------------------------------

CLASSES = {"ServiceClient": gradwire.ServiceClient, "TrainingClient": gradwire.TrainingClient,
           "SamplingClient": gradwire.SamplingClient, "RestClient": gradwire.RestClient,
           "APIFuture": gradwire.APIFuture}


def _signature_problems(where: str, method, expected: dict) -> list[str]:
    """gradwire's parameters must start with Tinker's, same names in the same order, none
    keyword-only that Tinker lets callers pass by position, with Tinker's literal defaults;
    gradwire may append parameters that have defaults or are keyword-only."""
    parameters = [p for p in inspect.signature(method).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in parameters]
    if names[:len(expected["params"])] != expected["params"]:
        return [f"{where}{tuple(names)}: Tinker 0.38 has {tuple(expected['params'])}"]
    problems = []
    for parameter in parameters[:len(expected["params"])]:
        if parameter.kind == parameter.KEYWORD_ONLY and parameter.name not in expected["keyword_only"]:
            problems.append(f"{where}: {parameter.name} is keyword-only, Tinker takes it by position")
        written = expected["defaults"].get(parameter.name)
        if written is None:
            continue  # a default where Tinker has none only accepts more calls (gradwire's old forms)
        try:
            tinker_default = ast.literal_eval(written)
        except ValueError:
            continue  # not a literal (an expression of Tinker's own types)
        if parameter.default != tinker_default:
            problems.append(f"{where}: {parameter.name}={parameter.default!r}, Tinker's default is {written}")
    for parameter in parameters[len(expected["params"]):]:
        if parameter.default is inspect.Parameter.empty and parameter.kind != parameter.KEYWORD_ONLY:
            problems.append(f"{where}: added parameter {parameter.name} needs a default")
    return problems


def test_client_signatures_match_tinker_0_38():
    """Every public method of Tinker 0.38's clients exists on gradwire's with Tinker's
    parameters (names, order, positional/keyword, literal defaults) and is a coroutine
    function exactly when Tinker's is (the _async twins); the methods gradwire cannot
    offer raise UnsupportedFeatureError; the rest of the gaps are listed, with reasons,
    in the JSON file. Every top-level name of `tinker` exists in gradwire."""
    expected = json.loads(SIGNATURES.read_text())
    absent = expected["gradwire"]["absent"]
    unsupported = set(expected["gradwire"]["raises_unsupported"])
    problems = []
    for class_name, methods in expected["classes"].items():
        cls = CLASSES[class_name]
        for name, signature in methods.items():
            where = f"{class_name}.{name}"
            if where in absent:
                continue
            method = getattr(cls, name, None)
            if method is None:
                problems.append(f"{where} is missing")
                continue
            if inspect.iscoroutinefunction(method) != name.endswith("_async"):
                problems.append(f"{where}: coroutine function is {inspect.iscoroutinefunction(method)}")
            if where in unsupported:
                continue
            problems += _signature_problems(where, method, signature)
    problems += [f"gradwire.{name} is missing" for name in expected["top_level_names"]
                 if f"tinker.{name}" not in absent and not hasattr(gradwire, name)]
    assert not problems, "\n".join(problems)


def test_methods_gradwire_cannot_offer_raise_naming_themselves(service):
    expected = json.loads(SIGNATURES.read_text())["gradwire"]["raises_unsupported"]
    rest = service.create_rest_client()
    for where in expected:
        name = where.split(".", 1)[1]
        method = getattr(rest, name)
        with pytest.raises(gradwire.UnsupportedFeatureError, match=name.removesuffix("_async")):
            if name.endswith("_async"):
                asyncio.run(method("x"))
            else:
                method("x")


def test_errors_are_caught_as_code_written_for_tinker_catches_them(server, service):
    """A request that fails after the server accepted it raises its status class and, as
    Tinker's failed futures do, a RequestFailedError naming the operation and whose failure
    it was; a wait that runs out is a TimeoutError; every error has Tinker's message and
    status_code, and pickles with all of it (errors cross to worker processes)."""
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    overflowing = [gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={
        "target_tokens": [2, 3, 4], "weights": [1e38, 1e38, 1e38]})]
    with pytest.raises(gradwire.RequestFailedError) as raised:
        tc.forward_backward(overflowing, "cross_entropy").result(30)
    failed = raised.value
    assert isinstance(failed, gradwire.ConflictError) and failed.status_code == 409
    assert failed.category == gradwire.RequestErrorCategory.User == "user"
    assert failed.request_id.startswith(f"operations/{tc.model_id}/")
    assert failed.message.startswith("FAILED_PRECONDITION: the gradient of this batch is not finite")
    copy = pickle.loads(pickle.dumps(failed))
    assert (type(copy), copy.args, copy.request_id, copy.category, copy.code, copy.reason) == \
        (type(failed), failed.args, failed.request_id, failed.category, failed.code, failed.reason)

    with pytest.raises(gradwire.BadRequestError) as refused:  # refused at once: not a failed request
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-3, beta1=2.0)).result(30)
    assert refused.value.status_code == 400 and not isinstance(refused.value, gradwire.RequestFailedError)
    with worker_busy(server), pytest.raises(TimeoutError):
        tc.forward(random_data(5), "cross_entropy").result(timeout=0)
