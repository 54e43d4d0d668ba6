"""The command line as a new user meets it: help lists every setting, --print-config, completion, readable logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from ilora_cli.settings import CONFIGS, settings, show_default

from conftest import run_cli


def _help(command: str) -> str:
    env = dict(os.environ, COLUMNS="250", TERM="dumb")
    r = subprocess.run(
        [sys.executable, "-m", "ilora_cli.cli", command, "--help"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_lists_every_setting_with_its_default(command):
    import dataclasses
    import importlib

    module, cls = CONFIGS[command].split(":")
    config_cls = getattr(importlib.import_module(module), cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    listed = settings(CONFIGS[command])
    assert [s.name for s in listed] == list(fields)  # every field, in order
    text = _help(command)
    for s in listed:
        f = fields[s.name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        assert s.default == default, s.name
        assert s.help, f"{command}.{s.name} has no comment"
        row = re.search(rf"│ {re.escape(s.name)} +(\S.*?) {{2,}}(\S+) +", text)
        assert row and row.group(2) == show_default(default), (s.name, row and row.group(0))


def test_train_help_names_the_settings_that_have_no_flag():
    text = _help("train")
    for key in ("lr", "rank", "alpha", "grad_accum", "device", "validate_every"):
        assert re.search(rf"│ {key} ", text), key
    assert "gate learning rate (default 0.3 x lr" in text and "--keep-best" in text and "--report-to" in text


def test_ablate_help_is_not_eaten_by_markup_and_lists_its_settings():
    text = " ".join(_help("ablate").split())
    assert "Run a grid of trainings and compare them on the same users" in text
    assert "eval_draws" in text and "permutations" in text


def test_print_config_is_yaml_that_config_reads_back(tmp_path, ilora_home):
    r = run_cli("train", "--experts", "2", "lr=1e-3", "validate_at=4,8", "--print-config", home=ilora_home)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    doc = yaml.safe_load(r.stdout)
    assert doc["experts"] == 2 and doc["lr"] == 1e-3 and doc["validate_at"] == [4, 8] and doc["fusion"] == "learned"
    (tmp_path / "c.yaml").write_text(r.stdout)
    again = run_cli("train", "--config", str(tmp_path / "c.yaml"), "--print-config", home=ilora_home)
    assert yaml.safe_load(again.stdout) == doc
    assert not (ilora_home / "runs").exists()  # nothing ran
    bad = run_cli("train", "gate=nope", "--print-config", home=ilora_home)
    assert bad.returncode == 2 and "Unknown gate" in bad.stderr


def test_shell_completion_of_commands_flags_and_setting_keys(ilora_home):
    def complete(words: str) -> list[str]:
        env = dict(
            os.environ, _ILORA_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - 1)
        )
        r = subprocess.run([sys.executable, "-m", "ilora_cli.cli"], capture_output=True, text=True, env=env)
        return r.stdout.split()

    assert complete("ilora tr") == ["train"]
    assert complete("ilora train --keep") == ["--keep-best"]
    assert complete("ilora train grad_") == ["grad_accum="]
    assert set(complete("ilora encode hid")) == {"hidden_size="}
    # typer detects the shell from the parent processes unless told not to, and a suite run detached from a terminal
    # has none: with detection off, --show-completion takes the shell's name
    env = dict(os.environ, ILORA_HOME=str(ilora_home), _TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION="1")
    r = subprocess.run(
        [sys.executable, "-m", "ilora_cli.cli", "--show-completion", "bash"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0 and "_ILORA_COMPLETE" in r.stdout, r.stderr


def test_eval_plot_must_be_a_png(ilora_home):
    r = run_cli("eval", "--encoder", "--dataset", "x", "--plot", "chart.jpg", home=ilora_home)
    assert r.returncode == 2 and "ending in .png" in r.stderr


@pytest.mark.slow
def test_logs_are_plain_lines_without_third_party_noise(tiny_world, tmp_path):
    """stderr to a file: plain progress lines from encode and train, no bars, no FutureWarnings."""
    env = dict(os.environ, ILORA_HOME=str(tiny_world), ILORA_PROGRESS_SECONDS="0")
    cmd = [sys.executable, "-m", "ilora_cli.cli"]
    enc = subprocess.run(
        [*cmd, "encode", "--dataset", "cyc", "--name", "cyc-log", "--epochs", "2", "hidden_size=16", "--overwrite"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert enc.returncode == 0, enc.stderr
    assert re.search(r"^encode sasrec \d+/\d+ \(\d+%\)  epoch 1 .*elapsed 0:00:\d\d", enc.stderr, re.M), enc.stderr
    # the last validation stays on the lines of the next epoch instead of being overwritten by its losses
    assert re.search(
        r"^encode sasrec .*epoch 2 loss [\d.]+  val \S+ [\d.]+ \(best [\d.]+ @ epoch 1\)", enc.stderr, re.M
    )
    assert "(whole catalogue, history excluded)" in enc.stderr and "ndcg@20" in enc.stderr  # the catalogue table
    tr = subprocess.run(
        [
            *cmd,
            "train",
            "--dataset",
            "cyc",
            "--backbone",
            str(tiny_world / "tiny-backbone"),
            "--name",
            "log",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "candidates=6",
            "--overwrite",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert tr.returncode == 0, tr.stderr
    lines = re.findall(
        r"^train (\d)/3 \(\d+%\)  epoch [\d.]+  loss [\d.]+  lr [\d.e+-]+  [\d.]+ samples/s  elapsed .*$",
        tr.stderr,
        re.M,
    )
    assert lines == ["1", "2", "3"], tr.stderr
    for noise in ("Warning", "\r", "it/s]", "Loading weights", "gemm_4bit"):
        assert noise not in tr.stderr, noise
    assert json.loads(tr.stdout)["steps"] == 3
    assert "Pictures: plots/loss.png, plots/gate-training.png, plots/gates.png." in tr.stderr


def test_every_example_config_states_its_command_and_resolves():
    """Each examples/*.yaml names, in its first lines, the exact command that runs it, and that command's
    settings accept it (accelerate's own config file is checked by its keys)."""
    import importlib
    from pathlib import Path

    from ilora_cli.config import resolve

    examples = Path(__file__).resolve().parents[1] / "examples"
    checked = 0
    for path in sorted(examples.glob("*.yaml")):
        header = "\n".join(line for line in path.read_text().splitlines()[:8] if line.startswith("#"))
        assert "Run with:" in header or "run with:" in header.lower(), path.name
        m = re.search(
            rf"(?:ilora|-m ilora_cli\.cli) (\w+)(?:(?!ilora)[^\n])*--config examples/{re.escape(path.name)}", header
        )
        if m is None:  # an accelerate config: launched with --config_file
            assert f"accelerate launch --config_file examples/{path.name}" in header, path.name
            assert yaml.safe_load(path.read_text())["distributed_type"] == "MULTI_GPU"
            continue
        module, cls = CONFIGS[m.group(1)].split(":")
        resolve(getattr(importlib.import_module(module), cls), path)
        checked += 1
    assert checked >= 6


def test_no_message_carries_markup_the_console_would_print_literally():
    """The console prints without markup (messages quote titles and settings), so ``[yellow]note:[/]`` would reach
    the user as written; labels are styled by ``console.labelled``."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "ilora_cli"
    tag = re.compile(r"\[/\]|\[(yellow|red|green|bold|dim)[^\]]*\]\w")
    found = [
        f"{p.relative_to(root)}:{n}"
        for p in sorted(root.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if tag.search(line) and "TextColumn" not in line
    ]
    assert not found, found
    assert tag.search('f"[yellow]note:[/] x"')


def test_help_paragraphs_are_joined_so_that_the_terminal_wraps_them():
    from ilora_cli.settings import paragraphs

    doc = """First line.

    A paragraph written over
    three lines of the
    source.

    Another."""
    assert paragraphs(doc) == "First line.\n\nA paragraph written over three lines of the source.\n\nAnother."
    assert paragraphs(None) is None
    r = subprocess.run(
        [sys.executable, "-m", "ilora_cli.cli", "ablate", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="100"),
    )
    assert "paired test of each cell" in " ".join(r.stdout.split())
    assert not re.search(r"^\s*of\s*$", r.stdout, re.M)  # the word the source's line break left alone
