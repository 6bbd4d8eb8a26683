"""The README and docs/: the generated key table matches the options, every relative link resolves, every recipe is
listed, and the README stays a front door (under 200 lines, the two commands CI runs)."""
import re
from pathlib import Path

import pytest

from tools import recipe_keys

REPO = Path(__file__).resolve().parents[1]
README = REPO / 'README.md'
PAGES = [README, *sorted((REPO / 'docs').glob('*.md'))]
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```.*?^```', re.MULTILINE | re.DOTALL)


def prose(path: Path) -> str:
    """The page without its code blocks, whose brackets are code, not links."""
    return FENCE.sub('', path.read_text())


def anchors(path: Path) -> set:
    """GitHub's anchors of a page's headings (a repeated heading gets -1, -2, ...)."""
    found = set()
    for heading in re.findall(r'^#{1,6} +(.+?) *$', prose(path), re.MULTILINE):
        slug = recipe_keys.anchor(heading.replace('`', ''))
        name, n = slug, 0
        while name in found:
            n += 1
            name = f'{slug}-{n}'
        found.add(name)
    return found


def relative_links(path: Path) -> list:
    return [target for target in LINK.findall(prose(path)) if not re.match(r'[a-z]+:', target)]


def test_recipe_keys_page_and_readme_index_are_those_the_options_generate():
    assert (REPO / 'docs' / 'recipe-keys.md').read_text() == recipe_keys.page(), \
        'docs/recipe-keys.md differs from training/config.py: run python tools/recipe_keys.py'
    assert README.read_text() == recipe_keys.readme_with_index(README.read_text()), \
        "the README's index of recipe keys differs from training/config.py: run python tools/recipe_keys.py"


def test_recipe_keys_page_has_a_row_for_every_option():
    page = (REPO / 'docs' / 'recipe-keys.md').read_text()
    rows = re.findall(r'^\| `([a-z_0-9]+)`', page, re.MULTILINE)
    assert rows == [option.name for option in recipe_keys.OPTIONS]


def test_readme_is_under_200_lines():
    assert len(README.read_text().splitlines()) < 200


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file, _, fragment = target.partition('#')
        resolved = (page.parent / file) if file else page
        if not resolved.exists():
            broken.append(f'{target}: no {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved}')
        elif fragment and (resolved.suffix == '.md') and (fragment not in anchors(resolved)):
            broken.append(f'{target}: no heading #{fragment} in {resolved.relative_to(REPO)}')
    assert not broken, f'{page.relative_to(REPO)}: ' + '; '.join(broken)


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition('#')[0]).resolve() for target in relative_links(README)}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_every_recipe_is_in_the_readme_table_and_in_docs_recipes():
    readme, recipes_page = README.read_text(), (REPO / 'docs' / 'recipes.md').read_text()
    names = [path.name for path in sorted((REPO / 'recipes').glob('*.yaml'))]
    assert names
    assert [name for name in names if f'`{name}`' not in readme] == []
    assert [name for name in names if f'`{name}`' not in recipes_page] == []


def test_readme_gives_the_two_commands_and_the_quickstart_model_file():
    blocks = re.findall(r'^```bash\n(.*?)^```', README.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks[0].strip().endswith('python train.py -c recipes/quickstart.yaml')
    assert blocks[1].strip() == 'python -m pytest'  # what .ci/run runs, as the user types it
    assert 'Best model: output/quickstart/model_best.pth.tar' in README.read_text()
