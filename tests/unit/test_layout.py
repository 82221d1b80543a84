import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_platform_is_the_standard_library_module_from_the_repo_root():
    proc = subprocess.run([sys.executable, "-c", "import platform; print(platform.system(), platform.__file__)"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    system, path = proc.stdout.split()
    assert system == "Linux"
    assert not path.startswith(str(ROOT)), path
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_rayloop_is_the_checkout_source():
    import rayloop

    assert Path(rayloop.__file__).resolve() == ROOT / "platform" / "rayloop" / "__init__.py"
