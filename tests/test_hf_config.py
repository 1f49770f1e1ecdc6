"""Hugging Face configs as transformers writes them: every field read or refused, scaled RoPE tables."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from plait.checkpoint.hf_config import ConfigForm, hf_config_dict, load_hf_config, read_llama_config
from plait.cli import main
from plait.models import ConfigError, LlamaConfig, RopeScaling, RopeType
from plait.models.rope import inverse_frequencies

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)


def saved_config(tmp_path, **fields) -> dict:
    """config.json as the installed transformers writes it."""
    transformers.LlamaConfig(**{**SHAPE, **fields}).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("rope, head_dim", [
    (dict(rope_type="default", rope_theta=100000.0), 16),
    (dict(rope_type="linear", rope_theta=10000.0, factor=4.0), 16),
    (LLAMA3, 16),
    ({**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 8192}, 128),  # Llama 3.2's own values
])
def test_rope_tables_are_bitwise_transformers(rope, head_dim):
    hf = transformers.LlamaConfig(**{**SHAPE, "hidden_size": 4 * head_dim}, max_position_embeddings=131072,
                                  rope_parameters=dict(rope))
    expected, scale = ROPE_INIT_FUNCTIONS.get(rope["rope_type"], lambda *_: (None, 1.0))(hf, "cpu")
    ours = read_llama_config(hf.to_dict())
    actual = inverse_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    if rope["rope_type"] == "default":
        expected = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        assert ours.rope_scaling is None
    else:
        assert ours.rope_scaling.rope_type is RopeType(rope["rope_type"])
        assert not torch.equal(actual, inverse_frequencies(head_dim, ours.rope_theta))  # scaling changes it
    assert scale == 1.0 and torch.equal(actual, expected)


@pytest.mark.parametrize("fields, expected", [
    (dict(rope_theta=100000.0), dict(rope_theta=100000.0, rope_scaling=None)),
    (dict(rope_parameters=dict(LLAMA3)), dict(rope_theta=500000.0, rope_scaling=RopeScaling(
        RopeType.LLAMA3, 8.0, 1.0, 4.0, 32))),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=20000.0, factor=2.0)),
     dict(rope_theta=20000.0, rope_scaling=RopeScaling(RopeType.LINEAR, 2.0))),
    (dict(head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-5), dict(head_dim=32, tie_word_embeddings=True)),
])
def test_both_forms_read_alike_and_write_back(tmp_path, fields, expected):
    """5.x's rope_parameters and 4.4x's rope_theta + rope_scaling give one LlamaConfig; each written
    form reads back to it, and transformers reads each written form to the same RoPE."""
    raw = saved_config(tmp_path, **fields)
    assert "rope_parameters" in raw and "rope_theta" not in raw  # the 5.x form
    config = load_hf_config(tmp_path)
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert config.rms_norm_eps == raw["rms_norm_eps"]
    legacy = {k: v for k, v in raw.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(raw["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    assert read_llama_config(legacy) == config
    for form in ConfigForm:
        written = hf_config_dict(config, form)
        assert ("rope_parameters" in written) == (form is ConfigForm.TRANSFORMERS_5)
        assert read_llama_config(written) == config
        theirs = transformers.LlamaConfig.from_dict(written)
        assert theirs.rope_parameters == transformers.LlamaConfig.from_dict(raw).rope_parameters


def test_a_llama_3_2_config_of_transformers_4_45(tmp_path):
    """The 4.4x form as the Llama 3.2 release wrote it (shapes shrunk): theta, llama3 scaling, tied."""
    raw = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 16, "hidden_act": "silu",
           "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 131072,
           "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
           "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
           "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 256}
    config = read_llama_config(raw)
    assert config.rope_scaling == RopeScaling(RopeType.LLAMA3, 32.0, 1.0, 4.0, 8192)
    assert config.rope_theta == 500000.0 and config.tie_word_embeddings and config.rms_norm_eps == 1e-5
    theirs = transformers.LlamaConfig.from_dict(raw)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](theirs, "cpu")
    assert torch.equal(inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling), expected)


def test_legacy_rope_scaling_of_another_type_is_refused():
    raw = {**SHAPE, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    with pytest.raises(ConfigError, match='rope_scaling.rope_type = "yarn" is not supported'):
        read_llama_config(raw)


def test_a_llama3_config_without_original_length_takes_max_position_embeddings():
    raw = {**SHAPE, "max_position_embeddings": 4096,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    assert read_llama_config(raw).rope_scaling.original_max_position_embeddings == 4096


def test_missing_fields_take_transformers_defaults():
    """A sparse config means what transformers makes of it, not plait's preset defaults."""
    config = read_llama_config({"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2})
    theirs = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    for field in ("vocab_size", "intermediate_size", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(theirs, field), field
    assert config.rope_theta == theirs.rope_parameters["rope_theta"] and config.rope_scaling is None


def test_checkpoint_meta_round_trip_keeps_scaling():
    config = LlamaConfig(**SHAPE, rope_scaling=RopeScaling(RopeType.LLAMA3, 8.0, 1.0, 4.0, 32))
    again = LlamaConfig(**json.loads(json.dumps(config.to_dict())))
    assert again == config and again.rope_scaling.rope_type is RopeType.LLAMA3


# (fields given to transformers.LlamaConfig, what the one-line error names)
REFUSED = [
    (dict(hidden_act="gelu"), "hidden_act = \"gelu\""),
    (dict(attention_bias=True), "attention_bias = true"),
    (dict(mlp_bias=True), "mlp_bias = true"),
    (dict(pretraining_tp=2), "pretraining_tp = 2"),
    (dict(attention_dropout=0.1), "attention_dropout = 0.1"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0)),
     "rope_parameters.rope_type = \"yarn\""),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)), "rope_type = \"dynamic\""),
    (dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0, beta_fast=32)),
     "rope_parameters.beta_fast = 32"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
     "partial_rotary_factor = 0.5"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "field quantization_config"),
    (dict(some_new_option=3), "field some_new_option = 3"),
    (dict(architectures=["LlamaForSequenceClassification"]), "architectures = [\"LlamaForSequenceClassification\"]"),
]


@pytest.mark.parametrize("fields, named", REFUSED, ids=[next(iter(f)) for f, _ in REFUSED])
def test_a_setting_plait_cannot_represent_is_refused_in_one_line(fields, named, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = tmp_path / "model"
    saved_config(model, **fields)
    code = main(["train", "--model", str(model), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("plait: error: ") and named in err and "config.json" in err, err
    plan = ["plan", "--model", str(model), "--gpus", "8", "--seq-len", "128", "--global-batch", "8"]
    assert main(plan) == 2  # the planner reads configs the same way
    assert named in capsys.readouterr().err


def test_the_no_effect_list_and_the_tables_cover_what_transformers_writes(tmp_path):
    """Every field transformers 5 writes for a Llama model is read, built in or documented as without
    effect, so a plain save_pretrained config loads without a refusal."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert {"dtype", "architectures", "transformers_version", "use_cache"} <= set(raw)
    assert read_llama_config(raw).vocab_size == SHAPE["vocab_size"]


def test_unreadable_config_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_hf_config(tmp_path)
