"""Tests for plait.data: corpora, tokenizers, token caches and the sampler.

Everything runs on tiny corpora built in tmp_path; the stdlib corpus is only
listed and sampled, never read in full.
"""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import pytest
import torch

from plait.data import (
    BatchSampler,
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Tokenizer,
    build_tokenizer,
    default_cache_dir,
    load_token_data,
    open_text_corpus,
    stdlib_root,
)

# --------------------------------------------------------------------- helpers


def write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def generated_documents(count: int, seed: int = 0) -> list[str]:
    """Small but varied Python-ish documents so BPE has something to merge."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "range", "print"]
    words += ["naïve", "größe"]  # multi-byte characters must survive merges
    documents = []
    for index in range(count):
        lines = []
        for _ in range(rng.randint(3, 8)):
            indent = "    " * rng.randint(0, 2)
            lines.append(indent + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))))
        documents.append(f"# document {index}\n" + "\n".join(lines) + "\n")
    return documents


def make_text_dir(root: pathlib.Path, documents: list[str]) -> pathlib.Path:
    for index, document in enumerate(documents):
        write_text(root / f"doc{index:03d}.txt", document)
    return root


# ---------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_lists_real_files_without_site_packages():
    corpus = open_text_corpus("stdlib")
    assert corpus.name == "stdlib"
    assert len(corpus.files) > 100
    root = stdlib_root()
    for path in corpus.files:
        relative_parts = path.relative_to(root).parts
        assert "site-packages" not in relative_parts
        assert "dist-packages" not in relative_parts
        assert path.suffix == ".py"
        assert path.stat().st_size > 0
    relative = [path.relative_to(root).as_posix() for path in corpus.files]
    assert relative == sorted(relative)
    assert any(name == "os.py" for name in relative)


def test_stdlib_corpus_is_deterministic_and_readable():
    first = open_text_corpus("stdlib")
    second = open_text_corpus("stdlib")
    assert first.files == second.files
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) >= 8
    int(first.fingerprint(), 16)  # hex
    # Read only a couple of documents: a lazy iterator, not the whole 30 MB.
    documents = first.documents()
    for _ in range(2):
        assert len(next(documents)) > 0


def test_stdlib_style_corpus_skips_undecodable_files(tmp_path):
    # The stdlib mode's skipping logic, exercised on a tiny fake tree.
    from plait.data.corpus import TextCorpus

    good = write_text(tmp_path / "good.py", "x = 1\n")
    bad = tmp_path / "bad.py"
    bad.write_bytes(b"s = 'b\xf6se'\n")
    corpus = TextCorpus("fake-stdlib", tmp_path, [bad, good], skip_undecodable=True)
    assert list(corpus.documents()) == [good.read_text()]
    assert corpus.skipped == 1


# ------------------------------------------------------------ user text corpora


def test_single_text_file(tmp_path):
    path = write_text(tmp_path / "notes.txt", "héllo wörld\n")
    corpus = open_text_corpus(str(path))
    assert corpus.files == [path]
    assert list(corpus.documents()) == ["héllo wörld\n"]


def test_directory_is_recursive_sorted_and_skips_hidden(tmp_path):
    write_text(tmp_path / "b.txt", "bee")
    write_text(tmp_path / "a" / "z.txt", "zed")
    write_text(tmp_path / "a" / "c.txt", "see")
    write_text(tmp_path / ".hidden.txt", "secret")
    write_text(tmp_path / ".git" / "config", "secret")
    write_text(tmp_path / "a" / ".cache" / "x.txt", "secret")
    write_text(tmp_path / "empty.txt", "")
    corpus = open_text_corpus(str(tmp_path))
    relative = [path.relative_to(tmp_path).as_posix() for path in corpus.files]
    assert relative == ["a/c.txt", "a/z.txt", "b.txt"]
    assert list(corpus.documents()) == ["see", "zed", "bee"]


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = write_text(tmp_path / "a.txt", "one")
    before = open_text_corpus(str(tmp_path)).fingerprint()
    assert open_text_corpus(str(tmp_path)).fingerprint() == before
    path.write_text("one more")
    assert open_text_corpus(str(tmp_path)).fingerprint() != before


def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as error:
        open_text_corpus(str(missing))
    assert str(missing) in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("layout", ["empty_dir", "only_hidden", "empty_file"])
def test_empty_corpus_is_a_clear_error(tmp_path, layout):
    if layout == "empty_dir":
        spec = tmp_path
    elif layout == "only_hidden":
        write_text(tmp_path / ".hidden", "text")
        spec = tmp_path
    else:
        spec = write_text(tmp_path / "empty.txt", "")
    with pytest.raises(DataError, match="is empty"):
        open_text_corpus(str(spec))


def test_undecodable_user_file_names_file_and_offset(tmp_path):
    write_text(tmp_path / "a.txt", "fine")
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"ok text \xff more")
    corpus = open_text_corpus(str(tmp_path))
    with pytest.raises(DataError) as error:
        list(corpus.documents())
    message = str(error.value)
    assert str(bad) in message
    assert "0xff" in message
    assert "offset 8" in message
    assert "\n" not in message


# ------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    assert isinstance(tokenizer, Tokenizer)
    text = "plain ascii, naïve café, 日本語, emoji 🎉\n\ttabs"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= token < tokenizer.vocab_size for token in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_id] + ids) == text + text
    assert tokenizer.encode_batch([text, "x"]) == [ids, [ord("x")]]


def test_byte_tokenizer_decode_tolerates_cut_characters():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("é")[:1]
    assert tokenizer.decode(ids) == "\ufffd"


def test_bpe_train_round_trips_and_compresses(tmp_path):
    documents = generated_documents(80)
    tokenizer = BPETokenizer.train(documents, vocab_size=350)
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.kind == "bpe"
    assert 257 < tokenizer.vocab_size <= 350
    samples = documents[:5] + ["unseen text: ünïcödé 🎉 and <|endoftext|> literally\r\n"]
    for text in samples:
        ids = tokenizer.encode(text)
        assert all(0 <= token < tokenizer.vocab_size for token in ids)
        assert tokenizer.eos_id not in ids  # literal special text stays text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(samples) == [tokenizer.encode(text) for text in samples]
    # Merges were learned: fewer tokens than bytes on in-domain text.
    assert len(tokenizer.encode(documents[0])) < len(documents[0].encode("utf-8"))
    # eos ids are dropped on decode, like the byte tokenizer.
    ids = tokenizer.encode(documents[0])
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == documents[0]

    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.eos_id == tokenizer.eos_id
    assert loaded.encode(samples[-1]) == tokenizer.encode(samples[-1])


def test_bpe_is_cached_and_keyed_by_vocab_size(tmp_path, monkeypatch):
    corpus = open_text_corpus(str(make_text_dir(tmp_path / "corpus", generated_documents(60))))
    cache_dir = tmp_path / "cache"
    first = build_tokenizer("bpe", corpus, vocab_size=320, cache_dir=cache_dir)
    cached = list((cache_dir / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    assert "320" in cached[0].name and corpus.fingerprint() in cached[0].name
    assert not list((cache_dir / "tokenizers").glob("*.tmp"))

    def fail_train(*args, **kwargs):
        raise AssertionError("cached tokenizer should have been loaded, not retrained")

    with monkeypatch.context() as patch:
        patch.setattr(BPETokenizer, "train", fail_train)
        second = build_tokenizer("bpe", corpus, vocab_size=320, cache_dir=cache_dir)
    text = "def value(self): return naïve"
    assert second.encode(text) == first.encode(text)

    build_tokenizer("bpe", corpus, vocab_size=340, cache_dir=cache_dir)
    names = sorted(path.name for path in (cache_dir / "tokenizers").glob("*.json"))
    assert len(names) == 2 and names[0] != names[1]


def test_build_tokenizer_errors(tmp_path):
    corpus = open_text_corpus(str(write_text(tmp_path / "a.txt", "text")))
    assert isinstance(build_tokenizer("byte", None), ByteTokenizer)
    with pytest.raises(DataError, match="tokenizer wordpiece does not exist"):
        build_tokenizer("wordpiece", corpus, cache_dir=tmp_path)
    with pytest.raises(DataError, match="at least 300"):
        build_tokenizer("bpe", corpus, vocab_size=299, cache_dir=tmp_path)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("PLAIT_CACHE")
    assert default_cache_dir() == pathlib.Path.home() / ".cache" / "plait"


# ------------------------------------------------------------- pre-tokenised .bin


@pytest.mark.parametrize(
    ("name", "dtype", "top_id"),
    [("t.bin", np.uint16, 60_000), ("t.u32.bin", np.uint32, 100_000)],
)
def test_bin_round_trip(tmp_path, name, dtype, top_id):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, top_id, size=1000).astype(dtype)
    tokens[17] = top_id
    path = tmp_path / name
    tokens.tofile(path)
    data = load_token_data(str(path), val_fraction=0.1)
    assert data.train[0].dtype == dtype
    assert data.tokenizer is None and data.eos_id is None
    assert data.vocab_size == top_id + 1  # inferred: max id + 1
    np.testing.assert_array_equal(np.concatenate([*data.train, data.val]), tokens)
    assert len(data.val) == 100

    explicit = load_token_data(str(path), bin_vocab_size=top_id + 5)
    assert explicit.vocab_size == top_id + 5


def test_bin_with_id_outside_vocabulary(tmp_path):
    path = tmp_path / "t.bin"
    np.array([1, 2, 500, 3], dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match=r"token id 500 in .*t\.bin exceeds the vocabulary size 400"):
        load_token_data(str(path), bin_vocab_size=400)


def test_bin_of_odd_byte_length(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x01\x00\x02")
    with pytest.raises(DataError, match="not a multiple"):
        load_token_data(str(path))
    path32 = tmp_path / "t.u32.bin"
    path32.write_bytes(b"\x01\x00\x00\x00\x02\x00")
    with pytest.raises(DataError, match="not a multiple"):
        load_token_data(str(path32))


def test_missing_bin(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_token_data(str(tmp_path / "missing.bin"))


# --------------------------------------------------------------------- sampler


def counting_tokens(length: int) -> np.ndarray:
    """Token i has value i (mod 2**16), so a window's content reveals its offset."""
    return (np.arange(length) % 2**16).astype(np.uint16)


