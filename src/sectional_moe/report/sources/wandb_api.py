"""Source 3: the W&B public API, ``wandb:ENTITY/PROJECT[/GROUP]`` (needs network and an API key)."""

from __future__ import annotations

from typing import Any, Iterator

from sectional_moe.report.sources.wandb_offline import REPORT_CONFIG_FLAG, wandb_state
from sectional_moe.report.table import RunRecord
from sectional_moe.runs.identity import flatten


API_STATES = {"finished": "done", "crashed": "failed", "failed": "failed", "killed": "failed", "running": "running", "pending": "running"}


def parse_wandb_source(source: str) -> tuple[str, str, str | None]:
    """``wandb:ENTITY/PROJECT[/GROUP]`` -> (entity, project, group or None)."""
    parts = source.split(":", 1)[1].strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts[:2]):
        raise ValueError(f"{source!r}: use wandb:ENTITY/PROJECT or wandb:ENTITY/PROJECT/GROUP")
    return parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None


def record_from_api_run(run: Any) -> RunRecord | None:
    """A :class:`RunRecord` from a ``wandb.apis.public.Run`` (or anything with the same attributes)."""
    config = dict(run.config)
    if config.get(REPORT_CONFIG_FLAG) or getattr(run, "job_type", None) == "report":
        return None
    summary = getattr(run.summary, "_json_dict", None) or dict(run.summary)
    history = [dict(r) for r in run.scan_history()]  # every row, unsampled (run.history samples)
    config = {**config, **flatten({k: v for k, v in config.items() if isinstance(v, dict) and k != "_wandb"})}
    state = API_STATES.get(str(run.state), str(run.state))
    error = None if state == "done" else f"W&B state {run.state}"
    if state == "done":
        state, error = wandb_state(0, summary, history, config)
    return RunRecord(run_id=str(run.id), name=str(run.name), group=getattr(run, "group", None) or None, state=state, error=error,
                     config=config, history=history, final=summary, source="wandb-api", path=str(getattr(run, "url", "")))


def iter_wandb_api(source: str, api: Any = None) -> tuple[int, Iterator[RunRecord]]:
    entity, project, group = parse_wandb_source(source)
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    found = list(api.runs(f"{entity}/{project}", filters={"group": group} if group else None))

    def gen() -> Iterator[RunRecord]:
        for run in found:
            rec = record_from_api_run(run)
            if rec is not None:
                yield rec

    return len(found), gen()
