"""`plait train` end to end, and its one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from plait.cli import main
from plait.train import TrainConfig


@pytest.fixture
def text_dir(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(4):
        lines = [f"def function_{index}_{n}(x):\n    return x * {n} + {index}\n" for n in range(300)]
        (corpus / f"part{index}.py").write_text("".join(lines))
    return corpus


def run_plait(args, tmp_path, timeout=240):
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=tmp_path)


def test_train_dp2_tp2_local_workers_end_to_end(text_dir, tmp_path):
    out = tmp_path / "run"
    steps = 12
    second = tmp_path / "records.jsonl"  # a second source, weighted 0.3, its text in field "body"
    second.write_text("".join(json.dumps({"body": f"class C{n}:\n    pass\n" * 20}) + "\n" for n in range(50)))
    result = run_plait(["train", "--model", "tiny", "--data", f"{text_dir}:0.7,{second}:0.3", "--field", "body",
                        "--tokenizer", "byte",
                        "--nproc", "4", "--device", "cpu", "--tp", "2", "--sequence-parallel", "--loss-parallel",
                        "--zero", "1",
                        "--steps", str(steps), "--global-batch", "8", "--micro-batch", "2",
                        "--seq-len", "64", "--lr", "3e-3", "--warmup-steps", "2", "--eval-every", "6",
                        "--out", str(out), "--no-progress"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dp=2 pp=1 tp=2" in result.stdout and "from 2 sources" in result.stdout and "final loss" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(steps))
    for record in records:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gb"):
            assert key in record and record[key] == record[key], key  # present and not NaN
    assert records[-1]["loss"] < records[0]["loss"] - 1.0
    assert [r["step"] for r in records if "val_loss" in r] == [5, 11]
    assert (out / "loss.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))
    run_info = json.loads((out / "config.json").read_text())
    assert run_info["layout"] == {"dp": 2, "pp": 1, "tp": 2, "cp": 1, "dp_shard": None} and run_info["train"]["steps"] == steps
    assert run_info["train"]["sequence_parallel"] and run_info["train"]["loss_parallel"]
    assert run_info["train"]["zero"] == 1 and run_info["train"]["device"] == "cpu"
    assert (run_info["device"], run_info["backend"]) == ("cpu", "gloo")
    assert [(s["spec"], s["weight"]) for s in run_info["data_sources"]] == [(str(text_dir), 0.7), (str(second), 0.3)]
    assert all(s["train_tokens"] > 0 for s in run_info["data_sources"])


@pytest.mark.parametrize("args, message", [
    (["--sequence-parallel"], "--sequence-parallel and --loss-parallel need --tp > 1"),
    (["--nproc", "3", "--tp", "3", "--model", "tiny"], "tp=3 does not divide the model's num_attention_heads = 8"),
    (["--nproc", "2", "--tp", "2", "--seq-len", "33", "--sequence-parallel"], "--seq-len 33 divisible by tp=2"),
    (["--nproc", "2", "--pp", "2", "--model", "tiny"], "--pp 2 needs at least 2 micro-batches per step, got 1"),
    (["--nproc", "2", "--pp", "2", "--model", "tiny", "--microbatches", "4", "--schedule", "interleaved"],
     "needs --virtual-stages >= 2"),
    (["--nproc", "2", "--pp", "2", "--model", "tiny", "--microbatches", "4", "--virtual-stages", "4",
      "--schedule", "interleaved"], "cannot split 4 layers into 8 pipeline chunks"),
    (["--nproc", "3", "--global-batch", "16"], "--global-batch 16 is not divisible by dp=3"),
    (["--dp", "3", "--nproc", "2"], "does not equal the world size 2"),
    (["--model", "nope"], "unknown model preset 'nope'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "gpu"], "--device"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--nproc", "2", "--pp", "2", "--model", "tiny", "--microbatches", "4", "--pipeline-split", "1,2"],
     "--pipeline-split needs 2 positive block counts summing to 4"),
    (["--global-batch", "8", "--micro-batch", "3"], "is not divisible by --micro-batch 3"),
    (["--data", "/definitely/not/here", "--model", "tiny", "--steps", "1"], "does not exist"),
    # before launch: no worker starts to find it missing (a traceback of its peer followed)
    (["--nproc", "2", "--model", "tiny", "--data", "/definitely/not/here:1,/also/not:1"],
     "data path /definitely/not/here does not exist"),
    (["--data", "a.bin:0.7,b.jsonl"], "'b.jsonl' has no weight"),
    (["--data", "a.bin:-1,b.bin:1"], "the weight of 'a.bin' must be a positive number"),
    (["--out", "/proc/plait-run"], "--out /proc/plait-run: cannot create or write the run directory"),
    (["--model", "tiny", "--schedule", "zbv"], "--schedule only apply to pipeline parallel runs"),
    (["--model", "tiny", "--virtual-stages", "2", "--timeline"], "--virtual-stages, --timeline only apply to pipeline"),
    (["--model", "tiny", "--pipeline-split", "2,2"], "--pipeline-split only apply to pipeline parallel runs"),
])
def test_bad_input_is_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path))
    code = main(["train", "--out", str(tmp_path / "out"), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("plait: error:") and message in err, err


def test_a_vocabulary_tp_does_not_divide_passes_the_checks_before_launch(tmp_path, capsys, monkeypatch):
    """A 32001-token Llama fine-tune, saved by transformers itself, at tp=2: split 16001 + 16000
    (no refusal; what stops this run before launch is only its missing data)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32001, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    model.save_pretrained(tmp_path / "finetune")
    capsys.readouterr()  # transformers' own progress bar
    code = main(["train", "--model", str(tmp_path / "finetune"), "--data", "x.bin", "--nproc", "2", "--tp", "2",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "plait: error: data path x.bin does not exist", err


@pytest.mark.parametrize("args, message", [
    (["--model", "llama2-7b"], "this run needs about 134.8 GB per rank (model states 107.8 GB"),
    (["--model", "tiny", "--global-batch", "100000000"],
     "--global-batch 100000000 x --seq-len 128 needs 311.2 GB of token ids per rank x 1 local rank"),
    (["--model", "small", "--nproc", "4", "--global-batch", "4096", "--micro-batch", "1024"], "x 4 local ranks"),
])
def test_a_run_this_host_cannot_hold_is_one_line_before_launch(args, message, capsys, tmp_path, monkeypatch):
    """The planner's estimate against the host's available memory (16 GB here), before any worker starts."""
    import plait.planner.fit
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(plait.planner.fit, "available_host_bytes", lambda: 16 * 10 ** 9)
    code = main(["train", "--out", str(tmp_path / "out"), "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message in err and "more than the 16.0 GB available on this host" in err, err


def test_the_memory_check_passes_what_this_host_trains(tmp_path):
    """The README's medium run on 8 ranks (13.5 GB measured) and the default run fit 24 GB."""
    from plait.mesh import ParallelDims
    from plait.models import get_preset
    from plait.planner.fit import check_host_memory
    medium = TrainConfig(model="medium", zero=3, activation_checkpointing="full", dtype="bfloat16", global_batch=8,
                         micro_batch=1, seq_len=256, out=str(tmp_path))
    check_host_memory(medium, ParallelDims(dp=8), get_preset("medium"), local_ranks=8, available=16 * 10 ** 9)
    check_host_memory(TrainConfig(out=str(tmp_path)), ParallelDims(), get_preset("small"), 1, available=2 * 10 ** 9)


def test_config_file_and_flag_precedence(tmp_path):
    from plait.cli import build_parser
    from plait.train_cli import train_config_from_args
    config = tmp_path / "run.toml"
    config.write_text('[train]\nsteps = 5\nglobal-batch = 4\nmodel = "tiny"\n')
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(config), "--steps", "7"]))
    assert (cfg.steps, cfg.global_batch, cfg.model) == (7, 4, "tiny")
    config.write_text('timeout = 30\nhang-timeout = 5\n')  # keys are the long flags (--timeout, --hang-timeout)
    cfg = train_config_from_args(build_parser().parse_args(["train", "--config", str(config)]))
    assert (cfg.timeout_s, cfg.hang_timeout_s) == (30, 5)
    config.write_text('steps = "many"\n')
    with pytest.raises(ValueError, match="steps = 'many' is not of type int"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(config)]))
    config.write_text('stepz = 3\n')
    with pytest.raises(ValueError, match="unknown key"):
        train_config_from_args(build_parser().parse_args(["train", "--config", str(config)]))


