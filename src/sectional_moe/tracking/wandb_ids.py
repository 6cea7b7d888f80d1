"""W&B run ids and mode: one id per run attempt, kept by its directory; online only when W&B can work.

The mode is settled at start-up, in a few seconds and before any data is prepared
(:func:`startup_mode`): ``auto`` goes online only with a well-formed API key that W&B's server
accepts within ``logger.wandb.startup_timeout_s``; otherwise the run logs offline into its
directory and says why in one line. ``online`` refuses to start instead (one line, exit 2).

Imports: :mod:`sectional_moe.runs.layout`, :mod:`sectional_moe.errors` (torch-free, standard library only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import netrc
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from sectional_moe.errors import ConfigError
from sectional_moe.runs.layout import RunDir

DEFAULT_BASE_URL = "https://api.wandb.ai"


def derived_wandb_id(task_name: str, group: str | None, key: str) -> str:
    """The id derived from the run key alone: what runs made before :func:`run_wandb_id` used,
    and the fallback a report uses for a directory without a ``wandb_id`` file."""
    return hashlib.sha1(f"{task_name}|{group or ''}|{key}".encode()).hexdigest()[:16]


def run_wandb_id(run: RunDir, key_id: str, *, create: bool = True, renew: bool = False) -> str:
    """The W&B id of the run in ``run``: read from its ``wandb_id`` file, else drawn now and
    written there (when ``create``; rank 0). ``renew``: draw a new one even if the file has one,
    because the run starts from scratch (no checkpoint to resume): the W&B run of a killed
    attempt must not be continued by a run that does not continue its training.

    The id lives as long as the directory: a restart, requeue or resume continues the same W&B
    run, while the same overrides in another checkout, by another user of the W&B project, or
    after the outputs were deleted (or moved aside by ``force=true``) start a new one, which an
    id derived from the overrides alone could not tell apart.
    """
    found = run.recorded_wandb_id()
    if (found and not renew) or not create:
        return found or key_id
    new = hashlib.sha1(f"{key_id}|{uuid.uuid4()}".encode()).hexdigest()[:16]
    run.record_wandb_id(new)
    return new


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


def wandb_api_key() -> tuple[str | None, str]:
    """W&B's API key and where it came from: ``WANDB_API_KEY``, else the netrc entry of the server."""
    key = os.environ.get("WANDB_API_KEY")
    if key is not None:
        return key, "WANDB_API_KEY"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    host = urllib.parse.urlparse(_base_url()).hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None, str(path)
    return (auth[2] if auth else None), str(path)


def wandb_api_key_configured() -> bool:
    """True if W&B has an API key: ``WANDB_API_KEY`` or a netrc entry for the W&B server."""
    return bool(wandb_api_key()[0])


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> ``online`` with an API key, else ``offline`` (sync later with ``wandb sync``)."""
    if mode == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    return mode


_JWT = re.compile(r"[\w-]+\.[\w-]+\.[\w-]+")


def api_key_problem(key: str) -> str | None:
    """What is wrong with the form of an API key (W&B's own rule: an optional ``<host>-`` prefix,
    then 40 or more letters, digits and underscores; or a JWT), or None if it looks right."""
    if key != key.strip():
        return "it starts or ends with whitespace"
    if not key:
        return "it is empty"
    if _JWT.fullmatch(key):
        return None
    secret = key.split("-", 1)[-1]
    if not re.fullmatch(r"[\w-]+", secret):
        return "it has characters other than letters, digits, '_' and '-'"
    if len(secret) < 40:
        return f"it has {len(secret)} characters, W&B keys have 40 or more"
    return None


def probe_server(key: str, timeout: float) -> str | None:
    """Ask the W&B server who ``key`` belongs to, within ``timeout`` seconds in all: None if it
    answers as expected, else why not (unreachable, timed out, key rejected)."""
    url = _base_url() + "/graphql"
    body = json.dumps({"query": "query { viewer { id } }"}).encode()
    auth = base64.b64encode(f"api:{key}".encode()).decode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1 << 16)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return f"{urllib.parse.urlparse(url).netloc} rejected the API key (HTTP {err.code})"
        return None  # the server answered: W&B itself will report anything else
    except (urllib.error.URLError, socket.timeout, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
            return f"{urllib.parse.urlparse(url).netloc} did not answer within {timeout:g} s"
        return f"{urllib.parse.urlparse(url).netloc} is unreachable ({reason})"
    return None


def startup_mode(mode: str, timeout: float) -> tuple[str, str | None]:
    """The W&B mode this run will use, and a one-line note when it is not the one asked for.

    ``auto``: ``online`` if an API key is configured, well formed and accepted by the server
    within ``timeout`` seconds; ``offline`` otherwise (the note says why; no note without a key,
    the documented default). ``online``: the same checks, but a failure is an error.

    Raises:
        ConfigError: ``logger.wandb.mode=online`` and W&B cannot work (malformed or rejected key,
            no server).
    """
    if mode not in ("auto", "online"):
        return mode, None
    key, source = wandb_api_key()
    if not key:
        if mode == "online":
            raise ConfigError("logger.wandb.mode", "mode=online but no W&B API key is configured (WANDB_API_KEY or `wandb login`); "
                              "log in, or use logger.wandb.mode=offline")
        return "offline", None
    problem = api_key_problem(key)
    why = f"the API key in {source} is malformed: {problem}" if problem else probe_server(key, timeout)
    if why is None:
        return "online", None
    if mode == "online":
        raise ConfigError("logger.wandb.mode", f"mode=online but {why}; fix it, or use logger.wandb.mode=offline "
                          "(and `wandb sync` the run later)")
    return "offline", f"W&B offline for this run: {why}; upload it later with `wandb sync` once that is fixed"
