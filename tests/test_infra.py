"""The infrastructure a deployment really has: explicit settings that reach the broker they name,
URL schemes refused at start with what to use instead."""

from __future__ import annotations

import functools
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import own_deployment
from tests.helpers import wait_until
from tierq import ConfigError, Settings, get_job, submit
from tierq.core.settings import get_settings
from tierq.ops.embedded import EmbeddedRedis, free_port
from tierq.sim import SimServer
from tierq.store.keys import Keys

DOC = " ".join(f"Sentence {i} of a document for a broker of its own." for i in range(12))


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sentinel://127.0.0.1:26379", "Sentinel is not supported yet"),
        ("redis+socket:///run/redis.sock", "Unix socket"),
        ("kafka://127.0.0.1:9092", "use redis://, rediss://, amqp://"),
        ("rediss://127.0.0.1:6380/0", "needs ssl_cert_reqs"),
    ],
)
def test_an_unsupported_broker_url_is_refused_with_what_to_use(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Settings(broker_url=url)
    with pytest.raises(ValueError, match="TIERQ_RESULT_BACKEND"):
        Settings(result_backend="rpc://")
    assert Settings(broker_url="rediss://127.0.0.1:6380/0?ssl_cert_reqs=required").broker_url


def test_the_environment_s_bad_url_is_a_config_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERQ_BROKER_URL", "sentinel://127.0.0.1:26379")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match="TIERQ_BROKER_URL: scheme 'sentinel'"):
            get_settings()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.slow
def test_an_explicit_producer_publishes_to_its_own_broker(tmp_dir: Path, redis_url: str) -> None:
    """``Producer(Settings(broker_url=X))`` publishes to X and reads its results there: the job runs
    on a worker of X, and nothing of it reaches the environment's broker."""
    other = EmbeddedRedis().start()
    session = redis.Redis.from_url(redis_url)
    try:
        tiers = "[tiers.fast]\nconcurrency = 4\n"
        with own_deployment(
            "explicit", tmp_dir, redis_url, tiers, {"fast": ["fast"]}, broker_url=f"{other.url}/0"
        ) as own:
            assert own.settings.broker_url == f"{other.url}/0"
            job_id = f"explicit-{uuid.uuid4().hex[:8]}"
            job = submit(DOC, urgency="critical", job_id=job_id, producer=own.producer)
            result = job.result(timeout=30)
            assert (result.job_id, result.tier) == (job_id, "fast")
            assert job.status() == "succeeded"
            there = redis.Redis.from_url(f"{other.url}/0")
            assert there.exists(Keys(own.prefix).result(job_id)), "the run guard's record is on X"
            there.close()
            assert not list(session.scan_iter(match=f"{own.prefix}*")), "nothing on the session's Redis"
    finally:
        session.close()
        other.stop()


def _make_certificates(folder: Path, openssl: str) -> None:
    """A CA, and a server certificate it signed for 127.0.0.1 (an IP subjectAltName)."""
    run = functools.partial(subprocess.run, cwd=folder, check=True, capture_output=True, timeout=60)
    key = ["-newkey", "rsa:2048", "-nodes"]
    run(
        [
            openssl,
            "req",
            "-x509",
            *key,
            "-days",
            "1",
            "-subj",
            "/CN=tierq-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]
    )
    run([openssl, "req", *key, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"])
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n", encoding="utf-8")
    signed = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "ext.cnf"]
    run([openssl, "x509", "-req", "-in", "server.csr", *signed, "-days", "1", "-out", "server.pem"])


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server speaking TLS only, with a certificate for 127.0.0.1 from a CA made here; its
    ``rediss://`` URL (the CA passed in the query, as an operator writes it)."""
    server_bin, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if server_bin is None or openssl is None:
        pytest.skip("no redis-server or openssl on PATH: cannot run a TLS Redis here")
    _make_certificates(tmp_path, openssl)
    port = free_port()
    tls = ["--tls-port", str(port), "--tls-cert-file", "server.pem", "--tls-key-file", "server.key"]
    tls += ["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"]
    quiet = ["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [server_bin, "--port", "0", *tls, *quiet],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tmp_path / 'ca.pem'}"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return proc.poll() is None and bool(client.ping())
        except redis.RedisError:
            return False

    def exited() -> None:
        if proc.poll() is not None:
            said = proc.stdout.read(300).decode(errors="replace") if proc.stdout else ""
            pytest.skip(f"this redis-server does not serve TLS: {said}")

    try:
        try:
            wait_until(answers, 10, "the TLS redis-server to answer", exited, interval=0.1)
        except AssertionError:
            pytest.skip("this redis-server did not answer over TLS within 10 s")
        yield url
    finally:
        client.close()
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.slow
def test_a_killed_worker_s_jobs_come_back_in_seconds_over_tls(
    tmp_dir: Path, redis_url: str, sim: SimServer, tls_redis: str
) -> None:
    """``rediss://`` gets the leases ``redis://`` has: a worker killed with jobs mid-call has them run
    again on the other worker within a few seconds (kombu's own TLS transport: 40 minutes)."""
    tiers = "[tiers.fast]\nconcurrency = 8\n"
    pools = {"a": ["fast"], "b": ["fast"]}
    with own_deployment("tls", tmp_dir, redis_url, tiers, pools, broker_url=tls_redis) as own:
        ids = [f"tls-{uuid.uuid4().hex[:8]}" for _ in range(8)]
        for job_id in ids:
            sim.state.add_faults(["stall:8"], job_id=job_id)  # mid-call at the kill
            submit(DOC, urgency="critical", job_id=job_id, producer=own.producer)
        victim = own.workers["a"]
        wait_until(lambda: all(sim.state.request_count(j) for j in ids), 20, "every job's call to be sent")
        victim.proc.kill()
        killed_at = time.time()
        # the producer reads the results over TLS too
        results = [get_job(j, producer=own.producer).result(timeout=30) for j in ids]
        assert [r.job_id for r in results] == ids
        held = [j for j in ids if sim.state.request_count(j) >= 2]
        assert held, "the killed worker held jobs"
        again = [t["arrived_at"] for j in held for t in sim.state.timings(j)[1:2] if t["arrived_at"]]
        recovered_s = max(again) - killed_at
        assert len(again) == len(held) and recovered_s < 8, f"held jobs back after {recovered_s:.1f} s"
