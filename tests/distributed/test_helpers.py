"""`moecompress.engine.distributed` in one process, and the data-parallel reduction with a fake peer.

No process group is created here: the helpers must be no-ops in a single process, and the
sharding and reduction of `collect_statistics(data_parallel=True)` are checked by playing
both ranks of a 2-process run in turn, with `all_reduce_` replaced by a recording (rank 1)
and a combining (rank 0) stand-in.
"""

from __future__ import annotations

import pytest
import torch

from moecompress.calibration.calibrate import collect_statistics
from moecompress.calibration.request import ObservedPass
from moecompress.engine import distributed
from moecompress.errors import MoecompressError
from moecompress.models.adapters import get_adapter
from tests.adapters.tiny_configs import TINY_CONFIGS
from tests.helpers import tiny_model, token_batch


def test_single_process_needs_nothing(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.initialise("cpu") == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.initialise("cpu") == (0, 1)
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_writer(), distributed.active()) == (0, 1, True,
                                                                                                            False)
    tensor = torch.arange(3.0)
    assert distributed.all_reduce_(tensor, "max") is tensor and tensor.tolist() == [0.0, 1.0, 2.0]
    assert distributed.reduce_(tensor, 0) is tensor and tensor.tolist() == [0.0, 1.0, 2.0]
    distributed.barrier()
    assert distributed.writer_only(lambda: 7, "a step") == 7
    assert distributed.shard(list("abc")) == list("abc")
    with pytest.raises(ValueError, match="unknown reduction"):
        distributed.all_reduce_(tensor, "mean")
    with pytest.raises(KeyError), distributed.phase("a step"):  # the error itself, unchanged
        raise KeyError("x")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_expert_owners_are_the_solvers_shares(monkeypatch, world) -> None:
    """The rank each expert's Hessians are reduced to is the rank whose share solves it."""
    from moecompress.quant.data_parallel import owners

    experts = [7, 2, 5, 0, 3]
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    owner = owners(experts)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        assert sorted(e for e, r in owner.items() if r == rank) == sorted(distributed.shard(sorted(experts)))


def test_bad_world_size_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MoecompressError, match="WORLD_SIZE='two'"):
        distributed.initialise("cpu")


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shard_is_round_robin_disjoint_and_complete(monkeypatch, world) -> None:
    items = list(range(11))
    shares = []
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    for rank in range(world):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shares.append(distributed.shard(items))
        assert shares[-1] == items[rank::world] == distributed.shard(items)  # deterministic
    assert sorted(x for share in shares for x in share) == items


def test_two_shards_reduce_to_the_whole(monkeypatch) -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=7, length=12, seed=3)
    domain_ids = torch.tensor([0, 1, 0, 1, 0, 0, 1])  # a: 4 rows, 2 batches; b: 3 rows, 2 batches
    domains = ["a", "b"]
    whole = collect_statistics(model, adapter, ids, domain_ids, domains, ObservedPass(batch_size=2), False)

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "agree", lambda error, what: None)
    sent: list[tuple[torch.Tensor, str]] = []
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_reduce_", lambda t, op="sum": sent.append((t.clone(), op)) or t)
    collect_statistics(model, adapter, ids, domain_ids, domains, ObservedPass(batch_size=2, data_parallel=True), False)
    assert {op for _, op in sent} == {"sum", "max"}

    received = iter(sent)

    def combine(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        other, other_op = next(received)
        assert other_op == op and other.shape == tensor.shape and other.dtype == tensor.dtype
        return tensor.copy_(tensor + other if op == "sum" else torch.maximum(tensor, other))

    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "all_reduce_", combine)
    reduced = collect_statistics(model, adapter, ids, domain_ids, domains,
                                 ObservedPass(batch_size=2, data_parallel=True), False)
    assert next(received, None) is None  # both ranks made the same reductions, in the same order
    assert reduced.token_counts() == whole.token_counts()
    expected, got = whole.tensors(), reduced.tensors()
    assert sorted(expected) == sorted(got)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-12, atol=0, msg=name)


def test_a_rank_without_batches_contributes_zeros(monkeypatch) -> None:
    model = tiny_model(TINY_CONFIGS["qwen3_moe"](), seed=0)
    adapter = get_adapter(model)
    ids = token_batch(model.config.vocab_size, batch=4, length=8, seed=3)
    calls: list[str] = []
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 2)  # 2 batches for 3 ranks: rank 2 has none
    monkeypatch.setattr(distributed, "agree", lambda error, what: None)
    monkeypatch.setattr(distributed, "all_reduce_", lambda t, op="sum": calls.append(op) or t)
    observer = collect_statistics(model, adapter, ids, torch.zeros(4, dtype=torch.long), ["all"],
                                  ObservedPass(batch_size=2, data_parallel=True), False)
    assert all(not tensor.any() for tensor in observer.tensors().values())
    assert all(tokens == {"all": 0} for tokens in observer.token_counts().values())
    layers = len(observer.observers)
    assert calls == ["sum", "max"] * layers + ["sum"]  # it still takes part in every reduction
