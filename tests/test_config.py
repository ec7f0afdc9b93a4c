import subprocess
import sys

import pytest

from pubsub_cmdb.config import ConfigError, load_settings

from .services import ROOT


def test_defaults_on_the_emulator(tmp_path):
    settings = load_settings({"PUBSUB_EMULATOR_HOST": "127.0.0.1:8085",
                              "CMDB_DATABASE": str(tmp_path / "c.sqlite")})
    assert settings.on_emulator
    assert (settings.gcp_project, settings.port, settings.server_address) == (
        "local-project", 5000, "http://localhost:5000")
    assert settings.customers == ("Customer 1", "Customer 2", "Customer 3")
    assert settings.topic_name and settings.subscription_name


@pytest.mark.parametrize("env, broker", [
    ({}, "embedded"),
    ({"GCP_PROJECT": "my-project"}, "embedded"),  # no credentials: said at start, BROKER=gcp forces it
    ({"PUBSUB_EMULATOR_HOST": "127.0.0.1:8085"}, "emulator"),
    ({"PUBSUB_EMULATOR_HOST": "127.0.0.1:8085", "BROKER": "embedded"}, "embedded"),
    ({"GCP_PROJECT": "my-project", "BROKER": "gcp"}, "gcp"),
    ({"GCP_PROJECT": "my-project", "GOOGLE_APPLICATION_CREDENTIALS": __file__}, "gcp"),
])
def test_broker_choice(tmp_path, env, broker, monkeypatch):
    monkeypatch.setattr("pubsub_cmdb.config.ADC_FILE", tmp_path / "no-adc.json")
    settings = load_settings(dict(env, CMDB_DATABASE=str(tmp_path / "c.sqlite")))
    assert settings.broker == broker
    assert settings.broker_reason
    assert settings.pubsub_database == str(tmp_path / "pubsub.sqlite")


def test_generated_secret_is_kept_per_instance(tmp_path):
    env = {"PUBSUB_EMULATOR_HOST": "127.0.0.1:8085", "CMDB_DATABASE": str(tmp_path / "c.sqlite")}
    first, second = load_settings(env), load_settings(env)
    assert first.secret_generated and len(first.secret) >= 32
    assert first.secret == second.secret
    other = load_settings(dict(env, CMDB_DATABASE=str(tmp_path / "sub" / ".." / "c.sqlite")))
    assert other.secret == first.secret
    assert load_settings(dict(env, SECRET="given")).secret == "given"


def test_retry_backoff_defaults_to_10_s_up_to_10_min(tmp_path):
    env = {"PUBSUB_EMULATOR_HOST": "h:1", "CMDB_DATABASE": str(tmp_path / "c.sqlite")}
    assert load_settings(env).retry_backoff == (10, 600)
    assert load_settings(dict(env, RETRY_MIN_BACKOFF="0", RETRY_MAX_BACKOFF="0")).retry_backoff == (0, 0)


def test_customers_are_split_and_trimmed(tmp_path):
    settings = load_settings({"PUBSUB_EMULATOR_HOST": "h:1", "CUSTOMERS": " acme , globex,,acme",
                              "CMDB_DATABASE": str(tmp_path / "c.sqlite")})
    assert settings.customers == ("acme", "globex")


@pytest.mark.parametrize("env, words", [
    ({"BROKER": "kafka"}, "BROKER"),
    ({"BROKER": "emulator"}, "PUBSUB_EMULATOR_HOST"),
    ({"BROKER": "gcp"}, "GCP_PROJECT"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "MAX_DELIVERY_ATTEMPTS": "3"}, "MAX_DELIVERY_ATTEMPTS"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "DEAD_LETTER_TOPIC": "x"}, "DEAD_LETTER_TOPIC"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "RETRY_MIN_BACKOFF": "-1"}, "RETRY_MIN_BACKOFF"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "RETRY_MAX_BACKOFF": "601"}, "RETRY_MAX_BACKOFF"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "RETRY_MIN_BACKOFF": "20", "RETRY_MAX_BACKOFF": "10"}, "RETRY_MIN_BACKOFF"),
    ({"HOST": "0.0.0.0"}, "CMDB_API_TOKEN"),
    ({"HOST": "192.0.2.10"}, "CMDB_API_TOKEN"),
    ({"PUBSUB_EMULATOR_HOST": "nonsense"}, "PUBSUB_EMULATOR_HOST"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "PORT": "http"}, "PORT"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "PORT": "70000"}, "PORT"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "TOPIC_NAME": "a b"}, "TOPIC_NAME"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "SUBSCRIPTION_NAME": "goog-x"}, "SUBSCRIPTION_NAME"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "SERVER_ADDRESS": "localhost:5000"}, "SERVER_ADDRESS"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "GCP_PROJECT": "My Project"}, "GCP_PROJECT"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "CUSTOMERS": " , "}, "CUSTOMERS"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "GOOGLE_APPLICATION_CREDENTIALS": "/no/such.json"},
     "GOOGLE_APPLICATION_CREDENTIALS"),
    ({"PUBSUB_EMULATOR_HOST": "h:1", "CMDB_DATABASE": "/no/such/dir/c.sqlite"}, "CMDB_DATABASE"),
])
def test_bad_setting_is_one_clear_error(tmp_path, env, words):
    env.setdefault("CMDB_DATABASE", str(tmp_path / "c.sqlite"))
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert words in str(caught.value)


@pytest.mark.parametrize("script", ["main.py", "subscriber.py"])
def test_entry_points_exit_2_with_one_line_and_no_traceback(tmp_path, script):
    env = {"PATH": "/usr/bin:/bin", "PUBSUB_EMULATOR_HOST": "127.0.0.1:8085", "PORT": "not-a-port",
           "CMDB_DATABASE": str(tmp_path / "c.sqlite")}
    result = subprocess.run([sys.executable, script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"{script}: configuration error: PORT='not-a-port' is not a "
                                                  "port number (1-65535)"]
    assert "Traceback" not in result.stderr


def test_dotenv_file_is_read_and_environment_wins(tmp_path):
    (tmp_path / ".env").write_text("PORT=not-from-env-file\nPUBSUB_EMULATOR_HOST=127.0.0.1:8085\n")
    env = {"PATH": "/usr/bin:/bin", "CMDB_DATABASE": str(tmp_path / "c.sqlite"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "PORT='not-from-env-file'" in result.stderr
    env["PORT"] = "bad-from-env"
    result = subprocess.run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert "PORT='bad-from-env'" in result.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token(tmp_path, host):
    assert load_settings({"HOST": host, "CMDB_DATABASE": str(tmp_path / "c.sqlite")}).api_token is None


def test_beyond_loopback_with_a_token(tmp_path):
    settings = load_settings({"HOST": "0.0.0.0", "CMDB_API_TOKEN": "s3cret", "CMDB_DATABASE": str(tmp_path / "c")})
    assert (settings.host, settings.api_token) == ("0.0.0.0", "s3cret")
