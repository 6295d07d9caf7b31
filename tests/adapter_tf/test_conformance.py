"""The conformance vectors pass with TensorFlow arrays (the core's runner)."""

import os
import subprocess
import sys


def test_conformance_vectors_pass_on_tensorflow():
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-m", "cabs_conformance", "--backend", "tensorflow"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert " 0 failed" in out.stdout and "FAIL " not in out.stdout
