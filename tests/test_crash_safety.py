"""A crash at any step of a checkpoint save leaves, under the checkpoint's name,
either nothing or a complete checkpoint that loads with exactly the saved state;
never a listed checkpoint that fails to load. Checked by killing a real
`gradwire-server` process at each step ($GRADWIRE_CHECKPOINT_CRASH_AT makes it
exit on the spot there) and restarting on the same folder; and the durable order
that makes it so (files fsynced, then the marker, then the rename) observed on
the system calls of one save."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

import gradwire
from gradwire_server import checkpoints
from conftest import start_cli_server
from reference import random_data

STEPS = ["before_marker", "after_marker", "before_rename", "after_rename"]
PROBE = random_data(90)


def crashing_save(folder: pathlib.Path, step: str, seed: int) -> tuple[str, list[np.ndarray]]:
    """Trains a run one step on a server that dies at `step` of its first save, then
    saves; returns (the run id, its forward logprobs just before the save)."""
    os.environ[checkpoints.CRASH_AT_ENV] = step
    try:
        process, address = start_cli_server("--checkpoint-dir", str(folder))
    finally:
        del os.environ[checkpoints.CRASH_AT_ENV]
    try:
        with gradwire.ServiceClient(base_url=address, progress=False, retry_s=0) as service:
            tc = service.create_lora_training_client("tiny-random", rank=4, seed=seed)
            tc.forward_backward(random_data(91 + seed), "cross_entropy")
            tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
            outputs = tc.forward(PROBE, "cross_entropy").result().loss_fn_outputs
            logprobs = [output["logprobs"].to_numpy() for output in outputs]
            tc.save_state("ckpt")
            assert process.wait(timeout=60) == checkpoints.CRASH_EXIT_CODE, f"the server did not die at {step}"
        return tc.model_id, logprobs
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """The checkpoint folder after one crash at each step, and per step (run id, logprobs)."""
    folder = tmp_path_factory.mktemp("crashes")
    return folder, {step: crashing_save(folder, step, seed) for seed, step in enumerate(STEPS)}


def test_after_a_crash_at_any_step_the_name_holds_nothing_or_the_whole_checkpoint(crashed):
    folder, runs = crashed
    process, address = start_cli_server("--checkpoint-dir", str(folder))
    try:
        with gradwire.ServiceClient(base_url=address, progress=False) as service:
            rest = service.create_rest_client()
            for step, (run_id, saved_logprobs) in runs.items():
                path = f"gradwire://{run_id}/weights/ckpt"
                listed = [c.path for c in rest.list_checkpoints(run_id).result().checkpoints]
                kind_folder = folder / run_id / "weights"
                if step == "after_rename":  # renamed into place: complete, listed, and exact
                    assert listed == [path]
                    resumed = service.create_training_client_from_state_with_optimizer(path)
                    assert resumed.get_info().step == 1
                    out = resumed.forward(PROBE, "cross_entropy").result()
                    for got, want in zip(out.loss_fn_outputs, saved_logprobs):
                        np.testing.assert_array_equal(got["logprobs"].to_numpy(), want)
                else:  # not renamed yet: no trace under the name, and the temporary folder is gone
                    assert listed == [], step
                    with pytest.raises(gradwire.NotFoundError):
                        service.create_training_client_from_state(path)
                    leftover = sorted(p.name for p in kind_folder.iterdir()) if kind_folder.exists() else []
                    assert leftover == [], f"crash {step} left {leftover} under {kind_folder}"
            # Whatever is listed loads.
            for run in rest.list_training_runs(limit=100).result().training_runs:
                for checkpoint in rest.list_checkpoints(run.training_run_id).result().checkpoints:
                    service.create_training_client_from_state_with_optimizer(checkpoint.path).unload().result()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_save_makes_its_files_durable_before_the_marker_and_the_marker_before_the_rename(
        server, service, tmp_path, monkeypatch):
    """The system calls of one real save, in order: every file's data is fsynced before the
    marker is, the marker and the folder before the rename, which happens only once the
    marker is in the folder; the parent is fsynced after it (so the new name survives)."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=7)
    tc.forward_backward(random_data(92), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    state = server.call(lambda: server.engine.save_state(tc.model_id, with_optimizer=True))
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, pathlib.Path.rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def rename(source: pathlib.Path, target):
        events.append(("rename with marker" if (source / checkpoints.MARKER).is_file() else "rename without marker",
                       str(source)))
        return real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(pathlib.Path, "rename", rename)
    path = checkpoints.CheckpointPath(tc.model_id, "weights", "durable")
    saved = checkpoints.write(tmp_path, path, state, "tiny-random")
    monkeypatch.undo()

    def position(kind: str, name: str) -> int:
        found = [i for i, (k, p) in enumerate(events) if k == kind and pathlib.Path(p).name == name]
        assert found, f"no {kind} of {name}: {events}"
        return found[0]

    temp = pathlib.Path(next(p for k, p in events if k.startswith("rename")))
    marker = position("fsync", checkpoints.MARKER)
    for name in sorted(saved.metadata["files"]):
        assert position("fsync", name) < marker, f"{name} is not durable before the marker"
    rename_at = position("rename with marker", temp.name)
    assert marker < position("fsync", temp.name) < rename_at
    assert rename_at < position("fsync", "weights") and events[-1] == ("fsync", str(saved.folder.parent))
    loaded, _ = checkpoints.read(checkpoints.find(tmp_path, path.path), with_optimizer=True)
    assert loaded.keys() == state.adapter.keys()
    assert all(np.array_equal(loaded[k].numpy(), state.adapter[k].numpy()) for k in loaded)
