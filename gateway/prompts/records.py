"""Registry records as the prompt API and the router see them: templates, adapter ids, wire shapes, checks."""

from __future__ import annotations

from typing import Any

from core.templates import PromptTemplate, parse_template
from gateway.errors import Unprocessable
from gateway.prompts.protocol import DEFAULT_MAX_ROWS, GuardSetting, JobOut, RecordOut, RecordSetting, VersionOut
from gateway.registry.store import JobRecord, PromptRecord, VersionRecord


def takes_bare_query(manifest: dict[str, Any] | None) -> bool:
    """Adapters trained with the prompt kept (the full-prompt baseline) must be sent the full prompt."""
    return (manifest or {}).get("inference") != "full_prompt"


def inference_mode(manifest: dict[str, Any] | None) -> str:
    return "bare" if takes_bare_query(manifest) else "full_prompt"


def adapter_model_id(name: str, version: int) -> str:
    return f"{name}@v{version}"


def template_from_record(record: PromptRecord) -> PromptTemplate:
    if record.kind == "completion":
        return parse_template(prompt=record.template, max_chars=10**9)
    return parse_template(messages=record.template, max_chars=10**9)


def validate_examples(template: PromptTemplate, examples: list[dict[str, str]]) -> list[dict[str, str]]:
    """Each declared example fills every slot (or `query`) and appears verbatim, so the trainer can cut it."""
    static = "\n".join(m.static_text for m in template.messages)
    single = template.slots[0] if len(template.slots) == 1 else None
    cleaned: list[dict[str, str]] = []
    for i, example in enumerate(examples):
        row = dict(example)
        if single and "query" in row and single not in row:
            row[single] = row.pop("query")
        missing = [k for k in (*template.slots, "response") if not row.get(k)]
        if missing:
            raise Unprocessable(f"example {i} lacks {', '.join(missing)}", param=f"examples[{i}]",
                                code="invalid_example")
        unknown = sorted(set(row) - {*template.slots, "response"})
        if unknown:
            raise Unprocessable(f"example {i} has unknown field(s) {', '.join(unknown)}",
                                param=f"examples[{i}]", code="invalid_example")
        for key, value in row.items():
            if value not in static:
                raise Unprocessable(
                    f"example {i}'s {key} does not appear verbatim in the template", param=f"examples[{i}].{key}",
                    code="example_not_in_template")
        cleaned.append(row)
    return cleaned


def job_out(job: JobRecord) -> JobOut:
    out = JobOut.model_validate(job, from_attributes=True)
    rows = job.spec.get("rows") if isinstance(job.spec, dict) else None
    return out.model_copy(update={"rows": len(rows)}) if isinstance(rows, list) else out


def version_out(version: VersionRecord) -> VersionOut:
    """The wire shape of a version; a status the API does not document fails here, not in a client. A rejected
    version's reason is kept in the registry's `error` column and shown as `reason`."""
    out = VersionOut.model_validate(version, from_attributes=True)
    if version.status == "rejected":
        return out.model_copy(update={"reason": version.error, "error": None})
    return out


def record_setting(setting: RecordSetting | None) -> dict[str, Any] | None:
    """A `record` setting as the registry keeps it: `max_rows` filled in (None: recording off)."""
    if setting is None:
        return None
    return {"rate": setting.rate, "max_rows": setting.max_rows or DEFAULT_MAX_ROWS}


def record_out(record: dict[str, Any] | None) -> RecordOut | None:
    if not record:
        return None
    return RecordOut(rate=float(record.get("rate", 0.0)), max_rows=int(record.get("max_rows") or DEFAULT_MAX_ROWS))


def guard_setting(guard: GuardSetting | None) -> dict[str, Any] | None:
    """A `guard` setting as the registry keeps it (None: off)."""
    return None if guard is None else guard.model_dump()


def guard_out(guard: dict[str, Any] | None) -> GuardSetting | None:
    return GuardSetting.model_validate(guard) if guard else None


def settings_fields(record: dict[str, Any] | None, guard: dict[str, Any] | None) -> dict[str, Any]:
    """The routing entry's fields for a prompt's registry settings: recording and the shadow guard."""
    out = record_out(record)
    return {"record_rate": out.rate if out else 0.0, "record_max_rows": out.max_rows if out else 0,
            "guard": guard_out(guard)}
