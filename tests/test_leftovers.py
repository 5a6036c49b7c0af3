"""Nothing left behind: a command writes no file but its outputs, however the run ends.

Each test runs the command line in a fresh process (``python -m graphopt``, or a small driver that
registers a test pass and calls ``graphopt.app.cli.main``) from an empty working directory, with
``TMPDIR`` and ``HOME`` pointed at empty directories, and asserts afterwards that the working
directory holds only the outputs, that ``TMPDIR`` and ``HOME`` are still empty, and that the input
model is unchanged. Covered: every zoo model (``models/*.onnx``) and every corpus model
(``models/corpus/*.onnx``, when present) through ``optimize``, ``inspect`` and ``verify``; bad input;
a failing verdict; an exception inside a pass; Ctrl-C and SIGTERM in the middle of a run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.util import init, make_model, tensor

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(ROOT.glob("models/*.onnx")) + sorted(ROOT.glob("models/corpus/*.onnx"))
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass
class Sandbox:
    """Empty working directory, TMPDIR and HOME for one command-line process."""

    cwd: Path
    tmp: Path
    home: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}  # graphopt must set it
        env.update(TMPDIR=str(self.tmp), HOME=str(self.home),
                   PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]))
        return env

    def graphopt(self, *args, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], cwd=self.cwd, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def driver(self, code: str, *args) -> subprocess.Popen:
        """A process that runs ``code`` (it may register passes) and then the command line on ``args``."""
        script = code + f"\nsys.exit(cli.main({[str(a) for a in args]!r}))\n"
        # Ctrl-C reaches the process as from a terminal, even when the tests themselves run in the
        # background of a shell without job control (which starts them with SIGINT ignored, inherited).
        return subprocess.Popen([sys.executable, "-c", script], cwd=self.cwd, env=self.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def left(self) -> dict[str, set[str]]:
        """What each directory holds (recursively, relative paths)."""
        return {name: {str(p.relative_to(folder)) for p in folder.rglob("*")}
                for name, folder in (("cwd", self.cwd), ("tmp", self.tmp), ("home", self.home))}


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    folders = [tmp_path / name for name in ("cwd", "tmp", "home")]
    for folder in folders:
        folder.mkdir()
    return Sandbox(*folders)


def _digest(model: Path) -> dict[str, str]:
    """SHA-256 of a model file and of every file beside it that its name starts (its data files)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.parent.iterdir()
            if p.is_file() and p.name.startswith(model.name)}


def _uses_external_data(model: Path) -> bool:
    proto = onnx.load(str(model), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("model", MODELS, ids=lambda p: p.relative_to(ROOT / "models").as_posix())
def test_commands_leave_only_their_outputs(model, sandbox):
    before = _digest(model)
    # Zoo models must pass; a corpus model's verdict is its own tests' business, its leftovers are ours.
    allowed = {EXIT_OK} if model.parent == ROOT / "models" else {EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT}
    done = sandbox.graphopt("optimize", model, "-o", "out.onnx", "--samples", "4", "-q")
    assert done.returncode in allowed, done.stderr
    outputs = set()
    if done.returncode == EXIT_OK:
        # the data file is there exactly when the written model refers to it
        outputs = {"out.onnx"} | ({"out.onnx.data"} if _uses_external_data(sandbox.cwd / "out.onnx") else set())
        checked = sandbox.graphopt("verify", model, "out.onnx", "--samples", "4", "-q")
        assert checked.returncode == EXIT_OK, checked.stderr
    inspected = sandbox.graphopt("inspect", model, "--json")
    assert inspected.returncode in allowed, inspected.stderr
    assert sandbox.left() == {"cwd": outputs, "tmp": set(), "home": set()}
    assert _digest(model) == before


def _tiny_model(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    model = make_model(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["m"]), onnx.helper.make_node("Add", ["m", "b"], ["y"])],
        [tensor("x", ["N", 16])], [tensor("y", ["N", 4])],
        [init("w", rng.standard_normal((16, 4)).astype(np.float32)), init("b", np.ones(4, np.float32))])
    path = folder / "tiny.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return _tiny_model(folder)


def test_bad_input_leaves_nothing(sandbox, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    done = sandbox.graphopt("optimize", junk, "-o", "out.onnx")
    assert done.returncode == EXIT_BAD_INPUT and done.stderr.startswith("graphopt: error:")
    assert sandbox.left() == {"cwd": set(), "tmp": set(), "home": set()}


def test_a_failing_verdict_writes_no_output(sandbox):
    # A zero tolerance fails any float difference; fold_batchnorm on the zoo's ResNet makes some.
    model = ROOT / "models" / "resnet.onnx"
    if not model.exists():
        pytest.skip("zoo model not generated")
    done = sandbox.graphopt("optimize", model, "-o", "out.onnx", "--samples", "4", "--rel-tol", "0", "--abs-tol",
                            "0", "-q")
    assert done.returncode == EXIT_FAILED, done.stderr
    assert sandbox.left() == {"cwd": set(), "tmp": set(), "home": set()}


# A pass that makes a scratch file the way a library that dies mid-write would leave it (its block never
# exits), then misbehaves as the test asks: raises, or says so and waits for a signal.
DRIVER = textwrap.dedent("""
    import sys, time
    from graphopt.app import cli
    from graphopt.core import scratch
    from graphopt.core.manager import Pass, PassResult, register

    @register
    class Misbehave(Pass):
        name = "test_misbehave"
        summary = "test only"

        def run(self, model, ctx):
            self.block = scratch.directory("partial")
            (self.block.__enter__() / "model.onnx.data").write_bytes(b"x" * 4096)
            if MODE == "raise":
                raise RuntimeError("a bug inside a pass")
            print("ready", flush=True)
            time.sleep(120)
            return PassResult(False)
""")


def test_an_exception_inside_a_pass_leaves_nothing(sandbox, tiny):
    before = _digest(tiny)
    proc = sandbox.driver("MODE = 'raise'\n" + DRIVER, "optimize", tiny, "-o", "out.onnx", "--passes",
                          "dead_code,test_misbehave")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERNAL and "a bug inside a pass" in err, err
    assert sandbox.left() == {"cwd": set(), "tmp": set(), "home": set()}
    assert _digest(tiny) == before


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, 128 + signal.SIGTERM)],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_in_the_middle_of_a_run_leaves_nothing(sandbox, tiny, signum, code):
    before = _digest(tiny)
    proc = sandbox.driver("MODE = 'wait'\n" + DRIVER, "optimize", tiny, "-o", "out.onnx", "--passes",
                          "dead_code,test_misbehave")
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        assert any(sandbox.tmp.iterdir())  # the run's scratch directory exists now
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert sandbox.left() == {"cwd": set(), "tmp": set(), "home": set()}
    assert _digest(tiny) == before
