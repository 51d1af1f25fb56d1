"""Communication report (bytes sent per collective, from compiled HLO) and the cost model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnjax import parallel
from attnjax.parallel import comm
from experiments import comm_model
from tests.helpers import random_qkv

HLO = """HloModule jit_f, is_scheduled=true, num_partitions=8

%body (p: (s32[], f32[4,16])) -> (s32[], f32[4,16]) {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  %x = f32[4,16]{1,0} get-tuple-element(%p), index=1
  %cp = f32[4,16]{1,0} collective-permute(%x), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,16]{1,0}) tuple(%i, %cp)
}

%cond (p: (s32[], f32[4,16])) -> pred[] {
  %p = (s32[], f32[4,16]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: bf16[2,8]) -> f32[4,16] {
  %x = bf16[2,8]{1,0} parameter(0)
  %ag = bf16[8,8]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ags = (bf16[2,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%x), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}
  %agd = bf16[16,8]{1,0} all-gather-done(%ags)
  %f = f32[4,16]{1,0} convert(%ag)
  %ar = f32[4,16]{1,0} all-reduce(%f), channel_id=4, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  %rs = f32[1,16]{1,0} reduce-scatter(%ar), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %a2a = f32[4,16]{1,0} all-to-all(%ar), channel_id=6, replica_groups=[2,4]<=[8], dimensions={0}
  %init = (s32[], f32[4,16]{1,0}) tuple(%c0, %a2a)
  %w = (s32[], f32[4,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[4,16]{1,0} get-tuple-element(%w), index=1
}
"""


def test_bytes_sent_per_collective_kind_from_hlo_text():
    found = {c.name: c for c in comm.collectives(HLO)}
    assert set(found) == {"ag", "agd", "ar", "rs", "a2a", "cp"}       # the async pair counts once
    assert (found["ag"].group_size, found["ag"].operand_bytes, found["ag"].sent_bytes) == (4, 32, 3 * 32)
    assert (found["agd"].group_size, found["agd"].sent_bytes) == (8, 7 * 32)
    assert (found["ar"].group_size, found["ar"].sent_bytes) == (2, 2 * 1 * 256 // 2)
    assert (found["rs"].operand_bytes, found["rs"].sent_bytes) == (256, 3 * 64)
    assert found["a2a"].sent_bytes == 3 * 256 // 4
    assert (found["cp"].sent_bytes, found["cp"].executions) == (256, 3)   # in a loop of 3 trips
    assert comm.collective_bytes(HLO) == {"all-gather": 96 + 224, "reduce-scatter": 192, "all-reduce": 256,
                                          "all-to-all": 192, "collective-permute": 768}
    assert comm.collective_counts(HLO)["collective-permute"] == 3


def test_loop_without_known_trip_count_is_an_error():
    with pytest.raises(ValueError, match="known trip count"):
        comm.collectives(HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))
    with pytest.raises(TypeError, match="Compiled or Lowered"):
        comm.collectives(3)


def test_compiled_collectives_of_every_kind():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "seq"))

    def body(x):                                                   # x: [4, 8] float32 per device, 128 B
        x = lax.all_to_all(x, "seq", 0, 0, tiled=True)
        x = lax.psum(x, "data")
        g = lax.all_gather(x, "seq", axis=0, tiled=True)          # [16, 8]
        s = lax.psum_scatter(g, "seq", scatter_dimension=0, tiled=True)
        return lax.fori_loop(0, 3, lambda i, y: lax.ppermute(y, "seq", [(j, (j + 1) % 4) for j in range(4)]), s)

    f = parallel.shard_map(body, mesh=mesh, in_specs=P("data", "seq"), out_specs=P("data", "seq"))
    sent = comm.collective_bytes(jax.jit(f).lower(jnp.ones((8, 32), jnp.float32)))
    assert sent == {"all-to-all": 3 * 128 // 4, "all-reduce": 2 * 1 * 128 // 2, "all-gather": 3 * 128,
                    "reduce-scatter": 3 * 128, "collective-permute": 3 * 128}


def measured_and_modeled(scheme, mesh, **kw):
    """Bytes sent per device for forward + backward: from the compiled HLO and from ``comm.traffic``."""
    B, T, Hq, Hkv, D = 1, 32, 4, 4, 8
    q, k, v = random_qkv(jax.random.PRNGKey(0), B=B, T=T, Hq=Hq, Hkv=Hkv, D=D)
    if scheme == "lasp2":
        fn = lambda q, k, v: parallel.lasp2_sharded(q, k, v, mesh=mesh, seq_axis="seq", **kw)  # noqa: E731
    else:
        fn = lambda q, k, v: parallel.SHARDED[scheme](q, k, v, mesh=mesh, seq_axis="seq", **kw)  # noqa: E731
    # The loss value keeps the whole forward alive; w is a cotangent that XLA can't constant-fold.
    step = jax.jit(jax.value_and_grad(lambda q, k, v, w: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))
    sent = comm.collective_bytes(step.lower(q, k, v, q))
    assert sent.pop("all-reduce") == 2 * 3 * 4 // 4                  # the loss: a psum of one float32
    measured = sum(sent.values())
    t = comm.traffic(scheme, comm.Workload(B, T, Hq, Hkv, D, dtype_bytes=4), mesh.shape["seq"],
                     "linear" if scheme == "lasp2" else "softmax")
    return measured, t.bytes_fwd + t.bytes_bwd


def test_cost_model_bytes_equal_compiled_bytes_allgather():
    """(LASP-2's bytes are checked in tests/parallel/test_lasp2.py.)"""
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    measured, modeled = measured_and_modeled("allgather", mesh, implementation="reference")
    assert measured == modeled > 0


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["ring", "ulysses", "lasp2"])
def test_cost_model_bytes_equal_compiled_bytes(scheme):
    mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
    measured, modeled = measured_and_modeled(scheme, mesh)
    assert measured == modeled > 0


def test_cost_model_scaling_and_feasibility():
    w = comm.Workload(batch=1, seq_len=2048 * 1024, heads=32, kv_heads=8, head_dim=64)
    doubled = comm.Workload(batch=1, seq_len=4096 * 1024, heads=32, kv_heads=8, head_dim=64)
    lasp2 = comm.traffic("lasp2", w, 64, "linear")
    assert lasp2.bytes_fwd == comm.traffic("lasp2", doubled, 64, "linear").bytes_fwd == 63 * 8 * 64 * 64 * 4
    ring = comm.traffic("ring", w, 64, "linear")
    assert comm.traffic("ring", doubled, 64, "linear").bytes_fwd == 2 * ring.bytes_fwd
    assert comm.feasible("ulysses", w, 8, "softmax") is None
    assert "Ulysses" in comm.feasible("ulysses", w, 64, "softmax")
    assert "linear" in comm.feasible("lasp2", w, 64, "softmax")
    with pytest.raises(ValueError, match="can't run"):
        comm.traffic("ulysses", w, 64)
    hw = comm.Hardware("test", flops=1e14, intra_node_bandwidth=3e11, inter_node_bandwidth=2.5e10)
    times = {s: comm.step_time(s, w, 64, hw, attention="linear", layers=16)["step"] for s in ("ring", "allgather",
                                                                                               "lasp2")}
    assert times["lasp2"] < times["allgather"] < times["ring"]
    slow_links = dataclasses.replace(hw, inter_node_bandwidth=hw.inter_node_bandwidth / 10)

    def slowdown(scheme):
        kw = dict(attention="linear", layers=16, other_flops_per_token=6 * 60e6)
        return comm.step_time(scheme, w, 64, slow_links, **kw)["step"] / comm.step_time(scheme, w, 64, hw, **kw)["step"]

    assert slowdown("ring") > 5 and slowdown("lasp2") < 1.2      # K/V traffic vs T-independent states


def test_comm_model_experiment_writes_tables_and_plot(tmp_path):

    comm_model.main(["--no-measure", "--devices", "8,64", "--tokens-per-device", "4096", "--out", str(tmp_path),
                     "--name", "tiny"])
    results = json.loads((tmp_path / "tiny.json").read_text())
    paper = {(r["scheme"], r["attention"]): r for r in results["paper"]["a100"]}
    assert paper[("lasp2", "linear")]["step"] < paper[("ring", "linear")]["step"]
    assert not paper[("ulysses", "linear")]["feasible"]                  # 64 devices, 8 KV heads
    assert len(results["projections"]) == 2 * 2 * 2 * 7                   # hardware x devices x scaling x runs
    assert "break-even" in (tmp_path / "tiny.md").read_text().lower()
    cell = next(r for r in results["ranking"]["a100"] if (r["seq_len"], r["world"], r["attention"]) ==
                (2048 * 1024, 64, "linear"))
    assert cell["order"][0][0] == "lasp2" and cell["infeasible"] == ["ulysses"]
    assert [t for _, t in cell["order"]] == sorted(t for _, t in cell["order"])
    assert (tmp_path / "tiny.png").stat().st_size > 0
