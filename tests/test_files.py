"""Written files get the usual permissions (0o666 & ~umask), atomic writes included."""
from __future__ import annotations

import os
import stat

import pytest

from plait.checkpoint import save_checkpoint
from plait.checkpoint.hf import export_hf
from plait.mesh import ParallelContext
from plait.train import Trainer
from helpers import tiny_config, tiny_model_config


@pytest.fixture
def umask():
    """Set the process umask for the test (``umask(value)``), restored afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def modes(root) -> dict[str, int]:
    return {str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode)
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_checkpoint_and_export_files_are_readable_by_others(tmp_path, data, umask):
    umask(0o022)
    trainer = Trainer(tiny_config(steps=1, micro_batch=1), ParallelContext.single(), data, tiny_model_config())
    trainer.train_step(0)
    checkpoint = save_checkpoint(trainer, tmp_path / "run", 1)
    export_hf(checkpoint, tmp_path / "exported")
    written = modes(tmp_path)
    assert any(name.endswith("rank-00000.safetensors") for name in written)
    assert "exported/model.safetensors" in written
    assert {name: oct(mode) for name, mode in written.items() if mode != 0o644} == {}


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    from plait.files import atomic_output, atomic_path, atomic_write_text

    umask(0o027)
    atomic_write_text(tmp_path / "a.txt", "a")
    with atomic_output(tmp_path / "b.bin") as handle:
        handle.write(b"b")
    with atomic_path(tmp_path / "sub" / "c.bin") as temp:
        temp.write_bytes(b"c")
    assert modes(tmp_path) == {"a.txt": 0o640, "b.bin": 0o640, "sub/c.bin": 0o640}
    assert (tmp_path / "sub" / "c.bin").read_bytes() == b"c"


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    from plait.files import atomic_path

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temp:
            temp.write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_tokenized_data_and_tokenizer_cache_are_readable_by_others(tmp_path, umask, monkeypatch):
    """plait tokenize's .bin and the BPE cache went through mkstemp (0600) before plait.files."""
    from plait.data import load_token_data

    umask(0o022)
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{n}(x):\n    return x + {n}\n" for n in range(300)))
    load_token_data(str(corpus), "bpe", 300, show_progress=False)
    written = modes(tmp_path / "cache")
    assert any(name.endswith(".bin") for name in written) and any(name.endswith(".json") for name in written)
    assert {name: oct(mode) for name, mode in written.items() if mode != 0o644} == {}