def test_schedule_command_draws_and_prints_the_bubble(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    assert main(["schedule", "--pp", "4", "--microbatches", "8", "--schedule", "1f1b", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "analytic (p-1)/(m+p-1) = 3/(8+3) = 0.2727; simulated 0.2727" in printed
    assert ("NCCL message order: every rank issues its messages in the step's order; 21 receives posted before "
            "they are waited on") in printed
    assert out.stat().st_size > 5000
    assert main(["schedule", "--pp", "4", "--microbatches", "6", "--schedule", "interleaved",
                 "--virtual-stages", "2", "-o", str(out)]) == 2
    assert "multiple of pp=4" in capsys.readouterr().err
    assert main(["schedule", "--pp", "2", "-o", str(tmp_path / "missing" / "s.png")]) == 2
    assert capsys.readouterr().err.strip() == f"plait: error: -o {tmp_path / 'missing' / 's.png'}: the folder " \
                                              f"{tmp_path / 'missing'} does not exist"
    # gpipe over two chunks per rank: the formula has v, as the simulation does
    assert main(["schedule", "--pp", "2", "--microbatches", "8", "--schedule", "gpipe", "--virtual-stages", "2",
                 "-o", str(out)]) == 0
    assert "analytic (p-1)/(v*m+p-1) = 1/(2*8+1) = 0.0588; simulated 0.0588" in capsys.readouterr().out
    # zero bubble: the default backward (2 forwards) split into B = W = 1
    assert main(["schedule", "--pp", "4", "--microbatches", "8", "--schedule", "zb1p", "-o", str(out)]) == 0
    assert "analytic (p-1)/(3m+p-1) = 3/(3*8+3) = 0.1111; simulated 0.1111" in capsys.readouterr().out


def test_pipeline_run_writes_its_measured_timeline(text_dir, tmp_path):
    out = tmp_path / "pp"
    result = run_plait(["train", "--model", "tiny", "--data", str(text_dir), "--tokenizer", "byte", "--nproc", "2",
                        "--pp", "2", "--microbatches", "4", "--schedule", "1f1b", "--steps", "3",
                        "--global-batch", "8", "--seq-len", "32", "--timeline", "--out", str(out), "--no-progress"],
                       tmp_path)
    assert result.returncode == 0, result.stderr
    assert "dp=1 pp=2 tp=1" in result.stdout
    trace = json.loads((out / "timeline.json").read_text())["traceEvents"]
    computed = [e for e in trace if e["ph"] == "X"]
    assert len(computed) == 2 * 2 * 4  # forward and backward of 4 micro-batches on each of 2 ranks
    assert {e["pid"] for e in computed} == {0, 1}
    assert (out / "timeline.png").stat().st_size > 5000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _workers(launcher: int) -> list[int]:
    """The training workers below a launcher (processes running `plait train` whose parent is not one)."""
    tree, frontier = [], [launcher]
    while frontier:
        frontier = [child for pid in frontier for child in _children(pid)]
        tree += frontier
    workers = []
    for pid in tree:
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                variables = environ.read()
        except OSError:
            continue
        if b"TORCHELASTIC_RUN_ID=" in variables and b"LOCAL_RANK=" in variables:
            workers.append(pid)
    return workers


@pytest.mark.large  # 30 s of processes: in `make test-large`; preemption's resume test covers the resume path
def test_killed_worker_is_restarted_and_the_run_finishes_identically(text_dir, tmp_path):
    import random
    import time

    from plait.checkpoint import latest_checkpoint, read_full_state

    def command(out):
        return [sys.executable, "-m", "plait", "train", "--model", "tiny", "--data", str(text_dir), "--tokenizer",
                "byte", "--nproc", "2", "--steps", "12", "--global-batch", "4", "--seq-len", "64",
                "--checkpoint-every", "2", "--max-restarts", "2", "--out", str(out), "--no-progress",
                "--no-tensorboard", "--no-plot"]

    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    clean = subprocess.run(command(tmp_path / "clean"), capture_output=True, text=True, env=env, timeout=240)
    assert clean.returncode == 0, clean.stderr
    killed_at = random.Random().randint(3, 9)
    launcher = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= killed_at:
            break
        time.sleep(0.05)
    victims = _workers(launcher.pid)
    assert victims, "no worker found to kill"
    os.kill(random.choice(victims), signal.SIGKILL)
    stdout, stderr = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, stderr
    assert "resuming from" in stdout + stderr
    want = read_full_state(latest_checkpoint(tmp_path / "clean"))
    got = read_full_state(latest_checkpoint(tmp_path / "killed"))
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000012"
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key  # bitwise: the restarted run replays the same steps


def test_rank_zero_failing_to_read_the_data_is_one_line_from_each_rank(tmp_path):
    """Rank 0 reads the corpus while the others wait in a (recorded) barrier: they say their peer
    failed in one line each, no traceback, and the launcher names rank 0's exit as the cause. (When
    the launcher stops rank 1 before its barrier notices, rank 1 says nothing: a race, either way.)"""
    (tmp_path / "empty").mkdir()
    result = run_plait(["train", "--model", "tiny", "--data", str(tmp_path / "empty"), "--tokenizer", "byte",
                        "--nproc", "2", "--out", str(tmp_path / "o"), "--no-progress"], tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"plait: error: data path {tmp_path / 'empty'} is empty (no non-empty text files)", lines
    assert lines[-1] == "plait: error: worker rank 0 exited with code 2 (exit code 2; its message, if any, is above)"
    assert len(lines) in (2, 3), lines
    assert all(line.startswith("plait: rank 1: a collective failed in world/barrier") for line in lines[1:-1]), lines


def test_the_launcher_names_the_worker_that_ended_the_job():
    from plait.launch import cause_of
    term, kill = -signal.SIGTERM, -signal.SIGKILL
    assert cause_of({0: (2, 10.0), 1: (term, 11.0)}) == 0   # rank 1 was stopped by the agent: not the cause
    assert cause_of({0: (1, 10.0), 1: (kill, 12.0)}) == 1   # a kill is the cause, whatever failed first
    assert cause_of({0: (1, 12.0), 1: (1, 10.0)}) == 1      # else the earliest failure
    assert cause_of({1: (term, 5.0), 0: (term, 5.0)}) == 0  # only stopped workers: the first rank of them


def test_dead_peer_without_restart_ends_the_run_quickly_with_a_message(text_dir, tmp_path):
    import time

    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "plait", "train", "--model", "tiny", "--data", str(text_dir), "--tokenizer", "byte",
         "--nproc", "2", "--steps", "100000", "--global-batch", "4", "--seq-len", "64", "--out", str(tmp_path / "o"),
         "--no-progress", "--no-tensorboard", "--no-plot"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env)
    metrics = tmp_path / "o" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    victim = _workers(launcher.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=90)
    assert time.monotonic() - killed < 60
    assert launcher.returncode != 0
    assert "was killed by signal 9" in stderr and "plait: error: worker rank" in stderr
    assert "a collective failed" in stderr or "Traceback" not in stderr  # the survivor says why, in one line


@pytest.mark.parametrize("args, mode", [([], "none"), (["--activation-checkpointing"], "full"),
                                        (["--activation-checkpointing", "selective"], "selective"),
                                        (["--activation-checkpointing", "full"], "full"),
                                        (["--no-activation-checkpointing"], "none")])
def test_activation_checkpointing_modes(args, mode):
    from plait.cli import build_parser
    from plait.train_cli import train_config_from_args

    assert train_config_from_args(build_parser().parse_args(["train", *args])).activation_checkpointing == mode


def test_activation_checkpointing_in_toml(tmp_path):
    from plait.train.config import TrainConfigError, load_toml

    for value, mode in (("true", "full"), ("false", "none"), ('"selective"', "selective")):
        (tmp_path / "c.toml").write_text(f"activation_checkpointing = {value}\n")
        assert TrainConfig(**load_toml(tmp_path / "c.toml")).activation_checkpointing == mode
    with pytest.raises(TrainConfigError, match="must be one of none, selective, full"):
        TrainConfig(activation_checkpointing="partial")


@pytest.mark.parametrize("setting, message", [
    (dict(seed=-1), "--seed must be >= 0, got -1"),
    (dict(weight_decay=-0.1), "--weight-decay and eps must be >= 0"),
    (dict(beta2=1.0), "beta1 and beta2 must be in [0, 1), got 0.9 and 1.0"),
    (dict(timeout_s=0), "--timeout must be > 0, got 0"),
    (dict(bucket_mb=-5.0), "--bucket-mb must be > 0"),
    (dict(peak_tflops=0.0), "--peak-tflops must be > 0"),
])
def test_numeric_settings_out_of_range_are_one_line(setting, message):
    """Before: --seed -1 reached the data sampler and ended in a traceback; a TOML beta2 = 1 in
    AdamW's constructor."""
    from plait.train.config import TrainConfigError

    with pytest.raises(TrainConfigError) as caught:
        TrainConfig(**setting)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`plait plan ... | head -1`: the reader goes away before the table is written; the command
    ends with the shell's code for a broken pipe and no traceback."""
    process = subprocess.Popen([sys.executable, "-m", "plait", "plan", "--model", "tiny", "--seq-len", "256",
                                "--global-batch", "8", "--gpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdout.close()  # before the first line: every write fails
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGPIPE and errors == ""


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["generate", "--help"],
                                  ["plan", "--model", "tiny", "--seq-len", "256", "--global-batch", "8", "--gpus", "2"],
                                  ["train", "--nproc", "0"]])
def test_help_plans_and_flag_errors_answer_without_importing_torch(args):
    """Importing torch takes ~1.5 s here: the parser, the planner and argument errors do without it."""
    probe = ("import sys\nfrom plait.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    assert result.stderr.splitlines()[-1] == "no torch", result.stderr
