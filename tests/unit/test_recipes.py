"""Cache keys: stable, order-sensitive, unambiguous, and changed by every input."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fission.cache_keys import cache_key
from fission.images.recipes import RECIPES, Recipe, recipe_key

parts = st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=20)), max_size=5)


def as_bytes(items: list[str | bytes]) -> list[bytes]:
    return [item.encode() if isinstance(item, str) else item for item in items]


def test_cache_key_is_stable_and_short_hex() -> None:
    key = cache_key("a", b"b", "c")
    assert key == cache_key("a", b"b", "c")
    assert len(key) == 16 and int(key, 16) >= 0


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "b"), ("b", "a")),
        (("ab", "c"), ("a", "bc")),
        (("a",), ("a", "")),
        ((), ("",)),
        (("a", "b", "c"), ("a", "b")),
    ],
)
def test_cache_key_tells_inputs_apart(left: tuple[str, ...], right: tuple[str, ...]) -> None:
    assert cache_key(*left) != cache_key(*right)


@given(parts, parts)
def test_different_inputs_give_different_keys(
    left: list[str | bytes], right: list[str | bytes]
) -> None:
    assume(as_bytes(left) != as_bytes(right))
    assert cache_key(*left) != cache_key(*right)


PYTHON = RECIPES["python"]
SOURCES = b"deb http://deb.debian.org/debian bookworm main\n"


def test_recipe_key_is_stable() -> None:
    assert recipe_key(PYTHON, SOURCES) == recipe_key(PYTHON, SOURCES)


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(PYTHON, packages=(*PYTHON.packages, "python3-scipy")),
        dataclasses.replace(PYTHON, packages=PYTHON.packages[:-1]),
        dataclasses.replace(PYTHON, packages=tuple(reversed(PYTHON.packages))),
        dataclasses.replace(PYTHON, packages=("python3", "python3-numpy", "python3-pandasx")),
        dataclasses.replace(PYTHON, name="python-other"),
    ],
)
def test_recipe_key_changes_with_the_recipe(changed: Recipe) -> None:
    assert recipe_key(changed, SOURCES) != recipe_key(PYTHON, SOURCES)


@pytest.mark.parametrize(
    "sources",
    [
        SOURCES + b"deb http://security.debian.org/ bookworm-security main\n",
        SOURCES[:-1],
        b"",
        SOURCES.replace(b"http", b"https"),
    ],
)
def test_recipe_key_changes_with_the_apt_sources(sources: bytes) -> None:
    assert recipe_key(PYTHON, sources) != recipe_key(PYTHON, SOURCES)


def test_the_description_does_not_force_a_rebuild() -> None:
    reworded = dataclasses.replace(PYTHON, description="something else")
    assert recipe_key(reworded, SOURCES) == recipe_key(PYTHON, SOURCES)


def test_every_recipe_has_its_own_key() -> None:
    assert all(name == recipe.name for name, recipe in RECIPES.items())
    keys = {recipe_key(recipe, SOURCES) for recipe in RECIPES.values()}
    assert len(keys) == len(RECIPES)


def test_images_that_clone_have_git() -> None:
    from fission.core.provision import GIT_IMAGES
    from fission.images.recipes import RECIPES

    for image in GIT_IMAGES:
        assert "git" in RECIPES[image].packages
