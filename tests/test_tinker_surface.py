"""Tinker 0.38's surface on gradwire, over real gRPC: checkpoint TTLs and overwrite,
ephemeral sampler weights, sequence ids and top-k sample logprobs, prompt_logprobs_last_n,
model names as users write them, and hosted-only features that refuse clearly."""
from __future__ import annotations

import gc
import json
import time

import numpy as np
import pytest
import torch

import gradwire
from gradwire_server import checkpoints, models
from conftest import server_config
from gradwire_server.server import BackgroundServer
from reference import assert_state_equal, random_data, run_state, trained_run

PROMPT = [1, 40, 33, 72, 105, 18, 7]


def run_folders(server, run_id: str) -> list[str]:
    """Every file or folder under the run's checkpoint folder."""
    folder = server.server.checkpoint_root / run_id
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def wait_until(condition, seconds: float = 30.0) -> bool:
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.05)
    return True


def snapshots(server) -> int:
    return server.call(server.server.sampling.adapters.snapshot_count)


# ---- checkpoint TTL and overwrite ---------------------------------------------------------------

def test_ttl_checkpoints_expire_leave_listings_and_are_deleted(server, service):
    tc = trained_run(service, seed=3)
    kept = tc.save_state("kept").result().path
    # 5 s: the listing below must come before they expire, also on a loaded machine.
    brief = tc.save_state("brief", ttl_seconds=5).result().path
    sampler = tc.save_weights_for_sampler("brief", ttl_seconds=5).result().path
    rest = service.create_rest_client()
    listed = {c.path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {kept, brief, sampler}
    assert listed[kept].expires_at is None
    assert 0 < (listed[brief].expires_at - listed[brief].time).total_seconds() <= 5.01
    folders = [checkpoints.checkpoint_directory(server.server.checkpoint_root, p) for p in (brief, sampler)]

    expiry = max(listed[brief].expires_at, listed[sampler].expires_at).timestamp()
    time.sleep(max(0.0, expiry - time.time()) + 0.1)
    assert [c.path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [kept]
    with pytest.raises(gradwire.NotFoundError, match="TTL"):
        tc.load_state(brief).result()
    with pytest.raises(gradwire.NotFoundError):
        service.create_sampling_client(model_path=sampler).compute_logprobs(
            gradwire.ModelInput.from_ints(PROMPT)).result()
    assert all(folder.exists() for folder in folders)  # until the sweep
    assert set(server.expire_checkpoints()) >= {brief, sampler}
    assert not any(folder.exists() for folder in folders)
    tc.load_state(kept).result()


def test_a_checkpoints_ttl_can_be_set_and_removed(server, service):
    tc = trained_run(service, seed=10)
    rest = service.create_rest_client()
    saved_at = time.monotonic()
    keep = tc.save_state("keep", ttl_seconds=3).result().path
    # removed at once (a loaded machine took over 1 s for the next save): then kept past those 3 s
    assert rest.set_checkpoint_ttl_from_tinker_path(keep.replace("gradwire://", "tinker://"), None).result() is None
    drop = tc.save_weights_for_sampler("drop").result().path
    rest.set_checkpoint_ttl_from_tinker_path(drop, 1).result()
    listed = {c.path: c.expires_at for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[keep] is None and listed[drop] is not None
    time.sleep(max(1.1, saved_at + 3.1 - time.monotonic()))
    assert [c.path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [keep]
    tc.load_state(keep).result()
    assert drop in server.expire_checkpoints()
    with pytest.raises(gradwire.NotFoundError):
        rest.set_checkpoint_ttl_from_tinker_path(drop, 10).result()
    for bad in (0, 10**12):
        with pytest.raises(gradwire.BadRequestError, match="ttl_seconds"):
            rest.set_checkpoint_ttl_from_tinker_path(keep, bad).result()
    with pytest.raises(TypeError, match=r"^ttl_seconds=1\.5: "):  # refused before it is sent
        rest.set_checkpoint_ttl_from_tinker_path(keep, 1.5)
    assert [c.expires_at for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [None]


def test_the_server_sweeps_expired_checkpoints_by_itself(tmp_path):
    background = BackgroundServer(server_config(checkpoint_dir=tmp_path,
                                               checkpoint_expiry_interval_s=0.2))
    try:
        with gradwire.ServiceClient(base_url=background.address, progress=False) as service:
            tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
            path = tc.save_weights_for_sampler("soon", ttl_seconds=1).result().path
            folder = checkpoints.checkpoint_directory(tmp_path, path)
            assert wait_until(lambda: not folder.exists())
            assert service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints == []
    finally:
        background.stop()


@pytest.mark.parametrize("ttl_seconds", [0, 10**12])
def test_bad_ttl_is_rejected_and_saves_nothing(server, service, ttl_seconds):
    """Below a second or beyond a century (whose expiry no timestamp can list): refused, nothing saved."""
    tc = trained_run(service, seed=4)
    before = run_state(server, tc.model_id)
    with pytest.raises(gradwire.BadRequestError, match="ttl_seconds"):
        tc.save_state("never", ttl_seconds=ttl_seconds).result()
    assert run_folders(server, tc.model_id) == []
    assert_state_equal(before, run_state(server, tc.model_id))
    assert service.create_rest_client().list_user_checkpoints().result() is not None


def test_an_expired_checkpoints_name_can_be_saved_again_before_the_sweep(server, service):
    """Once its TTL ran out a checkpoint is gone for every reader, so its name is free: a new
    save under it replaces the expired folder, and loads, lists and outlives the sweep."""
    tc = trained_run(service, seed=11)
    rest = service.create_rest_client()
    path = tc.save_state("daily", ttl_seconds=1).result().path
    time.sleep(1.1)
    tc.forward_backward(random_data(12), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    saved = run_state(server, tc.model_id)

    assert tc.save_state("daily").result().path == path

    assert path not in server.expire_checkpoints()
    [listed] = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert listed.path == path and listed.expires_at is None
    tc.forward_backward(random_data(13), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    tc.load_state(path).result()
    assert_state_equal({n: (w, None) for n, (w, _) in saved.items()},
                       {n: (w, None) for n, (w, _) in run_state(server, tc.model_id).items()})


def test_overwrite_replaces_a_checkpoint_and_only_when_asked(server, service):
    tc = trained_run(service, seed=5)
    path = tc.save_state("latest").result().path
    first = run_state(server, tc.model_id)
    tc.forward_backward(random_data(7), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    second = run_state(server, tc.model_id)
    with pytest.raises(gradwire.ConflictError, match="already exists"):
        tc.save_state("latest").result()
    assert tc.save_state("latest", overwrite=True).result().path == path
    # Only the checkpoint folder itself: no temporary or old copy is left behind.
    assert [p for p in run_folders(server, tc.model_id) if "/" not in p.removeprefix("weights/")] == \
        ["weights", "weights/latest"]
    tc.load_state(path).result()
    loaded = run_state(server, tc.model_id)
    for name, (weight, _) in second.items():
        assert torch.equal(loaded[name][0], weight)
        assert not torch.equal(first[name][0], weight)
    listed = service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
    assert [c.path for c in listed] == [path]


# ---- ephemeral sampler weights -------------------------------------------------------------------

def test_ephemeral_sampler_weights_match_a_saved_checkpoint_and_write_nothing(server, service):
    tc = trained_run(service, seed=6)
    prompt = gradwire.ModelInput.from_ints(PROMPT + [5, 9, 33])
    before = snapshots(server)
    sampler = tc.save_weights_and_get_sampling_client()
    assert sampler.result() is sampler and "/ephemeral/" in sampler.model_path
    assert run_folders(server, tc.model_id) == []
    assert snapshots(server) == before + 1
    ephemeral = sampler.compute_logprobs(prompt).result()
    saved = service.create_sampling_client(
        model_path=tc.save_weights_for_sampler("same").result().path).compute_logprobs(prompt).result()
    assert ephemeral == saved  # the same weights, the same numbers
    tc.forward_backward(random_data(8), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    assert sampler.compute_logprobs(prompt).result() == ephemeral  # a snapshot: later steps leave it
    path = sampler.model_path
    del sampler
    gc.collect()
    assert wait_until(lambda: snapshots(server) == before)
    with pytest.raises(gradwire.NotFoundError, match="released"):
        service.create_sampling_client(model_path=path).compute_logprobs(prompt).result()


def test_an_rl_loop_leaves_nothing_in_the_checkpoint_dir(server, service):
    """Each step samples from a fresh snapshot, trains with importance_sampling, and
    drops the previous sampler: no file is written, no snapshot piles up."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=7)
    before = snapshots(server)
    for step in range(6):
        sampler = tc.save_weights_and_get_sampling_client().result()
        response = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), 3,
                                  gradwire.SamplingParams(max_tokens=4, seed=step)).result()
        data = []
        for sequence in response.sequences:
            n = len(PROMPT) - 1
            data.append(gradwire.Datum(
                model_input=gradwire.ModelInput.from_ints(PROMPT + sequence.tokens[:-1]),
                loss_fn_inputs={"target_tokens": PROMPT[1:] + sequence.tokens,
                                "logprobs": [0.0] * n + sequence.logprobs,
                                "advantages": [0.0] * n + [float(sequence.tokens[0] % 3 - 1)] * 4}))
        tc.forward_backward(data, "importance_sampling")
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()
        assert snapshots(server) <= before + 2
    del sampler
    gc.collect()
    assert run_folders(server, tc.model_id) == []
    assert wait_until(lambda: snapshots(server) == before)


def test_snapshots_beyond_the_memory_budget_free_the_oldest(server, service, monkeypatch):
    adapters = server.server.sampling.adapters
    monkeypatch.setattr(adapters, "snapshot_budget_bytes", 1)  # room for one only
    tc = trained_run(service, seed=8)
    old = tc.save_weights_and_get_sampling_client()
    new = tc.save_weights_and_get_sampling_client()
    prompt = gradwire.ModelInput.from_ints(PROMPT)
    with pytest.raises(gradwire.NotFoundError, match="memory pressure"):
        old.compute_logprobs(prompt).result()
    assert new.compute_logprobs(prompt).result()[1] is not None


# ---- sampling fields -----------------------------------------------------------------------------

def test_sequence_ids_numpy_views_and_top_k_sample_logprobs(service):
    """Every sequence has its own id; tokens_np / logprobs_np mirror the lists; the top-k
    rows equal log_softmax of an in-process copy of the base model at each generated
    position, and hold the sampled token when it is among them (always, when greedy)."""
    sampler = service.create_sampling_client(base_model="tiny-random")
    prompt = gradwire.ModelInput.from_ints(PROMPT)
    first = sampler.sample(prompt, 3, gradwire.SamplingParams(max_tokens=6, seed=1), topk_sample_logprobs=4).result()
    second = sampler.sample(prompt, 2, gradwire.SamplingParams(max_tokens=6, temperature=0.0),
                            topk_sample_logprobs=4).result()
    ids = [s.sequence_id for s in first.sequences + second.sequences]
    assert all(ids) and len(set(ids)) == len(ids)
    model = models.tiny_random_model().eval()
    for sequence in first.sequences + second.sequences:
        assert sequence.tokens_np.dtype == np.int32 and sequence.tokens_np.tolist() == sequence.tokens
        np.testing.assert_array_equal(sequence.logprobs_np, np.float32(sequence.logprobs))
        assert len(sequence.topk_logprobs) == len(sequence.tokens)
        dense = sequence.topk_logprobs_np
        assert dense.token_ids.shape == (len(sequence.tokens), 4) and dense.token_ids.dtype == np.int32
        assert dense.logprobs.tolist() == [[np.float32(v).item() for _, v in row] for row in sequence.topk_logprobs]
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + sequence.tokens])).logits[0].float()
        expected = torch.topk(torch.log_softmax(logits[len(PROMPT) - 1:-1], dim=-1), 4, dim=-1)
        for row, token, logprob, ids_k, values_k in zip(sequence.topk_logprobs, sequence.tokens, sequence.logprobs,
                                                        expected.indices.tolist(), expected.values.tolist()):
            assert [t for t, _ in row] == ids_k
            np.testing.assert_allclose([v for _, v in row], values_k, atol=1e-4)
            if token in ids_k:
                assert dict(row)[token] == pytest.approx(logprob, abs=1e-5)
    for sequence in second.sequences:
        assert [row[0][0] for row in sequence.topk_logprobs] == sequence.tokens
    plain = sampler.sample(prompt, 1, gradwire.SamplingParams(max_tokens=3, seed=1)).result()
    assert plain.sequences[0].topk_logprobs is None


def test_prompt_logprobs_last_n(service):
    sampler = service.create_sampling_client(base_model="tiny-random")
    prompt = gradwire.ModelInput.from_ints(PROMPT)
    full = sampler.compute_logprobs(prompt).result()
    last = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert last == [None] * (len(PROMPT) - 3) + full[-3:]
    response = sampler.sample(prompt, 1, gradwire.SamplingParams(max_tokens=2, seed=0),
                              include_prompt_logprobs=True, topk_prompt_logprobs=2,
                              prompt_logprobs_last_n=2).result()
    assert response.prompt_logprobs == [None] * (len(PROMPT) - 2) + full[-2:]
    np.testing.assert_array_equal(response.prompt_logprobs_np,
                                  np.float32([np.nan] * (len(PROMPT) - 2) + full[-2:]))
    assert response.topk_prompt_logprobs[:-2] == [None] * (len(PROMPT) - 2)
    assert all(len(row) == 2 for row in response.topk_prompt_logprobs[-2:])
    dense = response.topk_prompt_logprobs_np
    assert dense.logprobs.shape == (len(PROMPT), 2) and (dense.logprobs[:-2] == -99999.0).all()
    with pytest.raises(gradwire.BadRequestError, match="prompt_logprobs_last_n"):
        sampler.compute_logprobs(prompt, prompt_logprobs_last_n=0).result()


# ---- model names ---------------------------------------------------------------------------------

def test_a_local_model_answers_to_its_hub_id(tmp_path):
    folder = tmp_path / "model"
    models.tiny_random_model().save_pretrained(folder)
    models.tiny_random_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "gradwire-tests/tiny-llama"}))
    background = BackgroundServer(server_config(model=str(folder), checkpoint_dir=tmp_path / "ckpt"))
    try:
        with gradwire.ServiceClient(base_url=background.address, progress=False) as service:
            names = [m.model_name for m in service.get_server_capabilities().supported_models]
            assert names == [str(folder), "gradwire-tests/tiny-llama"]
            tc = service.create_lora_training_client("gradwire-tests/tiny-llama", rank=2, seed=0)
            assert tc.get_tokenizer().decode([72, 105]) == "Hi"
            by_hub_id = service.create_sampling_client(base_model="gradwire-tests/tiny-llama")
            by_path = service.create_sampling_client(base_model=str(folder))
            prompt = gradwire.ModelInput.from_ints(PROMPT)
            assert by_hub_id.compute_logprobs(prompt).result() == by_path.compute_logprobs(prompt).result()
            with pytest.raises(gradwire.BadRequestError, match="gradwire-tests/tiny-llama"):
                service.create_lora_training_client("other/model", rank=2)
    finally:
        background.stop()


def test_hub_ids_of_the_named_models(tmp_path):
    assert models.hub_aliases("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct",)
    assert models.hub_aliases("tiny-random") == ()
    snapshot = tmp_path / "models--Org--Some-Model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert models.hub_aliases(str(snapshot)) == ("Org/Some-Model",)


# ---- provenance, hosted-only features, compatibility ------------------------------------------

def test_provenance_spans_must_tile_the_datum():
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2, 3, 4]),
                           loss_fn_inputs={"target_tokens": [2, 3, 4, 5]})
    spans = [gradwire.PromptProvenanceSpan(sequence_id="s-0", length=2),
             gradwire.SampledProvenanceSpan(sequence_id="s-0", length=2)]
    tagged = datum.with_provenance(model_input=spans, loss_fn_inputs=spans)
    assert tagged.provenance == {"model_input": spans, "loss_fn_inputs": spans} and datum.provenance is None
    with pytest.raises(ValueError, match="cover 2 positions"):
        datum.with_provenance(model_input=spans[:1])
    with pytest.raises(ValueError, match="length must be >= 1"):
        gradwire.SampledProvenanceSpan(sequence_id="s-0", length=0)


def test_hosted_only_features_raise_naming_the_feature(service):
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    rest = service.create_rest_client()
    cases = [
        (lambda: gradwire.ServiceClient(base_url=service.base_url, project_id="p-1"), "project_id"),
        (lambda: rest.publish_checkpoint_from_tinker_path("tinker://r/weights/a"), "publish_checkpoint"),
        (lambda: rest.get_checkpoint_archive_url("r", "weights/a"), "get_checkpoint_archive_url"),
        (lambda: tc.save_weights_and_get_sampling_client(record_stability_info=True), "record_stability_info"),
        (lambda: service.create_lora_training_client("tiny-random", optimizer=type("Dimuon", (), {"type": "dimuon"})()),
         "dimuon"),
        (lambda: tc.forward([gradwire.Datum(model_input=gradwire.ModelInput(
            [gradwire.ImageAssetPointerChunk(format="png", location="s3://x")]))], "cross_entropy").result(),
         "ImageAssetPointerChunk"),
    ]
    for call, feature in cases:
        with pytest.raises(gradwire.UnsupportedFeatureError, match=feature) as raised:
            call()
        assert isinstance(raised.value, NotImplementedError) and isinstance(raised.value, gradwire.TinkerError)


def test_service_client_options_and_old_forms(server):
    with pytest.warns(UserWarning, match="timeout"):
        client = gradwire.ServiceClient(base_url=server.address, timeout=5)
    client.close()
    with pytest.warns(DeprecationWarning, match="base_url"):
        client = gradwire.ServiceClient(server.address)
    assert client.base_url == server.address
    labelled = gradwire.ServiceClient(user_metadata={"team": "a"}, base_url=server.address, display_name="x")
    tc = labelled.create_lora_training_client("tiny-random", rank=2, user_metadata={"run": "b"})
    assert labelled.create_rest_client().get_training_run(tc.model_id).result().user_metadata == \
        {"team": "a", "run": "b"}
    with pytest.warns(DeprecationWarning, match="optim_params"):
        tc.optim_step(adam_params=gradwire.AdamParams()).result()
    client.close()
    labelled.close()


def test_tinker_paths_and_rest_futures(service):
    tc = trained_run(service, seed=9)
    path = tc.save_state("t").result().path
    tinker_path = path.replace("gradwire://", "tinker://")
    parsed = gradwire.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
    assert (parsed.training_run_id, parsed.checkpoint_type, parsed.checkpoint_id) == \
        (tc.model_id, "training", "weights/t")
    tc.load_state(tinker_path).result()
    rest = service.create_rest_client()
    assert rest.get_training_run_by_tinker_path(tinker_path).result().training_run_id == tc.model_id
    assert [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints] == [path]
    page = rest.list_user_checkpoints(limit=1).result()
    assert len(page.checkpoints) == 1 and page.cursor.total_count >= 1
    assert page.checkpoints[0].time >= max(c.time for c in rest.list_checkpoints(tc.model_id).result().checkpoints)
    with pytest.raises(ValueError, match="not a checkpoint path"):
        gradwire.ParsedCheckpointTinkerPath.from_tinker_path("tinker://only-two/parts")
