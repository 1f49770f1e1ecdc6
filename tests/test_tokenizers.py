"""A model's own tokenizer: read from a Hugging Face directory, used on text data, carried into
checkpoints and the export; plait's own tokenizers written in the same format. The reference is
what the installed ``transformers`` and ``tokenizers`` make of the same files."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from plait.cli import main  # noqa: E402
from plait.data import DataError, load_token_data  # noqa: E402
from plait.data.hf_tokenizer import PretrainedTokenizer  # noqa: E402
from plait.data.tokenizer import BPETokenizer, ByteTokenizer  # noqa: E402
from plait.train.config import TrainConfig, TrainConfigError  # noqa: E402

TEXTS = ["def add(a, b):\n    return a + b\n", "class Point:\n    x: int = 0  # café ∑\n",
         "print('hello, world')\n", "for i in range(10):\n    yield i * i\n"]


def llama_like_tokenizer(path, vocab_size: int = 300, bos: bool = True):
    """A byte-level BPE saved by transformers like a Llama tokenizer: BOS, EOS, a post-processor
    putting BOS in front of every text."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXTS * 20, trainer)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def text_corpus(path):
    path.mkdir()
    for index, text in enumerate(TEXTS * 30):
        (path / f"doc{index:03d}.py").write_text(text)
    return path


