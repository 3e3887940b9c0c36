"""The `minilm` command end to end: train, generate, info, --help, and one-line errors."""
import os
import pathlib
import subprocess
import sys

import pytest

from minilm import LM
from minilm.cli import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--schedule", "MA", "--d-model", "16", "--n-heads", "2", "--d-state", "4", "--chunk-size", "8",
        "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1", "--eval-batches", "1",
        "--no-progress"]


def run_main(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr); argparse's own exits are caught too."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("minilm")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint from `minilm train` on the built-in corpus (shared by the tests below)."""
    out = tmp_path_factory.mktemp("run")
    status = main(["train"] + TINY + ["--out", str(out)])
    assert status == 0
    return out


def test_train_writes_a_checkpoint_and_a_summary(tmp_path, capsys):
    status, out, err = run_main(["train"] + TINY + ["--out", str(tmp_path), "--eval-interval", "2"], capsys)
    assert status == 0, err
    assert "Traceback" not in err
    lines = out.strip().splitlines()
    assert lines[0].startswith("training MA") and "pydoc_data.topics" in lines[0]
    assert sum("val loss" in line for line in lines) == 3              # steps 2 and 4, then the summary
    summary = lines[-1]
    assert "steps 0->4 of 4" in summary and "bits/byte" in summary and "tok/s" in summary
    assert (tmp_path / "checkpoint.npz").is_file()
    model = LM.load(tmp_path / "checkpoint.npz")
    assert model.cfg.schedule == "MA" and model.cfg.d_model == 16


def test_train_on_a_file_and_resume(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    status, stdout, err = run_main(["train"] + TINY + ["--data", str(text), "--out", str(out)], capsys)
    assert status == 0, err
    assert str(text) in stdout
    status, stdout, err = run_main(["train", "--resume", str(out), "--steps", "6", "--no-progress"], capsys)
    assert status == 0, err
    assert "resuming MA from step 4 of 6" in stdout and "steps 4->6 of 6" in stdout
    status, _, err = run_main(["train", "--resume", str(out), "--d-model", "32"], capsys)
    assert_one_line_error(status, err, "different model", "d_model: 16 != 32")
    status, _, err = run_main(["train"] + TINY + ["--data", str(text), "--out", str(out)], capsys)
    assert_one_line_error(status, err, "exists", "--resume")        # a run is never overwritten silently


def test_generate_prints_the_continuation(trained, capsys):
    argv = ["generate", "--ckpt", str(trained), "--prompt", "The ", "--tokens", "12", "--seed", "3"]
    status, out, err = run_main(argv, capsys)
    assert status == 0, err
    assert out.startswith("The ")
    assert len(out.rstrip("\n").encode("utf-8", errors="surrogateescape")) >= 4
    again = run_main(argv, capsys)[1]
    assert again == out                                               # seeded
    status, out, err = run_main(argv + ["--temperature", "0", "--top-k", "5", "--no-echo-prompt", "--timing"],
                                capsys)
    assert status == 0 and not out.startswith("The ") and "ms/token" in err


def test_generate_matches_the_model_api(trained, capsys):
    from minilm import data
    model = LM.load(trained / "checkpoint.npz")
    expected = model.generate(data.encode("ab"), 10, temperature=0.7, top_k=20, seed=5)
    argv = ["generate", "--ckpt", str(trained), "--prompt", "ab", "--tokens", "10", "--temperature", "0.7",
            "--top-k", "20", "--seed", "5"]
    status, out, _ = run_main(argv, capsys)
    assert status == 0 and out == data.decode(expected) + "\n"


def test_info_reports_parameters_and_state(trained, capsys):
    status, out, err = run_main(["info", "--ckpt", str(trained)], capsys)
    assert status == 0, err
    model = LM.load(trained)
    assert "schedule MA" in out and f"{model.num_params():,} parameters" in out
    assert "training: 4 of 4 steps" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("layers.", "embed", "total"))}
    assert "M Mamba" in rows["layers.0"] and "A softmax attention" in rows["layers.1"]
    info = model.layer_info()
    assert f"{info[0]['params']:,}" in rows["layers.0"]
    assert rows["layers.0"].split()[-2:] == ["0", "B"]                 # Mamba: nothing grows per token
    assert rows["layers.1"].split()[-2:] == [str(info[1]["state_bytes_per_token"]), "B"]   # A: the KV cache
    assert "context   4096 tokens" in out and "KV cache grows" in out


def test_help_explains_every_option(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    for name in ("check", "train", "generate", "info"):
        sub = subparsers[name]
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text
    assert "pydoc_data.topics" in subparsers["train"].format_help()


def test_errors_are_one_line(tmp_path, capsys):
    status, _, err = run_main(["train"] + TINY + ["--data", str(tmp_path / "missing.txt"), "--out",
                                                  str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "not found", "missing.txt")
    status, _, err = run_main(["train", "--schedule", "MXA", "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "unknown letter", "'X'")
    status, _, err = run_main(["train", "--steps", "many"], capsys)
    assert_one_line_error(status, err, "--steps", "invalid int")
    status, _, err = run_main(["train"] + TINY + ["--lr", "-1"], capsys)
    assert_one_line_error(status, err, "lr")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    for command in (["generate", "--ckpt", str(corrupt)], ["info", "--ckpt", str(corrupt)],
                    ["train", "--resume", str(corrupt)]):
        status, _, err = run_main(command, capsys)
        assert_one_line_error(status, err, "truncated or corrupt")
    status, _, err = run_main(["info", "--ckpt", str(tmp_path / "nothing")], capsys)
    assert_one_line_error(status, err, "not found")
    status, _, err = run_main(["generate"], capsys)
    assert_one_line_error(status, err, "--ckpt")


def test_truncated_checkpoint_via_the_command_line(trained, tmp_path):
    """The installed entry point as a user runs it: a truncated file gives one line and status 2."""
    data = (trained / "checkpoint.npz").read_bytes()
    (tmp_path / "checkpoint.npz").write_bytes(data[:len(data) // 2])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "minilm.cli", "generate", "--ckpt", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.returncode, proc.stderr, "truncated or corrupt")
    assert LM.load(trained).cfg.schedule == "MA"                      # the original is intact


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from minilm.train import Trainer
    original = Trainer.train_step

    def interrupted_at_step_3(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_step_3)
    argv = ["train"] + TINY + ["--save-interval", "2", "--out", str(tmp_path)]
    status, _, err = run_main(argv, capsys)
    assert status == 130
    assert_one_line_error(status, err, "interrupted at step 3", "checkpoint of step 2", "--resume")
    monkeypatch.setattr(Trainer, "train_step", original)
    status, out, err = run_main(["train", "--resume", str(tmp_path), "--no-progress"], capsys)
    assert status == 0, err
    assert "steps 2->4 of 4" in out
