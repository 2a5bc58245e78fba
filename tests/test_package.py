"""What a Python service meets on its first day: one top-level package, an import that does
nothing, a public surface that names every error, statuses the schema lists."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tierq
from tests.helpers import ROOT
from tierq.contract import errors
from tierq.contract.job import check_job
from tierq.contract.message import check_message
from tierq.contract.result import STATUSES
from tierq.contract.tiers import load_tier_table

#: a service's own modules named like ours were before tierq was one namespace
SERVICE_FILES = {
    "tasks.py": "raise SystemExit('the service own tasks.py was imported')\n",
    "worker.py": "raise SystemExit('the service own worker.py was imported')\n",
    "simulator.py": "raise SystemExit('the service own simulator.py was imported')\n",
}


def _python(code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -c CODE`` in ``cwd`` (first on sys.path, as for a service's own script)."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    for name, text in SERVICE_FILES.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_the_wheel_ships_one_top_level_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    [wheel] = tmp_path.glob("tierq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"tierq", wheel.name.split("-py3")[0] + ".dist-info"}
    # the data files the code reads at run time travel with it
    assert {
        "tierq/llm/prices.toml",
        "tierq/sim/catalogue.toml",
        "tierq/store/lua/ratelimit_reserve.lua",
    } <= set(names)


def test_import_does_nothing_and_a_bad_tiers_file_fails_at_first_use(
    service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = service_dir / "tiers.toml"
    bad.write_text('[tiers.fast]\nmodel = "claude-haiku-4-5"\nmax_tokenz = 5\n', encoding="utf-8")
    env = {
        "PATH": "/usr/bin:/bin",
        "TIERQ_TIERS_FILE": str(bad),
        # an address where nothing answers: the first use must fail on the tiers file, before it
        "TIERQ_BROKER_URL": "redis://127.0.0.1:9/0",
    }
    code = """
import sys
import tierq
assert "celery" not in sys.modules and "kombu" not in sys.modules, "import tierq loaded Celery"
from celery import signals
from tierq import ConfigError, Producer, Settings, submit
from tierq.celery import app as app_module
assert app_module._default == [], "an app was built at import"
assert not signals.before_task_publish.receivers and not signals.setup_logging.receivers, "signals connected"
assert not signals.task_prerun.receivers and not signals.worker_init.receivers, "signals connected"
try:
    submit("a document")
except ConfigError as exc:
    print(exc)
else:
    raise SystemExit("submit did not refuse the tiers file")
"""
    done = _python(code, service_dir, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().startswith(f"tiers file {bad}, line 3: tiers.fast: max_tokenz"), done.stdout


def test_every_error_the_docs_name_is_importable_from_tierq() -> None:
    named = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named |= set(re.findall(r"\b([A-Z][A-Za-z]+Error)\b", doc.read_text(encoding="utf-8")))
    ours = named & set(dir(errors))
    assert "DeadlineUnmeetableError" in ours and "ConfigError" in set(errors.__all__)
    missing = {name for name in set(errors.__all__) | ours if not hasattr(tierq, name)}
    assert not missing, f"errors not importable from tierq: {sorted(missing)}"
    assert set(errors.__all__) <= set(tierq.__all__)


def test_job_status_is_the_schema_enum() -> None:
    schema = json.loads((ROOT / "docs" / "schemas" / "v1" / "status.json").read_text(encoding="utf-8"))
    assert list(STATUSES) == schema["enum"]
    assert tierq.JobStatus.__args__ == tuple(schema["enum"])  # type: ignore[attr-defined]


def test_the_example_messages_pass_the_workers_checks() -> None:
    examples = ROOT / "tasks" / "examples"
    body = json.loads((examples / "fast-job.body.json").read_text(encoding="utf-8"))
    envelope = json.loads((examples / "fast-job.envelope.json").read_text(encoding="utf-8"))
    assert json.loads(base64.b64decode(envelope["body"])) == body
    checked = check_message(envelope["headers"], body)
    queue = envelope["properties"]["delivery_info"]["routing_key"]
    spec, tier = check_job(checked.job, load_tier_table(None), queue)
    assert (spec.job_id, tier.name) == (envelope["headers"]["id"], "fast")
    assert (examples / "enqueue.sh").stat().st_mode & 0o111, "enqueue.sh is executable"
