"""The Ray actor wrappers on a real (local, private) Ray instance: they run in their own worker
processes, report where they run, and a greedy round through them equals the in-process one."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from engine_helpers import prepared
from testbed.engine.draft import DraftWorker
from testbed.engine.native import Model
from testbed.engine.verify import Verifier
from testbed.prompts import render_prompt

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"     # never phone home

import ray  # noqa: E402  (required: an import error fails the module, never skips it)


@pytest.fixture(scope="module")
def local_ray():
    # address="local": always a new private instance, never someone else's running cluster;
    # its own temp dir, so the machine's "current cluster" file is left alone.
    tmp = tempfile.mkdtemp(prefix="tbray-", dir="/tmp")
    # A lab test earlier in this process may have left its token settings in the environment.
    from testbed.cluster import clear_driver_env
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH",
                                            "RAY_AUTH_TOKEN")}
    clear_driver_env()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tmp,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_actors_report_where_and_match_in_process(local_ray):
    from testbed.engine.actors import DraftActor, VerifierActor

    paths = prepared()
    target, draft = paths["smollm2-135m-q4_1"], paths["smollm2-135m-q4_0"]
    with Model.open(target, vocab_only=True) as m:
        prompt = m.tokenize(render_prompt("Name three colours."))
    d_actor = DraftActor.options(num_cpus=1).remote(draft, n_ctx=256)
    v_actor = VerifierActor.options(num_cpus=1).remote(target, n_seq_max=2, n_ctx=256, threads=1)
    d_where, v_where = ray.get([d_actor.where.remote(), v_actor.where.remote()], timeout=120)
    assert d_where["pid"] != os.getpid() and v_where["pid"] != os.getpid()
    assert d_where["pid"] != v_where["pid"]
    assert d_where["ip"] == ray.util.get_node_ip_address()

    local_d = DraftWorker(draft, n_ctx=256)
    local_v = Verifier(target, n_seq_max=2, n_ctx=256, threads=1)
    try:
        ray.get([d_actor.start.remote(prompt), v_actor.add_sequence.remote(1, prompt)], timeout=60)
        local_d.start(prompt)
        local_v.add_sequence(1, prompt)
        for _ in range(3):
            data, draft_s = ray.get(d_actor.draft_payload.remote(4), timeout=60)   # bytes only
            step = ray.get(v_actor.verify.remote({1: data}), timeout=60)
            res = step.results[1]
            ray.get(d_actor.accept.remote(res.n_accepted, res.next_token), timeout=60)
            local = local_d.draft(4)
            assert local.payload == data and draft_s > 0
            local_res = local_v.verify({1: local.payload}).results[1]
            local_d.accept(local_res.n_accepted, local_res.next_token)
            assert local_res == res and step.n_decodes == 1
        assert ray.get(v_actor.tokens.remote(1)) == local_v.tokens(1)
    finally:
        local_d.close()
        local_v.close()
        for a in (d_actor, v_actor):
            ray.kill(a)
