"""jobs/annotate.py as a user runs it: its embedded default and its errors. (Full runs of the
job: tests/test_annotate_cluster.py submits it to a Ray head.)"""

import subprocess
import sys
from pathlib import Path

from jobs import annotate as job

ROOT = Path(__file__).resolve().parents[1]


def test_no_arguments_mean_the_toy_world_sample_shards_and_toy_models(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    args = job.parse_args([])
    job.toy_defaults(args)
    assert args.input == ["out/toy/samples"]
    assert sorted(p.name for p in (tmp_path / "out/toy/samples").iterdir()) == [
        "sample-000000.tar", "sample-000001.tar", "sample-000002.tar"
    ]  # fmt: skip
    assert args.lmm == str(ROOT / "models/toy/llava") and Path(args.lmm, "config.json").is_file()
    assert (args.sam, args.sam_checkpoint) == ("toy", str(ROOT / "models/toy/sam.safetensors"))
    config = job.config_of(args)
    assert config.output == "out/annotate" and config.model.sam_variant == "toy"
    if (ROOT / "models/toy/heads.safetensors").is_file():
        assert args.heads == str(ROOT / "models/toy/heads.safetensors")
    else:
        assert args.heads is None and "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_missing_inputs_fail_fast_with_a_clear_error(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs/annotate.py"), "--input", str(tmp_path / "nope")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode != 0 and "error: input not found" in run.stderr
    assert not (tmp_path / "out").exists()
