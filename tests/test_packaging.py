"""The pinned stack is the same everywhere it is written down: pyproject, the CPU
requirements that `make setup` installs, the Makefile and the GPU Dockerfile."""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from support import REPO_ROOT

STACK = {"torch": "2.13.0", "fbgemm": "1.8.0", "torchrec": "1.8.0"}


def pins(lines, name):
    return {m.group(1) for line in lines if (m := re.match(rf"{name}==([\w.]+)", line.strip()))}


def test_pyproject_pins_the_stack_in_step():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert pins(deps, "torch") == {STACK["torch"]}
    assert pins(deps, "torchrec") == {STACK["torchrec"]}
    extras = project["optional-dependencies"]
    assert pins(extras["cpu"], "fbgemm-gpu-cpu") == {STACK["fbgemm"]}
    assert pins(extras["gpu"], "fbgemm-gpu") == {STACK["fbgemm"]}


def test_cpu_requirements_and_makefile_match_pyproject():
    req = (REPO_ROOT / "requirements" / "cpu.txt").read_text().splitlines()
    assert pins(req, "torch") == {STACK["torch"]}
    assert pins(req, "fbgemm-gpu-cpu") == {STACK["fbgemm"]}
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert f"torchrec=={STACK['torchrec']}" in makefile


def test_dockerfile_installs_the_same_versions():
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.M))
    assert args["TORCH_VERSION"] == STACK["torch"]
    assert args["FBGEMM_VERSION"] == STACK["fbgemm"]
    assert args["TORCHREC_VERSION"] == STACK["torchrec"]


def test_installed_stack_is_the_pinned_one():
    import fbgemm_gpu
    import torch
    import torchrec

    assert torch.__version__.split("+")[0] == STACK["torch"]
    assert torchrec.__version__ == STACK["torchrec"]
    assert fbgemm_gpu.__version__.split("+")[0] == STACK["fbgemm"]


def test_console_script_reports_version_and_help_without_loading_torch():
    probe = (
        "import sys; from ctrscale.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'ctrscale --help imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "ctrscale", "--version"], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "ctrscale 0.1.0"


def test_dockerfile_creates_its_user_on_a_base_image_that_has_uid_1000(tmp_path):
    """nvidia/cuda:*-ubuntu24.04 inherits user/group `ubuntu` with uid/gid 1000. The
    Dockerfile's user commands, run against a root with that user (`--root`), succeed and
    give ctrscale uid and gid 1000; a plain `useradd --uid 1000` fails there."""
    if shutil.which("useradd") is None or os.geteuid() != 0:
        pytest.skip("needs useradd and root")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "home").mkdir()
    files = {
        "passwd": "root:x:0:0::/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/sh\n",
        "group": "root:x:0:\nubuntu:x:1000:\n",
        "shadow": "root:*:19000::::::\nubuntu:!:19000::::::\n",
        "gshadow": "root:*::\nubuntu:!::\n",
    }
    for name, text in files.items():
        (root / "etc" / name).write_text(text)
    plain = ["useradd", "--root", str(root), "--uid", "1000", "x"]
    refused = subprocess.run(plain, capture_output=True)
    assert refused.returncode != 0 and b"not unique" in refused.stderr

    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    run = re.search(r"^RUN (if id -u ubuntu.*?)\n(?!\s*&&)", dockerfile, re.M | re.S).group(1)
    steps = [step.strip(" \\\n") for step in run.split("&&")]
    script = " && ".join(s for s in steps if s.startswith(("if ", "groupadd", "useradd")))
    script = script.replace("id -u ubuntu", f"grep -q '^ubuntu:' {root}/etc/passwd")
    script = script.replace("getent group ubuntu", f"grep -q '^ubuntu:' {root}/etc/group")
    for tool in ("userdel", "groupdel", "groupadd", "useradd"):
        script = script.replace(f"{tool} ", f"{tool} --root {root} ")
    subprocess.run(["sh", "-c", script], check=True, capture_output=True)
    users = (root / "etc/passwd").read_text().splitlines()
    entry = next(line for line in users if line.startswith("ctrscale:"))
    assert entry.split(":")[2:4] == ["1000", "1000"]
