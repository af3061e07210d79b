"""The egress policy: allowlist entries, wildcards, ports and address classes."""

from __future__ import annotations

import ipaddress

import pytest

from fission.errors import InvalidInput
from fission.net.policy import NetworkPolicy, address_class, parse_rule


def test_default_policy_is_off() -> None:
    policy = NetworkPolicy()
    assert not policy.enabled and policy.value == "none"
    assert not policy.allows_name("example.com", 443)


@pytest.mark.parametrize(
    ("entry", "host", "ports"),
    [
        ("api.example.com", "api.example.com", (80, 443)),
        ("API.Example.COM.", "api.example.com", (80, 443)),
        ("api.example.com:8443", "api.example.com", (8443,)),
        ("*.example.com", "*.example.com", (80, 443)),
        ("127.0.0.1:8000", "127.0.0.1", (8000,)),
        ("[::1]:8080", "::1", (8080,)),
        ("::1", "::1", (80, 443)),
    ],
)
def test_rules_parse(entry: str, host: str, ports: tuple[int, ...]) -> None:
    rule = parse_rule(entry)
    assert (rule.host, rule.ports) == (host, ports)


@pytest.mark.parametrize(
    "entry", ["", "a..b", "*", "*.", "a.*.com", "host:0", "host:65536", "host:x", "[::1]x", "a b"]
)
def test_bad_rules_are_refused(entry: str) -> None:
    with pytest.raises(InvalidInput):
        parse_rule(entry)


def test_wildcards_match_subdomains_only() -> None:
    policy = NetworkPolicy.allowing(["*.example.com"])
    assert policy.allows_name("a.example.com", 443)
    assert policy.allows_name("a.b.example.com", 80)
    assert not policy.allows_name("example.com", 443)
    assert not policy.allows_name("badexample.com", 443)
    assert not policy.allows_name("a.example.com.evil.org", 443)


def test_ports() -> None:
    policy = NetworkPolicy.allowing(["api.example.com", "files.example.com:8080"])
    assert policy.allows_name("api.example.com", 443)
    assert not policy.allows_name("api.example.com", 22)
    assert policy.allows_name("files.example.com", 8080)
    assert not policy.allows_name("files.example.com", 443)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("fd00::1", "private"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_classes(address: str, kind: str | None) -> None:
    assert address_class(ipaddress.ip_address(address)) == kind


def test_private_addresses_need_a_literal_entry() -> None:
    by_name = NetworkPolicy.allowing(["localhost:8000"])
    loopback = ipaddress.ip_address("127.0.0.1")
    assert by_name.allows_name("localhost", 8000)
    assert not by_name.allows_address(loopback, 8000)
    literal = NetworkPolicy.allowing(["127.0.0.1:8000"])
    assert literal.allows_address(loopback, 8000)
    assert literal.allows_address(ipaddress.ip_address("::ffff:127.0.0.1"), 8000)
    assert not literal.allows_address(loopback, 8001)
    assert not literal.allows_address(ipaddress.ip_address("169.254.169.254"), 80)
    assert by_name.allows_address(ipaddress.ip_address("93.184.216.34"), 8000)


def test_hosts_need_network() -> None:
    with pytest.raises(InvalidInput, match="--network"):
        NetworkPolicy(False, (parse_rule("a.com"),))


def test_json_round_trip() -> None:
    policy = NetworkPolicy.allowing(["a.com", "127.0.0.1:9", "*.b.org:8443"], max_connections=4)
    again = NetworkPolicy.from_json(policy.to_json())
    assert again == policy
    assert NetworkPolicy.from_json("none") == NetworkPolicy()
    assert NetworkPolicy.from_json(None) == NetworkPolicy()
    with pytest.raises(InvalidInput):
        NetworkPolicy.from_json("open")
    with pytest.raises(InvalidInput):
        NetworkPolicy.from_json({"allow_hosts": "a.com"})


def test_disabled_policy_with_hosts_is_refused() -> None:
    with pytest.raises(InvalidInput):
        NetworkPolicy.from_json({"enabled": False, "allow_hosts": ["a.com"]})
    assert NetworkPolicy.from_json({"enabled": False}) == NetworkPolicy()


def test_proxy_env_only_with_network() -> None:
    from fission.net.egress import PROXY_URL, proxy_env

    assert proxy_env(NetworkPolicy()) == {}
    env = proxy_env(NetworkPolicy.allowing(["a.com"]), "http://127.0.0.1:1/simple/")
    assert env["HTTPS_PROXY"] == env["http_proxy"] == env["ALL_PROXY"] == PROXY_URL
    assert env["NO_PROXY"] == ""
    assert (env["GIT_CONFIG_KEY_0"], env["GIT_CONFIG_VALUE_0"]) == ("http.proxy", PROXY_URL)
    assert env["PIP_INDEX_URL"] == "http://127.0.0.1:1/simple/"


def test_cli_allow_host_needs_network() -> None:
    from fission.cli.run import network_policy

    with pytest.raises(InvalidInput, match="--network"):
        network_policy(False, ["a.com"])
    assert network_policy(True, ["a.com:8080"]).allows_name("a.com", 8080)
    assert not network_policy(False, None).enabled
