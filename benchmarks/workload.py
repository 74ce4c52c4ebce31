"""A small demo stack and its traffic: the gateway, a Prometheus scraping it, and a mix of apps' requests.

The dashboard picture needs live metrics that look like a deployment's: two few-shot prompts
(one served by its adapter from the start, one that falls back until its adapter arrives a
third of the way in) and unmatched chat requests, sent one after another. Answers are short
(4 tokens), as for commands or labels, where the long prompt is most of a request's cost.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from benchmarks import prometheus as prom
from benchmarks.deploy import DeployFiles
from core.basemodel import base_model_dir
from core.config import Settings
from gateway.local_server import LocalGateway, free_port
from trainer.lora import random_lora

BASH_SHOTS = (("list files in the current directory", "ls"), ("show the current working directory", "pwd"),
              ("count lines in file.txt", "wc -l file.txt"), ("show disk usage of /var", "du -sh /var"),
              ("find files larger than 100 MB under /home", "find /home -type f -size +100M"),
              ("show the first 5 lines of data.csv", "head -n 5 data.csv"),
              ("search for the word error in app.log", "grep error app.log"),
              ("make script.sh executable", "chmod +x script.sh"),
              ("show free memory in megabytes", "free -m"), ("rename a.txt to b.txt", "mv a.txt b.txt"),
              ("compress the folder logs into logs.tar.gz", "tar -czf logs.tar.gz logs"),
              ("show the ten largest files here", "du -ah . | sort -rh | head -n 10"))
SQL_SHOTS = (("how many orders are there?", "SELECT COUNT(*) FROM orders;"),
             ("the largest order", "SELECT * FROM orders ORDER BY total DESC LIMIT 1;"),
             ("orders of customer 42", "SELECT * FROM orders WHERE customer_id = 42;"),
             ("total sales per day", "SELECT date(created_at), SUM(total) FROM orders GROUP BY 1;"),
             ("customers who never ordered", "SELECT id FROM customers WHERE id NOT IN "
                                            "(SELECT customer_id FROM orders);"),
             ("the five best customers by spend", "SELECT customer_id, SUM(total) AS s FROM orders "
                                                "GROUP BY customer_id ORDER BY s DESC LIMIT 5;"))
BASH = [
    {"role": "system", "content": "You translate requests into one bash command for a Linux shell. Answer with "
                                  "the command only, no explanation, no code fences.\n"
                                  + "\n".join(f"Input: {q}\nOutput: {a}" for q, a in BASH_SHOTS)},
    {"role": "user", "content": "Input: {query}\nOutput:"},
]
SQL = [
    {"role": "system", "content": "You write one SQLite query. Tables: customers(id, name, city, created_at) and "
                                  "orders(id, customer_id, total, created_at). Answer with the query only.\n"
                                  + "\n".join(f"Question: {q}\nSQL: {a}" for q, a in SQL_SHOTS)},
    {"role": "user", "content": "Question: {query}\nSQL:"},
]
BASH_QUERIES = ("find all python files under src", "show the last 20 lines of app.log", "make a directory build",
                "count files in /tmp", "print the date", "show running processes", "copy a.txt to b.txt")
SQL_QUERIES = ("total revenue per customer", "orders placed today", "the ten newest orders",
               "customers with more than five orders", "the average order total")
CHAT_QUERIES = ("What is the capital of France?", "Write a haiku about the sea.", "Name three primary colours.",
                "How many days are in a leap year?")


def fill(template: list[dict[str, str]], query: str) -> list[dict[str, str]]:
    return [{**m, "content": m["content"].replace("{query}", query)} for m in template]


@dataclass
class DemoStack:
    """A running gateway and Prometheus; `drive` sends the demo traffic and counts answers by route."""

    gateway: LocalGateway
    prometheus_url: str
    late_adapter: Path
    routes: Counter[str] = field(default_factory=Counter)

    def _upload_late_adapter(self) -> None:
        with self.gateway.admin() as admin:
            admin.post("/v1/prompts/sql/adapters", json={"adapter_path": str(self.late_adapter)}).raise_for_status()

    def drive(self, duration: float, max_tokens: int = 4) -> int:
        """Send requests one after another for `duration` seconds; returns how many were answered."""
        model = self.gateway.settings.served_model_name
        started = time.monotonic()
        uploader = threading.Thread(target=self._upload_late_adapter, name="late-adapter", daemon=True)
        sent = 0
        with httpx.Client(base_url=self.gateway.url, timeout=120) as client:
            while time.monotonic() - started < duration:
                if uploader.ident is None and time.monotonic() - started > duration / 3:
                    uploader.start()
                kind = sent % 5
                if kind < 2:
                    messages = fill(BASH, BASH_QUERIES[sent % len(BASH_QUERIES)])
                elif kind < 4:
                    messages = fill(SQL, SQL_QUERIES[sent % len(SQL_QUERIES)])
                else:
                    messages = [{"role": "user", "content": CHAT_QUERIES[sent % len(CHAT_QUERIES)]}]
                body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens,
                                        "temperature": 0}
                response = client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                self.routes[response.headers["x-promptintern-route"]] += 1
                sent += 1
        if uploader.ident is not None:
            uploader.join(timeout=300)
        return sent


@contextmanager
def demo_stack(settings: Settings, model_path: Path | None = None,
               deploy: DeployFiles = DeployFiles()) -> Iterator[DemoStack]:
    """The gateway on `model_path` (default: the base model) with two prompts, and Prometheus scraping it
    with `deploy`'s rules."""
    model = model_path or base_model_dir(settings)
    with tempfile.TemporaryDirectory(prefix="promptintern-demo-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        print(f"[bench dashboard] preparing: two random LoRA adapters, gateway on {model.name}", flush=True)
        bash_adapter = random_lora(model, root / "bash-lora", seed=1, scale=0.3)
        sql_adapter = random_lora(model, root / "sql-lora", seed=2, scale=0.3)
        demo = settings.model_copy(update={
            "data_dir": root / "data", "adapter_dir": root / "adapters", "base_model": model,
            "admin_key": SecretStr(secrets.token_urlsafe(24)), "port": free_port(), "host": "127.0.0.1",
            "api_keys": [], "import_dir": root})
        gateway = stack.enter_context(LocalGateway(demo))
        with gateway.admin() as admin:
            admin.post("/v1/prompts", json={"name": "nl2bash", "messages": BASH,
                                            "adapter_path": str(bash_adapter)}).raise_for_status()
            admin.post("/v1/prompts", json={"name": "sql", "messages": SQL}).raise_for_status()
        target = gateway.url.removeprefix("http://")
        prometheus = stack.enter_context(prom.start_prometheus(root, [target], "1s", deploy=deploy))
        prom.wait_for_scrapes(prometheus.url, 2, job=prom.GATEWAY_JOB)
        yield DemoStack(gateway, prometheus.url, sql_adapter)
