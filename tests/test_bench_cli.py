"""flagdit-bench prints a real table (CPU, quick shapes) and writes its JSON."""

import json

from flagdit_kernels.bench.cli import main


def test_cli_prints_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--families", "packing", "--rep-ms", "5", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "measured ceilings: copy" in text
    assert "pack" in text and "python loop" in text
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ms"] > 0 for r in rows)
    assert {r["impl"] for r in rows} >= {"reference", "python loop"}


def test_families_are_discovered_from_their_modules():
    from flagdit_kernels.bench.cases import family_names

    names = family_names()
    assert {"attention", "norms", "packing", "rope"} <= set(names)  # flagdit_kernels.bench: the op families
    assert {"model", "diffusers_lumina"} <= set(names)  # flagdit.bench: whole models, above the kernels
