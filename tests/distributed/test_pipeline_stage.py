"""Layer partitioning, the pipeline's rules in the rule book, and message shapes (no processes needed)."""
from __future__ import annotations

import pytest

from megalm.config import ConfigError, load_config
from megalm.config.rules import validate
from megalm.parallel.pipeline import activation_shape, partition_layers
from megalm.parallel.topology import Topology
from tests.conftest import validate_pipeline


def test_even_partition_and_megatron_interleaving():
    assert partition_layers(8, 2) == [[range(0, 4)], [range(4, 8)]]
    # chunk c of rank p is slice c*pp + p
    assert partition_layers(8, 2, 2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    parts = partition_layers(24, 4, 3)
    assert parts[1] == [range(2, 4), range(10, 12), range(18, 20)]
    flat = sorted(j for rank in parts for chunk in rank for j in chunk)
    assert flat == list(range(24))


def test_explicit_partition_in_pipeline_order():
    assert partition_layers(10, 2, explicit=[3, 7]) == [[range(0, 3)], [range(3, 10)]]
    assert partition_layers(8, 2, 2, explicit=[1, 3, 0, 4]) == [[range(0, 1), range(4, 4)],
                                                                [range(1, 4), range(4, 8)]]


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_layers=10, pp=4, virtual_stages=1, num_microbatches=4), ["num_layers=10", "pipeline_layers"]),
    (dict(num_layers=6, pp=2, virtual_stages=2, num_microbatches=4), ["num_layers=6", "2 x 2 = 4"]),
    (dict(num_layers=8, pp=2, virtual_stages=2, num_microbatches=3), ["num_microbatches=3", "e.g. 4"]),
    (dict(num_layers=8, pp=4, virtual_stages=2, num_microbatches=2), ["num_microbatches=2", "multiple of 4"]),
    (dict(num_layers=8, pp=2, virtual_stages=1, num_microbatches=4, explicit=[8]), ["must list 2 counts"]),
    (dict(num_layers=8, pp=2, virtual_stages=1, num_microbatches=4, explicit=[3, 4]),
     ["sum to 7", "num_layers=8"]),
    (dict(num_layers=8, pp=2, virtual_stages=1, num_microbatches=4, explicit=[9, -1]), ["non-negative"]),
    (dict(num_layers=8, pp=2, virtual_stages=1, num_microbatches=0), ["num_microbatches=0"]),
    (dict(num_layers=8, pp=2, virtual_stages=2, num_microbatches=4, schedule="1f1b"), ["virtual_stages=1"]),
    (dict(num_layers=8, pp=2, virtual_stages=1, num_microbatches=4, schedule="zb"), ["gpipe"]),
    (dict(num_layers=8, pp=0, virtual_stages=1, num_microbatches=4), ["parallel.pp=0"]),
])
def test_invalid_layouts_name_the_numbers(kwargs, words):
    with pytest.raises(ValueError) as err:
        validate_pipeline(**kwargs)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_valid_layouts_pass():
    validate_pipeline(8, 2, 2, 4)
    validate_pipeline(8, 4, 2, 8)
    validate_pipeline(8, 4, 1, 1)                       # 1F1B with fewer micro-batches than stages
    validate_pipeline(8, 2, 1, 3, schedule="gpipe")
    validate_pipeline(7, 2, 1, 3, explicit=[3, 4])
    validate_pipeline(8, 1, 2, 3)                       # pp = 1: any m interleaves (loopback)


def test_sequence_parallel_sends_the_shard():
    topo = Topology(tp=2, pp=2, sequence_parallel=True)
    assert activation_shape(4, 16, 32, topo) == (4, 8, 32)
    assert activation_shape(4, 16, 32, Topology(tp=2, pp=2)) == (4, 16, 32)
    with pytest.raises(ConfigError, match="seq_len=15"):       # refused by the rule book before any message
        validate(load_config(None, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                                    "data.seq_len=15", "model.max_seq_len=16", "model.num_layers=4"]), 4)
