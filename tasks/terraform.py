"""Terraform (or OpenTofu) through its own CLI, with typed results.

Not python-terraform: unmaintained since 2019, its destroy passes ``-force``
(removed in Terraform 0.15), its apply cannot run without a prompt, it hides
failures unless asked and logs variable values. Here every call goes through
olab's command runner (``core.runner``: timeouts, secrets masked), runs
non-interactively (``TF_IN_AUTOMATION``, ``-input=false``), plans to a file that
is shown as JSON and applied exactly as shown, and fails with terraform's own
message. Secrets reach terraform only through its environment (or a 0600 file),
never its argv or a log. A held state lock and a provider's 429/5xx are retried
with backoff; anything else fails at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from core.files import atomic_write
from core.logs import task_logger
from core.runner import CommandError, ToolMissing, run

ChangeKind = Literal["add", "change", "replace", "destroy", "read", "no-op"]
TRANSIENT = re.compile(
    r"(Error 429|Error 5\d\d|googleapi: Error (429|5\d\d)|429 Too Many Requests|Service Unavailable|"
    r"rateLimitExceeded|backendError|connection reset by peer|i/o timeout)",
    re.IGNORECASE,
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TerraformError(RuntimeError):
    """Terraform failed; the message is terraform's own error (its first lines)."""


class StateLocked(TerraformError):
    """Another run holds the state lock; ``holder`` says who, since when, doing what."""

    def __init__(self, message: str, holder: dict[str, str]):
        self.holder = holder
        super().__init__(message)


class ResourceChange(BaseModel):
    model_config = ConfigDict(frozen=True)

    address: str
    actions: list[str]

    @property
    def kind(self) -> ChangeKind:
        return change_kind(self.actions)


class PlanSummary(BaseModel):
    """What a saved plan will do, read from ``terraform show -json`` of it."""

    model_config = ConfigDict(frozen=True)

    plan_file: Path
    changes: list[ResourceChange]
    output_changes: list[str] = []
    destroy: bool = False

    def of_kind(self, kind: ChangeKind) -> list[str]:
        return [c.address for c in self.changes if c.kind == kind]

    @property
    def adds(self) -> list[str]:
        return self.of_kind("add")

    @property
    def updates(self) -> list[str]:
        return self.of_kind("change")

    @property
    def replaces(self) -> list[str]:
        return self.of_kind("replace")

    @property
    def destroys(self) -> list[str]:
        return self.of_kind("destroy")

    @property
    def has_changes(self) -> bool:
        return bool(self.adds or self.updates or self.replaces or self.destroys or self.output_changes)

    @property
    def destructive(self) -> bool:
        """Whether applying it removes or re-creates anything (and so needs an approval)."""
        return bool(self.replaces or self.destroys)

    def describe(self) -> str:
        return (
            f"{len(self.adds)} to add, {len(self.updates)} to change, {len(self.replaces)} to replace, "
            f"{len(self.destroys)} to destroy"
        )


def change_kind(actions: list[str]) -> ChangeKind:
    if actions in (["delete", "create"], ["create", "delete"]):
        return "replace"
    return {"create": "add", "update": "change", "delete": "destroy", "read": "read"}.get(
        actions[0] if len(actions) == 1 else "", "no-op"
    )


def parse_plan(plan_json: dict, plan_file: Path, destroy: bool = False) -> PlanSummary:
    """A typed summary of ``terraform show -json <planfile>`` (pure)."""
    changes = [
        ResourceChange(address=rc["address"], actions=list(rc["change"]["actions"]))
        for rc in plan_json.get("resource_changes", [])
        if rc.get("mode", "managed") == "managed"
    ]
    outputs = [name for name, oc in (plan_json.get("output_changes") or {}).items() if oc.get("actions") != ["no-op"]]
    return PlanSummary(plan_file=plan_file, changes=[c for c in changes if c.kind != "no-op"], output_changes=outputs, destroy=destroy)


def parse_lock_holder(output: str) -> dict[str, str]:
    """The ``Lock Info:`` block terraform prints when the state is locked (pure)."""
    holder: dict[str, str] = {}
    block = output.split("Lock Info:", 1)
    if len(block) == 2:
        for line in block[1].splitlines()[1:]:
            match = re.match(r"^\s+(\w+):\s*(.*)$", line)
            if not match:
                break
            holder[match.group(1)] = match.group(2).strip()
    return holder


SOURCE_SNIPPET = re.compile(r"^(on .+ line \d+|\d+:|[├│╵╷─])")


def first_error(output: str) -> str:
    """Terraform's own first error as one line: its summary and its explanation,
    without the source snippet it quotes."""
    text = ANSI.sub("", output)
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("Error:"):
            detail = []
            for part in lines[i + 1 :]:
                if part.startswith("Error:"):
                    break
                if part and not SOURCE_SNIPPET.match(part):
                    detail.append(part)
            return " ".join([line, *detail])[:600]
    tail = [line for line in lines if line]
    return tail[-1][:600] if tail else "terraform failed without a message"


def binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        hint = "https://developer.hashicorp.com/terraform/install" if name == "terraform" else "https://opentofu.org/docs/intro/install/"
        raise ToolMissing(f"{name} is not installed or not on PATH ({hint}); the site's gke.terraform chooses terraform or tofu")
    return found


