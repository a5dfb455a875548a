"""flagdit-train / flagdit-sample: every modality end to end, resume, the run directory's safety rules, argument
errors, and --help."""

from __future__ import annotations

import json
import re
import wave

import pytest
import torch

from flagdit import checkpoint, data
from flagdit.cli import run_dir, train
from flagdit.cli.sample import build_parser as sample_parser
from flagdit.cli.sample import main as sample_main
from flagdit.data import audio
from flagdit.sampling import sample

# The audio data set needs librosa (the [audio] extra), which the GPU machine's image lacks.
pytest.importorskip("librosa", reason="the audio modality needs librosa (pip install 'flagdit-kernels[audio]')")

SMALL = ["--set", "dim=64", "--set", "n_layers=2", "--batch-size", "4", "--warmup", "1", "--lr", "3e-3",
         "--no-progress", "--threads", "1", "--log-every", "1"]  # fmt: skip
STEPS = 6


def _run(out, *extra) -> list[float]:
    return train.train(train.parse_args([*SMALL, "--out", str(out), *extra]))


def _log_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per data set: {modality: (losses, checkpoint path)}."""
    runs = {}
    for modality in data.DATASETS:
        out = tmp_path_factory.mktemp(modality)
        runs[modality] = (_run(out, "--modality", modality, "--steps", str(STEPS)), out / "ckpt.pt")
    return runs


@pytest.mark.parametrize("modality", data.DATASETS)
def test_every_modality_trains_with_falling_loss(trained, modality):
    losses, _ = trained[modality]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses


@pytest.mark.parametrize("modality", data.MODALITIES)
def test_every_modality_samples_finite_latents_of_its_shape(trained, modality):
    model = checkpoint.model_from_checkpoint(trained[modality][1]).eval()
    item = data.make_item(0, 0, modality=modality)
    shape = tuple(item.latent.shape)
    feats, mask = data.WordEncoder(model.config.cap_feat_dim)([item.caption] * 2)
    kwargs = model.conditioning_inputs([modality] * 2, [item.cameras] * 2)
    assert set(kwargs) == ({"modality", "cameras"} if modality == "multiview" else {"modality"})
    out = sample(model, [shape, shape], feats, mask, steps=2, cfg_scale=2.0, **kwargs)
    assert [tuple(o.shape) for o in out] == [shape, shape] and all(torch.isfinite(o).all() for o in out)


def test_sample_cli_writes_every_modalitys_outputs(trained, tmp_path):
    from PIL import Image

    out = tmp_path / "s.png"
    sample_main(["--ckpt", str(trained["mixed"][1]), "--out", str(out), "--steps", "1", "--scale", "1",
                 "--sizes", "8x8", "8x16", "--caption", "a red circle on blue", "--video-caption",
                 "a red bar on white moving up", "--frames", "3", "--video-size", "8x8", "--view-caption",
                 "a red cube", "--views", "5", "--view-size", "8x8", "--audio-caption", "a low tone",
                 "--audio-caption", "a rising high tone", "--duration", "0.25", "--no-progress"])  # fmt: skip
    assert Image.open(out).size == (4 + 8 + 4 + 16 + 4, 4 + 8 + 4)  # one caption row, two sizes
    assert Image.open(tmp_path / "s_video.png").size == (4 + 3 * (8 + 4), 4 + 8 + 4)
    ring = Image.open(tmp_path / "s_views.png")
    assert ring.size[0] == ring.size[1] > 3 * 8  # five views around a circle
    frames = audio.frames_for(0.25)
    assert Image.open(tmp_path / "s_audio.png").size == (4 + frames + 4, 4 + 2 * (audio.N_MELS + 4))
    for k in range(2):
        with wave.open(str(tmp_path / f"s_audio_{k}.wav")) as f:
            assert (f.getframerate(), f.getnframes()) == (audio.SAMPLE_RATE, audio.samples_for(frames))


def test_sample_cli_defaults_follow_the_checkpoints_data(trained, tmp_path):
    sample_main(["--ckpt", str(trained["image"][1]), "--out", str(tmp_path / "a.png"), "--steps", "1",
                 "--sizes", "8x8", "--caption", "an orange bar on black", "--no-progress"])  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_video.png"]  # image runs hold clips too
    sample_main(["--ckpt", str(trained["multiview"][1]), "--out", str(tmp_path / "b.png"), "--steps", "1",
                 "--view-caption", "a green cube", "--no-progress"])  # fmt: skip
    assert (tmp_path / "b_views.png").exists() and not (tmp_path / "b.png").exists()


def test_resume_continues_the_same_trajectory(tmp_path):
    straight = _run(tmp_path / "a", "--steps", "4")
    first = _run(tmp_path / "b", "--steps", "2")
    rest = _run(tmp_path / "b", "--steps", "4", "--resume")
    assert len(straight) == 4 and len(first) == 2 and len(rest) == 2
    assert first + rest == straight
    ckpt = checkpoint.load_training_checkpoint(tmp_path / "b" / "ckpt.pt")
    assert ckpt["step"] == 4 and ckpt["config"]["dim"] == 64 and ckpt["args"]["modality"] == "image"
    assert _log_steps(tmp_path / "b") == [1, 2, 3, 4]


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    """A run killed after its last checkpoint logged steps the resumed run trains again (and maybe half a line)."""
    _run(tmp_path, "--steps", "2")
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    _run(tmp_path, "--steps", "3", "--resume")
    assert _log_steps(tmp_path) == [1, 2, 3]


def test_a_checkpoint_is_never_silently_overwritten(tmp_path):
    _run(tmp_path, "--steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(run_dir.RunDirError, match="pass --resume to continue that run or --overwrite"):
        _run(tmp_path, "--steps", "2")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert _run(tmp_path, "--steps", "1", "--overwrite")
    assert checkpoint.load_training_checkpoint(tmp_path / "ckpt.pt")["step"] == 1 and _log_steps(tmp_path) == [1]


def test_a_second_run_on_one_directory_is_refused(tmp_path, capsys):
    held = run_dir.lock_run_dir(tmp_path)  # as a first run holds it
    try:
        with pytest.raises(run_dir.RunDirError, match="in use by another flagdit-train"):
            _run(tmp_path, "--steps", "1")
    finally:
        held.close()
    assert _run(tmp_path, "--steps", "1")  # free again once the first run ends
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        train.main([*SMALL, "--out", str(tmp_path), "--steps", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.count("\n") == 1, err
    assert re.match(r"flagdit-train: error: .* exists: pass --resume", err), err


def test_checkpoints_are_written_atomically_and_durably(tmp_path, monkeypatch):
    synced = []
    real_fsync = train.os.fsync
    monkeypatch.setattr(train.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    replaced = []
    real_replace = train.os.replace
    monkeypatch.setattr(train.os, "replace", lambda a, b: replaced.append((len(synced), b)) or real_replace(a, b))
    _run(tmp_path, "--steps", "2", "--save-every", "1")
    ckpt_renames = [(n, b) for n, b in replaced if str(b).endswith("ckpt.pt")]
    assert len(ckpt_renames) == 2 and all(n > 0 for n, _ in ckpt_renames)  # fsync before each rename
    assert len(synced) >= 2 * 3  # per checkpoint: the log, the file, the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "ckpt.pt", "log.jsonl"]  # no temp files left


BAD_OPTIONS = [
    ("flagdit-train", ["--steps", "-5"], "argument --steps"),
    ("flagdit-train", ["--steps", "0"], "argument --steps"),
    ("flagdit-train", ["--save-every", "0"], "argument --save-every"),
    ("flagdit-train", ["--log-every", "0"], "argument --log-every"),
    ("flagdit-train", ["--batch-size", "0"], "argument --batch-size"),
    ("flagdit-train", ["--backend", "bogus"], "argument --backend"),
    ("flagdit-train", ["--cap-dropout", "2"], "argument --cap-dropout"),
    ("flagdit-train", ["--video-fraction", "-1"], "argument --video-fraction"),
    ("flagdit-train", ["--modality", "smell"], "argument --modality"),
    ("flagdit-train", ["--views", "0"], "argument --views"),
    ("flagdit-train", ["--lr", "0"], "argument --lr"),
    ("flagdit-train", ["--lr", "nan"], "argument --lr"),
    ("flagdit-train", ["--warmup", "-1"], "argument --warmup"),
    ("flagdit-train", ["--grad-clip", "-1"], "argument --grad-clip"),
    ("flagdit-train", ["--threads", "-2"], "argument --threads"),
    ("flagdit-train", ["--set", "dimm=3"], "argument --set"),
    ("flagdit-train", ["--set", "dim=7"], "--config/--set: dim (7) must be divisible by n_heads"),
    ("flagdit-train", ["--config", "huge"], "argument --config"),
    ("flagdit-train", ["--resume", "--overwrite"], "argument --overwrite"),
    ("flagdit-sample", ["--steps", "0"], "argument --steps"),
    ("flagdit-sample", ["--views", "0"], "argument --views"),
    ("flagdit-sample", ["--modality", "smell"], "argument --modality"),
    ("flagdit-sample", ["--duration", "0"], "argument --duration"),
    ("flagdit-sample", ["--sizes", "16"], "argument --sizes"),
    ("flagdit-sample", ["--frames", "0"], "argument --frames"),
    ("flagdit-sample", ["--backend", "bogus"], "argument --backend"),
    ("flagdit-sample", ["--solver", "rk4"], "argument --solver"),
]
PARSERS = {"flagdit-train": train.parse_args, "flagdit-sample": lambda argv: sample_parser().parse_args(argv)}


@pytest.mark.parametrize(
    ("prog", "argv", "message"), BAD_OPTIONS, ids=[f"{p} {' '.join(a)}" for p, a, _ in BAD_OPTIONS]
)
def test_bad_options_are_argparse_errors(prog, argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        PARSERS[prog](argv)
    assert exit.value.code == 2 and f"{prog}: error: {message}" in capsys.readouterr().err


def test_sample_errors_that_need_the_checkpoint(trained, tmp_path, capsys):
    ckpt = str(trained["audio"][1])
    cases = [
        (["--ckpt", str(tmp_path / "none.pt")], "--ckpt: no such file"),
        (["--ckpt", ckpt, "--duration", "0.01"], "--duration: duration 0.01 s is too short for one patch"),
        (["--ckpt", ckpt, "--modality", "image", "--sizes", "15x16"], "--sizes: 15x16 is not a multiple"),
    ]
    torch.save({"x_embedder.weight": torch.zeros(2, 2)}, tmp_path / "lumina.pth")
    cases.append((["--ckpt", str(tmp_path / "lumina.pth")], "is not a flagdit-train checkpoint: it is a bare"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit:
            sample_main([*argv, "--out", str(tmp_path / "x.png"), "--no-progress"])
        assert exit.value.code == 2 and message in capsys.readouterr().err, argv


@pytest.mark.parametrize("parser", [train.build_parser, sample_parser], ids=["flagdit-train", "flagdit-sample"])
def test_help_states_every_default_and_reads_as_plain_text(parser):
    p = parser()
    text = p.format_help()
    assert "`" not in text
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and "default" in p.formatter_class("x")._get_help_string(action), action.dest
