"""Secrets never reach a file, a log, a run name or W&B: what counts as a secret and how it is redacted.

A secret is

* the value of an environment variable whose *name* looks secret (``*KEY*``, ``*TOKEN*``,
  ``*SECRET*``, ``*PASSWORD*``, ...), wherever that value appears (also pasted literally into an
  override: ``+notes=$WANDB_API_KEY``);
* the value of a config key whose *last segment* names a secret as a word (``hf_token``,
  ``api_key``, ``db_password``, ``secret_value``; not ``tokenizer_path`` or ``max_expert_keys``).
  Values given on the command line (``+hf_token=hf_...``) are registered with
  :func:`register_secret_values` and from then on redacted like environment secrets, in every
  text: Hydra's files, log records (:func:`redact_log_records`), run names, W&B's recorded
  command line.

Imports: the standard library and :mod:`sectional_moe.files` only (torch-free).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from sectional_moe.files import atomic_write

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)  # environment variable names
# config key names: secret words delimited by _ - or the ends, so data.tokenizer_path, max_expert_keys
# or monkey are not "secret" while hf_token, api_key, secret_value and db_password are
SECRET_KEY_NAME = re.compile(r"(?:^|[_\-])(?:api_?key|key|token|secret|password|passwd|passphrase|credentials?|auth)(?:$|[_\-])",
                             re.IGNORECASE)
REDACTED = "***REDACTED***"
_MIN_SECRET_LEN = 8  # shorter values ("1", "true") are not secrets and would redact everything
_REGISTERED: set[str] = set()  # secret values of this process beyond the environment (register_secret_values)


def is_secret_key(key: str) -> bool:
    """True if a (dotted) config key's last segment names a secret: ``data.hf_token``, ``+api_key``."""
    return bool(SECRET_KEY_NAME.search(str(key).lstrip("+~").rsplit(".", 1)[-1]))


def register_secret_values(values: Iterable[Any]) -> None:
    """Treat ``values`` as secrets from now on (redacted in every text, like environment secrets).

    Values shorter than 8 characters are not registered (they would redact common words); config
    files and logged configs still redact them by their key (:func:`redact_secrets`).
    """
    for value in values:
        if isinstance(value, str) and len(value) >= _MIN_SECRET_LEN:
            _REGISTERED.add(value)


def register_override_secrets(overrides: Iterable[str]) -> None:
    """Register the values of ``key=value`` command-line overrides whose key names a secret."""
    for arg in overrides:
        key, sep, value = str(arg).partition("=")
        if sep and is_secret_key(key):
            register_secret_values([value.strip("'\"")] + ([value] if value[:1] in "'\"" else []))


def register_config_secrets(flat: Mapping[str, Any]) -> None:
    """Register the string values of a flat config's secret-named keys (e.g. set in conf/local)."""
    register_secret_values(v for k, v in flat.items() if isinstance(v, str) and is_secret_key(k))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of environment variables whose name looks secret, plus the registered ones, longest
    first so that a secret containing another is redacted whole."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    if environ is None:
        values |= _REGISTERED
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """``text`` with every secret environment value replaced by :data:`REDACTED`."""
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return text


def redact_secrets(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a flat logged config without secrets: values of secret-named keys and any value
    containing a secret environment variable's value (e.g. resolved from ``${oc.env:...}``)."""
    secrets = secret_values()
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if is_secret_key(key) and value not in (None, "") and not isinstance(value, (bool, int, float)):
            out[key] = REDACTED
        elif isinstance(value, str):
            out[key] = redact_text(value, secrets)
        else:
            out[key] = value
    return out


_YAML_ENTRY = re.compile(r"^(\s*(?:-\s+)?['\"]?)([+~]*[\w.\-/@]+)(=|:\s+)(.+)$")
_JOINED_OVERRIDE = re.compile(r"(^|[,\s])([+~]*[\w.\-/@]+)=([^,\s]*)")


def redact_joined_overrides(text: str) -> str:
    """``+hf_token=abc,experts=4`` (Hydra's ``override_dirname``, a run name) -> the value of every
    secret-named ``key=value`` pair redacted, however short."""
    return _JOINED_OVERRIDE.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}" if is_secret_key(m.group(2)) and m.group(3)
                                not in ("", "null", REDACTED) else m.group(0), text)


def redact_yaml_text(text: str, secrets: list[str] | None = None) -> str:
    """A YAML text (Hydra's ``config.yaml``, ``overrides.yaml``, ``hydra.yaml``, ``multirun.yaml``)
    without secrets: secret values anywhere, and the value of every ``key: value`` entry or
    ``key=value`` override whose key names a secret, however short."""
    secrets = secret_values() if secrets is None else secrets
    lines = []
    for line in redact_text(text, secrets).splitlines(keepends=True):
        body = line.rstrip("\r\n")
        end = line[len(body):]
        m = _YAML_ENTRY.match(body)
        if m and is_secret_key(m.group(2)) and m.group(4).strip("'\" ") not in ("null", "", REDACTED):
            quote = m.group(1)[-1:] if m.group(1)[-1:] in ("'", '"') else ""
            body = f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}{quote}"
        else:
            body = redact_joined_overrides(body)
        lines.append(body + end)
    return "".join(lines)


def scrub_secrets_in_files(directory: Path) -> None:
    """Redact the small YAML files of ``directory`` (a sweep's ``multirun.yaml``, which holds the
    command line verbatim) with :func:`redact_yaml_text`."""
    if not directory.is_dir():
        return
    secrets = secret_values()
    for path in directory.glob("*.yaml"):
        text = path.read_text()
        clean = redact_yaml_text(text, secrets)
        if clean != text:  # parallel jobs of a sweep scrub multirun.yaml too: write aside, rename
            atomic_write(path, clean)


def redact_override(override: str, secrets: list[str] | None = None) -> str:
    """One command-line override without secrets: ``+hf_token=...`` keeps its key, not its value."""
    key, sep, value = override.partition("=")
    if sep and is_secret_key(key) and value not in ("", "null"):
        return f"{key}={REDACTED}"
    return redact_joined_overrides(redact_text(override, secrets))


def redact_message(text: str) -> str:
    """A message (an error line) without secrets: secret values, and ``key=value`` pairs of secret keys."""
    return redact_joined_overrides(redact_text(text))


def redact_argv(argv: list[str]) -> None:
    """Redact a command line in place (``sys.argv`` before W&B records it as the run's ``args``)."""
    secrets = secret_values()
    argv[:] = [redact_override(a, secrets) for a in argv]


def redact_log_records() -> None:
    """From now on, every log record's message is redacted when it is created, whichever handler
    (a Hydra ``train.log``, the console that W&B captures) later writes it. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_smoe_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        secrets = secret_values()
        if secrets:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record is logging's to report
                return record
            clean = redact_text(message, secrets)
            if clean != message:
                record.msg, record.args = clean, None
        return record

    factory._smoe_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
