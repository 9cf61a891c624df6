"""Training runs and checkpoints as resources: RestClient over ResourceService,
checked against the files on the server's disk."""
from __future__ import annotations

import grpc
import pytest

import gradwire
from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire_server import checkpoints
from gradwire_server.resource_servicer import DOWNLOAD_CHUNK_BYTES
from reference import trained_run


def test_runs_and_checkpoints_are_listed(server, service):
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=1, train_mlp=False,
                                             user_metadata={"owner": "tests"})
    training = tc.save_state("first").result().path
    sampler = tc.save_weights_for_sampler("first").result().path
    rest = service.create_rest_client()

    run = rest.get_training_run(tc.model_id)
    assert (run.base_model, run.lora_rank, run.user_metadata, run.loaded, run.step) == \
        ("tiny-random", 4, {"owner": "tests"}, True, 0)
    assert run.lora_config == gradwire.LoraConfig(rank=4, seed=1, train_unembed=True, train_mlp=False,
                                                  train_attn=True)
    assert (run.last_checkpoint.path, run.last_sampler_checkpoint.path) == (training, sampler)
    assert tc.model_id in [r.training_run_id for r in rest.list_training_runs()]

    listed = rest.list_checkpoints(tc.model_id)
    assert [(c.checkpoint_id, c.checkpoint_type, c.path) for c in listed] == [
        ("weights/first", "training", training), ("sampler_weights/first", "sampler", sampler)]
    root = server.server.checkpoint_root
    for checkpoint in listed:
        folder = checkpoints.checkpoint_directory(root, checkpoint.path)
        assert checkpoint.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
        assert checkpoint.expires_at is None and checkpoint.training_run_id == tc.model_id

    with pytest.raises(gradwire.NotFoundError, match="run-nope"):
        rest.get_training_run("run-nope")
    with pytest.raises(gradwire.NotFoundError, match="run-nope"):
        rest.list_checkpoints("run-nope")


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
    rest.delete_checkpoint(doomed)
    assert not folder.exists() and not list(folder.parent.iterdir())
    assert [c.path for c in rest.list_checkpoints(tc.model_id)] == [kept]
    with pytest.raises(gradwire.NotFoundError, match="doomed"):
        tc.load_state(doomed).result()
    with pytest.raises(gradwire.NotFoundError, match="doomed"):
        rest.delete_checkpoint(doomed)
    with pytest.raises(gradwire.BadRequestError, match="not a checkpoint path"):
        rest.delete_checkpoint("/etc/passwd")


def test_info_and_capabilities_describe_the_run_and_server(service):
    tc = service.create_lora_training_client("tiny-random", rank=3, seed=2, train_unembed=False)
    info = tc.get_info()
    assert (info.model_name, info.lora_rank, info.is_lora) == ("tiny-random", 3, True)
    assert info.lora_config == gradwire.LoraConfig(rank=3, seed=2, train_unembed=False, train_mlp=True,
                                                   train_attn=True)
    capabilities = service.create_rest_client().get_server_capabilities()
    assert [m.model_name for m in capabilities.supported_models] == ["tiny-random"]
    assert "cross_entropy" in capabilities.loss_fns and capabilities.limits["max_lora_rank"] > 0
