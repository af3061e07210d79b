"""Language names and aliases, and the images they point at."""

from __future__ import annotations

import pytest

from fission.core.languages import LANGUAGES, resolve_language
from fission.errors import InvalidInput, UnknownLanguage
from fission.images.recipes import RECIPES

EVERY_NAME = [
    (alias, lang.name) for lang in LANGUAGES.values() for alias in (lang.name, *lang.aliases)
]


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("python", "python"),
        ("py", "python"),
        ("python3", "python"),
        ("node", "node"),
        ("javascript", "node"),
        ("js", "node"),
        ("nodejs", "node"),
        ("bash", "bash"),
        ("sh", "bash"),
        ("shell", "bash"),
    ],
)
def test_documented_aliases(alias: str, name: str) -> None:
    assert resolve_language(alias).name == name


@pytest.mark.parametrize(("alias", "name"), EVERY_NAME)
@pytest.mark.parametrize("spell", [str, str.upper, str.title, str.swapcase, lambda s: f" {s}\t"])
def test_every_alias_resolves_in_any_case(alias: str, name: str, spell: object) -> None:
    assert resolve_language(spell(alias)).name == name  # type: ignore[operator]


def test_resolving_gives_the_registered_language() -> None:
    assert resolve_language("JavaScript") is LANGUAGES["node"]


def test_no_alias_is_claimed_twice() -> None:
    names = [alias for alias, _ in EVERY_NAME]
    assert len(names) == len(set(names))
    assert all(alias == alias.lower().strip() for alias in names)


@pytest.mark.parametrize("language", list(LANGUAGES.values()), ids=list(LANGUAGES))
def test_every_language_has_an_image_recipe_and_a_command(language: object) -> None:
    assert language.image in RECIPES  # type: ignore[attr-defined]
    assert language.argv and language.script_name  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["cobol", "", "   ", "pythons", "node.js", "ruby"])
def test_an_unknown_language_lists_the_known_ones(name: str) -> None:
    with pytest.raises(UnknownLanguage) as caught:
        resolve_language(name)
    message = str(caught.value)
    assert repr(name) in message
    for alias, _ in EVERY_NAME:
        assert alias in message
    assert isinstance(caught.value, InvalidInput)
