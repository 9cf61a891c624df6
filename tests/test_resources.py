"""Training runs and checkpoints as resources: RestClient over ResourceService,
checked against the files on the server's disk."""
from __future__ import annotations

import os
import pathlib
import shutil
import threading

import grpc
import pytest

import gradwire
from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import checkpoints, paging, validation
from gradwire_server.resource_servicer import DOWNLOAD_CHUNK_BYTES
from gradwire_server.server import BackgroundServer
from conftest import server_config
from reference import random_data, trained_run, worker_busy


def test_runs_and_checkpoints_are_listed(server, service):
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=1, train_mlp=False,
                                             user_metadata={"owner": "tests"})
    training = tc.save_state("first").result().path
    sampler = tc.save_weights_for_sampler("first").result().path
    rest = service.create_rest_client()

    run = rest.get_training_run(tc.model_id).result()
    assert (run.base_model, run.lora_rank, run.user_metadata, run.loaded, run.step) == \
        ("tiny-random", 4, {"owner": "tests"}, True, 0)
    assert run.lora_config == gradwire.LoraConfig(rank=4, seed=1, train_unembed=True, train_mlp=False,
                                                  train_attn=True)
    assert (run.last_checkpoint.path, run.last_sampler_checkpoint.path) == (training, sampler)
    assert tc.model_id in [r.training_run_id for r in rest.list_training_runs(limit=10**6).result().training_runs]

    listed = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert [(c.checkpoint_id, c.checkpoint_type, c.path) for c in listed] == [
        ("weights/first", "training", training), ("sampler_weights/first", "sampler", sampler)]
    root = server.server.checkpoint_root
    for checkpoint in listed:
        folder = checkpoints.checkpoint_directory(root, checkpoint.path)
        assert checkpoint.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
        assert checkpoint.expires_at is None and checkpoint.training_run_id == tc.model_id

    with pytest.raises(gradwire.NotFoundError, match="run-nope"):
        rest.get_training_run("run-nope").result()
    with pytest.raises(gradwire.NotFoundError, match="run-nope"):
        rest.list_checkpoints("run-nope").result()


def test_list_training_runs_pages(server, service):
    for seed in range(3):
        service.create_lora_training_client("tiny-random", rank=2, seed=seed)
    with grpc.insecure_channel(server.address) as channel:
        stub = rpb_grpc.ResourceServiceStub(channel)
        pages, token = [], ""
        while True:
            page = stub.ListTrainingRuns(rpb.ListTrainingRunsRequest(page_size=2, page_token=token))
            pages.append([r.training_run_id for r in page.training_runs])
            token = page.next_page_token
            if not token:
                break
        everything = stub.ListTrainingRuns(rpb.ListTrainingRunsRequest(page_size=1000)).training_runs
        for bad in (rpb.ListTrainingRunsRequest(page_token="garbage"), rpb.ListTrainingRunsRequest(page_size=-1)):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListTrainingRuns(bad)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert all(len(page) <= 2 for page in pages) and len(pages) >= 2
    assert [run for page in pages for run in page] == [r.training_run_id for r in everything]


def test_runs_whose_labels_outgrow_a_message_are_listed_over_more_pages(tmp_path):
    """Runs with user_metadata at its limit: a page of 1000 would be 2.5 MB, so it ends early,
    at the size a gRPC message holds with room to spare, and its token lists the rest; the SDK,
    which reads every page, lists them all."""
    labels = {"notes": "n" * (validation.MAX_USER_METADATA_BYTES - len("notes"))}
    server = BackgroundServer(server_config(checkpoint_dir=tmp_path))
    try:
        with grpc.insecure_channel(server.address) as channel:
            training = pb_grpc.TrainingServiceStub(channel)
            created = [training.CreateModel(pb.CreateModelRequest(
                base_model="tiny-random", lora_config=pb.LoraConfig(rank=1), user_metadata=labels)).model_id
                for _ in range(150)]
            stub = rpb_grpc.ResourceServiceStub(channel)
            first = stub.ListTrainingRuns(rpb.ListTrainingRunsRequest(page_size=1000))
            rest = stub.ListTrainingRuns(rpb.ListTrainingRunsRequest(page_size=1000, page_token=first.next_page_token))
        assert 0 < len(first.training_runs) < 150 and first.ByteSize() <= paging.PAGE_BYTES
        assert rest.next_page_token == ""
        assert sorted(r.training_run_id for r in [*first.training_runs, *rest.training_runs]) == sorted(created)
        with gradwire.ServiceClient(base_url=server.address) as service:
            listed = service.create_rest_client().list_training_runs(limit=1000).result().training_runs
        assert sorted(r.training_run_id for r in listed) == sorted(created)
        assert all(r.user_metadata == labels for r in listed)
    finally:
        server.stop()