def test_global_batch_depends_only_on_seed_and_step():
    tokens = counting_tokens(5000)
    first = BatchSampler(tokens, seq_len=16, global_batch=8, seed=3)
    second = BatchSampler(tokens.copy(), seq_len=16, global_batch=8, seed=3)
    for step in (0, 1, 7, 1000):
        inputs_a, targets_a = first.global_batch(step)
        inputs_b, targets_b = second.global_batch(step)
        assert torch.equal(inputs_a, inputs_b) and torch.equal(targets_a, targets_b)
    # Repeated and out-of-order calls give the same answer (no hidden state).
    assert torch.equal(first.global_batch(1)[0], second.global_batch(1)[0])
    assert not torch.equal(first.global_batch(0)[0], first.global_batch(1)[0])
    other_seed = BatchSampler(tokens, seq_len=16, global_batch=8, seed=4)
    assert not torch.equal(first.global_batch(0)[0], other_seed.global_batch(0)[0])


def test_batch_shapes_and_shifted_targets():
    tokens = counting_tokens(3000)
    sampler = BatchSampler(tokens, seq_len=32, global_batch=6, seed=0)
    inputs, targets = sampler.global_batch(5)
    assert inputs.shape == targets.shape == (6, 32)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    for row in range(6):
        start = int(inputs[row, 0])
        expected = torch.from_numpy(tokens[start : start + 33].astype(np.int64))
        assert torch.equal(inputs[row], expected[:-1])
        assert torch.equal(targets[row], expected[1:])


