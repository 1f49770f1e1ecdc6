"""Weighted mixtures of data sources: the spec, the sampler's draws, loading, and layout invariance."""
from __future__ import annotations

import json

import numpy as np
import pytest

from plait.data import BatchSampler, DataError, TokenData, load_token_data
from plait.data.mixture import DataSource, TokenChain, parse_data_spec
from plait.mesh import ParallelContext, ParallelDims
from plait.train.config import TrainConfig, TrainConfigError, load_toml
from helpers import VOCAB, assert_runs_match, synthetic_data, tiny_config, tiny_model_config, train_and_collect


def ranged_stream(low: int, count: int) -> np.ndarray:
    """Ids low, low+1, ... (mod 100, then + low): a window says which stream it came from."""
    return (low + np.arange(count) % 100).astype(np.uint16)


# ------------------------------------------------------------------ the spec


def test_spec_names_sources_and_weights(tmp_path):
    assert parse_data_spec("stdlib") == [DataSource("stdlib", 1.0)]
    assert parse_data_spec("a.bin:0.7, b.jsonl:0.3") == [DataSource("a.bin", 0.7), DataSource("b.jsonl", 0.3)]
    assert parse_data_spec("stdlib:2,x/y.parquet:1") == [DataSource("stdlib", 2.0), DataSource("x/y.parquet", 1.0)]
    odd = tmp_path / "a,b:c.txt"  # an existing path is one source, whatever it holds
    odd.write_text("text")
    assert parse_data_spec(str(odd)) == [DataSource(str(odd), 1.0)]


@pytest.mark.parametrize("spec, message", [
    ("a.bin:0.7,b.jsonl", "'b.jsonl' has no weight"),
    ("a.bin:x,b.bin:1", "the weight of 'a.bin' is 'x', not a number"),
    ("a.bin:0,b.bin:1", "must be a positive number, got 0"),
    ("a.bin:-1,b.bin:1", "must be a positive number, got -1"),
    ("a.bin:nan,b.bin:1", "must be a positive number, got nan"),
    ("a.bin:1,a.bin:2", "names a source twice"),
    (":1,b.bin:1", "has no weight"),
])
def test_bad_specs_are_one_line_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_data_spec(spec)
    with pytest.raises(TrainConfigError) as caught:  # refused before any process starts
        TrainConfig(data=spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_toml_table_is_a_mixture(tmp_path):
    (tmp_path / "c.toml").write_text('[train.data]\n"a.bin" = 0.7\n"b.jsonl" = 3\n')
    cfg = TrainConfig(**load_toml(tmp_path / "c.toml"))
    assert parse_data_spec(cfg.data) == [DataSource("a.bin", 0.7), DataSource("b.jsonl", 3.0)]
    (tmp_path / "c.toml").write_text('[train.data]\n"a.bin" = "lots"\n')
    with pytest.raises(TrainConfigError, match="its weight 'lots' is not a number"):
        load_toml(tmp_path / "c.toml")


# ------------------------------------------------------------------ the sampler


def test_mixture_draws_follow_the_weights_and_each_row_reads_its_stream():
    streams = [ranged_stream(0, 5000), ranged_stream(1000, 3000), ranged_stream(2000, 800)]
    sampler = BatchSampler(streams, seq_len=16, global_batch=64, seed=5, weights=[5, 3, 2])
    for step in range(30):
        chosen, offsets = sampler.rows(step)
        inputs, targets = sampler.global_batch(step)
        for row in range(64):
            start = streams[chosen[row]][offsets[row]]
            assert inputs[row, 0] == start and 1000 * chosen[row] <= int(inputs[row].min())
            assert int(inputs[row].max()) < 1000 * chosen[row] + 100
            assert offsets[row] + 17 <= len(streams[chosen[row]])  # the window fits its stream
            assert targets[row, -1] == streams[chosen[row]][offsets[row] + 16]
    counts = sum(np.bincount(sampler.rows(step)[0], minlength=3) for step in range(2000))
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.005)  # 128,000 draws: sd 0.0013


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_mixture_shards_concatenate_to_the_global_batch(dp_size):
    streams = [ranged_stream(0, 4000), ranged_stream(1000, 900)]
    sampler = BatchSampler(streams, seq_len=8, global_batch=16, seed=3, weights=[0.7, 0.3])
    again = BatchSampler([s.copy() for s in streams], seq_len=8, global_batch=16, seed=3, weights=[0.7, 0.3])
    for step in (0, 7, 1234):
        inputs, targets = sampler.global_batch(step)
        shards = [sampler.shard(step, rank, dp_size) for rank in range(dp_size)]
        assert np.array_equal(np.concatenate([x for x, _ in shards]), inputs)
        assert np.array_equal(np.concatenate([y for _, y in shards]), targets)
        assert np.array_equal(again.global_batch(step)[0], inputs)  # a pure function of (seed, step)
    other = BatchSampler(streams, seq_len=8, global_batch=16, seed=4, weights=[0.7, 0.3])
    assert not np.array_equal(other.global_batch(0)[0], sampler.global_batch(0)[0])


