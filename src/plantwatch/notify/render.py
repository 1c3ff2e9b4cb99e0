"""Message templates: Jinja2, one file per event type, in a sandbox.

Each `<event>.txt` defines three blocks: `subject`, `body` (e-mail text, chat,
webhook) and `short` (SMS, WhatsApp). E-mail also gets an HTML part from
`_email.html`, the one template that is autoescaped. A deployment may override
any file by putting one of the same name in `PLANTWATCH_NOTIFY_TEMPLATES_DIR`;
if an override fails to render, the built-in template is used (and logged), so a
typo never silences an alert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    FileSystemLoader,
    PackageLoader,
    TemplateError,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from plantwatch.notify.channels import SEVERITY_COLOURS

log = structlog.get_logger("plantwatch.notify")

SUBJECT_MAX = 200
SHORT_MAX = 320  # two SMS segments
BODY_MAX = 20_000
_BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class Rendered:
    subject: str
    body: str
    short: str
    html: str


def _clean(text: str, limit: int) -> str:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    out = _BLANK_RUNS.sub("\n\n", "\n".join(lines))
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _one_line(text: str, limit: int) -> str:
    return _clean(" ".join(text.split()), limit)


def _environment(loader: BaseLoader) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        loader=loader,
        autoescape=select_autoescape(enabled_extensions=("html",), default=False),
        trim_blocks=True,
        lstrip_blocks=True,
    )


class Renderer:
    def __init__(self, templates_dir: Path | None = None) -> None:
        builtin = PackageLoader("plantwatch.notify", "templates")
        self._builtin = _environment(builtin)
        self._custom = (
            _environment(ChoiceLoader([FileSystemLoader(str(templates_dir)), builtin]))
            if templates_dir is not None
            else None
        )

    def render(self, name: str, context: dict[str, Any]) -> Rendered:
        if self._custom is not None:
            try:
                return self._render(self._custom, name, context)
            except TemplateError:
                log.exception("notify_template_failed", template=name)
        return self._render(self._builtin, name, context)

    def _render(self, env: SandboxedEnvironment, name: str, context: dict[str, Any]) -> Rendered:
        template = env.get_template(f"{name}.txt")

        def block(which: str) -> str:
            render = template.blocks[which]
            return "".join(render(template.new_context(context)))

        subject = _one_line(block("subject"), SUBJECT_MAX)
        body = _clean(block("body"), BODY_MAX)
        short = _one_line(block("short"), SHORT_MAX)
        html = self._html(env, subject, body, context.get("link"), str(context.get("severity")))
        return Rendered(subject=subject, body=body, short=short, html=html)

    def email_html(self, subject: str, body: str, link: str | None, severity: str) -> str:
        """The HTML part of an e-mail whose text was rendered earlier (autoescaped)."""
        if self._custom is not None:
            try:
                return self._html(self._custom, subject, body, link, severity)
            except TemplateError:
                log.exception("notify_template_failed", template="_email.html")
        return self._html(self._builtin, subject, body, link, severity)

    @staticmethod
    def _html(env: SandboxedEnvironment, subject: str, body: str, link: Any, severity: str) -> str:
        return env.get_template("_email.html").render(
            subject=subject,
            body=body,
            link=link,
            colour=SEVERITY_COLOURS.get(severity, "808080"),
        )