def test_download_streams_the_files_in_chunks(server, service, tmp_path):
    """A checkpoint larger than one chunk arrives in chunks of at most 2 MiB naming their
    file and offset; the downloaded folder is byte-identical to the server's."""
    tc = trained_run(service, rank=256)
    path = tc.save_state("big").result().path
    folder = checkpoints.checkpoint_directory(server.server.checkpoint_root, path)
    assert (folder / "optimizer.pt").stat().st_size > DOWNLOAD_CHUNK_BYTES

    with grpc.insecure_channel(server.address) as channel:
        chunks = list(rpb_grpc.ResourceServiceStub(channel).DownloadCheckpoint(
            rpb.DownloadCheckpointRequest(path=path)))
    assert all(len(c.data) <= DOWNLOAD_CHUNK_BYTES for c in chunks)
    assert len([c for c in chunks if c.relative_path == "optimizer.pt"]) > 1
    assert chunks[-1].relative_path == checkpoints.MARKER
    rebuilt: dict[str, bytes] = {}
    for chunk in chunks:
        assert chunk.offset == len(rebuilt.get(chunk.relative_path, b""))
        rebuilt[chunk.relative_path] = rebuilt.get(chunk.relative_path, b"") + chunk.data
    on_disk = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert rebuilt == on_disk

    downloaded = service.create_rest_client().download_checkpoint(path, tmp_path / "copy")
    assert downloaded == tmp_path / "copy"
    assert {p.name: p.read_bytes() for p in downloaded.iterdir()} == on_disk
    with pytest.raises(gradwire.NotFoundError, match="weights/absent"):
        service.create_rest_client().download_checkpoint(f"gradwire://{tc.model_id}/weights/absent",
                                                         tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_delete_checkpoint(server, service):
    tc = trained_run(service)
    kept = tc.save_state("kept").result().path
    doomed = tc.save_weights_for_sampler("doomed").result().path
    folder = checkpoints.checkpoint_directory(server.server.checkpoint_root, doomed)
    rest = service.create_rest_client()
    rest.delete_checkpoint(tc.model_id, "sampler_weights/doomed").result()
    assert not folder.exists() and not list(folder.parent.iterdir())
    assert [c.path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [kept]
    with pytest.raises(gradwire.NotFoundError, match="doomed"):
        tc.load_state(doomed).result()
    with pytest.raises(gradwire.NotFoundError, match="doomed"):
        rest.delete_checkpoint_from_tinker_path(doomed).result()
    with pytest.raises(gradwire.BadRequestError, match="not a checkpoint path"):
        rest.delete_checkpoint_from_tinker_path("/etc/passwd").result()
    # gradwire's former form, delete_checkpoint(path), still works, with a warning.
    with pytest.warns(DeprecationWarning, match="delete_checkpoint"):
        rest.delete_checkpoint(kept).result()
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []


@pytest.mark.parametrize("damage", ["folder removed", "marker removed", "marker damaged"])
def test_a_listed_checkpoint_removed_by_hand_can_be_deleted_from_the_listing(server, service, damage):
    """Someone removed a checkpoint's folder or marker, or damaged the marker, behind the
    server's back: it can no longer be loaded, and deleting it clears its listing (and what is
    left of its folder)."""
    tc = trained_run(service)
    path = tc.save_state("by-hand").result().path
    folder = checkpoints.checkpoint_directory(server.server.checkpoint_root, path)
    if damage == "folder removed":
        shutil.rmtree(folder)
    elif damage == "marker removed":
        (folder / checkpoints.MARKER).unlink()
    else:
        (folder / checkpoints.MARKER).write_text('{"format_version": ')
    rest = service.create_rest_client()
    with pytest.raises((gradwire.NotFoundError, gradwire.InternalServerError)):
        tc.load_state(path).result()

    rest.delete_checkpoint_from_tinker_path(path).result()

    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []
    assert not folder.exists()
    with pytest.raises(gradwire.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(path).result()


def test_a_damaged_checkpoint_is_not_downloaded(server, service, tmp_path):
    """One flipped byte (same size): DATA_LOSS naming the file, as loading it gives, and no folder."""
    tc = trained_run(service)
    path = tc.save_state("flipped").result().path
    weights = checkpoints.checkpoint_directory(server.server.checkpoint_root, path) / checkpoints.ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(gradwire.InternalServerError,
                       match="adapter_model.safetensors does not match its sha256") as raised:
        service.create_rest_client().download_checkpoint(path, tmp_path / "copy")
    assert raised.value.code == grpc.StatusCode.DATA_LOSS
    assert not (tmp_path / "copy").exists() and list(tmp_path.iterdir()) == []


def test_download_into_the_working_directory_when_it_is_empty(server, service, tmp_path, monkeypatch):
    """dest_dir "." (an empty working directory) receives the files and stays the working
    directory; nothing of the download is left beside it."""
    tc = trained_run(service)
    path = tc.save_state("here").result().path
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    downloaded = service.create_rest_client().download_checkpoint(path, ".")
    assert downloaded == pathlib.Path(".")
    assert os.getcwd() == str(here) and os.path.samefile(".", here)  # not unlinked under its user
    folder = checkpoints.checkpoint_directory(server.server.checkpoint_root, path)
    assert {p.name: p.read_bytes() for p in here.iterdir()} == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["here"]


@pytest.mark.parametrize("taken", ["folder with a file", "file"])
def test_download_into_a_taken_destination_is_refused_before_it_starts(server, service, tmp_path, taken):
    tc = trained_run(service)
    path = tc.save_state("dest").result().path
    dest = tmp_path / "dest"
    if taken == "file":
        dest.write_text("mine")
    else:
        dest.mkdir()
        (dest / "mine.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="dest_dir .* must be absent or an empty folder"):
        service.create_rest_client().download_checkpoint(path, dest)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_info_and_capabilities_describe_the_run_and_server(service):
    tc = service.create_lora_training_client("tiny-random", rank=3, seed=2, train_unembed=False)
    info = tc.get_info()
    assert (info.model_name, info.lora_rank, info.is_lora) == ("tiny-random", 3, True)
    assert info.model_data == gradwire.types.ModelData(arch="LlamaForCausalLM", model_name="tiny-random",
                                                       tokenizer_id="tiny-random")  # Tinker's attributes
    assert info.lora_config == gradwire.LoraConfig(rank=3, seed=2, train_unembed=False, train_mlp=True,
                                                   train_attn=True)
    capabilities = service.create_rest_client().get_server_capabilities().result()
    assert [m.model_name for m in capabilities.supported_models] == ["tiny-random"]
    assert "cross_entropy" in capabilities.loss_fns and capabilities.limits["max_lora_rank"] == 256


def queued_jobs(server, label: str) -> int:
    """How many of the worker's unordered jobs named `label` wait in its queue."""
    scheduler = server.server.scheduler
    with scheduler._lock:
        return len(scheduler._ready.get(f"__control__/{label}", ()))


def test_concurrent_deletes_of_one_checkpoint(server, service):
    """Two deletes of the same checkpoint queued together: one deletes it, the other is
    NOT_FOUND (not an unknown error from a folder that vanished under it)."""
    tc = trained_run(service)
    path = tc.save_weights_for_sampler("twice").result().path
    request = rpb.DeleteCheckpointRequest(path=path)
    with grpc.insecure_channel(server.address) as channel:
        stub = rpb_grpc.ResourceServiceStub(channel)
        with worker_busy(server):
            calls = [stub.DeleteCheckpoint.future(request) for _ in range(2)]
            for _ in range(3000):  # until both RPCs reached the worker's queue
                if queued_jobs(server, "delete_checkpoint") == 2:
                    break
                threading.Event().wait(0.01)
        outcomes = []
        for call in calls:
            try:
                call.result()
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                outcomes.append(error.code())
    assert sorted(outcomes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND], key=str)
    assert service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints == []


def test_list_checkpoints_pages(server, service):
    """ListCheckpoints pages like ListTrainingRuns; page tokens are opaque (a bare offset
    is not one)."""
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    saved = [tc.save_weights_for_sampler(f"page{i}").result().path for i in range(3)]
    with grpc.insecure_channel(server.address) as channel:
        stub = rpb_grpc.ResourceServiceStub(channel)
        pages, token = [], ""
        while True:
            page = stub.ListCheckpoints(rpb.ListCheckpointsRequest(training_run_id=tc.model_id, page_size=2,
                                                                   page_token=token))
            pages.append([c.path for c in page.checkpoints])
            token = page.next_page_token
            if not token:
                break
        assert not token.isdigit()
        for bad, field in ((rpb.ListCheckpointsRequest(training_run_id=tc.model_id, page_token="2"), "page_token"),
                           (rpb.ListCheckpointsRequest(training_run_id=tc.model_id, page_size=1001), "page_size"),
                           (rpb.ListTrainingRunsRequest(page_token="1"), "page_token")):
            method = stub.ListCheckpoints if isinstance(bad, rpb.ListCheckpointsRequest) else stub.ListTrainingRuns
            with pytest.raises(grpc.RpcError) as raised:
                method(bad)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in raised.value.details()
    assert pages == [saved[:2], saved[2:]]
    assert [c.path for c in service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints] == saved


def test_deleting_what_a_page_listed_skips_nothing_on_the_next_page(server, service):
    """The usual cleanup loop (list a page, delete its items, follow the token) reaches
    every checkpoint: a token holds the last item's place, not an offset that the deletions
    shift. A token is tied to its list: another run's ListCheckpoints, or ListTrainingRuns,
    refuses it."""
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    saved = [tc.save_weights_for_sampler(f"cleanup{i}").result().path for i in range(5)]
    other = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    rest = service.create_rest_client()
    seen, token = [], ""
    with grpc.insecure_channel(server.address) as channel:
        stub = rpb_grpc.ResourceServiceStub(channel)
        while True:
            page = stub.ListCheckpoints(rpb.ListCheckpointsRequest(training_run_id=tc.model_id, page_size=2,
                                                                   page_token=token))
            for checkpoint in page.checkpoints:
                seen.append(checkpoint.path)
                rest.delete_checkpoint_from_tinker_path(checkpoint.path).result()
            token = page.next_page_token
            if not token:
                break
            for foreign in (rpb.ListCheckpointsRequest(training_run_id=other.model_id, page_token=token),
                            rpb.ListTrainingRunsRequest(page_token=token)):
                method = stub.ListCheckpoints if isinstance(foreign, rpb.ListCheckpointsRequest) else \
                    stub.ListTrainingRuns
                with pytest.raises(grpc.RpcError) as raised:
                    method(foreign)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert seen == saved
    assert rest.list_checkpoints(tc.model_id).result().checkpoints == []


def test_a_lost_run_index_is_rebuilt_from_the_checkpoint_folders(tmp_path):
    """The folders are the truth: a server started on a checkpoint folder whose index was
    lost (deleted, or a backup without it) lists each run that has a checkpoint again, with
    what its checkpoints recorded (base model, LoRA settings, step), and their checkpoints."""
    folder = tmp_path / "checkpoints"
    first = BackgroundServer(server_config(checkpoint_dir=folder))
    try:
        with gradwire.ServiceClient(base_url=first.address) as service:
            tc = service.create_lora_training_client("tiny-random", rank=4, seed=1, train_mlp=False)
            tc.forward_backward(random_data(3), "cross_entropy")
            tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
            paths = [tc.save_state("first").result().path, tc.save_weights_for_sampler("first").result().path]
            rest = service.create_rest_client()
            before = rest.get_training_run(tc.model_id).result()
            listed = [c.path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    finally:
        first.stop()
    for index in folder.glob("index.sqlite3*"):
        index.unlink()
    again = BackgroundServer(server_config(checkpoint_dir=folder))
    try:
        with gradwire.ServiceClient(base_url=again.address) as service:
            rest = service.create_rest_client()
            run = rest.get_training_run(tc.model_id).result()
            assert (run.base_model, run.lora_rank, run.lora_config, run.step, run.loaded) == \
                (before.base_model, before.lora_rank, before.lora_config, 1, False)
            assert tc.model_id in [r.training_run_id for r in rest.list_training_runs(limit=100).result().training_runs]
            assert [c.path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == listed == paths
            resumed = service.create_training_client_from_state(paths[0])
            assert resumed.get_info().step == 1
    finally:
        again.stop()