def test_a_model_tokenizer_encodes_documents_as_transformers_and_tokenizers_do(tmp_path):
    llama_like_tokenizer(tmp_path / "tok")
    ours = PretrainedTokenizer(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    raw = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (0, 1)
    documents = ours.encode_documents(TEXTS)
    for text, ids in zip(TEXTS, documents):
        assert ids[0] == ours.bos_id  # the post-processor's BOS, as transformers adds it
        assert ids == theirs(text)["input_ids"] + [ours.eos_id] == raw.encode(text).ids + [ours.eos_id]
        assert ours.decode(ids) == text
    # text that spells a special token stays text (AutoTokenizer's split_special_tokens=True); by
    # default AutoTokenizer would turn it into the control id, ending a document mid-file
    spelled = "x = '</s>'  # <s>\n"
    ids = ours.encode_documents([spelled])[0]
    assert ids == theirs(spelled, split_special_tokens=True)["input_ids"] + [ours.eos_id]
    assert ids.count(ours.eos_id) == 1 and ids.count(ours.bos_id) == 1 and ours.decode(ids) == spelled
    assert theirs(spelled)["input_ids"].count(ours.eos_id) == 1
    # the token stream of a corpus: its documents in path order, each followed by EOS
    data = load_token_data(str(text_corpus(tmp_path / "corpus")), str(tmp_path / "tok"), cache_dir=tmp_path / "c",
                           val_fraction=0.01)
    stream = np.concatenate([*data.train, data.val]).tolist()
    assert stream == [token for ids in ours.encode_documents(TEXTS * 30) for token in ids]
    assert data.tokenizer.kind == "pretrained" and data.vocab_size == theirs.vocab_size == len(theirs)
    # a bare tokenizer.json works too (its special tokens then come from nowhere: EOS is required)
    with pytest.raises(DataError, match="names no eos_token"):
        PretrainedTokenizer(tmp_path / "tok" / "tokenizer.json")


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_plait_tokenizers_save_as_hugging_face_tokenizers(kind, tmp_path):
    ours = BPETokenizer.train(TEXTS * 20, 400) if kind == "bpe" else ByteTokenizer()
    ours.save_pretrained(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    again = PretrainedTokenizer(tmp_path / "tok")
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == ours.eos_id == again.eos_id
    assert len(theirs) == ours.vocab_size == again.vocab_size
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text) == again.encode(text)
        assert again.encode_documents([text]) == ours.encode_documents([text])
        assert theirs.decode(ours.encode(text)) == text


def test_tokenizer_choice_and_its_one_line_errors(tmp_path):
    model = tmp_path / "model"
    transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2).save_pretrained(model)
    corpus = str(text_corpus(tmp_path / "corpus"))
    assert TrainConfig(model="tiny").tokenizer_spec() == "bpe"
    assert TrainConfig(model=str(model), data="x.bin").tokenizer_spec() == "bpe"  # nothing to encode
    with pytest.raises(TrainConfigError, match="has no tokenizer.json to encode"):
        TrainConfig(model=str(model), data=corpus).tokenizer_spec()
    llama_like_tokenizer(model)
    assert TrainConfig(model=str(model), data=corpus).tokenizer_spec() == str(model)
    for kind in ("bpe", "byte"):
        with pytest.raises(TrainConfigError, match="makes new token ids"):
            TrainConfig(model=str(model), data=corpus, tokenizer=kind).tokenizer_spec()
    with pytest.raises(TrainConfigError, match="no such file or directory"):
        TrainConfig(tokenizer=str(tmp_path / "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="could not be loaded"):
        PretrainedTokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match="has no tokenizer.json"):
        PretrainedTokenizer(tmp_path / "corpus")


def run_plait(args, tmp_path, timeout=300):
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


QUIET = ["--eval-every", "0", "--no-progress", "--no-tensorboard", "--no-plot"]


def test_fine_tune_a_hugging_face_llama_on_text_with_its_tokenizer_at_tp2_then_transformers_generates(tmp_path):
    """The user's path: plait train --model DIR --data TEXT (the model's tokenizer, not a fresh
    BPE) at tp=2, plait export; transformers loads model and tokenizer from the export and
    generates, and the export's tokenizer encodes text exactly as the source's."""
    source = tmp_path / "source"
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1)).save_pretrained(source)
    llama_like_tokenizer(source)
    corpus = text_corpus(tmp_path / "corpus")
    run = run_plait(["train", "--model", str(source), "--data", str(corpus), "--nproc", "2", "--tp", "2",
                     "--steps", "3", "--global-batch", "2", "--seq-len", "32", "--dtype", "float32",
                     "--checkpoint-every", "3", "--out", str(tmp_path / "run"), *QUIET], tmp_path)
    assert run.returncode == 0, run.stderr
    stored = PretrainedTokenizer(tmp_path / "run" / "tokenizer")  # the run keeps what its ids mean
    assert stored.encode_documents(TEXTS) == PretrainedTokenizer(source).encode_documents(TEXTS)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    theirs = transformers.AutoTokenizer.from_pretrained(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == theirs(text)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    prompt = tokenizer("def add(a, b):", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0]), str)
    assert model.generation_config.eos_token_id == 1


def test_a_run_with_plaits_bpe_exports_as_a_complete_hugging_face_model(tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    run = run_plait(["train", "--model", "tiny", "--data", str(corpus), "--vocab-size", "320", "--steps", "1",
                     "--global-batch", "2", "--seq-len", "32", "--checkpoint-every", "1", "--sample", "def ",
                     "--out", str(tmp_path / "run"), *QUIET], tmp_path)
    assert run.returncode == 0, run.stderr
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    ours = BPETokenizer.load(next((tmp_path / "cache" / "tokenizers").glob("bpe-320-*.json")))
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == ours.encode(text)
    config = json.loads((export / "config.json").read_text())
    assert config["eos_token_id"] == ours.eos_id
    assert json.loads((export / "generation_config.json").read_text()) == {"eos_token_id": ours.eos_id}
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    prompt = tokenizer("def ", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=48, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    if out and out[-1] == ours.eos_id:
        out = out[:-1]
    # --sample printed the trained model's greedy continuation: transformers' on the export
    printed = run.stdout.split("continuation of 'def ' (")[1]
    assert printed.startswith(f"{len(out)} tokens):\n")
    assert printed.split("):\n", 1)[1].startswith("def " + tokenizer.decode(out))
