"""The start-up heap kept out of full garbage collections while an engine or a server runs
(lmforge/utils/gc_heap.py): what existed at entry is not collected inside the block, what is made inside is,
and leaving the block (a server's shutdown included) hands everything back to the collector."""
from __future__ import annotations

import gc
import weakref

from lmforge.utils.gc_heap import frozen_heap


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_heap_skips_the_start_up_objects_only():
    before = Node()
    before_ref = weakref.ref(before)
    with frozen_heap() as count:
        assert count > 1000 and gc.get_freeze_count() > 1000
        del before
        gc.collect()
        assert before_ref() is not None  # frozen at entry: full collections do not walk it
        inside = Node()
        inside_ref = weakref.ref(inside)
        del inside
        gc.collect()
        assert inside_ref() is None  # made inside: collected as ever
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert before_ref() is None  # handed back on the way out


def test_frozen_heap_thaws_on_error():
    try:
        with frozen_heap():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0


def test_server_freezes_its_heap_while_it_serves():
    from fastapi.testclient import TestClient

    from lmforge.arguments import DeployArguments
    from lmforge.serve import create_app
    from tests.test_serve_support import EchoEngine

    with TestClient(create_app(EchoEngine(), DeployArguments(served_model_name="echo"))) as client:
        assert gc.get_freeze_count() > 1000
        assert client.get("/v1/models").status_code == 200
    assert gc.get_freeze_count() == 0
