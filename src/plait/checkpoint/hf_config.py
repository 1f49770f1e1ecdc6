"""Hugging Face Llama ``config.json``, read and written, and the files that travel with it.

transformers writes a Llama config in one of two forms:

- 4.4x: top-level ``rope_theta`` and ``rope_scaling`` (``{"rope_type": "llama3", "factor": 8, ...}``
  or null), ``torch_dtype``;
- 5.x: ``rope_parameters`` (``{"rope_type": "default", "rope_theta": 100000.0}``), ``dtype``.

5.x reads both (``rope_scaling`` first, then ``rope_parameters``; a theta missing from the dict
comes from the top level, else 10000); 4.x reads only its own. ``read_llama_config`` reads both
the same way. Every field of the file is in exactly one of three tables, or the file is refused
with a one-line ``ConfigError`` that names the field and its value:

- ``READ``: becomes a ``LlamaConfig`` field (missing ones take transformers' own defaults,
  which are not always plait's: ``rms_norm_eps`` is 1e-6 there);
- ``BUILT_IN``: plait's Llama has one value built in (SwiGLU with silu, no biases, no attention
  dropout, rotate-half RoPE over the whole head, ...); any other value is refused;
- ``GENERIC_DEFAULTS``: fields every transformers config has (a full ``to_dict()`` writes them):
  accepted at transformers' default, which means what their absence means; refused otherwise;
- ``NO_EFFECT``: fields that do not change what the model computes (token ids used by
  tokenizers and generation, cache and output switches, versions, the storage dtype of the
  weights, generation settings that transformers 4 kept here, classification labels). The
  token ids and switches are carried into an export (``carried_fields``).

So nothing with an effect on the model is ever ignored: an unknown field (``quantization_config``,
``auto_map``, a new transformers option) is refused until plait knows what it means.

``hf_config_dict`` writes the form the installed transformers reads (5.x when it is not
installed). The files beside the weights that are not weights (``SOURCE_FILES``: generation
config, chat template, tokenizer) are copied into every checkpoint of a run that started from a
Hugging Face directory, and from there into its export.
"""
from __future__ import annotations

import enum
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from plait.models import ConfigError, LlamaConfig, RopeScaling, RopeType

_INT, _FLOAT, _BOOL = "an integer", "a number", "true or false"

# field -> (what its value must be, transformers' default when the field is missing).
READ: dict[str, tuple[str, Any]] = {
    "vocab_size": (_INT, 32000),
    "hidden_size": (_INT, 4096),
    "intermediate_size": (_INT, 11008),
    "num_hidden_layers": (_INT, 32),
    "num_attention_heads": (_INT, 32),
    "num_key_value_heads": (_INT, None),  # None: num_attention_heads
    "head_dim": (_INT, None),             # None: hidden_size / num_attention_heads
    "max_position_embeddings": (_INT, 2048),
    "rms_norm_eps": (_FLOAT, 1e-6),
    "tie_word_embeddings": (_BOOL, False),
    "initializer_range": (_FLOAT, 0.02),
}
ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters")  # read by read_rope

# field -> (the values plait's Llama computes, why).
BUILT_IN: dict[str, tuple[tuple, str]] = {
    "model_type": (("llama", None), "plait reads Llama models"),
    "architectures": ((["LlamaForCausalLM"], None), "plait trains LlamaForCausalLM"),
    "hidden_act": (("silu",), "plait's MLP is SwiGLU with silu"),
    "attention_bias": ((False,), "plait's attention projections have no bias"),
    "mlp_bias": ((False,), "plait's MLP projections have no bias"),
    "attention_dropout": ((0, 0.0), "plait has no attention dropout"),
    "pretraining_tp": ((1, None), "plait computes each projection as one matmul"),
    "partial_rotary_factor": ((1, 1.0, None), "plait rotates the whole head"),
    "rope_interleaved": ((False, None), "plait's RoPE rotates halves, not interleaved pairs"),
}

# transformers' generic config fields (every model has them; a full ``to_dict()`` writes them all):
# at these values they mean what their absence means; other values are refused.
GENERIC_DEFAULTS: dict[str, Any] = {
    "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
    "tie_encoder_decoder": False, "cross_attention_hidden_size": None, "pruned_heads": {}, "torchscript": False,
    "tf_legacy_loss": False, "use_bfloat16": False, "task_specific_params": None, "finetuning_task": None,
}

# Fields without an effect on the model's computation. The first group travels into an export.
CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_attentions",
           "output_hidden_states", "return_dict", "tokenizer_class", "is_llama_config", "transformers.js_config")
# Generation settings that transformers 4 kept in config.json (now in generation_config.json).
GENERATION = ("max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
              "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
              "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
              "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
              "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
              "suppress_tokens", "begin_suppress_tokens", "prefix", "sep_token_id", "decoder_start_token_id")
NO_EFFECT = (*CARRIED, *GENERATION, "transformers_version", "_name_or_path", "dtype", "torch_dtype",
             "id2label", "label2id", "problem_type")  # labels and problem type: classification heads only

# Files of a Hugging Face directory that are neither weights nor config.json.
SOURCE_FILES = ("generation_config.json", "chat_template.jinja", "chat_template.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
                "vocab.json", "merges.txt")
SOURCE_DIR = "hf_source"  # inside a checkpoint: the source's config.json and SOURCE_FILES

