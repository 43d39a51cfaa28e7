"""Plugins: the example package installs and registers; a broken plugin does not break the rest."""

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddit import plugins
from ddit.policies import Step, available_policies, get_policy

EXAMPLE = Path(__file__).parents[1] / "plugins" / "ddit-policy-example"


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    plugins.plugin_manager.cache_clear()
    yield
    plugins.plugin_manager.cache_clear()


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True)


def installed(dist):
    try:
        return importlib.metadata.distribution(dist) is not None
    except importlib.metadata.PackageNotFoundError:
        return False


def test_example_plugin_installs_and_is_found_by_name(tmp_path):
    was_installed = installed("ddit-policy-example")
    source = shutil.copytree(EXAMPLE, tmp_path / "src", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(source))  # builds in the copy
    try:
        importlib.invalidate_caches()
        assert "sigma_threshold" in [cls.name for cls in plugins.collect("ddit_policies")]
        policy = get_policy("sigma_threshold", threshold=0.5)
        policy.reset(2, 2, (2, 4, 8))
        sizes = [policy.decide(Step(i, 4, sigma, 1000 * sigma, torch.zeros(2, 4, 8, 8))).tolist()
                 for i, sigma in enumerate([1.0, 0.75, 0.5, 0.25])]
        assert sizes == [[8, 8], [8, 8], [2, 2], [2, 2]]
    finally:
        if not was_installed:
            pip("uninstall", "--yes", "ddit-policy-example")


def fake_distribution(root: Path, dist: str, module: str, source: str) -> None:
    """An installed distribution ``dist`` whose ``ddit`` entry point is ``module``."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[ddit]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(source)


GOOD_PLUGIN = '''
from ddit.plugins import hookimpl
from ddit.policies import PatchPolicy


class GoodPolicy(PatchPolicy):
    name = "good_policy"

    def choose(self, step):
        return self.base_size, {}


@hookimpl
def ddit_policies():
    return [GoodPolicy]
'''


def test_broken_plugin_is_reported_by_distribution_and_the_others_load(tmp_path, monkeypatch):
    fake_distribution(tmp_path, "broken-ddit-plugin", "broken_ddit_plugin", "raise ImportError('no GPU here')\n")
    fake_distribution(tmp_path, "good-ddit-plugin", "good_ddit_plugin", GOOD_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(plugins.PluginWarning, match="broken-ddit-plugin.*no GPU here"):
        policies = available_policies()
    assert "good_policy" in policies and "third_order" in policies


def test_plugin_whose_hook_raises_is_skipped():
    class Raising:
        @plugins.hookimpl
        def ddit_policies(self):
            raise RuntimeError("bad hook")

    class Good:
        @plugins.hookimpl
        def ddit_policies(self):
            return ["a policy"]

    plugins.plugin_manager().register(Raising(), name="raising-dist:raising")
    plugins.plugin_manager().register(Good(), name="good-dist:good")
    with pytest.warns(plugins.PluginWarning, match="raising-dist:raising.*bad hook"):
        assert "a policy" in plugins.collect("ddit_policies")
