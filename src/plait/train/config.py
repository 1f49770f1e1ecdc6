"""Training configuration: one dataclass, loadable from TOML, overridden by CLI flags."""
from __future__ import annotations

import dataclasses
import enum
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from plait.device import DeviceRequest
from plait.data.errors import DataError
from plait.data.mixture import format_data_spec, has_text_source, parse_data_spec
from plait.errors import PlaitError
from plait.layout import Recompute
from plait.pipeline.schedules import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class TrainConfigError(PlaitError):
    """A bad training option; the message is one line."""


class OnNonFinite(str, enum.Enum):
    """What a step whose loss or gradient norm is not finite does (its update is never applied)."""

    STOP = "stop"  # exit non-zero naming the step; the last good checkpoint stays the newest
    SKIP = "skip"  # drop the update, count the step in the metrics, go on


DTYPES = ("float32", "bfloat16")
PLAIT_TOKENIZERS = ("bpe", "byte")  # trained on the corpus / fixed; anything else is a tokenizer path


@dataclass
class TrainConfig:
    # what to train, on what
    model: str = "small"                 # preset name (or, later, a Hugging Face directory)
    data: str = "stdlib"                 # "stdlib", a text / .jsonl / .parquet file, a directory, a .bin of
                                         # token ids, or a weighted mixture "a.bin:0.7,b.jsonl:0.3"
    field: str = "text"                  # the text of .jsonl records / .parquet rows
    tokenizer: str | None = None         # None: --model DIR's own, else "bpe"; "bpe", "byte" or a path
    vocab_size: int = 8192               # BPE vocabulary size
    # layout
    nproc: int = 1                       # local worker processes plait launches itself
    device: str = "auto"                 # auto (CUDA when visible, else CPU), cuda (NCCL) or cpu (gloo)
    dp: int | None = None                # None: world_size / (pp * cp * tp)
    pp: int = 1
    tp: int = 1
    cp: int = 1                          # context parallel: the sequence sharded through the whole block
    cp_mode: str = "ring"                # ring (keys/values around the cp ranks) or alltoall (Ulysses)
    dp_shard: int | None = None          # hybrid sharding: ZeRO within groups of N dp ranks, all-reduce across
    sequence_parallel: bool = False      # norms and residuals on sequence shards (needs tp > 1)
    loss_parallel: bool = False          # cross-entropy on vocabulary-sharded logits (needs tp > 1)
    zero: int = 0                        # 0: replicated DP; 1/2/3: shard optimizer state / + grads / + params
    schedule: str = "1f1b"               # pipeline schedule: gpipe, 1f1b, interleaved, zb1p
    microbatches: int | None = None      # micro-batches per step and rank (sets micro_batch); pipeline needs >= pp
    virtual_stages: int = 1              # chunks per pipeline rank (interleaved; 2 for zbv)
    pipeline_split: str | None = None    # explicit blocks per chunk, e.g. "3,5"; default: balanced by FLOPs
    # schedule
    steps: int = 300
    global_batch: int = 16               # sequences per optimizer step, over all dp ranks
    micro_batch: int | None = None       # sequences per forward/backward; None: the whole per-rank batch
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1            # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0               # global-norm clipping; 0 disables
    on_nonfinite: str = "stop"           # a non-finite loss or gradient norm: stop, or skip the update
    label_smoothing: float = 0.0
    seed: int = 0
    dtype: str = "bfloat16"              # compute dtype under autocast; master weights stay fp32
    activation_checkpointing: str | bool = "none"  # none, selective or full (true: full, false: none)
    compile: bool = False                # torch.compile each decoder block's forward
    timeline: bool = False               # pipeline: write the last step's measured timeline
    # evaluation and output
    eval_every: int = 50                 # 0 disables periodic validation
    eval_batches: int = 4                # validation set: the first eval_batches x global_batch windows
    out: str | None = None               # run directory; default runs/<model>-<timestamp>
    checkpoint_every: int = 0            # write a checkpoint every N steps (and at the end); 0: never
    keep_checkpoints: int = 2            # complete checkpoints kept (older ones deleted)
    sample: str | None = None            # at the end, print the model's greedy continuation of this prompt
    resume: bool = True                  # continue from the newest complete checkpoint in --out
    max_restarts: int = 0                # --nproc launcher: restart the worker group this often after a failure
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    peak_tflops: float | None = None     # per-rank peak for MFU; None: measured at start
    bucket_mb: float = 25.0              # data-parallel gradient bucket size
    timeout_s: float = 600.0             # a collective waiting longer than this fails the run
    hang_timeout_s: float = 120.0        # no progress for this long while waiting in a collective: report, end
    threads: int | None = None           # torch threads per rank; None: cores / local ranks

    def __post_init__(self) -> None:
        self.validate()

    def tokenizer_spec(self) -> str:
        """The tokenizer this run encodes text with: ``--tokenizer`` if given, else the one in
        ``--model DIR``, else plait's BPE. A pretrained model never gets fresh token ids: its
        embedding rows stand for its own tokenizer's."""
        from plait.checkpoint.hf_config import is_hf_directory
        from plait.data.hf_tokenizer import has_tokenizer

        pretrained = is_hf_directory(self.model)
        text_data = has_text_source(self.data)
        if self.tokenizer in PLAIT_TOKENIZERS and pretrained and text_data:
            raise TrainConfigError(f"--tokenizer {self.tokenizer} makes new token ids, which the embeddings of "
                                   f"--model {self.model} do not stand for; leave --tokenizer out to use the "
                                   "model's own, or name its tokenizer file")
        if self.tokenizer is not None:
            return self.tokenizer
        if not pretrained:
            return "bpe"
        if has_tokenizer(self.model):
            return self.model
        if text_data:
            raise TrainConfigError(f"--model {self.model} has no tokenizer.json to encode --data {self.data} with: "
                                   "pass --tokenizer PATH, or a .bin tokenized with the model's tokenizer")
        return "bpe"  # a .bin without a tokenizer: nothing is encoded

    def validate(self) -> None:
        positive = ("vocab_size", "nproc", "pp", "tp", "cp", "steps", "global_batch", "seq_len", "eval_batches")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("dp", "micro_batch", "threads", "dp_shard"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        DeviceRequest.parse(self.device)
        if self.zero not in (0, 1, 2, 3):
            raise TrainConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        try:
            self.activation_checkpointing = Recompute.parse(self.activation_checkpointing).value
        except ValueError as error:
            raise TrainConfigError(str(error)) from None
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.microbatches is not None and self.microbatches < 1 or self.virtual_stages < 1:
            raise TrainConfigError("--microbatches and --virtual-stages must be >= 1")
        if self.microbatches is not None and self.micro_batch is not None:
            raise TrainConfigError("give --microbatches or --micro-batch, not both")
        if self.pipeline_split is not None:
            try:
                [int(part) for part in self.pipeline_split.split(",")]
            except ValueError:
                raise TrainConfigError(f"--pipeline-split must be comma-separated block counts, got "
                                       f"{self.pipeline_split!r}") from None
        try:
            parse_data_spec(self.data)
        except DataError as error:
            raise TrainConfigError(str(error)) from None
        if not self.field:
            raise TrainConfigError("--field must name a field")
        if self.dtype not in DTYPES:
            raise TrainConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tokenizer is not None and self.tokenizer not in PLAIT_TOKENIZERS \
                and not Path(self.tokenizer).expanduser().exists():
            raise TrainConfigError(f"--tokenizer {self.tokenizer}: no such file or directory (expected 'bpe', "
                                   "'byte', a tokenizer.json or a directory holding one)")
        if self.out is not None:  # the run directory must be creatable: no file on its path
            for parent in (Path(self.out), *Path(self.out).parents):
                if parent.exists():
                    if not parent.is_dir():
                        raise TrainConfigError(f"--out {self.out}: {parent} is a file, not a directory")
                    break
        if self.on_nonfinite not in [mode.value for mode in OnNonFinite]:
            raise TrainConfigError(f"--on-nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.lr <= 0:
            raise TrainConfigError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.grad_clip < 0 or self.checkpoint_every < 0:
            raise TrainConfigError("--warmup-steps, --eval-every, --grad-clip and --checkpoint-every must be >= 0")
        if self.hang_timeout_s < 0:
            raise TrainConfigError(f"--hang-timeout must be >= 0 (0: off), got {self.hang_timeout_s}")
        if self.max_restarts < 0:
            raise TrainConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if self.keep_checkpoints < 1:
            raise TrainConfigError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0 <= self.label_smoothing < 1:
            raise TrainConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seed < 0:  # the data order's generator takes no negative seed
            raise TrainConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.weight_decay < 0 or self.eps < 0:
            raise TrainConfigError(f"--weight-decay and eps must be >= 0, got {self.weight_decay} and {self.eps}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainConfigError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        for flag, value in (("--timeout", self.timeout_s), ("--bucket-mb", self.bucket_mb),
                            ("--peak-tflops", self.peak_tflops)):
            if value is not None and value <= 0:
                raise TrainConfigError(f"{flag} must be > 0, got {value}")

    @property
    def watchdog_timeout_s(self) -> float:
        """When the hang watchdog ends a stalled job: ``--hang-timeout``, but before ``--timeout``
        would fail the collective without a summary (0: off)."""
        return min(self.hang_timeout_s, 0.9 * self.timeout_s) if self.hang_timeout_s > 0 else 0.0

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_toml(path: str | Path, flag_fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Keys of a TOML config file (flat, or under a [train] table), checked against TrainConfig.

    A key is a long flag without its dashes (``timeout``, ``hang-timeout``), '-' or '_' alike, or
    a TrainConfig field name; ``flag_fields`` maps flag names ('_' for '-') to fields where
    they differ."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TrainConfigError(f"config file {path} is not valid TOML: {error}") from None
    flag_fields = flag_fields or {}
    data = {flag_fields.get(key.replace("-", "_"), key.replace("-", "_")): value
            for key, value in data.get("train", data).items()}
    if isinstance(data.get("data"), dict):  # [train.data] "source" = weight: a mixture
        try:
            data["data"] = format_data_spec(data["data"])
        except DataError as error:
            raise TrainConfigError(f"config file {path}: {error}") from None
    types = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise TrainConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    for key, value in data.items():
        if not _matches(value, str(types[key])):
            raise TrainConfigError(f"config file {path}: {key} = {value!r} is not of type {types[key]}")
    return data


def _matches(value: Any, annotation: str) -> bool:
    """Does a TOML value fit a field annotated like 'int', 'float | None', 'str | None'?"""
    allowed = {part.strip() for part in annotation.split("|")}
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return "int" in allowed or "float" in allowed
    if isinstance(value, float):
        return "float" in allowed
    return isinstance(value, str) and "str" in allowed
