"""The real LiteLLM proxy of integrations/litellm-proxy (config.yaml, router_hook.py), started as a
subprocess on loopback with router-middleware's hook, for the tests that need the proxy itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from .conftest import ROOT, _free_port

PROXY_DIR = ROOT / "integrations" / "litellm-proxy"
LITELLM = Path(sys.executable).with_name("litellm")


def proxy_missing() -> str | None:
    """Why the proxy cannot start here, or ``None``."""
    try:
        import fastapi  # noqa: F401
    except ImportError:
        return "the LiteLLM proxy needs the `proxy` extra (pip install -e '.[proxy]')"
    return None


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a process and everything it started (Cline may leave helpers behind)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def running_proxy(tmp_path: Path, env: Mapping[str, str], config: Path | None = None) -> Iterator[str]:
    """The proxy's base URL (``http://127.0.0.1:PORT``) while it runs in ``tmp_path`` (its log:
    proxy.log), with ``env`` (the deployments' ``*_API_BASE``/``*_API_KEY``, ``ROUTER_MIDDLEWARE_CONFIG``);
    ``config``: a proxy config of the test's own (beside a copy of router_hook.py, which it names as
    its callback), instead of integrations/litellm-proxy/config.yaml."""
    port = _free_port()
    full = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": "sk-proxy-master", **env}
    log = (tmp_path / "proxy.log").open("wb")
    if config is not None:
        shutil.copy(PROXY_DIR / "router_hook.py", config.with_name("router_hook.py"))
    process = subprocess.Popen([str(LITELLM), "--config", str(config or PROXY_DIR / "config.yaml"), "--host", "127.0.0.1",
                                "--port", str(port)], cwd=tmp_path, env=full, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{base}/health/liveliness", timeout=2)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError((tmp_path / "proxy.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("the LiteLLM proxy did not become ready in 90 s")
        yield base
    finally:
        stop(process)
        log.close()