_ROPE_KEYS = {None: set(), RopeType.LINEAR: {"factor"},
              RopeType.LLAMA3: {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


class ConfigForm(enum.Enum):
    """Which transformers reads the written config.json."""

    TRANSFORMERS_4 = "4"
    TRANSFORMERS_5 = "5"

    @classmethod
    def installed(cls) -> "ConfigForm":
        """The form of the installed transformers; 5.x when it is not installed."""
        try:
            major = int(metadata.version("transformers").split(".")[0])
        except (metadata.PackageNotFoundError, ValueError):
            return cls.TRANSFORMERS_5
        return cls.TRANSFORMERS_4 if major < 5 else cls.TRANSFORMERS_5


def _refuse(where: str, field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {field} = {json.dumps(value)} is not supported ({why})")


def _is_kind(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == _INT else isinstance(value, (int, float))


def read_rope(raw: dict, where: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either form, with transformers 5's precedence."""
    scaling, parameters = raw.get("rope_scaling"), raw.get("rope_parameters")
    for field, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if value is not None and not isinstance(value, dict):
            raise _refuse(where, field, value, "expected an object")
    if scaling and parameters and _normalised(scaling, raw) != _normalised(parameters, raw):
        raise ConfigError(f"{where}: rope_scaling {json.dumps(scaling)} and rope_parameters "
                          f"{json.dumps(parameters)} disagree")
    params = dict(scaling or parameters or {})
    field = "rope_scaling" if scaling else "rope_parameters"
    name = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    if not _is_kind(theta, _FLOAT):
        raise _refuse(where, "rope_theta", theta, "expected a number")
    partial = params.pop("partial_rotary_factor", None)
    if partial not in BUILT_IN["partial_rotary_factor"][0]:
        raise _refuse(where, f"{field}.partial_rotary_factor", partial, BUILT_IN["partial_rotary_factor"][1])
    try:
        kind = None if name == "default" else RopeType(name)
    except ValueError:
        raise _refuse(where, f"{field}.rope_type", name,
                      "plait computes default, " + ", ".join(t.value for t in RopeType)) from None
    if kind is RopeType.LLAMA3:  # transformers fills it in the same way
        params.setdefault("original_max_position_embeddings",
                          raw.get("max_position_embeddings", READ["max_position_embeddings"][1]))
    extra = sorted(set(params) - _ROPE_KEYS[kind])
    if extra:
        raise _refuse(where, f"{field}.{extra[0]}", params[extra[0]], f"not a parameter of rope_type {name}")
    missing = sorted(_ROPE_KEYS[kind] - set(params))
    if missing:
        raise ConfigError(f"{where}: {field} of rope_type {name} lacks {', '.join(missing)}")
    for key, value in params.items():
        if not _is_kind(value, _INT if key == "original_max_position_embeddings" else _FLOAT):
            raise _refuse(where, f"{field}.{key}", value, "expected a number")
    return float(theta), None if kind is None else RopeScaling(kind, **params)


def _normalised(params: dict, raw: dict) -> dict:
    params = dict(params)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    return params


def read_llama_config(raw: dict, where: str = "config.json") -> LlamaConfig:
    """A Hugging Face Llama config (either form) -> ``LlamaConfig``, or a one-line ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    known = set(READ) | set(ROPE_FIELDS) | set(BUILT_IN) | set(NO_EFFECT)
    for field, value in raw.items():
        if field in GENERIC_DEFAULTS and value != GENERIC_DEFAULTS[field]:
            raise _refuse(where, field, value, f"plait's Llama is {json.dumps(GENERIC_DEFAULTS[field])} here")
        if field not in known and field not in GENERIC_DEFAULTS:
            raise ConfigError(f"{where}: field {field} = {json.dumps(value)} is not one plait knows; a field "
                              f"that may change the model is refused rather than ignored")
    for field, (allowed, why) in BUILT_IN.items():
        if field in raw and raw[field] not in allowed:
            raise _refuse(where, field, raw[field], why)
    values: dict[str, Any] = {}
    for field, (kind, default) in READ.items():
        value = raw.get(field, default)
        if value is not None and not _is_kind(value, kind):
            raise _refuse(where, field, value, f"expected {kind}")
        values[field] = value
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    values["rope_theta"], values["rope_scaling"] = read_rope(raw, where)
    try:
        return LlamaConfig(**values)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def is_hf_directory(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def load_hf_config(path: str | Path) -> LlamaConfig:
    """``read_llama_config`` of ``path/config.json``."""
    file = Path(path) / "config.json"
    return read_llama_config(read_json(file), str(file))


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file} cannot be read: {error}") from None


def carried_fields(raw: dict) -> dict:
    """The fields of a source config that an export repeats (token ids, switches)."""
    return {field: raw[field] for field in CARRIED if field in raw}


def hf_config_dict(config: LlamaConfig, form: ConfigForm | None = None, carried: dict | None = None) -> dict:
    """``config`` as the ``config.json`` of an fp32 ``LlamaForCausalLM`` in ``form``."""
    form = form or ConfigForm.installed()
    values: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                              "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
                              "pretraining_tp": 1}
    values.update({field: getattr(config, field) for field in READ})
    values.update(carried or {})
    scaling = config.rope_scaling.to_dict() if config.rope_scaling else None
    if form is ConfigForm.TRANSFORMERS_4:
        values.update(rope_theta=config.rope_theta, rope_scaling=scaling, torch_dtype="float32")
    else:
        rope = {"rope_type": "default"} if scaling is None else scaling
        values.update(rope_parameters={**rope, "rope_theta": config.rope_theta}, dtype="float32")
    return dict(sorted(values.items()))


def copy_source_files(source: str | Path, destination: str | Path) -> list[str]:
    """Copy ``config.json`` and the ``SOURCE_FILES`` that ``source`` has; returns their names."""
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("config.json", *SOURCE_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
            copied.append(name)
    return copied
