"""What a worker makes its contributions with: the codec settings the coordinator publishes in
its run info (volunteer.worker.codec_options), checked before any training."""

from __future__ import annotations

import pytest

from crowdtrain.errors import CrowdtrainError
from crowdtrain.volunteer.worker import codec_options
from crowdtrain.wire.protocol import SwarmSchedule


def schedule(codec: str, block: int, **sparse) -> SwarmSchedule:
    return SwarmSchedule(inner_steps=5, round_seconds=60.0, rounds=2, min_contributions=1,
                         codec=codec, block=block, **sparse)


def test_a_sparse_run_s_k_and_bits_come_from_its_schedule():
    assert codec_options(schedule("int8", 256)) == {}
    assert codec_options(schedule("int4", 64)) == {}
    got = codec_options(schedule("sparse", 4096, sparse_k=123, sparse_bits=4))
    assert got == {"block": 4096, "k": 123, "bits": 4}


@pytest.mark.parametrize("sparse", [{}, {"sparse_k": 41}, {"sparse_k": 0, "sparse_bits": 2},
                                    {"sparse_k": 41, "sparse_bits": 3}])
def test_a_sparse_schedule_without_usable_k_and_bits_stops_the_worker(sparse):
    with pytest.raises(CrowdtrainError, match="sparse codec settings are not usable"):
        codec_options(schedule("sparse", 4096, **sparse))
