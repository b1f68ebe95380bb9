"""The shell blocks of the README and the docs, run as a user types them: extracted from the pages.

Every ```bash block of README.md (the 10-minute tour), then of the pages in `WALKTHROUGH` (the
tutorials, which continue on the tour's store), is run, in that order and in document order, as
one bash session (a user going down the pages in one terminal), except the blocks marked on the
line before the fence with `<!-- readme-test: not run (why) -->`. A runnable block in any other
page fails `test_blocks_are_found_and_every_skip_says_why`, so none goes untested. Editing a block
changes what this test runs. Only what must differ is substituted, each by a documented means
("How the docs are tested" in docs/pages/how-to/tests.md):

- the session runs in a fresh folder whose `platform` is a link to the repository's, so the
  relative paths resolve and nothing is written into the checkout;
- the local cluster's ports and temp dir are free ones, through the script's own variables
  (`DASHBOARD_PORT`, `RAY_PORT`, ..., `RAY_TEMP_DIR`);
- every `tsesnet train` command gets `--set` options appended that shorten its schedule.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from local_head import BIN, DROPPED, PORT_VARS, ROOT, free_ports, head_pids

README = ROOT / "README.md"
PAGES = ROOT / "docs" / "pages"
# The pages whose blocks run, in this order: the tour, then the tutorials that continue from it.
WALKTHROUGH = (
    README,
    PAGES / "tutorial" / "ray-job.md",
    PAGES / "tutorial" / "sweep.md",
)
SKIP = re.compile(r"<!-- readme-test: not run \((?P<why>[^)]+)\) -->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
# What a `tsesnet train` command gets appended: one short epoch, one validation case.
SHORT = (
    "--set schedule.epochs=1 --set data.patches_per_epoch=2 --set data.max_val_cases=1 "
    "--set data.val_overlap=0"
)


def blocks(text: str) -> list[tuple[int, str, str | None]]:
    """Every bash block: (line number of its fence, its text, why it is not run or None)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, i = i, i + 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if m.group("lang") in ("bash", "sh"):
            skip = SKIP.match(lines[start - 1]) if start else None
            out.append((start + 1, "\n".join(body), skip.group("why") if skip else None))
    return out


def shorten_training(block: str) -> str:
    """`SHORT` appended to every `tsesnet train` command (after its last continuation line)."""
    lines, out, in_train = block.splitlines(), [], False
    for line in lines:
        code = line.split("  #", 1)[0].rstrip()
        in_train = in_train or re.search(r"(^|\s)tsesnet train\b", code) is not None
        if in_train and not code.endswith("\\"):
            line, in_train = f"{code} {SHORT}", False
        out.append(line)
    return "\n".join(out)


def every_page() -> list[Path]:
    """README.md and every page of the docs."""
    return [README, *sorted(PAGES.rglob("*.md"))]


def test_blocks_are_found_and_every_skip_says_why():
    run, stray = [], []
    for page in every_page():
        found = blocks(page.read_text())
        assert all(why for _, _, why in found if why is not None), page
        runnable = [(line, body) for line, body, why in found if why is None]
        (run if page in WALKTHROUGH else stray).extend((page, *b) for b in runnable)
    assert not stray, "runnable blocks outside WALKTHROUGH: " + ", ".join(
        f"{page.relative_to(ROOT)} line {line}" for page, line, _ in stray
    )
    assert len(run) >= 7
    assert {page for page, _, _ in run} == set(WALKTHROUGH)
    text = "\n".join(body for _, _, body in run)
    for command in ("tsesnet ingest", "tsesnet store info", "tsesnet store export",
                    "tsesnet train", "local_cluster.sh start", "ray job submit",
                    "tsesnet sweep", "--resume", "tsesnet models promote", "tsesnet predict",
                    "tsesnet evaluate"):  # fmt: skip
        assert command in text, command
    assert shorten_training("tsesnet train --store s \\\n  --name x  # why") == (
        f"tsesnet train --store s \\\n  --name x {SHORT}"
    )


def _session(pages) -> str:
    """The runnable blocks of `pages`, in order, as one bash script, each announced so that a
    failure names its page and line."""
    parts = ["set -euo pipefail"]
    for page in pages:
        for line, body, why in blocks(page.read_text()):
            if why is None:
                name = page.relative_to(ROOT)
                parts += [f"echo '=== {name} line {line}'", shorten_training(body)]
    return "\n".join(parts) + "\n"


@pytest.mark.slow
def test_the_readme_runs_as_written(ray_session, tmp_path):
    import mlflow

    from tsesnet.tracking.runs import git_commit

    work = tmp_path / "walkthrough"
    work.mkdir()
    (work / "platform").symlink_to(ROOT / "platform")
    (work / "tsesnet").mkdir()  # the README's paths are relative to the repository root
    (work / "tsesnet" / "configs").symlink_to(ROOT / "tsesnet" / "configs")
    env = {k: v for k, v in os.environ.items() if k not in DROPPED}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", NUM_CPUS="2", STOP_GRACE="3")
    env.update(zip(PORT_VARS, map(str, free_ports(len(PORT_VARS))), strict=True))
    env["RAY_TEMP_DIR"] = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: unix socket paths
    env["XDG_STATE_HOME"] = str(tmp_path / "state")  # logs and PID records, not the user's home
    script = _session(WALKTHROUGH)
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True,
                              text=True, timeout=1500)  # fmt: skip
    finally:
        for pid in head_pids(env["RAY_TEMP_DIR"]):  # a failed block may leave its head running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    out = proc.stdout + proc.stderr
    failed_at = re.findall(r"=== \S+ line \d+", proc.stdout)
    assert proc.returncode == 0, f"{failed_at[-1:]} failed:\n{out[-5000:]}"

    # What the blocks were for: the test split, the job's lineage, the sweep, the predictions.
    predicted = (work / "out" / "pred" / "summary.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in predicted) == ["SYN_008", "SYN_009"]
    assert (work / "out" / "pred_nifti" / "summary.csv").is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tsesnet").experiment_id
    runs = {r.data.tags["tsesnet.run_name"]: r for r in client.search_runs([exp])}
    assert {"demo", "demo-job", "demo-ray-job", "try"} <= set(runs)
    for name in ("demo-job", "demo-ray-job"):  # submitted: their copy of the code has no .git
        assert runs[name].data.tags["code.git_commit"] == git_commit(ROOT) != "unknown"
    assert runs["try"].info.status == "FINISHED"
    for e in client.search_experiments():  # nothing kept in a job's temporary directory
        assert e.artifact_location.startswith((work / "mlartifacts").as_uri()), e
    promoted = client.get_model_version("tsesnet", "1")
    assert promoted.tags["promoted_champion_reason"] == "best on the external test set"
