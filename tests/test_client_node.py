"""The official OpenAI Node SDK (pinned in tests/node/package-lock.json, installed by `make test`) against the
real stack: each `test("...")` case in tests/node/sdk.test.mjs runs here as its own pytest test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import MODEL, Stack

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "sdk.test.mjs"
CASES = re.findall(r'^test\("([^"]+)"', SCRIPT.read_text(), re.MULTILINE)

pytestmark = pytest.mark.clients


def test_node_cases_are_found() -> None:
    assert len(CASES) >= 8 and len(set(CASES)) == len(CASES), CASES
    # Each name goes into node's --test-name-pattern as an anchored regular expression.
    assert all(re.fullmatch(r"[a-z ]+", case) for case in CASES), CASES


@pytest.mark.parametrize("case", CASES)
def test_openai_node_sdk(chatwire: Stack, case: str) -> None:
    node = shutil.which("node")
    assert node, "node is not on PATH"
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), "run `make test` (npm ci --prefix tests/node) first"
    command = [node, "--test", "--test-reporter=spec", f"--test-name-pattern=^{case}$", SCRIPT.name]
    env = {**os.environ, "CHATWIRE_BASE_URL": chatwire.base_url, "CHATWIRE_MODEL": MODEL, "NO_COLOR": "1"}
    try:  # under pytest's own 300 s timeout, so that what node printed is shown
        run = subprocess.run(command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=280, check=False)
    except subprocess.TimeoutExpired as expired:
        printed = b"".join(out for out in (expired.stdout, expired.stderr) if isinstance(out, bytes))
        pytest.fail(f"node ran past {expired.timeout} s:\n{printed.decode(errors='replace')}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"node exited {run.returncode}:\n{output}"
    # A pattern that matched nothing would exit 0 too (node 20 reports the other cases as skipped).
    assert re.search(r"^\S* ?pass 1$", output, re.MULTILINE), f"the case did not run:\n{output}"
