import pytest

from l2t.config import ConfigError
from l2t.data import DataError
from l2t.errors import L2TError, print_error
from l2t.evaluate import EvaluationError
from l2t.images import ImageError
from l2t.merge import MergeError
from l2t.models import ModelError
from l2t.parity import ParityError
from l2t.runs import RunFolderError


@pytest.mark.parametrize(
    ("error", "other_base"),
    [
        (ConfigError("k"), ValueError),
        (DataError("d"), Exception),
        (ImageError("image_missing", "i"), Exception),
        (ModelError("m"), RuntimeError),
        (RunFolderError("r"), ValueError),
        (EvaluationError("e"), Exception),
        (MergeError("m"), RuntimeError),
        (ParityError("p", {}), RuntimeError),
    ],
)
def test_every_user_error_is_an_l2t_error_and_keeps_its_other_base(error, other_base):
    assert isinstance(error, L2TError) and isinstance(error, other_base)


def test_a_user_error_is_one_line_and_exit_status_1(capsys):
    assert print_error(ConfigError("train.batch_size=0: must be at least 1")) == 1
    assert capsys.readouterr().err == "error: train.batch_size=0: must be at least 1\n"


def test_importing_the_library_does_not_print_the_optional_kernel_notice():
    import subprocess
    import sys

    code = "import l2t.models, peft, bitsandbytes, logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a real warning')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr
    assert "a real warning" in done.stderr
