"""The wheels the GPU machine lacks for petpipe and the lesson benchmarks (its python3 is 3.12, with no network).

The device image (``nvidia-h200``, read 2026-11-17: ``DEVICE`` below) has torch 2.11, torchvision 0.26, timm, numpy,
pandas, matplotlib, pillow, pyyaml, psutil, nvidia-ml-py and much more, but not DVC, MLflow, pydantic or fastai. This
resolves, with a Python 3.12 interpreter (``--python312``, default ``python3.12``), the dependency closure of

- petpipe's dependencies (pyproject.toml), with ``mlflow-skinny`` + ``mlflow-tracing`` instead of ``mlflow`` (see
  below), plus ``sqlalchemy`` and ``alembic`` for the sqlite store (``sqlite:///mlflow.db``);
- ``fastai>=2.8,<2.9`` for ``benchmarks/fastai_lesson.py``, without spaCy: fastai requires it, but only
  ``fastai.text`` imports it, never ``fastai.vision.all``;

in a scratch virtual environment where the device's packages are already "installed" (empty stubs at the versions
the device reports, so the resolver keeps them), pinned to the versions this checkout's venv has (``pip freeze``:
the versions the tests ran), then downloads the missing ones with ``pip download --no-deps`` for cp312 manylinux
x86_64 into ``DEST`` (default ``.whl`` in the repository root; ``/.whl/`` belongs in ``.git/info/exclude``).

Why ``mlflow-skinny``: the full ``mlflow`` wheel is the same Python package plus the UI's JavaScript and the
server's dependencies (Flask, gunicorn, graphene, docker, scikit-learn, skops...), none of which a stage imports.
The skinny wheel holds the sqlalchemy tracking store and the pyfunc/pytorch model flavours. The full wheel is still
carried (12 MB), without its dependencies (``WITHOUT_DEPS``): petpipe reads ``importlib.metadata.version("mlflow")``
for the logged models' requirements, and only the ``mlflow`` distribution answers that. Were that read to fall back
to ``mlflow-skinny``, the wheel could go.

Then it checks what it can without the device: every wheel is ``py3-none-any``, ``cp312`` or ``abi3`` and
``manylinux`` x86_64 or pure; one version per project; every non-extra ``Requires-Dist`` (markers evaluated for
CPython 3.12 on Linux x86_64) of every wheel is met by a wheel or a device package (at the device's version where
known); and the total size. ``--check`` checks an existing ``DEST`` without downloading.

    .venv/bin/python benchmarks/device_wheels.py                    # -> .whl/
    .venv/bin/python benchmarks/device_wheels.py /work/main/.whl    # into another checkout
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]  # fmt: skip
# /work/.library/device/KINDS.md, "Python packages already there" (read on a machine on 2026-11-17).
DEVICE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
# The versions the device reported (KINDS.md's pip list row); the others are taken as any version.
DEVICE_VERSIONS = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                   "huggingface-hub": "1.33.0", "triton": "3.6.0", "accelerate": "1.15.0", "transformers": "5.17.0",
                   "tokenizers": "0.23.2", "torchmetrics": "1.9.0", "pytorch-lightning": "2.6.6"}  # fmt: skip
# Required by a carried wheel but never imported on the lesson's path: left out on purpose (stubbed for the resolver).
LEFT_OUT = {"spacy": "3.8.7"}  # fastai: only fastai.text imports spacy; fastai.vision.all does not
# fastprogress 1.0.3: from 1.1 it imports fasthtml (a web framework: starlette, uvicorn[standard], httpx2...) at import
# time; fastai 2.8 asks only for fastprogress>=0.2.4 and uses progress_bar and master_bar, which 1.0.3 has.
# The full mlflow wheel, installed without its server's requirements (Flask, gunicorn, graphene, docker, scikit-learn,
# skops...): petpipe pins the logged models' mlflow==importlib.metadata.version("mlflow") (tracking/models.py), which
# mlflow-skinny alone does not answer. Its Python code is mlflow-skinny's (same version) plus the UI; of its own
# requirements a stage imports only these.
WITHOUT_DEPS = {"mlflow": {"mlflow-skinny", "mlflow-tracing"}}
ROOTS = ["mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic", "fastai>=2.8,<2.9", "fastprogress==1.0.3"]


def project_requirements() -> list[str]:
    """pyproject.toml's dependencies, ``mlflow`` as ``mlflow-skinny`` (ROOTS), torch's own stack left to the device."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if canonicalize_name(Requirement(d).name) != "mlflow"] + ROOTS


def tested_versions() -> list[str]:
    """``name==version`` of this venv's packages that the device lacks: the closure keeps the versions tested here."""
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                            text=True, check=True).stdout.split()  # fmt: skip
    device = {canonicalize_name(n) for n in DEVICE}
    pins = [line for line in frozen if "==" in line and "+" not in line]
    return [p for p in pins if canonicalize_name(p.split("==")[0]) not in device | set(LEFT_OUT)]


