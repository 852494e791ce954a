"""transformers' own generic test mixins, from the source distribution of the installed transformers version.

The sdist (``pip download --no-deps --no-binary :all: transformers==X``) ships ``tests/`` with
``test_modeling_common.py`` (``ModelTesterMixin``) and ``test_configuration_common.py`` (``ConfigTester``), but
not the sibling modules they import: ``generation/test_utils.py`` (``GenerationTesterMixin``),
``exporters/test_export.py`` (``ExportTesterMixin``) and ``utils/test_configuration_utils.py``. Those are
installed here as empty stand-ins, so the generation and ``torch.export`` mixins do not run and
``ConfigTester.check_config_arguments_init`` (which needs the missing ``config_common_kwargs``) must not be
called.

Fetching happens once, in the test setup (``make setup`` / ``.ci/run``): ``python tests/transformers_sdist.py``
downloads the sdists of every transformers version CI runs into ``~/.cache/brillm/transformers-sdist``. Tests
never download; they fail with the command to run when the matching sdist is missing.
"""

import importlib
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import transformers

CACHE = Path.home() / ".cache" / "brillm" / "transformers-sdist"
CI_VERSIONS = ("5.23.0", "5.24.0")  # keep in step with requirements-ci.txt and .ci/run
PACKAGE = "transformers_sdist_tests"  # the sdist's tests/ folder, imported under this package name


def fetch(versions=CI_VERSIONS, cache=CACHE):
    """Download the sdists (setup time only) and unpack their ``tests/`` folders."""
    cache.mkdir(parents=True, exist_ok=True)
    for version in versions:
        archive = cache / f"transformers-{version}.tar.gz"
        if not archive.exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 f"transformers=={version}", "-d", str(cache)],
                check=True,
            )  # fmt: skip
        _unpack(archive, cache)


def _unpack(archive, cache):
    root = archive.name[: -len(".tar.gz")]
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{root}/tests/") and m.isfile()]
        tar.extractall(cache, members=members, filter="data")
    folder = cache / root / "tests"
    (folder / "__init__.py").touch()  # empty in the repository, left out of the sdist; ConfigTester execs it
    return folder


def tests_folder(version=None, cache=CACHE):
    """The unpacked ``tests/`` folder of the sdist matching ``version`` (the installed transformers by default)."""
    version = version or transformers.__version__
    folder = cache / f"transformers-{version}" / "tests"
    if not (folder / "test_modeling_common.py").exists():
        archive = cache / f"transformers-{version}.tar.gz"
        if not archive.exists():
            raise RuntimeError(
                f"transformers {version}'s source distribution is not in {cache}: run `make setup` or "
                f"`python tests/transformers_sdist.py {version}` once (the tests never download it)."
            )
        folder = _unpack(archive, cache)
    return folder


def load(version=None):
    """Import the sdist's ``tests`` as a package; returns ``(test_modeling_common, test_configuration_common)``."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests_folder(version))]
        sys.modules[PACKAGE] = package
        _stand_in("exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
        _stand_in("generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
        _stand_in("utils.test_configuration_utils", config_common_kwargs=_NotShipped())
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling, configuration


class _NotShipped(dict):
    """Stands in for ``config_common_kwargs``: any use fails, naming the missing file."""

    def _missing(self, *args):
        raise RuntimeError("config_common_kwargs lives in tests/utils/test_configuration_utils.py, not in the sdist")

    __getitem__ = __iter__ = __len__ = keys = items = copy = __deepcopy__ = _missing


def _stand_in(dotted, **attributes):
    """An empty module standing in for one the sdist does not ship."""
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join([PACKAGE, *parts[:depth]])
        if name not in sys.modules:
            module = sys.modules[name] = types.ModuleType(name)
            module.__path__ = []
    vars(sys.modules[f"{PACKAGE}.{dotted}"]).update(attributes)


if __name__ == "__main__":
    fetch(tuple(sys.argv[1:]) or CI_VERSIONS)
