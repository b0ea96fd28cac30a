"""The README's workflow and every page under docs/, run as written, from a fresh copy of the repository and
another working folder.

The commands are read from the code blocks of README.md, then of the docs/ pages in the order the README
links them (a command shown on two pages runs once, where it first appears).
Only what cannot exist here is substituted, each substitution listed in SUBSTITUTE: the ADReSSo archives
(a synthetic corpus in the same layout), the XLSR model (a tiny random wav2vec2 saved the same way), and the
budgets (500 and 300 trials, 8 workers, 20 null runs), cut to what a test can afford; and since 8 trials on the
small synthetic corpus do not clear its nuisance-only baseline, `export` is given `--despite-nuisance-baseline`
(the gate itself: tests/test_hard.py). Commands that need something
optional or interactive (a GPU fine-tune, transcripts, other feature sources, the dashboard server, the
shortcut-control study) are tested elsewhere and skipped here with their reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow
SKIP = {"finetune": "fine-tuning: tests/test_finetune.py", "transcribe": "transcripts: tests/test_transcripts.py",
        "--features": "other feature sources: tests/test_transcripts.py, tests/test_extract.py",
        "<": "a placeholder for a folder the reader fills in", "dashboard": "a server: tests/test_dashboard.py",
        "--keep": "the shortcut control: tests/test_trust.py", "control": "the shortcut control: tests/test_trust.py"}


def pages() -> list[Path]:
    """README.md, then every docs/ page in the order the README first links it (each page once)."""
    readme = ROOT / "README.md"
    linked = re.findall(r"\]\((docs/[\w-]+\.md)[#)]", readme.read_text())
    found = [ROOT / name for name in dict.fromkeys(linked)]
    missing = sorted(set((ROOT / "docs").glob("*.md")) - set(found))
    assert not missing, f"docs pages the README does not link: {missing}"
    return [readme, *found]


def workflow_commands() -> list[str]:
    commands = []
    for page in pages():
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in re.sub(r"\\\n\s*", "", block).splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("adsearch ") and not any(mark in line for mark in SKIP) and line not in commands:
                    commands.append(line)
    return commands


def fresh_copy(target: Path) -> Path:
    """The repository's tracked files as they are now (a clone would miss uncommitted edits)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def test_the_readme_workflow_runs_as_written_from_another_folder(synth_root, tiny_model, synth_cache_root, tmp_path):
    commands = workflow_commands()
    assert [c.split()[1] for c in commands] == ["corpus", "extract", "search", "null", "export", "predict", "cache",
                                                "worker", "evaluate", "search", "export", "predict"], commands
    clone = fresh_copy(tmp_path / "clone")
    work = tmp_path / "work"  # not the repository: studies/default.yaml must be found from anywhere
    work.mkdir()
    # the session's extraction of this corpus with this model and default settings: the README's extract
    # command must find exactly this cache complete (the same folder name and key), extraction is tested in
    # tests/test_extract.py
    shutil.copytree(synth_cache_root, work / "cache")
    test_audio = sorted((synth_root / "ADReSSo21" / "diagnosis" / "test-dist" / "audio").glob("*.wav"))[:2]
    substitute = {"~/data/adresso": str(synth_root), "~/data/task1.csv": str(synth_root / "task1.csv"),
                  "jonatasgrosman/wav2vec2-large-xlsr-53-english": str(tiny_model), "--trials 500": "--trials 8",
                  "--trials 300": "--trials 6",
                  "--workers 8": "--workers 2", "--runs 20": "--runs 1", "new1.wav": str(test_audio[0]),
                  "new2.wav": str(test_audio[1]), "segments.csv": "corpus.csv",
                  "adsearch export ": "adsearch export --despite-nuisance-baseline "}
    env = {"PYTHONPATH": str(clone), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for command in commands:
        for written, here in substitute.items():
            command = command.replace(written, here)
        args = shlex.split(command)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "adsearch.cli", *args[1:]], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        print(f"{time.monotonic() - started:6.1f} s  {command}")
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if args[1] == "extract":
            assert "cache already complete" in done.stdout, done.stdout
        if args[1] == "evaluate":
            assert "reproduced exactly" in done.stdout, done.stdout
    assert (work / "best" / "report.html").is_file() and (work / "predictions.csv").read_text().count("\n") == 3
    assert (work / "mmse-best" / "figures" / "test_predicted_vs_true.png").is_file()
    assert not (clone / "adsearch.db").exists()  # everything went to the working folder