def test_one_stream_draws_as_before():
    """A lone source keeps the draws of earlier versions: resumed runs see the same batches."""
    tokens = np.arange(3000, dtype=np.uint16)
    sampler = BatchSampler(tokens, seq_len=16, global_batch=8, seed=11)
    expected = np.random.default_rng([11, 9]).integers(0, 3000 - 17, size=8, endpoint=True)
    assert np.array_equal(sampler.global_batch(9)[0][:, 0].numpy(), expected)


def test_a_source_too_short_for_a_window_is_named():
    with pytest.raises(DataError, match="source 2 of the mixture has 10 training tokens"):
        BatchSampler([ranged_stream(0, 100), ranged_stream(0, 10)], seq_len=16, global_batch=4, seed=0,
                     weights=[1, 1])


def test_token_chain_reads_across_parts():
    parts = [np.arange(5, dtype=np.uint16), np.arange(10, 13, dtype=np.uint16), np.arange(20, 24, dtype=np.uint16)]
    chain = TokenChain(parts)
    whole = np.concatenate(parts)
    assert len(chain) == 12
    for start in range(13):
        for stop in range(start, 14):
            assert np.array_equal(chain[start:stop], whole[start:stop])
    assert np.array_equal(np.asarray(chain), whole)


# ------------------------------------------------------------------ loading


def test_load_a_mixture_of_token_files_and_text(tmp_path):
    first, second = ranged_stream(0, 2000), ranged_stream(300, 1000)
    first.tofile(tmp_path / "a.bin")
    second.tofile(tmp_path / "b.bin")
    data = load_token_data(f"{tmp_path / 'a.bin'}:3,{tmp_path / 'b.bin'}:1", val_fraction=0.1)
    assert data.weights == (3.0, 1.0) and data.vocab_size == 400 and data.tokenizer is None
    assert np.array_equal(data.train[0], first[:1800]) and np.array_equal(data.train[1], second[:900])
    assert np.array_equal(data.val[:], np.concatenate([first[1800:], second[900:]]))
    assert data.train_tokens == 2700

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": f"document {i} " * 20}) + "\n" for i in range(20)))
    (tmp_path / "d.txt").write_text("plain text " * 300)
    spec = f"{tmp_path / 'c.jsonl'}:1,{tmp_path / 'd.txt'}:1"
    byte = load_token_data(spec, "byte", cache_dir=tmp_path / "cache", field="body")
    assert byte.eos_id == 256 and len(byte.train) == 2
    text = bytes(int(i) for i in byte.train[1][:11]).decode()
    assert text == "plain text "
    with pytest.raises(DataError, match="no field 'text'"):
        load_token_data(spec, "byte", cache_dir=tmp_path / "cache")
    bpe = load_token_data(spec, "bpe", vocab_size=300, cache_dir=tmp_path / "cache", field="body")
    assert bpe.tokenizer.decode(bpe.train[1][:40].tolist()).startswith("plain text plain")
    assert bpe.tokenizer.decode(bpe.train[0][:40].tolist()).startswith("document 0 document")

    with pytest.raises(DataError, match="mixes .bin token files with text"):
        load_token_data(f"{tmp_path / 'a.bin'}:1,{tmp_path / 'd.txt'}:1", "bpe", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------ training on a mixture


def mixture_data() -> TokenData:
    first, second = synthetic_data(12_000, seed=0), synthetic_data(6_000, seed=1)
    return TokenData(train=(first.train[0], second.train[0]), val=TokenChain([first.val, second.val]),
                     vocab_size=VOCAB, eos_id=None, tokenizer=None, weights=(0.6, 0.4))


@pytest.mark.parametrize("dims", [ParallelDims(dp=2), ParallelDims(dp=2, tp=2)])
def test_training_on_a_mixture_is_layout_invariant(pool, dims):
    cfg = tiny_config(steps=6, eval_every=6, eval_batches=2)
    data, model_config = mixture_data(), tiny_model_config()
    reference = train_and_collect(ParallelContext.single(), cfg, data, model_config)
    results = pool.run(train_and_collect, dims, cfg, data, model_config)
    assert_runs_match(results, reference)
