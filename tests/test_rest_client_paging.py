"""RestClient listings longer than one page of the server's: the SDK follows the page
tokens to the end (RestClient._every_page)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

import gradwire
from conftest import server_config
from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire_server.paging import DEFAULT_PAGE_SIZE
from gradwire_server.server import BackgroundServer


def test_list_training_runs_reads_every_page(tmp_path):
    # No server setting lowers the page size (paging.DEFAULT_PAGE_SIZE), so the listing is made
    # long with real runs, cheap ones (rank 1 on tiny-random), on a server of their own.
    background = BackgroundServer(server_config(checkpoint_dir=tmp_path))
    service = gradwire.ServiceClient(base_url=background.address)
    try:
        created = [service.create_lora_training_client("tiny-random", rank=1).model_id
                   for _ in range(DEFAULT_PAGE_SIZE + 1)]
        with grpc.insecure_channel(background.address) as channel:
            first_page = rpb_grpc.ResourceServiceStub(channel).ListTrainingRuns(rpb.ListTrainingRunsRequest())
        assert len(first_page.training_runs) == DEFAULT_PAGE_SIZE and first_page.next_page_token

        listed = service.create_rest_client().list_training_runs(limit=len(created)).result()
        assert [run.training_run_id for run in listed.training_runs] == created
        assert listed.cursor == gradwire.Cursor(offset=0, limit=len(created), total_count=len(created))
    finally:
        service.close()
        background.stop()


@pytest.mark.parametrize("window, error", [({"limit": -1}, ValueError), ({"offset": -1}, ValueError),
                                           ({"limit": 2.5}, TypeError), ({"offset": True}, TypeError)])
def test_a_negative_or_fractional_window_is_refused_naming_it(service, window, error):
    """limit=-1 would cut the last item off a Python slice, offset=-1 would give an empty page;
    numpy integers are ints."""
    rest = service.create_rest_client()
    [name] = window
    for listing in (rest.list_user_checkpoints, rest.list_training_runs):
        with pytest.raises(error, match=f"{name} must be an int >= 0"):
            listing(**window)
    assert rest.list_user_checkpoints(limit=np.int64(1), offset=np.int64(0)).result().cursor.limit == 1
