"""Fixtures shared by test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one intra-op thread (and the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def world_cache(tmp_path_factory):
    """The world's models that tests build (the micro preset) go to a temporary cache (``$LVLM_CACHE``,
    inherited by the torchrun subprocesses), never to the user's ``~/.cache/lvlm_align``."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LVLM_CACHE", str(tmp_path_factory.mktemp("lvlm_cache")))
    yield
    patch.undo()


@pytest.fixture
def refusal(capsys):
    """``refusal(parse, argv)``: run a command-line parser that must refuse ``argv`` (argparse's
    ``parser.error``, a SystemExit) and return what it printed to stderr."""
    def refuse(parse, argv):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parse(argv)
        return capsys.readouterr().err
    return refuse
