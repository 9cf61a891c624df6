"""Checkpoint folders that are not what their marker says: a newer format version,
a folder moved or copied by hand, an unreadable marker, a file the marker names but
that is gone. Each load fails with a clear status and leaves the run exactly as it
was (weights, gradients, optimizer). A save that fails part-way leaves no folder."""
from __future__ import annotations

import dataclasses
import json
import shutil

import grpc
import pytest

import gradwire
from gradwire_server import checkpoints
from reference import (assert_optimizer_equal, assert_state_equal, optimizer_state, random_data, run_state,
                       trained_run)
from test_checkpoint_bad_input import donor_checkpoint


def edit_marker(folder, **changes) -> None:
    marker = json.loads((folder / checkpoints.MARKER).read_text())
    marker.update(changes)
    (folder / checkpoints.MARKER).write_text(json.dumps(marker))


def newer_format(server, service):
    path, folder = donor_checkpoint(server, service)
    edit_marker(folder, format_version=checkpoints.FORMAT_VERSION + 1)
    version = checkpoints.FORMAT_VERSION
    return path, f"has format version {version + 1}; this server reads {version}"


def moved_by_hand(server, service):
    path, folder = donor_checkpoint(server, service)
    moved = folder.parent / "moved-by-hand"
    folder.rename(moved)
    return path.rsplit("/", 1)[0] + "/moved-by-hand", f"holds a copy of {path}; checkpoint folders must not be moved"


def copied_by_hand(server, service):
    path, folder = donor_checkpoint(server, service)
    shutil.copytree(folder, folder.parent / "copied-by-hand")
    return path.rsplit("/", 1)[0] + "/copied-by-hand", f"holds a copy of {path}"


def unreadable_marker(server, service):
    path, folder = donor_checkpoint(server, service)
    (folder / checkpoints.MARKER).write_text('{"format_version": 1, "run_id": ')
    return path, f"checkpoint {path}: {checkpoints.MARKER} is unreadable"


def missing_file(name: str):
    def make(server, service):
        path, folder = donor_checkpoint(server, service)
        (folder / name).unlink()
        return path, f"checkpoint {path}: {name} is missing"
    return make


# (case, damage -> (path, words), with optimizer, error class, code)
CASES = [
    ("newer format version", newer_format, False, gradwire.ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    ("folder moved by hand", moved_by_hand, False, gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS),
    ("folder copied by hand", copied_by_hand, True, gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS),
    ("unreadable marker", unreadable_marker, False, gradwire.InternalServerError, grpc.StatusCode.DATA_LOSS),
    ("adapter file missing", missing_file(checkpoints.ADAPTER_WEIGHTS), False, gradwire.InternalServerError,
     grpc.StatusCode.DATA_LOSS),
    ("optimizer file missing", missing_file(checkpoints.OPTIMIZER_STATE), True, gradwire.InternalServerError,
     grpc.StatusCode.DATA_LOSS),
]


@pytest.mark.parametrize("case, damage, with_optimizer, error, code", CASES, ids=[c[0] for c in CASES])
def test_a_checkpoint_that_is_not_what_its_marker_says_fails_and_changes_nothing(
        server, service, case, damage, with_optimizer, error, code):
    path, words = damage(server, service)
    tc = trained_run(service, seed=8)
    tc.forward_backward(random_data(93), "cross_entropy").result()
    before, optimizer_before = run_state(server, tc.model_id), optimizer_state(server, tc.model_id)
    with pytest.raises(error) as raised:
        (tc.load_state_with_optimizer(path) if with_optimizer else tc.load_state(path)).result()
    assert raised.value.code == code
    assert words in str(raised.value), str(raised.value)
    assert_state_equal(before, run_state(server, tc.model_id))
    assert_optimizer_equal(optimizer_before, optimizer_state(server, tc.model_id))
    runs_before = set(server.engine.runs)
    with pytest.raises(error, match=words[:30]):
        (service.create_training_client_from_state_with_optimizer if with_optimizer
         else service.create_training_client_from_state)(path)
    assert set(server.engine.runs) == runs_before


def test_a_save_that_fails_part_way_leaves_no_folder_and_the_name_free(server, service, tmp_path):
    """safetensors refuses an adapter whose tensors share memory, after the temporary folder
    was made and the config written: the temporary folder is removed, nothing is under the
    name, and a good save of the same name then succeeds."""
    tc = trained_run(service, seed=9)
    state = server.call(lambda: server.engine.save_state(tc.model_id, with_optimizer=True))
    first = next(iter(state.adapter.values()))
    broken = dataclasses.replace(state, adapter={**state.adapter, "shares.memory.weight": first})
    path = checkpoints.CheckpointPath(tc.model_id, "weights", "retried")
    with pytest.raises(RuntimeError, match="share memory"):
        checkpoints.write(tmp_path, path, broken, "tiny-random")
    kind_folder = tmp_path / tc.model_id / "weights"
    assert list(kind_folder.iterdir()) == []
    assert list(checkpoints.scan(tmp_path)) == []
    saved = checkpoints.write(tmp_path, path, state, "tiny-random")
    assert [p.name for p in kind_folder.iterdir()] == ["retried"]
    assert checkpoints.find(tmp_path, path.path).metadata["files"] == saved.metadata["files"]


def test_every_checkpoint_file_has_the_same_permissions(server, service):
    """The process's umask decides them for all files alike (safetensors alone wrote 0600),
    so whoever may read one file of a checkpoint may read them all."""
    tc = service.create_lora_training_client("tiny-random", rank=2)
    path = tc.save_state("modes").result().path
    folder = checkpoints.checkpoint_directory(server.server.checkpoint_root, path)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes
