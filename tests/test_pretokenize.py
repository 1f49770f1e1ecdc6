"""plait tokenize: the ids of every document (text files, .jsonl, .parquet) equal
tokenizers.Tokenizer.encode on the same text followed by EOS, the same with 1 and 2 worker
processes, and bad inputs fail in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from test_tokenizers import TEXTS, llama_like_tokenizer  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from plait.cli import main  # noqa: E402
from plait.data import load_token_data  # noqa: E402


def plait_tokenize(capsys, *args) -> tuple[int, str, str]:
    code = main(["tokenize", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("pretok")
    llama_like_tokenizer(root / "tok")
    data = root / "data"
    data.mkdir()
    (data / "a.py").write_text(TEXTS[0])
    (data / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    pq.write_table(pa.table({"text": TEXTS[::-1], "n": list(range(4))}), data / "c.parquet", row_group_size=2)
    return root


def expected_ids(root) -> list[int]:
    raw = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    eos = raw.token_to_id("</s>")
    documents = [TEXTS[0], *TEXTS, *TEXTS[::-1]]  # a.py, b.jsonl's lines, c.parquet's rows (path order)
    return [t for text in documents for t in raw.encode(text).ids + [eos]]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ids_equal_tokenizers_encode_of_every_document(corpus, tmp_path, workers, capsys):
    out = tmp_path / "ids.bin"
    code, stdout, stderr = plait_tokenize(capsys, "--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"),
                                          "-o", str(out), "--workers", workers)
    assert code == 0, stderr
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected_ids(corpus)
    assert "token ids from" in stdout and not list(tmp_path.glob("*.tmp"))
    # plait train's own stream of the same directory is the same ids
    data = load_token_data(str(corpus / "data"), str(corpus / "tok"), cache_dir=tmp_path / "cache")
    assert np.concatenate([*data.train, data.val]).tolist() == expected_ids(corpus)
    wide = tmp_path / "ids.u32.bin"
    assert plait_tokenize(capsys, "--data", str(corpus / "data"), "--tokenizer", str(corpus / "tok"), "-o", str(wide),
                          "--workers", workers)[0] == 0
    assert np.fromfile(wide, dtype=np.uint32).tolist() == expected_ids(corpus)


def test_bad_inputs_fail_in_one_line(corpus, tmp_path, capsys):
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    tok = str(corpus / "tok")
    cases = [((tmp_path / "nofield.jsonl", tok, "x.bin"), "nofield.jsonl:2: no field 'text'"),
             ((tmp_path / "broken.jsonl", tok, "x.bin"), "broken.jsonl:2: not a JSON line"),
             ((tmp_path / "broken.parquet", tok, "x.bin"), "is not a readable parquet file"),
             ((corpus / "data", str(tmp_path / "missing"), "x.bin"), "does not exist"),
             ((corpus / "data", tok, "x.txt"), "must be a .bin")]
    for (data, tokenizer, out), message in cases:
        code, _, stderr = plait_tokenize(capsys, "--data", str(data), "--tokenizer", tokenizer, "-o", str(tmp_path / out),
                                         "--workers", "1")
        assert code == 2, (message, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (message, stderr)
        assert not (tmp_path / out).exists()
