"""Where the repository's deploy files are: given by the caller (`--deploy-dir`), never found from `__file__`,
so the benchmarks read the same files from a checkout and from an installed package."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.errors import BenchInputError

DEFAULT_DEPLOY_DIR = Path("deploy")


@dataclass(frozen=True)
class DeployFiles:
    """The repository's `deploy/` folder: the Prometheus rules and the Grafana dashboard the harness runs."""

    root: Path = DEFAULT_DEPLOY_DIR

    @property
    def rules_dir(self) -> Path:
        return self.root.resolve() / "prometheus" / "rules"

    @property
    def dashboard(self) -> Path:
        return self.root.resolve() / "grafana" / "dashboards" / "promptintern-cost.json"

    def checked(self) -> DeployFiles:
        """Itself, once the rules folder and the dashboard are there; else a BenchInputError that says where."""
        missing = [str(p) for p in (self.rules_dir, self.dashboard) if not p.exists()]
        if missing:
            raise BenchInputError(f"no deploy files at {self.root.resolve()} (missing {', '.join(missing)}): run "
                                  "from the repository's root or give its deploy folder (--deploy-dir)")
        return self