def test_offsets_cover_the_whole_valid_range():
    # With 3 possible offsets, both ends must be reachable and nothing beyond.
    tokens = counting_tokens(10)
    sampler = BatchSampler(tokens, seq_len=7, global_batch=64, seed=0)
    seen = set()
    for step in range(5):
        inputs, targets = sampler.global_batch(step)
        seen.update(int(start) for start in inputs[:, 0])
        assert int(targets.max()) <= 9
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_shards_concatenate_to_global_batch(dp_size):
    tokens = counting_tokens(4000)
    sampler = BatchSampler(tokens, seq_len=8, global_batch=8, seed=11)
    for step in (0, 9):
        global_inputs, global_targets = sampler.global_batch(step)
        shards = [sampler.shard(step, rank, dp_size) for rank in range(dp_size)]
        assert all(inputs.shape == (8 // dp_size, 8) for inputs, _ in shards)
        assert torch.equal(torch.cat([inputs for inputs, _ in shards]), global_inputs)
        assert torch.equal(torch.cat([targets for _, targets in shards]), global_targets)


def test_shard_requires_divisible_batch():
    sampler = BatchSampler(counting_tokens(100), seq_len=8, global_batch=6, seed=0)
    with pytest.raises(DataError, match="not divisible"):
        sampler.shard(0, 0, 4)


def test_too_short_corpus_for_sampler():
    with pytest.raises(DataError, match="corpus has 8 training tokens, fewer than seq_len\\+1 = 9"):
        BatchSampler(counting_tokens(8), seq_len=8, global_batch=2, seed=0)
    BatchSampler(counting_tokens(9), seq_len=8, global_batch=2, seed=0)  # exactly one window is fine


# ------------------------------------------------------------- load_token_data


def test_load_token_data_from_text_dir_with_byte_tokenizer(tmp_path):
    documents = ["first doc é\n", "second\n", "third one 🎉"]
    corpus_dir = tmp_path / "corpus"
    for index, document in enumerate(documents):
        write_text(corpus_dir / f"{index}.txt", document)
    cache_dir = tmp_path / "cache"

    data = load_token_data(str(corpus_dir), "byte", cache_dir=cache_dir, val_fraction=0.25)
    tokenizer = ByteTokenizer()
    expected = []
    for document in documents:
        expected += tokenizer.encode(document) + [tokenizer.eos_id]
    stream = np.concatenate([*data.train, data.val])
    np.testing.assert_array_equal(stream, expected)
    assert data.eos_id == 256 and data.vocab_size == 257
    assert isinstance(data.tokenizer, ByteTokenizer)
    assert len(data.val) == int(len(expected) * 0.25)
    np.testing.assert_array_equal(data.val, expected[-len(data.val) :])
    assert data.train[0].dtype == np.uint16

    cached = list((cache_dir / "tokens").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".bin"
    mtime = cached[0].stat().st_mtime_ns
    again = load_token_data(str(corpus_dir), "byte", cache_dir=cache_dir, val_fraction=0.25)
    assert isinstance(again.train[0], np.memmap)
    assert cached[0].stat().st_mtime_ns == mtime  # not rewritten
    np.testing.assert_array_equal(again.train[0], data.train[0])
    np.testing.assert_array_equal(again.val, data.val)


def test_load_token_data_with_bpe(tmp_path):
    documents = generated_documents(40)
    corpus_dir = make_text_dir(tmp_path / "corpus", documents)
    data = load_token_data(
        str(corpus_dir), "bpe", vocab_size=320, cache_dir=tmp_path / "cache", val_fraction=0.05
    )
    stream = np.concatenate([*data.train, data.val]).astype(np.int64)
    assert int(stream.max()) < data.vocab_size
    assert int((stream == data.eos_id).sum()) == len(documents)
    assert stream[-1] == data.eos_id
    first_eos = int(np.argmax(stream == data.eos_id))
    assert data.tokenizer.decode(stream[:first_eos].tolist()) == documents[0]


def test_undecodable_file_leaves_no_partial_cache(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_text(corpus_dir / "a.txt", "good")
    (corpus_dir / "b.txt").write_bytes(b"\xc3\x28 bad")
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="offset 0"):
        load_token_data(str(corpus_dir), "byte", cache_dir=cache_dir)
    assert list((cache_dir / "tokens").iterdir()) == []


def test_load_token_data_rejects_bad_val_fraction(tmp_path):
    path = write_text(tmp_path / "a.txt", "some text")
    for fraction in (0.0, 1.0, -0.5):
        with pytest.raises(DataError, match="val_fraction"):
            load_token_data(str(path), "byte", cache_dir=tmp_path / "cache", val_fraction=fraction)


def test_cache_writes_are_atomic(tmp_path):
    from plait.files import atomic_output

    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    with atomic_output(target) as handle:
        handle.write(b"complete")
    assert target.read_bytes() == b"complete"
