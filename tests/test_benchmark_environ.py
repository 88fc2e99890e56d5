"""benchmarks/run.py keeps the environment variables Lightning's import sets to Lightning's own runners.

Lightning's import sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` process-wide, which
made every ``torch.cuda.is_available()`` (once per optimizer step, in every
runner) ~36 µs slower on a machine without a GPU. A stand-in ``lightning``
package that sets a variable at import shows the isolation without Lightning
installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]  # the stand-in lightning first, then benchmarks/
    os.environ["EK_KEPT"] = "mine"
    from lightning_env import import_lightning, in_lightning_environ
    module = import_lightning()
    assert module.__version__ == "0.0-standin", module.__file__
    assert "EK_SET_BY_LIGHTNING" not in os.environ and os.environ["EK_KEPT"] == "mine"  # put back after the import
    seen = in_lightning_environ(lambda: (os.environ.get("EK_SET_BY_LIGHTNING"), os.environ.get("EK_KEPT")))
    assert seen == ("1", None), seen  # Lightning's own environment while its runner runs
    assert "EK_SET_BY_LIGHTNING" not in os.environ and os.environ["EK_KEPT"] == "mine"  # and put back again
    import_lightning()  # a second import changes nothing either
    assert "EK_SET_BY_LIGHTNING" not in os.environ
    print("isolated")
    """
)


def test_lightnings_environment_is_given_only_to_its_runners(tmp_path: Path) -> None:
    package = tmp_path / "standin" / "lightning"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os\nos.environ['EK_SET_BY_LIGHTNING'] = '1'\nos.environ.pop('EK_KEPT', None)\n__version__ = '0.0-standin'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "standin"), str(REPO / "benchmarks")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "isolated", result.stdout + result.stderr
