"""The docs hold together (hack/check_docs.py, also run by make lint): links resolve, every
subcommand is documented, and the check itself notices when they do not."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import ROOT

spec = importlib.util.spec_from_file_location("check_docs", ROOT / "hack" / "check_docs.py")
check_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_docs)


def test_every_link_resolves_and_every_subcommand_is_documented():
    proc = subprocess.run([sys.executable, str(ROOT / "hack" / "check_docs.py")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {"ckpt verify", "export-hf", "prepare-data", "local", "launch"} <= set(check_docs.subcommands())


def test_the_check_finds_a_broken_link_a_missing_heading_and_an_undocumented_command(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# Top\n\n[ok](docs/a.md#a-page) [gone](docs/missing.md) "
                                        "[bad](docs/a.md#nope)\n```\n[in a fence](not/checked.md)\n```\n")
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n`fsdp-train local` and nothing else.\n")
    monkeypatch.setattr(check_docs, "ROOT", tmp_path)
    assert check_docs.broken_links() == ["README.md: link docs/missing.md: no such file",
                                         "README.md: link docs/a.md#nope: no heading #nope in docs/a.md"]
    missing = check_docs.undocumented_commands()
    assert "docs/: `fsdp-train ckpt verify` is documented nowhere" in missing
    assert not any("`fsdp-train local`" in line for line in missing)
