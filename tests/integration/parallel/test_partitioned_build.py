"""Under ZeRO-3 a model is built (from a preset) and loaded (from a pretrained directory, shard by shard) in
pieces: each of 2 ranks holds about half of what one rank holds, never the whole model (bench/model_memory.py's
worker builds it as training does and samples each rank's resident memory)."""

import pytest

from tests.helpers import bench_module

LAYERS = 20  # a Llama of 295 M parameters at the test tokenizer's 512 tokens (1.18 GB in fp32)


@pytest.mark.slow
def test_two_ranks_each_build_and_load_about_half_of_what_one_rank_does(tmp_path, data_dir):
    bench = bench_module("model_memory")
    pretrained = str(tmp_path / "pretrained")
    assert bench.save_pretrained(LAYERS, str(data_dir), pretrained) > 290e6
    launches = [(n, bench.overrides_for(LAYERS, str(data_dir), 3, str(tmp_path / f"run{n}"))) for n in (1, 2)]
    found = dict(zip((1, 2), bench.measure(launches, pretrained, str(tmp_path)), strict=True))
    assert found[1]["partitioned"] and found[2]["partitioned"]
    assert found[1]["preset"] > 1.1e9, found  # (one rank holds the whole model: the measurement sees it)
    for way in ("preset", "pretrained"):
        assert found[2][way] <= 0.6 * found[1][way], (way, found)  # whole per rank before: 1.0
    print({ranks: {k: round(v / 2**20) for k, v in f.items() if k != "partitioned"} for ranks, f in found.items()})
