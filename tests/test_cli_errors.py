"""Every mistake a user can make with the three CLIs is one line on stderr and a non-zero exit, found before
anything is written (issue 25): flagdit-train's config, world and environment checks, its run-directory and
resume checks, divergence; flagdit-sample's captions, limits and outputs; flagdit-bench's device, --json, --ops
and report inputs. In-process with capsys where the CLI allows; one torchrun job for the per-rank checks."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.helpers import free_port

import flagdit_kernels as fk
from flagdit import checkpoint
from flagdit.cli import distributed, train
from flagdit.cli.run_dir import RunDirError
from flagdit.cli.sample import main as sample_main
from flagdit.data import WordEncoder
from flagdit_kernels.bench.cli import main as bench_main
from flagdit_kernels.bench.results import report

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "dim=64", "--set", "n_layers=1", "--batch-size", "2", "--warmup", "1", "--no-progress",
         "--threads", "1"]  # fmt: skip
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def _one_line(capsys, exit: pytest.ExceptionInfo, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert exit.value.code == code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-step flagdit-train run (its checkpoint), trained once for the module."""
    out = tmp_path_factory.mktemp("run")
    train.train(train.parse_args([*SMALL, "--out", str(out), "--steps", "1"]))
    return out


@pytest.fixture(scope="module")
def run_files(run_dir) -> dict[str, bytes]:
    """Every file of the run directory, as the first run left it."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


# ---------------------------------------------------------------------------------------------------------
# flagdit-train: argument, config, environment and world mistakes (exit 2, nothing on disk).

TRAIN_ARGUMENTS = [
    (["--set", "n_heads=0"], {}, "n_heads must be >= 1, got 0"),
    (["--set", "dim=32"], {}, "head_dim = dim / n_heads = 32 / 4 = 8"),
    (["--set", "multiple_of=0"], {}, "multiple_of must be >= 1"),
    (["--set", "patch_size=0"], {}, "patch_size must be >= 1"),
    (["--set", "patch_size=3"], {}, "the patch size must divide 8"),
    (["--set", "norm_eps=-1"], {}, "norm_eps must be a finite number > 0"),
    (["--set", "cap_feat_dim=0"], {}, "cap_feat_dim must be >= 1"),
    (["--set", "in_channels=1"], {}, "--set in_channels=1: image data has 3 channels"),
    (["--sp", "2"], {}, "run under torchrun with a multiple of 2 processes (this is 1)"),
    (["--dist", "ddp", "--sp", "2"], {}, "run under torchrun with a multiple of 2 processes (this is 1)"),
    (["--seed", str(10**20)], {}, "argument --seed: expected an integer seed in [0, 4294967295]"),
    (["--views", "100000"], {}, "argument --views: expected an integer in [1, 64]"),
    ([], {"FLAGDIT_KERNELS_BACKEND": "garbage"}, "FLAGDIT_KERNELS_BACKEND='garbage' is not a backend"),
    (["--sp", "3"], {"WORLD_SIZE": "2"}, "a multiple of 3 processes (this is 2)"),
    (["--sp", "2", "--sp-strategy", "ulysses", "--set", "n_heads=3", "--set", "dim=48"], {"WORLD_SIZE": "2"},
     "--sp-strategy ulysses: n_heads (3) must be divisible by the sequence-parallel group size"),
    (["--batch-size", "3"], {"WORLD_SIZE": "2"}, "--batch-size 3 must be divisible by the 2 data-parallel ranks"),
    (["--attention-window", "2,2"], {}, "argument --attention-window: expected three integers >= 1 as FRAMES,ROWS"),
    (["--attention-window", "1,0,1"], {}, "argument --attention-window: expected three integers >= 1"),
    (["--attention-top-k", "0"], {}, "argument --attention-top-k: expected an integer >= 1, got '0'"),
    (["--attention-tile", "1,x,2"], {}, "argument --attention-tile: expected three integers >= 1"),
    (["--attention-top-k", "2", "--sp", "2"], {"WORLD_SIZE": "2"},
     "--sp 2: tile-sparse attention (--attention-window / --attention-top-k) runs on one rank"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "env", "message"), TRAIN_ARGUMENTS, ids=[" ".join(a) or str(e) for a, e, _ in
                                                                            TRAIN_ARGUMENTS])  # fmt: skip
def test_train_argument_mistakes_are_one_line_before_anything_exists(argv, env, message, tmp_path, capsys,
                                                                     monkeypatch, run_dir, run_files):  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--steps", "1", "--out", str(out), *argv])  # a later option wins over SMALL's
    _one_line(capsys, exit, 2, "flagdit-train: error: ", message)
    assert not out.exists()
    with pytest.raises(SystemExit) as exit:  # the same beside a run to resume: it stays as it was
        train.main([*SMALL, "--steps", "2", "--out", str(run_dir), "--resume", *argv])
    _one_line(capsys, exit, 2, "flagdit-train: error: ", message)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == run_files


@NO_CUDA
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_train_backend_that_cannot_run_here(backend, tmp_path, capsys):
    if backend in fk.available_backends("rms_norm", "cpu") + fk.available_backends("varlen_attention", "cpu"):
        pytest.skip(f"{backend} runs on this CPU (TRITON_INTERPRET=1)")
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(tmp_path / "out"), "--backend", backend])
    _one_line(capsys, exit, 2, f"--backend {backend} cannot run on this machine's cpu")
    assert not (tmp_path / "out").exists()


def test_train_audio_without_librosa(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "librosa" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(tmp_path / "out"), "--modality", "mixed"])
    _one_line(capsys, exit, 2, "--modality mixed needs librosa")


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, timeout: seen.update(timeout=timeout))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 1)
    monkeypatch.setenv("MASTER_PORT", "1")
    distributed.setup_distributed("ddp", 7.5)
    assert seen["timeout"].total_seconds() == 7.5
    assert train.parse_args([]).dist_timeout == distributed.DEFAULT_DIST_TIMEOUT_S


def test_every_torchrun_rank_reports_the_same_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "flagdit.cli.train", *SMALL, "--batch-size", "3", "--out",
           str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("flagdit-train: error: ")]
    assert proc.returncode != 0 and len(lines) == 2, proc.stderr[-3000:]
    assert all("--batch-size 3 must be divisible by the 2 data-parallel ranks" in line for line in lines)
    assert "ValueError" not in proc.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# flagdit-train: what is at OUT/ckpt.pt, and checkpoints that pass their checksum but do not fit (exit 1).


def _odd_checkpoint_paths(out: Path) -> dict:
    def dangling():
        out.joinpath("ckpt.pt").symlink_to(out / "gone.pt")

    def loop():
        out.joinpath("ckpt.pt").symlink_to(out / "other.pt")
        out.joinpath("other.pt").symlink_to(out / "ckpt.pt")

    return {"dangling": (dangling, "does not resolve"), "loop": (loop, "does not resolve"),
            "directory": (lambda: out.joinpath("ckpt.pt").mkdir(), "is a directory, not a checkpoint")}  # fmt: skip


@pytest.mark.parametrize("kind", ["dangling", "loop", "directory"])
@pytest.mark.parametrize("again", ["--resume", "--overwrite", None])
def test_anything_at_ckpt_pt_but_a_checkpoint_is_an_error_never_a_fresh_start(kind, again, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    make, message = _odd_checkpoint_paths(out)[kind]
    make()
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(out), "--steps", "1", *([again] if again else [])])
    _one_line(capsys, exit, 1, f"{out / 'ckpt.pt'}", message)
    assert os.path.lexists(out / "ckpt.pt") and not (out / "ckpt.pt").is_file()  # left as it was
    assert not (out / "log.jsonl").exists()


def test_debug_shows_the_traceback(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").mkdir()
    with pytest.raises(RunDirError, match="is a directory"):
        train.main([*SMALL, "--out", str(out), "--resume", "--debug"])


def _misfits(run_dir: Path) -> dict:
    good = checkpoint.load_training_checkpoint(run_dir / "ckpt.pt")
    other = checkpoint.load_training_checkpoint(run_dir / "ckpt.pt")
    other["config"] = {**good["config"], "dim": 128}
    return {
        "other config's weights": (other, "the checkpoint's weights do not fit its config: wrong shapes"),
        "no step": ({k: v for k, v in good.items() if k != "step"}, "its step must be an int >= 0, got None"),
        "step as a string": ({**good, "step": "3"}, "its step must be an int >= 0, got '3'"),
        "config not a dict": ({**good, "config": "tiny"}, "its config is a str, not a dict of FlagDiTConfig fields"),
    }


@pytest.mark.parametrize("case", ["other config's weights", "no step", "step as a string", "config not a dict"])
def test_resume_and_sample_give_one_error_for_a_checkpoint_that_does_not_fit(case, run_dir, tmp_path, capsys):
    body, message = _misfits(run_dir)[case]
    out = tmp_path / "out"
    out.mkdir()
    checkpoint.save_training_checkpoint(out / "ckpt.pt", body)  # a valid checksum over content that does not fit
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(out), "--resume", "--steps", "3"])
    _one_line(capsys, exit, 1, f"flagdit-train: error: {out / 'ckpt.pt'}: ", message)
    assert (out / "ckpt.pt").read_bytes() == before
    if case in ("no step", "step as a string"):
        return  # sampling does not read the step
    with pytest.raises(SystemExit) as exit:
        sample_main(["--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "s.png"), "--no-progress"])
    _one_line(capsys, exit, 2, f"flagdit-sample: error: --ckpt: {out / 'ckpt.pt'}: ", message)


def test_a_run_that_diverges_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    train.main([*SMALL, "--out", str(out), "--steps", "3"])  # the reproduction
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(out), "--resume", "--steps", "8", "--lr", "1e3"])  # a typo for 1e-3
    _one_line(capsys, exit, 1, "flagdit-train: error: training diverged at step ", f"{out / 'ckpt.pt'} still "
              "holds step 3")  # fmt: skip
    assert (out / "ckpt.pt").read_bytes() == before


def test_non_finite_weights_are_never_saved_even_with_a_finite_loss(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    real_step = torch.optim.AdamW.step
    steps = []

    def poisoning_step(self, *args, **kwargs):  # the third update leaves an inf weight (its loss was finite)
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(out), "--steps", "5", "--save-every", "1"])
    _one_line(capsys, exit, 1, "training diverged at step 3: the weights are not finite", "still holds step 2")
    state = checkpoint.load_training_checkpoint(out / "ckpt.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


# ---------------------------------------------------------------------------------------------------------
# flagdit-sample: captions, limits, outputs (exit 2, checked before any sampling, nothing written).

SAMPLE_ARGUMENTS = [
    (["--modality", "image", "--caption", "a purple elephant"], "'elephant' not in the vocabulary"),
    (["--modality", "image", "--caption", "a red circle on blue a red circle on blue"], "has 10 words; the encoder "
     "takes at most 8"),
    (["--modality", "mixed", "--audio-caption", "a loud tone"], "--audio-caption: caption 'a loud tone': 'loud'"),
    (["--modality", "image", "--out", "{tmp}"], "is a directory, not a file"),
    (["--modality", "image", "--out", "{tmp}/grid"], "no picture format for the extension '(none)'"),
    (["--modality", "image", "--out", "{ckpt}/x.png"], "is not a directory"),
    (["--modality", "video", "--out", "{tmp}/a.png", "--dir", "{tmp}/a_video.png"], "a_video.png is a directory"),
    (["--seed", str(10**20)], "argument --seed"),
    (["--modality", "image", "--sizes", "2048x2048"], "--sizes: 2048x2048 is larger than 1024 pixels on a side"),
    (["--modality", "image", "--sizes", "512x512"], "more than the 8192 one sample may hold"),
    (["--modality", "image", "--sizes", "8x1024", "--scale", "16"], "pictures of more than 4096 pixels a side"),
    (["--frames", "100000"], "argument --frames: expected an integer in [1, 64]"),
    (["--modality", "video", "--frames", "64", "--video-size", "128x128"], "--frames/--video-size: one sample"),
    (["--views", "100000"], "argument --views: expected an integer in [1, 64]"),
    (["--modality", "multiview", "--views", "64", "--view-size", "64x64"], "--views/--view-size: one sample"),
    (["--scale", "100000"], "argument --scale: expected an integer in [1, 16]"),
    (["--modality", "audio", "--duration", "1000"], "--duration 1000: one sample of shape (1, 64, 62500)"),
    (["--modality", "audio", "--duration", "1e300"], "--duration 1e+300: one sample"),
    (["--attention-window", "1,2,2,2"], "argument --attention-window: expected three integers >= 1"),
    (["--attention-top-k", "two"], "argument --attention-top-k: expected an integer >= 1"),
    (["--attention-tile", "0,4,4"], "argument --attention-tile: expected three integers >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), SAMPLE_ARGUMENTS, ids=[" ".join(a) for a, _ in SAMPLE_ARGUMENTS])
def test_sample_mistakes_are_one_line_before_any_sampling(argv, message, run_dir, tmp_path, capsys, monkeypatch):
    argv = [a.format(tmp=tmp_path, ckpt=run_dir / "ckpt.pt") for a in argv]
    if "--dir" in argv:  # a directory where an output beside --out goes
        i = argv.index("--dir")
        Path(argv[i + 1]).mkdir()
        del argv[i : i + 2]
    sampled = []
    monkeypatch.setattr("flagdit.cli.sample.Sampler.__call__", lambda *a, **k: sampled.append(1))
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit:
        sample_main(["--ckpt", str(run_dir / "ckpt.pt"), "--no-progress", "--steps", "1",
                     *(["--out", str(tmp_path / "s.png")] if "--out" not in argv else []), *argv])  # fmt: skip
    _one_line(capsys, exit, 2, "flagdit-sample: error: ", message)
    assert not sampled and set(tmp_path.iterdir()) == before


@NO_CUDA
def test_sample_backend_cuda_without_cuda(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        sample_main(["--ckpt", str(run_dir / "ckpt.pt"), "--out", str(tmp_path / "s.png"), "--backend", "cuda"])
    _one_line(capsys, exit, 2, "--backend cuda cannot run on this machine's cpu")


def test_sample_reads_args_that_are_not_a_dict_as_a_checkpoint_error(run_dir, tmp_path, capsys):
    body = checkpoint.load_training_checkpoint(run_dir / "ckpt.pt")
    checkpoint.save_training_checkpoint(tmp_path / "c.pt", {**body, "args": "image"})
    with pytest.raises(SystemExit) as exit:
        sample_main(["--ckpt", str(tmp_path / "c.pt"), "--out", str(tmp_path / "s.png")])
    _one_line(capsys, exit, 2, "its args is a str, not a dict")


def test_captions_are_read_case_insensitively():
    encoder = WordEncoder(16)
    upper, lower = encoder(["A Red CIRCLE on blue"]), encoder(["a red circle on blue"])
    assert torch.equal(upper[0], lower[0]) and torch.equal(upper[1], lower[1])


# ---------------------------------------------------------------------------------------------------------
# flagdit-bench: device, --json, --ops, report inputs.

BENCH_ARGUMENTS = [
    (["--device", "garbage"], "--device 'garbage' is not a torch device"),
    (["--device", "meta"], "not meta"),
    (["--json", "{tmp}/missing/b.json"], "does not exist"),
    (["--json", "{tmp}"], "is a directory"),
    (["--rep-ms", "-1"], "argument --rep-ms: expected a number of milliseconds > 0, got '-1'"),
    (["--families", "packing", "--ops", "pakc"], "--ops: no case of ['pakc'] in the families packing; their ops: "),
]


@pytest.mark.parametrize(("argv", "message"), BENCH_ARGUMENTS, ids=[" ".join(a) for a, _ in BENCH_ARGUMENTS])
def test_bench_mistakes_are_one_line_before_the_run(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        bench_main([a.format(tmp=tmp_path) for a in argv])
    err = _one_line(capsys, exit, 2, "flagdit-bench: error: ", message)
    assert "measured ceilings" not in capsys.readouterr().out
    if "--ops" in argv:
        assert "pack" in err.split("their ops: ")[1]


@NO_CUDA
def test_bench_device_cuda_without_cuda(capsys):
    with pytest.raises(SystemExit) as exit:
        bench_main(["--device", "cuda"])
    _one_line(capsys, exit, 2, "--device cuda: this machine has no CUDA device")


@pytest.mark.parametrize("text", ['{"rows": null}', '{"rows": [1]}', '{"benchmarks": [1]}', "not json", "[1, 2]",
                                  '{"rows": [{"op": "x"}]}'])  # fmt: skip
def test_report_on_malformed_json_is_one_line(text, tmp_path, capsys):
    (tmp_path / "b.json").write_text(text)
    assert report.main([str(tmp_path / "b.json"), "--md", str(tmp_path / "r.md"), "--png", ""]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"flagdit-bench report: {tmp_path / 'b.json'}"), err
    assert not (tmp_path / "r.md").exists()
