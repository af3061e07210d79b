"""The MCP tools for templates: list, build (from the shared host directory) and delete.

A mixin of ``FissionTools``; runs and sandboxes take a template through ``run_code`` and
``sandbox_create``'s ``template`` parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field

from fission.core import template_build, templates
from fission.errors import PathNotAllowed

if TYPE_CHECKING:
    from fission.core.service import Service
    from fission.mcp.files import HostFiles

TemplateName = Annotated[
    str, Field(min_length=1, max_length=63, description="A template's name (template_list).")
]


class TemplateInfo(BaseModel):
    """One built template."""

    name: str = Field(description="Pass it as `template` to run_code or sandbox_create.")
    language: str = Field(description="The language its programs run in.")
    env: dict[str, str] = Field(description="Environment every run in it gets.")
    ready: bool = Field(description="False when it must be built again (its snapshot is gone).")


class TemplateList(BaseModel):
    """The built templates."""

    templates: list[TemplateInfo]


class TemplateBuilt(BaseModel):
    """A template that is ready to use."""

    template: TemplateInfo
    cached: bool = Field(description="True when it was already built from the same content.")


def template_info(built: template_build.BuiltTemplate) -> TemplateInfo:
    """The tool output of a built template."""
    data = built.to_json()
    return TemplateInfo(
        name=built.name, language=built.language.name, env=built.env, ready=data["ready"]
    )


class TemplateTools:
    """Template tools; ``service`` and ``host`` come from ``FissionTools``."""

    @property
    def service(self) -> Service:
        """The running service (``FissionTools.service``)."""
        raise NotImplementedError

    @property
    def host(self) -> HostFiles:
        """The shared host directory (``FissionTools.host``)."""
        raise NotImplementedError

    async def template_list(self) -> TemplateList:
        """List the built templates: named environments (packages and files installed, a
        warm VM saved) that run_code and sandbox_create can start from with `template`."""
        return TemplateList(templates=[template_info(b) for b in template_build.built_templates()])

    async def template_build(
        self,
        path: Annotated[
            str,
            Field(
                min_length=1,
                max_length=4096,
                description="The template's TOML file on the MCP server's host, relative to "
                "its shared directory.",
            ),
        ],
    ) -> TemplateBuilt:
        """Build a template from a TOML file in the shared host directory (see docs/templates.md:
        base, pip/npm/go packages, files beside it, env, start, limits). Takes a minute or
        more the first time; the same content is built once. Returns its name and whether it
        was cached; bad files fail with a message naming the problem before any VM starts."""
        source = self.host.resolve(path)
        spec = templates.load(source, template_build.source_of)
        for local in spec.files.values():  # files beside it stay inside the shared directory
            if not local.is_relative_to(self.host.root):
                raise PathNotAllowed(f"template file {local} is outside {self.host.root}")
        built, cached = await self.service.build_template(source)
        return TemplateBuilt(template=template_info(built), cached=cached)

    async def template_delete(self, name: TemplateName) -> TemplateList:
        """Delete a built template and its saved VM; returns the templates left."""
        template_build.remove(name)
        return await self.template_list()
