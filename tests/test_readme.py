"""The README stays true: every flag of every script is documented with its environment variable."""

import re

import pytest

import master
import monitor
import worker
from conftest import REPO
from cropchips.cli.options import env_table

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("module", [master, worker, monitor], ids=["master", "worker", "monitor"])
def test_every_flag_and_env_twin_is_in_the_readme(module):
    for flag, env in env_table(module.build_parser(env={})):
        assert re.search(rf"`{re.escape(flag)}` \| `{env}`", README), f"{flag} / {env} missing from README"


def test_the_two_commands_are_in_the_readme_and_ci_calls_the_test_one():
    assert "make demo" in README and "make test" in README
    assert "exec make test" in (REPO / ".ci" / "run").read_text()