def stub(site: Path, name: str, version: str) -> None:
    """An empty installed distribution: pip's resolver takes ``name==version`` as there already."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("stub\n")
    (info / "RECORD").write_text("")


def resolve(python312: str, scratch: Path) -> dict[str, tuple[str, bool]]:
    """The closure's packages the device lacks, ``{name: (version, is a wheel)}``, resolved by pip for Python 3.12."""
    venv = scratch / "venv"
    subprocess.run([python312, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3.12/site-packages"))
    for name, version in DEVICE_VERSIONS.items() | LEFT_OUT.items():
        stub(site, name, version)
    constraints = scratch / "constraints.txt"
    constraints.write_text("\n".join(tested_versions()) + "\n")
    report = scratch / "report.json"
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin/python")]  # this pip, run for the 3.12 venv
    # --prefer-binary, not --only-binary: hydra-core (DVC) needs antlr4-python3-runtime 4.9.*, an sdist alone
    subprocess.run([*pip, "install", "--dry-run", "--quiet", "--prefer-binary", "--report", str(report),
                    "-c", str(constraints), *project_requirements()], check=True)  # fmt: skip
    installs = json.loads(report.read_text())["install"]
    device = {canonicalize_name(n) for n in DEVICE}
    picked = {
        canonicalize_name(i["metadata"]["name"]): (i["metadata"]["version"], i["download_info"]["url"].endswith(".whl"))
        for i in installs
    }
    wanted = {name: picked[name] for name in sorted(picked) if name not in device}
    return wanted | {"mlflow": wanted["mlflow-skinny"]}


def download(wanted: dict[str, tuple[str, bool]], dest: Path) -> None:
    """Wheels for CPython 3.12 manylinux x86_64; a package published as an sdist alone is built into a wheel here
    (pure Python, or the check fails)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()  # one version of each: two stop the whole install on the device
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    wheels = [f"{name}=={version}" for name, (version, is_wheel) in wanted.items() if is_wheel]
    sdists = [f"{name}=={version}" for name, (version, is_wheel) in wanted.items() if not is_wheel]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *wheels],
                   check=True)  # fmt: skip
    if sdists:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), *sdists],
                       check=True)  # fmt: skip


def device_environment() -> dict[str, str]:
    env = default_environment()
    env.update(python_version="3.12", python_full_version="3.12.3", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix", extra="")  # fmt: skip
    return env


def check(dest: Path) -> list[str]:
    """What would stop or break the install on the device; prints the wheels and their total size."""
    problems = []
    wheels = sorted(dest.glob("*.whl"))
    have: dict[str, str] = {}
    for wheel in wheels:
        name, version, _, tags = parse_wheel_filename(wheel.name)
        if name in have:
            problems.append(f"two versions of {name}: {have[name]} and {version}")
        have[name] = str(version)
        fits = any(
            (t.interpreter in ("py3", "cp312") and t.abi in ("none", "cp312", "abi3") or t.abi == "abi3")
            and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64")))
            for t in tags
        )
        if not fits:
            problems.append(f"{wheel.name}: not a CPython 3.12 manylinux x86_64 or pure wheel")
    device = {canonicalize_name(n) for n in DEVICE}
    env = device_environment()
    for wheel in wheels:
        wheel_name = parse_wheel_filename(wheel.name)[0]
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            requires = Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another platform's
            name = canonicalize_name(req.name)
            version = have.get(name) or DEVICE_VERSIONS.get(name)
            if name in LEFT_OUT or (wheel_name in WITHOUT_DEPS and name not in WITHOUT_DEPS[wheel_name]):
                continue
            if name not in have and name not in device:
                problems.append(f"{wheel.name} needs {req}: neither a wheel nor on the device")
            elif version is not None and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{wheel.name} needs {req}: have {version}")
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in all")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", nargs="?", type=Path, default=ROOT / ".whl", help="wheel folder (default .whl)")
    parser.add_argument("--python312", default="python3.12", help="a CPython 3.12 to resolve for")
    parser.add_argument("--check", action="store_true", help="only check the wheels already in DEST")
    args = parser.parse_args(argv)
    if not args.check:
        if shutil.which(args.python312) is None:
            sys.exit(f"{args.python312} not found: a CPython 3.12 is needed to resolve for the device (--python312)")
        with tempfile.TemporaryDirectory(prefix="petpipe-wheels-") as tmp:
            wanted = resolve(args.python312, Path(tmp))
        print("missing on the device: " + ", ".join(f"{n}=={v}" for n, (v, _) in wanted.items()), flush=True)
        download(wanted, args.dest)
    problems = check(args.dest)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