class Terraform:
    """One root module for one site: its own copy of the module, its own data folder,
    its variables in a file, its backend settings in a file."""

    def __init__(
        self,
        module: Path,
        work: Path,
        *,
        tool: str = "terraform",
        variables: Mapping[str, Any] | None = None,
        backend: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        secrets: list[str] | None = None,
        lock_timeout: str = "60s",
        attempts: int = 4,
        backoff: float = 5.0,
        timeout: float = 3600,
        on_line: Callable[[str], None] | None = None,
    ):
        self.module = module
        self.work = work
        self.tool = tool
        self.variables = dict(variables or {})
        self.backend = dict(backend or {})
        self.secrets = [s for s in (secrets or []) if s]
        self.lock_timeout = lock_timeout
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.on_line = on_line
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TF_")},
            **(env or {}),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            "TF_DATA_DIR": str(work / ".terraform"),
            "CHECKPOINT_DISABLE": "1",
        }

    @property
    def root(self) -> Path:
        return self.work / "module"

    def _prepare(self) -> None:
        """A fresh copy of the module (terraform writes its lock file beside the code)
        and the backend settings, in a private file."""
        if self.root.exists():
            shutil.rmtree(self.root)
        shutil.copytree(self.module, self.root, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", "*.tfplan"))
        backend = "".join(f"{key} = {json.dumps(value)}\n" for key, value in sorted(self.backend.items()))
        atomic_write(self.work / "backend.hcl", backend, mode=0o600)

    def _run(self, *args: str, ok: tuple[int, ...] = (0,), quiet: bool = False) -> tuple[int, str]:
        """One terraform command, retried while the state is locked or the provider answers 429/5xx."""
        argv = [binary(self.tool), f"-chdir={self.root}", *args]
        logger = task_logger()
        for attempt in range(1, self.attempts + 1):
            try:
                # Through a file, not a pipe: killed with this process, terraform would die
                # halfway and leave the state locked; so it finishes and unlocks (a rerun
                # waits for it through -lock-timeout).
                result = run(
                    argv, env=self.env, secrets=self.secrets, check=False, timeout=self.timeout,
                    on_line=None if quiet else (self.on_line or logger.info), output_file=self.work / "terraform.log",
                )
            except CommandError as exc:  # timed out
                raise TerraformError(f"{self.tool} {args[0]} timed out after {self.timeout:.0f}s") from None
            if result.returncode in ok:
                return result.returncode, result.output
            message = first_error(result.output)
            locked = "Error acquiring the state lock" in result.output
            transient = locked or bool(TRANSIENT.search(result.output))
            if not transient or attempt == self.attempts:
                if locked:
                    holder = parse_lock_holder(result.output)
                    who = ", ".join(f"{k.lower()} {holder[k]}" for k in ("Who", "Operation", "Created", "ID") if holder.get(k))
                    raise StateLocked(
                        f"{self.tool} {args[0]}: the state is locked by another run ({who or 'holder unknown'}); "
                        f"tried {attempt} times. If that run is dead: {self.tool} force-unlock {holder.get('ID', '<ID>')}",
                        holder,
                    )
                raise TerraformError(f"{self.tool} {args[0]}: {message}")
            wait = self.backoff * 2 ** (attempt - 1)
            logger.warning("%s %s: %s; retrying in %.0fs (%d of %d)", self.tool, args[0], message, wait, attempt, self.attempts)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def init(self) -> None:
        self._prepare()
        args = ["init", "-input=false", "-no-color", "-reconfigure"]
        if self.backend:
            args.append(f"-backend-config={self.work / 'backend.hcl'}")
        self._run(*args)

    def plan(self, *, destroy: bool = False, variables: Mapping[str, Any] | None = None) -> PlanSummary:
        """A saved plan; ``variables`` override the module's for this plan only."""
        plan_file = self.work / ("destroy.tfplan" if destroy else "olab.tfplan")
        # The variables as they are now, in a private file (never -var on the command line).
        values = {**self.variables, **(variables or {})}
        atomic_write(self.work / "olab.tfvars.json", json.dumps(values, indent=2, sort_keys=True), mode=0o600)
        args = [
            "plan", "-input=false", "-no-color", "-detailed-exitcode", f"-lock-timeout={self.lock_timeout}",
            f"-var-file={self.work / 'olab.tfvars.json'}", f"-out={plan_file}",
        ]
        if destroy:
            args.append("-destroy")
        self._run(*args, ok=(0, 2))
        _, shown = self._run("show", "-json", "-no-color", str(plan_file), quiet=True)
        return parse_plan(json.loads(shown), plan_file, destroy)

    def apply(self, plan: PlanSummary) -> None:
        """Apply exactly the saved plan (terraform refuses a plan that went stale)."""
        self._run("apply", "-input=false", "-no-color", f"-lock-timeout={self.lock_timeout}", str(plan.plan_file))

    def outputs(self) -> dict[str, Any]:
        _, shown = self._run("output", "-json", "-no-color", quiet=True)
        return {name: value.get("value") for name, value in json.loads(shown or "{}").items()}
