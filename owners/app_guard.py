"""The only Flower ClientApp that ever runs at the owner is the one the owner installed.

A Flower SuperNode normally installs whatever Flower App (FAB) the server submits and imports the
ClientApp it names: a cloud could ship its own code and run it next to the owner's key. The
owner's SuperNode therefore starts this module in place of Flower's ``flwr-clientapp`` (through a
private ``flwr-clientapp`` on its PATH, ``owners/federate.py``). It runs Flower's own ClientApp
process with two changes, made before anything of the run is read:

* the FAB is *checked, never installed*: it may hold only its ``pyproject.toml`` and Flower's
  content list, and its ClientApp must be :data:`INSTALLED_CLIENTAPP`; anything else refuses the
  run (the server gets an error reply) and no byte of it is unpacked or imported;
* the ClientApp is loaded from this installation (``owners.client_app:app``), never from a path
  the server controls; dependencies are never installed at run time.
"""
from __future__ import annotations

import importlib
import io
import sys
import zipfile

from owners.errors import OwnerError

INSTALLED_CLIENTAPP = "owners.client_app:app"
FAB_FILES = ("pyproject.toml", ".info/CONTENT")  # what a code-free Flower App holds (flwr build)
MAX_FAB_BYTES = 1 << 20  # a code-free app is a few KB; refuse to parse anything large


class ForeignApp(OwnerError):
    """The server asked this owner to run an app other than the installed client."""


def check_fab(content: bytes) -> None:
    """Refuse a Flower App that ships files or names a ClientApp other than the installed one."""
    if len(content) > MAX_FAB_BYTES:
        raise ForeignApp(f"refused the server's Flower app: {len(content)} bytes; a code-free app is a few KB")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            names = fab.namelist()
            extra = sorted(set(names) - set(FAB_FILES))
            if extra or "pyproject.toml" not in names:
                raise ForeignApp(f"refused the server's Flower app: it ships {', '.join(extra[:5]) or 'no pyproject'}; "
                                 f"only the installed client ({INSTALLED_CLIENTAPP}) runs here")
            pyproject = fab.read("pyproject.toml")
    except zipfile.BadZipFile:
        raise ForeignApp("refused the server's Flower app: not a zip archive") from None
    named = _clientapp_of(pyproject)
    if named != INSTALLED_CLIENTAPP:
        raise ForeignApp(f"refused the server's Flower app: it names ClientApp {named!r}; only the installed "
                         f"client ({INSTALLED_CLIENTAPP}) runs here")


def _clientapp_of(pyproject: bytes) -> str | None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        doc = tomllib.loads(pyproject.decode("utf-8"))
        return str(doc["tool"]["flwr"]["app"]["components"]["clientapp"])
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return None


def _check_instead_of_install(fab_file, install_dir=None, skip_prompt: bool = False) -> None:
    """Stands in for Flower's ``install_from_fab``: checks the app, unpacks and installs nothing."""
    if not isinstance(fab_file, bytes):
        raise ForeignApp("refused a Flower app given as a file path; only the server's bytes are checked")
    check_fab(fab_file)


def _installed_client_loader(**_):
    """Stands in for Flower's ``get_load_client_app_fn``: the installed ClientApp, whatever the run says."""
    def load(fab_id: str, fab_version: str, fab_hash: str):
        from owners.client_app import app

        return app

    return load


def main() -> None:
    """``flwr-clientapp`` for the owner's SuperNode: Flower's ClientApp process, guarded."""
    # The modules by their full names: the packages re-export functions of the same names.
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    # Fail closed: if this Flower version loads apps through other names, run nothing at all.
    laid_out_as_expected = (hasattr(runner, "install_from_fab") and hasattr(runner, "get_load_client_app_fn")
                            and cli.run_clientapp is runner.run_clientapp)
    if not laid_out_as_expected:
        raise ForeignApp("this Flower version's flwr-clientapp is laid out differently; refusing to run unguarded")
    runner.install_from_fab = _check_instead_of_install
    runner.get_load_client_app_fn = _installed_client_loader
    sys.argv = [a for a in sys.argv if a != "--allow-runtime-dependency-installation"]
    cli.flwr_clientapp()


if __name__ == "__main__":
    main()
