"""The distribution: a wheel built from the tree maps `hub/`, `serve/`, `train/` to
`hotswap.hub`, `hotswap.serve`, `hotswap.train`, and declares the one console command."""

import subprocess
import sys
import sysconfig
import zipfile

import pytest

pytestmark = pytest.mark.slow
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_wheel_layout_and_imports_without_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("hotswap-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("hotswap/hub/registry.py", "hotswap/serve/engine/__init__.py", "hotswap/train/__init__.py",
                   "hotswap/serve/lora/bgmv.c", "hotswap/serve/lora/bgmv_rows.h",
                   "hotswap/serve/lora/activate.c"):  # kernels compile where they run
        assert module in names
    assert not any(n.startswith(("hub/", "serve/", "train/", "tests/")) for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hotswap = hotswap.hub.cli:main" in entry_points and "[hotswap.commands]" in entry_points

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # -S: no .pth files, so the editable install of this checkout cannot shadow the wheel.
    code = (f"import sys; sys.path[:0] = [{str(target)!r}, {sysconfig.get_paths()['purelib']!r}]; "
            "import hotswap.hub, hotswap.serve, hotswap.train; "
            "assert hotswap.hub.__file__.startswith(sys.path[0]), hotswap.hub.__file__; "
            "from hotswap.hub.cli import main; main(['hub', 'list', '--json', '--home', sys.argv[1]])")
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path / "home")], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
