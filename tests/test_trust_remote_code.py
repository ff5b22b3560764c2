"""Whether a model's own code runs is decided by --trust_remote_code alone: --model_kwargs may repeat the
value but a contradiction is an error (it used to override --trust_remote_code false silently)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.model.loader import get_model_tokenizer, resolve_trust_remote_code


def test_model_kwargs_may_repeat_but_not_contradict():
    assert resolve_trust_remote_code(False, {"revision": "x"}) == (False, {"revision": "x"})
    assert resolve_trust_remote_code(True, {"trust_remote_code": True, "a": 1}) == (True, {"a": 1})
    assert resolve_trust_remote_code(False, {"trust_remote_code": False}) == (False, {})
    with pytest.raises(ValueError, match="--model_kwargs sets trust_remote_code=True but --trust_remote_code "
                                         "is false"):
        resolve_trust_remote_code(False, {"trust_remote_code": True})
    with pytest.raises(ValueError, match="trust_remote_code='yes'"):
        resolve_trust_remote_code(True, {"trust_remote_code": "yes"})


def test_the_conflict_stops_loading_and_the_cli_says_why(tmp_path):
    with pytest.raises(ValueError, match="--trust_remote_code only"):
        get_model_tokenizer("builtin:tiny", model_kwargs={"trust_remote_code": True}, load_model=False)
    data = tmp_path / "q.jsonl"
    data.write_text('{"query": "hi"}\n')
    out = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "infer", "--model", "builtin:tiny",
                          "--model_kwargs", '{"trust_remote_code": true}', "--val_dataset", str(data),
                          "--result_path", str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--model_kwargs sets trust_remote_code=True but --trust_remote_code is false" in out.stderr
