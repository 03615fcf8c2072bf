"""The operator's settings: a config file, the client-option rules, and bad settings as one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from guardrail.errors import OptionsError
from guardrail.serve.config import client_rules, make_config, read_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_config_file_sets_limits_rules_and_detail_and_flags_win(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("detail: none\nqueue_size: 3\nclient_options: {threshold: any}\n"
                    "limits: {max_messages: 8, max_chars: 500}\ndefaults: {max_tokens: 64}\n")
    config = make_config(read_settings(str(path)) | {"queue_size": 5})
    assert config.detail == "none" and config.queue_size == 5
    assert config.limits.max_messages == 8 and config.limits.max_chars == 500 and config.limits.max_stop == 4
    assert config.client_options["threshold"] == "any" and config.client_options["policy"] == "stricter"
    assert config.client_options["schedule"] == "none" and config.defaults == {"max_tokens": 64}


def test_client_rules():
    assert client_rules(None) == client_rules("stricter")
    assert set(client_rules("any").values()) == {"any"} and set(client_rules("none").values()) == {"none"}
    assert client_rules("schedule=any, tau=none")["schedule"] == "any"
    for bad in ("treshold=any", "policy=sometimes"):
        with pytest.raises(OptionsError):
            client_rules(bad)


@pytest.mark.parametrize("settings, match", [
    ({"detial": "full"}, "unknown server setting"),
    ({"detail": "everything"}, "detail must be one of"),
    ({"limits": {"max_mesages": 3}}, "unknown limit"),
    ({"limits": {"max_messages": 0}}, "at least 1"),
    ({"defaults": {"policy": "monitor"}}, "unknown server defaults"),
    ({"queue_timeout_s": 0}, "timeouts positive"),
])
def test_bad_settings_are_one_line_errors(settings, match):
    with pytest.raises(OptionsError, match=match) as info:
        make_config(settings)
    assert "\n" not in str(info.value)


def test_the_serve_command_refuses_a_bad_config_in_one_line_before_loading_a_model(tmp_path):
    for text, match in (("limits: [1, 2]\n", "limits must be a mapping"), ("detail: [\n", "not valid YAML"),
                        ("- a list\n", "must be a mapping")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        result = subprocess.run([sys.executable, "-m", "cli", "serve", "--config", str(path)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.startswith("error: ") and match in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
