"""flagdit-bench prints a real table (CPU, quick shapes) a newcomer can read, and writes its JSON."""

import json
import subprocess
import sys

import pytest

from flagdit_kernels.bench.cli import format_row, main, noise_warnings


def test_cli_prints_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--families", "packing", "--rep-ms", "5", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "measured ceilings: copy" in text
    assert "CPU run:" in text and "need a GPU" in text
    assert "% peak: GB/s as a share of the measured copy bandwidth" in text
    lines = text.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("op ")]
    assert len(header) == 1, "one header"
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ms_min"] <= r["ms"] <= r["ms_max"] for r in rows)
    assert {r["impl"] for r in rows} >= {"reference", "python loop"}
    table = [line for line in lines[header[0] + 2 :] if line and not line.startswith("warning")]
    assert len(table) == len(rows), "each row once, after the header"
    for line, row in zip(table, rows):
        assert line.startswith(row["op"]) and f" {row['impl']} " in line
    assert "nan" not in text


def test_rows_show_spread_and_dashes():
    row = {"op": "pack", "shape": "s", "direction": "fwd", "impl": "cpu", "ms": 2.0, "ms_min": 1.5, "ms_max": 3.25}
    line = format_row({**row, "GB/s": 4.0, "TFLOP/s": None}, copy_gbs=8.0, mm_tflops=1.0)
    assert "1.500-3.250" in line and line.split()[-3:] == ["4.0", "-", "50.0"]
    assert format_row({**row, "GB/s": None, "TFLOP/s": None}, 8.0, 1.0).split()[-3:] == ["-", "-", "-"]
    broken = format_row({"op": "pack", "shape": "s", "direction": "fwd", "impl": "triton", "error": "E: x"}, 8.0, 1.0)
    assert broken.endswith("E: x")


@pytest.mark.parametrize(
    ("ceilings", "share", "expected"),
    [
        ({"copy GB/s": (10.0, 10.5)}, 50.0, []),
        ({"copy GB/s": (10.0, 7.0)}, 50.0, ["too busy"]),
        ({"matmul TFLOP/s": (1.0, 1.0)}, 130.0, ["above 100%"]),
    ],
)
def test_noise_warnings(ceilings, share, expected):
    rows = [{"op": "rms_norm", "impl": "cpu", "GB/s": share / 10}]
    found = noise_warnings(rows, ceilings, copy_gbs=10.0, mm_tflops=1.0)
    assert len(found) == len(expected) and all(w in f for w, f in zip(expected, found))


def test_help_shows_the_report_command_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "flagdit-bench report JSON..." in text.split("\n\n")[0], "the usage names the report command"
    assert "(default: 100 on GPU, 40 on CPU)" in " ".join(text.split()) and "`" not in text


@pytest.mark.parametrize("name", ["report", "warm", "compile-report", "bandwidth-report"])
def test_every_measurement_tool_is_a_subcommand(name, capsys):
    """flagdit-bench is the one entry point: each tool answers --help under its subcommand's name, and the
    table's --help lists them all."""
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: flagdit-bench {name} ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"\n  {name} " in capsys.readouterr().out


def test_families_are_discovered_from_their_modules():
    from flagdit_kernels.bench.cases import family_names

    names = family_names()
    assert {"attention", "norms", "packing", "rope"} <= set(names)  # flagdit_kernels.bench.families: the ops
    assert {"model", "diffusers_lumina"} <= set(names)  # flagdit.bench: whole models, above the kernels


def test_backend_info_says_how_to_get_triton():
    import torch

    import flagdit_kernels as fk

    status = fk.backend_info()["triton_status"]
    if torch.cuda.is_available():
        assert status == "available on CUDA tensors"
    elif fk.backend_info()["triton_interpreter"]:
        assert status.startswith("interpreted on the CPU (TRITON_INTERPRET=1)")
    else:
        assert "set TRITON_INTERPRET=1" in status and "backend='triton'" in status


def test_chosen_tiles_reads_the_autotuner_only_where_the_attention_is_loaded(monkeypatch):
    code = (
        "import sys\n"
        "from flagdit_kernels.bench.tuning import LAUNCH, chosen_tiles\n"
        "assert chosen_tiles() == {} and LAUNCH not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

    from flagdit_kernels.bench import tuning
    from flagdit_kernels.ops import attention_engines
    from flagdit_kernels.triton.attention import launch

    tiles = {"_fwd_kernel": {"key": "BLOCK_M=128"}}
    monkeypatch.setattr(launch, "tuned_tiles", lambda: tiles)
    monkeypatch.setattr(attention_engines, "chosen", lambda: {})
    monkeypatch.setattr(launch, "AUTOTUNE_MODE", "0")
    assert tuning.chosen_tiles() == {}  # FLAGDIT_KERNELS_AUTOTUNE=0: nothing was tuned
    monkeypatch.setattr(launch, "AUTOTUNE_MODE", "1")
    assert tuning.chosen_tiles() == tiles
    monkeypatch.setattr(attention_engines, "chosen", lambda: {"head_dim=128": "triton"})
    assert tuning.chosen_tiles() == {**tiles, "engine": {"head_dim=128": "triton"}}
